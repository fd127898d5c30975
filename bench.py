"""
Memory and speed of one training step of a transformer block stack (or a whole Hugging Face GPT-2), in every mode a
user would choose between:

    plain       standard back-propagation (all activations stored)
    checkpoint  torch.utils.checkpoint around each block (the usual memory saver)
    bdia        BDIA training with stored activations (eqs. 18-21)
    bdia-rev    BDIA with online back-propagation (activations rebuilt by eq. 24)
    revvit      RevViT's two-stream reversible blocks with their own online back-propagation
                (the paper's reversible baseline; vit family only)

Families: vit, the paper's ViT block; gpt, a nanoGPT block (both this project's models.Block, a stack
fed random activations); hf-gpt2, a whole Hugging Face GPT2LMHeadModel (random init, GPT-2 small's
width, SDPA attention, its own loss on random tokens), in the modes as a user gets them: plain;
checkpoint, HF's model.gradient_checkpointing_enable() (use_reentrant False); bdia and bdia-rev, the
one statement model.transformer.h = BDIAStack(model.transformer.h, BDIAConfig(...)). Its activation
memory includes the logits and the loss's (depth-independent); its modes' timed models share one set
of parameters, gradients and AdamW state (three 48-layer ones would not fit 23 GB). Needs transformers.

Memory is measured per mode and depth in a fresh process: on CUDA max_memory_allocated
over one forward and backward, on CPU the peak-RSS rise over them (MALLOC_MMAP_THRESHOLD_=65536,
so freed tensors leave RSS). Both are measured after a warm-up step, so parameters,
gradients and optimizer state are already allocated and the rise is the activations
(plus transient workspace); the optimizer's step is left out, since its temporaries, as
large as the parameters, would set the peak of a small batch in every mode alike. Time: warm-up, then the modes interleaved, medians.

--kernels counts, instead, what each mode adds per block and training step beyond the
block's own computation, on any device: operations (aten ops on a CPU, kernels on CUDA) per
block, from two depths' difference, minus those of the mode without BDIA that runs the block
as often (bdia - plain; bdia-rev and revvit - checkpoint, which both recompute the block once).

--compile times each mode also with each block compiled on its own ("MODE+compile"; block.compile(),
as torchtitan does; RevViT: its F and G), the eager and compiled modes interleaved.

    python bench.py --family gpt --depths 6,12,24,48 --device cpu
    python bench.py --kernels --modes plain,checkpoint,bdia,bdia-rev --dim 64
    python bench.py --compile --modes plain,checkpoint,bdia-rev,revvit --depths 12 --no-memory
    python bench.py --family gpt --tokens 1024 --batch-size 8 --depths 12   # GPT-2 small's blocks
    python bench.py --family hf-gpt2 --modes plain,checkpoint,bdia-rev --depths 12,24,48 --batch-size 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint

from bdia import BDIAConfig, BDIAStack, run_blocks, side_bits
from models import Block, RevBlock, run_rev_blocks
from plumbing import data, runlib

MODES = ("plain", "checkpoint", "bdia", "bdia-rev", "revvit")
FAMILIES = {  # (width, heads, MLP width, tokens, causal)
    "vit": (512, 8, 512, 65, False),  # the paper's ViT on CIFAR: 64 patches + CLS
    "gpt": (768, 12, 3072, 256, True),  # nanoGPT-like
    "hf-gpt2": (768, 12, 3072, 256, True),  # transformers' GPT2LMHeadModel, GPT-2 small's width
}
HF_VOCAB = 50257  # GPT-2's


def build(args, mode, depth):
    """The model of `mode` at `depth`: a block stack, or (hf-gpt2) a whole Hugging Face model."""
    return build_hf_gpt2(args, mode, depth) if args.family == "hf-gpt2" else build_stack(args, mode, depth)


def build_stack(args, mode, depth):
    """The blocks of `mode`; "MODE+compile": each block compiled on its own (RevViT's: F and G)."""
    dim, heads, mlp, _, causal = family(args)
    torch.manual_seed(0)
    if mode.startswith("revvit"):
        blocks = nn.ModuleList(RevBlock(dim, heads, mlp, args.dropout) for _ in range(depth))
    else:
        blocks = nn.ModuleList(Block(dim, heads, mlp, args.dropout, causal=causal, layout="gpt" if causal else "vit")
                               for _ in range(depth))
    for block in blocks if mode.endswith("+compile") else []:
        if isinstance(block, RevBlock):
            block.F, block.G = torch.compile(block.F), torch.compile(block.G)
        else:
            block.compile()
    return blocks


def build_hf_gpt2(args, mode, depth):
    """GPT2LMHeadModel, random init, converted as a user would: HF's own checkpointing, or BDIA's one statement."""
    import transformers  # optional: only this family needs it (main() says so when it is missing)

    transformers.logging.set_verbosity_error()  # not its note that the config's loss_type=None means the default loss
    dim, heads, mlp, tokens, _ = family(args)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=dim, n_head=heads, n_inner=mlp, n_layer=depth, n_positions=max(1024, tokens),
                                     vocab_size=args.vocab_size or HF_VOCAB, resid_pdrop=args.dropout,
                                     embd_pdrop=args.dropout, attn_pdrop=args.dropout, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config)
    if mode == "checkpoint":
        with warnings.catch_warnings():  # transformers 5 calls it a deprecated alias of activation_checkpointing_enable
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode in ("bdia", "bdia-rev"):
        model.transformer.h = BDIAStack(model.transformer.h, BDIAConfig(reversible=mode == "bdia-rev"))
    return model


