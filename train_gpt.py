"""
Language modelling with GPT and BDIA-GPT in nanoGPT style (paper Appendix F).

    python train_gpt.py --dataset shakespeare_char --n-layer 6 --n-head 6 --n-embd 384 --block-size 256
    python train_gpt.py --dataset shakespeare_char ... --bdia           # BDIA-GPT, reversible
    python train_gpt.py --text-file book.txt --bdia                   # char-level on any text
    python train_gpt.py --data-dir data/openwebtext --train-fraction 0.0005 --bdia   # Appendix F
    torchrun --nproc_per_node=2 train_gpt.py --dataset shakespeare_char --bdia       # DDP
    torchrun --nproc_per_node=2 train_gpt.py --dataset shakespeare_char --bdia --fsdp   # FSDP2
    python train_gpt.py --out-dir out/gpt --sample 3                  # samples from a checkpoint
    python train_gpt.py --out-dir out/gpt --resume --eval-gammas -0.5 0 0.5   # Fig. 1 of a finished run

The defaults are GPT-2 124M (12 x 768, 1024 tokens): too large for a CPU. A small run that
finishes on a CPU in under a minute, its validation loss falling from 4.3 to about 2.8 (timed on
one quiet 2-core CPU; a busy one takes several times longer, and --compile adds minutes):

    python train_gpt.py --text-file /usr/share/common-licenses/GPL-3 --n-layer 2 --n-head 2 --n-embd 64 \\
        --block-size 64 --batch-size 8 --max-iters 200 --eval-interval 100 --eval-iters 5 --out-dir out/gpt-small

A data directory holds nanoGPT-style train.bin / val.bin (uint16 token ids) and, for
character vocabularies, meta.json or meta.pkl. OUT_DIR/log.jsonl gets a line per
evaluation (iteration N: the losses before step N, and lr, the rate step N trains with, as
nanoGPT's); OUT_DIR/ckpt.pt is written atomically after each; --resume continues exactly.
Under torchrun N processes train as one with N times --batch-size: with DDP each holds the
whole model, with --fsdp 1/N of its parameters, gradients and optimizer state. The checkpoint
is the unsharded model's either way: it resumes with or without --fsdp, on any number of
processes (the same run exactly on the same number).
"""

import argparse
import contextlib
import gc
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

from bdia import BDIAConfig
from models import GPT, constant_gamma
from plumbing import data, runlib
from plumbing.distributed import distributed, shard_model, unsharded_states

SCRIPT = Path(__file__).name

