"""Would fusing (21) and (24) pay? Times a training step of bench.py's ViT block stack with each block
compiled, in three ways interleaved: plain, reversible BDIA as bdia.py is, and reversible BDIA with
(21) and (24) compiled in the one way issue 37 allows for exactness:

    the mixed term Q_l[(1 - gamma) x + (1 + gamma) h] compiled alone and called by both (21) and (24)
    (the one rounding of the step: the very same kernel in both directions), and the rest of each
    equation compiled around it (exact on the 2^-l grid, so any fusion gives the same bits).

The engine checks every step (each recomputed h_k and the rebuilt x_0): a fusion that rounded
otherwise in the two directions would stop this script with a ReconstructionError. Nothing here
changes bdia.py; the fused functions replace bdia.bdia_step and bdia.bdia_unstep in this process
only. Run from the repository root:

    python results/gpu-bench/fusion.py                      # the paper's ViT: width 512, depth 6, batch 128
    python results/gpu-bench/fusion.py --device cpu --dim 128 --heads 4 --mlp-dim 128 --depth 24 --batch-size 16
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

import bdia  # noqa: E402
import bench  # noqa: E402

ENGINE = bdia.bdia_step, bdia.bdia_unstep
MIXED = torch.compile(bdia.mixed_term)  # one compiled function: the same kernel in (21) and in (24)


@torch.compile
def rest_of_21(x_prev, mixed, gamma, bits, side):
    return gamma * (x_prev + side * 2.0**-bits) + mixed  # (21) around its mixed term: exact on the grid


@torch.compile
def rest_of_24(x_next, mixed, gamma, bits, side):
    return (x_next - mixed) / gamma - side * 2.0**-bits  # (24) around its mixed term: exact on the grid


def fused_step(x_prev, x, h, gamma, bits, side):  # reversible training only: bits and side information given
    return rest_of_21(x_prev.detach(), MIXED(x.detach(), h, gamma, bits), gamma, bits, side)  # detached: one compile


def fused_unstep(x_next, x, h, gamma, bits, side):
    return rest_of_24(x_next, MIXED(x.detach(), h, gamma, bits), gamma, bits, side)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp-dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device)
    stack = argparse.Namespace(family="vit", dim=args.dim, heads=args.heads, mlp_dim=args.mlp_dim, tokens=None,
                               dropout=0.0, batch_size=args.batch_size, amp=False)
    ways = {"plain+compile": ("plain+compile", ENGINE), "bdia-rev+compile": ("bdia-rev+compile", ENGINE),
            "bdia-rev+compile, (21)/(24) fused": ("bdia-rev+compile", (fused_step, fused_unstep))}
    steps = {name: bench.make_step(stack, mode, args.depth, device)[0] for name, (mode, _) in ways.items()}
    times = {name: [] for name in ways}
    for i in range(3 + args.steps):  # 3 untimed: compiling
        for name, (_, (step, unstep)) in ways.items():
            bdia.bdia_step, bdia.bdia_unstep = step, unstep  # what the engine calls for (21) and (24)
            bench.sync(device)
            t0 = time.perf_counter()
            steps[name]()
            bench.sync(device)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    bdia.bdia_step, bdia.bdia_unstep = ENGINE
    print(f"ViT block stack: width {args.dim}, {args.heads} heads, MLP {args.mlp_dim}, depth {args.depth}, "
          f"batch {args.batch_size}, {bench.device_name(device)}; median of {args.steps} steps, interleaved")
    plain = statistics.median(times["plain+compile"])
    for name, t in times.items():
        print(f"{name:>36} {1e3 * statistics.median(t):9.2f} ms {statistics.median(t) / plain:6.2f}x plain")


if __name__ == "__main__":
    main()