def family(args):
    dim, heads, mlp, tokens, causal = FAMILIES[args.family]
    return (args.dim or dim, args.heads or heads, args.mlp_dim or (args.dim and 4 * args.dim) or mlp,
            args.tokens or tokens, causal)


def forward(mode, blocks, x):
    mode = mode.removesuffix("+compile")
    if mode == "plain":
        return run_blocks(blocks, x, None)
    if mode == "revvit":
        return torch.cat(run_rev_blocks(blocks, x, x, reversible=True), dim=-1)
    if mode == "checkpoint":
        for block in blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x
    return run_blocks(blocks, x, BDIAConfig(reversible=mode == "bdia-rev"))


def make_step(args, mode, depth, device, shared=None):
    """One training step of a fresh model, and its forward and backward alone. shared: a dict that the first
    call fills with its model and optimizer, whose parameters (and so gradients and AdamW state) later calls use."""
    model = build(args, mode, depth).to(device).train()
    shared = {} if shared is None else shared
    if "model" in shared:
        model.load_state_dict(shared["model"].state_dict(keep_vars=True), assign=True)  # the same Parameters
    else:
        shared.update(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    optimizer = shared["optimizer"]
    _, _, _, tokens, _ = family(args)
    if args.family == "hf-gpt2":
        ids = torch.randint(args.vocab_size or HF_VOCAB, (args.batch_size, tokens), device=device,
                            generator=torch.Generator(device).manual_seed(0))
        loss_of = lambda: model(ids, labels=ids, use_cache=False).loss  # noqa: E731
    else:
        x = torch.randn(args.batch_size, tokens, family(args)[0], device=device)
        loss_of = lambda: forward(mode, model, x).float().square().mean()  # noqa: E731

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = loss_of()
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated between steps

    return step, forward_backward


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# Operations per block and step: a device-independent measure of BDIA's arithmetic

VIEWS = {"aten::" + op for op in (
    "view empty empty_like empty_strided as_strided slice select unsqueeze squeeze t transpose permute expand "
    "expand_as detach alias lift_fresh reshape _reshape_alias _unsafe_view contiguous unbind split chunk narrow "
    "flatten unflatten view_as item _local_scalar_dense is_nonzero resolve_conj resolve_neg "
    "requires_grad_ result_type").split()}  # no arithmetic: metadata, views, host reads
BASELINE = {"bdia": "plain", "bdia-rev": "checkpoint", "revvit": "checkpoint"}


def operations(args, mode, depth, device):
    """Operations of one training step: top-level aten ops (not views) on a CPU, kernels on CUDA."""
    if device.type == "cpu":  # kineto, the profiler's backend, logs each start and stop ("USDT: ...") and, in a
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # CUDA build without a GPU, an error; 6 is above its levels
    step, _ = make_step(args, mode, depth, device)
    step()  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    if device.type == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    top = (e for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEWS
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    return sum(1 for _ in top)


def count_kernels(args, device):
    """Per mode: operations per block and step, and those beyond the block's own computation."""
    shallow, deep = 2, 4
    per_block = {m: (operations(args, m, deep, device) - operations(args, m, shallow, device)) / (deep - shallow)
                 for m in args.modes}
    rows = []
    for mode in args.modes:
        base = BASELINE.get(mode)
        added = per_block[mode] - per_block[base] if base in per_block else None
        rows.append(dict(mode=mode, per_block=per_block[mode], baseline=base, added=added))
    unit = "kernels (CUDA profiler)" if device.type == "cuda" else "aten ops (CPU profiler)"
    print(f"\n{args.family} stack, {device_name(device)}: {unit} per block and training step")
    print(f"{'mode':>11} {'per block':>10} {'baseline':>11} {'added':>6}")
    for r in rows:
        added = "-" if r["added"] is None else f"{r['added']:g}"
        print(f"{r['mode']:>11} {r['per_block']:>10g} {r['baseline'] or '-':>11} {added:>6}")
    return rows


# -----------------------------------------------------------------------------
# Memory, in a fresh process per (mode, depth)


def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure_memory(args, mode, depth):
    """Bytes one training step's forward and backward allocate beyond what the step before
    left in place (parameters, gradients, optimizer state): the activations."""
    device = torch.device(args.device)
    step, forward_backward = make_step(args, mode, depth, device)
    step()  # warm-up: gradients and optimizer state now exist
    sync(device)
    # Forward and backward only: AdamW's step allocates temporaries as large as the
    # parameters, which would otherwise set the peak of a small batch in every mode alike.
    if device.type == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = rss_kb("VmRSS")
    forward_backward()
    return (rss_kb("VmHWM") - before) * 1024


class MemoryRunFailed(Exception):
    """A memory measurement's own process failed; the message says why and what to try."""


def memory_in_fresh_process(args, mode, depth):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    argv = [sys.executable, os.path.abspath(__file__), "--measure-memory", mode, str(depth)]
    argv += [a for a in sys.argv[1:] if a not in ("--measure-memory",)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise MemoryRunFailed(f"the memory run of {mode} at depth {depth} failed ({last}); try a smaller "
                                      "--batch-size or --depths, or --no-memory")
    return int(out.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# Time, modes interleaved in one process


def measure_times(args, depth, device):
    shared = {} if args.family == "hf-gpt2" else None  # one set of weights and AdamW state for every mode
    steps = {mode: make_step(args, mode, depth, device, shared)[0] for mode in args.modes}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {mode: [] for mode in args.modes}
    for _ in range(args.steps):
        for mode, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(t) for mode, t in times.items()}


def state_bytes(args, mode, depth):
    """Parameters, gradients and AdamW's two moments: 4 float32 copies of the weights."""
    with torch.device("meta"):  # counted, not allocated
        return 4 * 4 * sum(p.numel() for p in build(args, mode, depth).parameters())


def side_info_bytes(args, depth):
    """Bytes of packed side information bdia-rev keeps per step: m bits per element, K-1 blocks."""
    dim, _, _, tokens, _ = family(args)
    per_block = side_bits(BDIAConfig().gammas) * -(-args.batch_size * tokens * dim // 8)
    return (depth - 1) * per_block


def main():
    p = runlib.ArgumentParser(description=__doc__)  # runlib's --help: the docstring's layout, and the defaults
    p.add_argument("--family", choices=FAMILIES, default="vit", help="vit: the paper's ViT block (512 wide, 65 tokens); "
                   "gpt: a nanoGPT block (768 wide, 256 tokens, causal); hf-gpt2: a Hugging Face GPT2LMHeadModel "
                   "(768 wide, 256 tokens; needs transformers)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)} "
                   "(revvit: vit family)")
    p.add_argument("--depths", default="6,12,24,48", help="comma-separated numbers of blocks")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--dim", type=int, default=None, help="override the family's width (MLP becomes 4x)")
    p.add_argument("--heads", type=int, default=None, help="override the family's attention heads")
    p.add_argument("--mlp-dim", type=int, default=None, help="override the family's MLP width")
    p.add_argument("--tokens", type=int, default=None, help="override the family's tokens per sequence "
                   "(GPT-2 small: --family gpt --tokens 1024)")
    p.add_argument("--vocab-size", type=int, default=None, help=f"hf-gpt2's vocabulary (GPT-2's: {HF_VOCAB})")
    p.add_argument("--dropout", type=float, default=0.0, help="in every block (CPU dropout is slow: 0 compares engines)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda where available")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in the blocks")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    p.add_argument("--kernels", action="store_true", help="count the operations BDIA adds per block and step, "
                   "instead of timing and memory")
    p.add_argument("--compile", action="store_true", help="also time each mode with each block compiled "
                   "(MODE+compile), interleaved with the eager modes")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--measure-memory", nargs=2, metavar=("MODE", "DEPTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.modes = args.modes.split(",")
    if args.family != "vit" and "revvit" in args.modes:
        args.modes.remove("revvit")  # RevViT is the ViT family's baseline
    if args.family == "hf-gpt2":
        try:
            import transformers  # noqa: F401
        except ImportError:
            p.error("--family hf-gpt2 needs transformers (pip install transformers), an optional dependency")
        if args.compile:
            p.error("--compile compiles this project's blocks; --family hf-gpt2 is not measured compiled")
    elif args.vocab_size is not None:
        p.error("--vocab-size is hf-gpt2's; the block-stack families have no vocabulary")
    if bad := [m for m in args.modes if m not in MODES]:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if args.compile and args.kernels:
        p.error("--kernels counts the operations of eager code; drop --compile")
    if args.compile and not args.measure_memory:
        args.modes += [m + "+compile" for m in args.modes]
    if not args.modes:
        p.error(f"--modes revvit is the vit family's baseline: with --family {args.family} no mode is left to run")
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        p.error(f"--depths takes comma-separated integers, got {args.depths!r}")
    if min(depths) < 1:
        p.error(f"--depths must be at least 1, got {args.depths!r}")
    for name in ("batch_size", "steps", "dim", "heads", "mlp_dim", "tokens", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must not be negative, got {args.warmup}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if family(args)[0] % family(args)[1]:
        p.error(f"the width {family(args)[0]} must be divisible by the heads {family(args)[1]}: set --dim or --heads")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: no such folder")
    try:  # a failed memory run, CUDA out of memory: one line, exit 2
        if args.measure_memory:
            mode, depth = args.measure_memory
            print(measure_memory(args, mode, int(depth)))
        elif args.kernels:
            rows = count_kernels(args, torch.device(args.device))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"config": vars(args), "device": device_name(torch.device(args.device)), "kernels": rows},
                              f, indent=2)
        else:
            run(args, depths)
    except (MemoryRunFailed, *runlib.ERRORS) as e:
        runlib.exit_with(e, "bench.py")

def run(args, depths):
    from tqdm import tqdm

    device = torch.device(args.device)
    config = {k: v for k, v in vars(args).items() if k != "measure_memory"}
    results = []
    for depth in tqdm(depths, desc="depths"):
        results += measure_depth(args, depth, device)
        if args.json:  # after each depth, atomically: a run cut short keeps what it measured
            table = {"config": config, "device": device_name(device), "results": results,
                     "activation_mb_per_layer": slopes(results)}
            data.atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=2)))
    print_table(args, results)