# -----------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    p = runlib.ArgumentParser(prog=SCRIPT, description=__doc__)
    g = p.add_argument_group("model (defaults: GPT-2 124M)")
    for name, default, meaning in (("--n-layer", 12, "blocks"),
                                   ("--n-head", 12, "attention heads"),
                                   ("--n-embd", 768, "width of the residual stream"),
                                   ("--block-size", 1024, "context length in tokens")):
        g.add_argument(name, type=int, default=default, help=meaning)
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the blocks")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False,
                   help="biases in the Linear layers and LayerNorms (none, as nanoGPT's train.py)")
    g = p.add_argument_group("data")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=["shakespeare_char"], default=None, help="download and prepare it")
    source.add_argument("--data-dir", default=None, help="a folder with train.bin, val.bin (and meta.json/meta.pkl)")
    source.add_argument("--text-file", default=None, help="train char-level on this text (90/10 split)")
    g.add_argument("--data-root", default="data", help="where --dataset is downloaded and prepared")
    g.add_argument("--train-fraction", type=float, default=1.0, help="keep only this leading fraction of the training tokens")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=12, help="sequences per process per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step, summed over processes")
    g.add_argument("--max-iters", type=int, default=5000, help="optimizer steps")
    g.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=6e-5, help="the cosine's floor")
    g.add_argument("--warmup-iters", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="on the 2-D weights only")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: none)")
    g.add_argument("--eval-interval", type=int, default=250, help="evaluate, log and checkpoint every N steps")
    g.add_argument("--eval-iters", type=int, default=50, help="batches per split and evaluation")
    g.add_argument("--eval-gammas", nargs="+", type=float, default=None, metavar="G",
                   help="after training (or of a finished run, with --resume): the validation loss with each "
                        "constant gamma at inference (paper Fig. 1), into OUT_DIR/gamma_sweep.json")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample", type=int, default=0, metavar="N", help="print N samples from OUT_DIR/ckpt.pt and exit")
    g.add_argument("--sample-tokens", type=int, default=300, help="tokens per sample")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens")
    g = p.add_argument_group("BDIA (bdia.py; what they train: bdia_config below)")
    g.add_argument("--bdia", action="store_true", help="train the GPT with BDIA (otherwise the plain GPT)")
    g.add_argument("--gammas", nargs="+", action=runlib.Numbers, default=(-0.5, 0.5), metavar="G",
                   help="the values gamma_k is drawn from, uniformly, per sequence and block k >= 1")
    g.add_argument("--bits", type=runlib.parse_bits, default=9, help="l: the residual stream is rounded to multiples of "
                   "2^-l (Q_l, eq. 17), or 'none'; gammas of +-2^-m keep m side bits per element and block")
    g.add_argument("--no-reversible", action="store_true", help="store the activations instead of rebuilding them "
                   "in the backward pass (eq. 24)")
    g.add_argument("--eval-gamma", type=float, default=0.0, help="the constant gamma at inference (0: the standard "
                   "GPT, eq. 25)")
    p.add_run_flags(out_dir="out/gpt", fsdp=True)
    args = p.parse(argv, at_least_1=("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                                     "max_iters", "eval_interval", "eval_iters", "top_k"),
                   at_least_0=("warmup_iters", "sample", "min_lr", "weight_decay", "grad_clip", "sample_tokens"),
                   positive=("lr", "temperature"), fractions=("dropout",))
    args.bdia_config = p.checked_config(bdia_config, args)  # None without --bdia; what cannot work: one line, exit 2
    if not args.sample and not (args.dataset or args.data_dir or args.text_file):
        p.error("give the data: --dataset shakespeare_char, --data-dir DIR or --text-file FILE")
    if not 0 < args.train_fraction <= 1:
        p.error("--train-fraction must be in (0, 1]")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    return args


# -----------------------------------------------------------------------------
# Data: random windows of the token files; every process draws the whole global batch


def data_folder(args, prepare):
    """The folder of .bin files, prepared from --text-file or --dataset when `prepare`
    (only the first process prepares; the others wait for it)."""
    if args.text_file:
        folder = Path(args.out_dir) / "data"
        return data.prepare_text_file(args.text_file, folder) if prepare else folder
    if args.dataset:
        return data.shakespeare_dir(args.data_root) if prepare else Path(args.data_root) / "shakespeare_char"
    return Path(args.data_dir)


def get_batch(tokens, batch_size, block_size, generator, device):
    """Random windows (x, y = x shifted by one) drawn with `generator`."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(tokens[i: i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(tokens[i + 1: i + 1 + block_size].astype(np.int64)) for i in starts])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def global_batch_slice(tokens, generator, args, dist, device):
    """This process's share of a global batch that every process draws alike from `generator`,
    so N processes see exactly the batches one process with N times the batch size sees."""
    x, y = get_batch(tokens, args.batch_size * dist.world_size, args.block_size, generator, device)
    return (t[dist.rank * args.batch_size: (dist.rank + 1) * args.batch_size] for t in (x, y))


# -----------------------------------------------------------------------------
# Model and optimizer


def bdia_config(args):
    """What the BDIA flags train: the BDIAConfig that GPT(bdia=...) hands to bdia.run_blocks with its blocks
    (None without --bdia: the plain GPT). --bdia --gammas -0.25 0.25 --bits 9, for instance, trains the
    GPT's blocks by eq. (21): every sequence draws, for each block k >= 1, gamma_k = -1/4 or +1/4 (equally
    likely), the residual stream is rounded to multiples of 2^-9 (eqs. 17-19), and the backward pass
    rebuilds each block's input by eq. (24) instead of storing it (2 side bits per element and block, as
    |gamma| = 2^-2). Evaluation and sampling run eq. (25) with gamma = --eval-gamma, 0: the standard GPT
    on the 2^-9 grid; the state_dict is the plain GPT's. args: the flags, or those a checkpoint holds."""
    if not args.bdia:
        return None
    return BDIAConfig(gammas=args.gammas, bits=args.bits, reversible=not args.no_reversible, eval_gamma=args.eval_gamma)


def compiled(model, args):
    """--compile: torch.compile(model), as nanoGPT. With reversible --bdia each block is compiled on its own
    too (block.compile(), as torchtitan does, before --fsdp shards them; the state_dict keys stay):
    bdia.run_blocks keeps the reversible stack out of the model's graph, because a block's forward and its
    recomputation in the backward pass must run the same compiled code for eq. (24) to be exact.
    Compiling takes minutes on a CPU; it pays off on long runs, on a GPU."""
    if not args.compile:
        return model
    if args.bdia_config is not None and args.bdia_config.reversible:
        for block in model.transformer.h:
            block.compile()
    return torch.compile(model)


def configure_optimizer(model, args):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only, none on biases and LayerNorm
    gains, as nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def learning_rate(it, args):
    """nanoGPT's schedule: linear warm-up for --warmup-iters steps, then cosine decay from --lr to --min-lr
    at --max-iters."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = min(1.0, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


# -----------------------------------------------------------------------------
# Training loop


def train_step(train_model, model, optimizer, tokens, generator, args, dist, device):
    """One optimizer step: grad_accum micro-batches per process; gradients averaged over all."""
    total_loss = 0.0
    for micro in range(args.grad_accum):
        x, y = global_batch_slice(tokens, generator, args, dist, device)
        last = micro == args.grad_accum - 1
        # DDP all-reduces (FSDP reduce-scatters) the gradients on the last micro-step only
        sync = contextlib.nullcontext() if last or not dist.enabled or args.fsdp else train_model.no_sync()
        if args.fsdp:
            train_model.set_requires_gradient_sync(last)
        with sync:
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                _, loss = train_model(x, y)
            (loss / args.grad_accum).backward()  # BDIA: reversible blocks rebuild their inputs here (24)
        total_loss += loss.item() / args.grad_accum
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss


# -----------------------------------------------------------------------------
# Evaluation and sampling


@torch.no_grad()
def estimate_loss(model, splits, args, dist, device):
    """Mean loss over eval_iters batches per split, averaged over processes. model.eval():
    a BDIA-GPT is the plain GPT here (eq. 25)."""
    model.eval()
    losses = {}
    for name, tokens in splits.items():
        generator = torch.Generator().manual_seed(10_000)  # the same batches at every evaluation
        total = torch.zeros((), device=device)
        for _ in range(args.eval_iters):
            x, y = global_batch_slice(tokens, generator, args, dist, device)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                total += model(x, y)[1].float()
        if dist.enabled:
            torch.distributed.all_reduce(total)
        losses[name] = (total / (args.eval_iters * dist.world_size)).item()
    model.train()
    return losses


def gamma_sweep(model, val_tokens, args, dist, device):
    """Validation loss with one constant gamma in every block at inference (Fig. 1)."""
    results = []
    for gamma in args.eval_gammas:
        with constant_gamma(model, gamma):
            loss = estimate_loss(model, {"val": val_tokens}, args, dist, device)["val"]
        results.append(dict(gamma=gamma, val_loss=loss))
    return results


def write_gamma_sweep(out, sweep):
    """OUT_DIR/gamma_sweep.json, written atomically (reproduce.py counts a run with it as swept), and printed."""
    data.atomic_write(out / "gamma_sweep.json", lambda tmp: Path(tmp).write_text(json.dumps(sweep, indent=1)))
    print("gamma at inference   val loss")
    for row in sweep:
        print(f"{row['gamma']:>18.3f}   {row['val_loss']:.4f}")


def sample(args, device):
    """Print --sample samples of the checkpoint's model, built from its own flags."""
    ckpt = runlib.read_checkpoint(Path(args.out_dir) / "ckpt.pt", SCRIPT)
    # the BDIA model samples as it was evaluated: eq. (25) on the 2^-l grid
    model = GPT(**ckpt["model_args"], bdia=bdia_config(argparse.Namespace(**ckpt["args"]))).to(device).eval()
    model.load_state_dict(ckpt["model"])
    itos = ckpt.get("itos")
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    for i in range(args.sample):
        ids = model.generate(start, args.sample_tokens, args.temperature, args.top_k)[0, 1:].tolist()
        text = "".join(itos[t] for t in ids) if itos else " ".join(map(str, ids))
        print(f"--- sample {i + 1}\n{text}")