def measure_depth(args, depth, device):
    """Every mode's row at one depth: time (modes interleaved), memory (a fresh process each), ratios to plain."""
    times = measure_times(args, depth, device)
    rows = []
    for mode in args.modes:
        mem = None if args.no_memory else memory_in_fresh_process(args, mode, depth)
        row = dict(mode=mode, depth=depth, step_ms=1e3 * times[mode], activation_mb=mem and mem / 2**20,
                   state_mb=state_bytes(args, mode, depth) / 2**20)
        if mode.startswith("bdia-rev"):
            row["side_info_mb"] = side_info_bytes(args, depth) / 2**20
            row["side_info_share"] = mem and side_info_bytes(args, depth) / mem
        rows.append(row)
    plain = next((r for r in rows if r["mode"] == "plain"), None)
    for row in rows:
        row["time_vs_plain"] = plain and row["step_ms"] / plain["step_ms"]
        row["memory_vs_plain"] = plain and row["activation_mb"] and row["activation_mb"] / plain["activation_mb"]
    return rows


def slopes(results):
    """Per mode, the activation memory's slope in depth (MB per layer, least squares over the depths measured)."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        points = [(r["depth"], r["activation_mb"]) for r in results if r["mode"] == mode and r["activation_mb"]]
        if len({d for d, _ in points}) >= 2:
            d0, m0 = statistics.fmean(d for d, _ in points), statistics.fmean(m for _, m in points)
            out[mode] = sum((d - d0) * (m - m0) for d, m in points) / sum((d - d0) ** 2 for d, _ in points)
    return out


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(args, results):
    dim, heads, mlp, tokens, _ = family(args)
    what = (f"hf-gpt2 model (GPT2LMHeadModel, vocabulary {args.vocab_size or HF_VOCAB}, SDPA)" if args.family == "hf-gpt2"
            else f"{args.family} stack")
    print(f"\n{what}: width {dim}, {heads} heads, MLP {mlp}, {tokens} tokens, batch {args.batch_size}, "
          f"dropout {args.dropout}, {device_name(torch.device(args.device))}")
    print("act. MB: what a training step's forward and backward allocate beyond the parameters, gradients and optimizer state (state MB)")
    print(f"{'mode':>16} {'depth':>5} {'state MB':>9} {'act. MB':>9} {'x plain':>8} {'step ms':>9} {'x plain':>8} "
          f"{'side MB':>8} {'side %':>7}")

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))

    for r in results:
        share = r.get("side_info_share")
        print(f"{r['mode']:>16} {r['depth']:>5} {r['state_mb']:9.1f} {fmt(r['activation_mb'], '9.1f')} "
              f"{fmt(r['memory_vs_plain'], '8.2f')} {r['step_ms']:9.1f} {fmt(r['time_vs_plain'], '8.2f')} "
              f"{fmt(r.get('side_info_mb'), '8.2f')} {fmt(share and 100 * share, '7.1f')}")
    if per_layer := slopes(results):
        print("act. MB per layer (slope in depth, least squares): "
              + ", ".join(f"{mode} {mb:.2f}" for mode, mb in per_layer.items()))


if __name__ == "__main__":
    main()