# -----------------------------------------------------------------------------
# main: flags (with --resume the checkpoint's), data, model, the iterations (evaluated, logged
# and checkpointed every --eval-interval)


def main(argv=None):
    args = None
    try:
        args = parse_args(argv)
        if args.sample:
            return sample(args, torch.device(args.device))
        with runlib.folder_lock(args.out_dir):  # one run per folder (under torchrun: rank 0 holds it)
            runlib.refuse_to_replace(args)  # without --resume or --overwrite, never over another run
            train(args)
    except runlib.ERRORS as e:  # data, checkpoint, divergence, precision, out of memory, a failed write
        runlib.exit_with(e, SCRIPT)
    except (runlib.Stopped, KeyboardInterrupt) as e:  # Ctrl-C, SIGTERM
        runlib.exit_stopped(e, SCRIPT, args and args.out_dir)


def train(args):
    dist = distributed(args.device)
    device = torch.device("cuda", dist.local_rank) if dist.enabled and args.device == "cuda" else torch.device(args.device)
    out, main_process = Path(args.out_dir), dist.rank == 0
    ckpt = runlib.read_checkpoint(out / "ckpt.pt", SCRIPT) if args.resume else None  # before the data: fail fast
    if main_process:
        print(f"preparing the data of {args.text_file or args.dataset or args.data_dir} ...", flush=True)
    folder = data_folder(args, prepare=main_process)
    if dist.enabled:
        torch.distributed.barrier()  # rank 0 prepared any data first
    meta = data.load_meta(folder)
    vocab_size = meta["vocab_size"] if meta else 50304  # GPT-2 BPE, padded to a multiple of 64
    train_tokens, val_tokens = data.load_tokens(folder, args.train_fraction, args.block_size, vocab_size)
    model_args = dict(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)

    # The same initial weights on every process (DDP, and --fsdp before sharding, broadcast rank
    # 0's), but dropout masks and BDIA's gammas differ per process, as they would per sample on one.
    torch.manual_seed(args.seed + dist.rank)
    model = GPT(**model_args, bdia=args.bdia_config).to(device)  # BDIA enters here: the blocks run eqs. (18)-(21)
    optimizer = configure_optimizer(model, args)
    start_iter = 0
    if ckpt is not None:
        if main_process:
            print(f"resuming {out / 'ckpt.pt'}, saved after {runlib.position(ckpt)}")
        runlib.restore(ckpt, model, optimizer, rank=dist.rank)
        start_iter = ckpt["iter"]
    if args.fsdp:  # the checkpoint was loaded whole; now each process keeps its shards
        optimizer = shard_model(model, model.transformer.h, optimizer, lambda m: configure_optimizer(m, args))
    train_model = compiled(model, args)
    if dist.enabled and not args.fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    log = None
    if main_process:  # lines after the checkpoint's iteration were written by a run killed before its next checkpoint
        log = runlib.JsonlLog(out / "log.jsonl", resume=args.resume, keep=lambda line: line["iter"] <= start_iter)
        print(f"{'BDIA-GPT' if args.bdia else 'GPT'}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters, {len(train_tokens)} training tokens, {dist.world_size} process(es) on {device}"
              + (f", iterations {start_iter}..{args.max_iters}" if start_iter < args.max_iters else ""))
        if start_iter >= args.max_iters:
            print(runlib.finished(out, start_iter, args.max_iters, "iteration", "--max-iters"))
        if device.type == "cpu" and sum(p.numel() for p in model.parameters()) > 20e6:
            print("note: a model this size takes seconds per step on a CPU, and each evaluation "
                  f"({args.eval_iters} batches per split) minutes; --help gives a small command for a CPU")

    tokens_per_iter = args.batch_size * args.block_size * args.grad_accum * dist.world_size
    splits = {"train": train_tokens, "val": val_tokens}

    def save(it):  # every process gives its RNG state (and, with --fsdp, its shards); rank 0 writes
        rngs = [None] * dist.world_size
        if dist.enabled:
            torch.distributed.all_gather_object(rngs, runlib.random_states())
        else:
            rngs = [runlib.random_states()]
        if args.fsdp:  # every process gathers; rank 0 keeps the whole model
            model_state, optimizer_state = unsharded_states(model, optimizer, keep=main_process)
        elif main_process:
            model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
        if main_process:
            runlib.save_checkpoint(out / "ckpt.pt", args, model=model_state, optimizer=optimizer_state, rng=rngs,
                                   iter=it, model_args=model_args, itos=meta["itos"] if meta else None)

    # the bar counts optimizer steps: it ends at max_iters/max_iters
    bar = tqdm(total=args.max_iters, initial=start_iter, disable=not main_process, dynamic_ncols=True)
    t0, last_eval = time.perf_counter(), start_iter
    with runlib.Signals() as signals:  # Ctrl-C, SIGTERM: the step ends, the run is saved there, it stops
        for it in range(start_iter, args.max_iters + 1):
            # the learning rate follows from the iteration and the flags alone: a resumed run (maybe
            # with a lower --lr after a divergence) continues the same schedule. The log line of
            # iteration `it` (the losses before its step, as nanoGPT's) gives the rate its step trains with.
            lr = learning_rate(it, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # a resumed run does not evaluate start_iter again: the log has it, and the weights are the same
            evaluate = (it % args.eval_interval == 0 or it == args.max_iters) and not (args.resume and it == start_iter)
            if evaluate:
                seconds = time.perf_counter() - t0
                bar.set_description(f"evaluating {args.eval_iters} batches")
                with runlib.at(f"iteration {it}", out):  # an error names this iteration and the intact checkpoint
                    losses = estimate_loss(model, splits, args, dist, device)
                    runlib.check_loss(losses["train"])  # diverged since the last evaluation: stop before it is saved
                bar.set_description("")
                if main_process:
                    log.write(iter=it, train_loss=losses["train"], val_loss=losses["val"], lr=lr, seconds=seconds,
                              tokens_per_s=tokens_per_iter * (it - last_eval) / seconds if it > last_eval else None,
                              peak_memory_mb=runlib.peak_memory_mb(device), device=device.type)
                    bar.write(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if it > start_iter:
                    save(it)
                t0, last_eval = time.perf_counter(), it
            if it == args.max_iters:
                break
            if signals.received(device):  # evaluated (if due) and not yet trained: `it` steps done
                save(it)
                signals.stop(f"iteration {it}")
            with runlib.at(f"iteration {it}", out):
                loss = train_step(train_model, model, optimizer, train_tokens, runlib.step_generator(args.seed, it), args,
                                  dist, device)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    bar.close()
    if args.eval_gammas:  # Fig. 1: how the trained model fares with other integrators at inference
        sweep = gamma_sweep(model, val_tokens, args, dist, device)
        if main_process:
            write_gamma_sweep(out, sweep)
    if dist.enabled:
        torch.distributed.barrier()  # no process tears the group down while another still uses it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    gc.collect()  # --fsdp: the sharded model lives in reference cycles; freed now, not as Python exits (seen: SIGABRT)
