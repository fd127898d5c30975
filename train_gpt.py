"""
Language modelling with GPT and BDIA-GPT in nanoGPT style (paper Appendix F).

    python train_gpt.py --dataset shakespeare_char --n-layer 6 --n-head 6 --n-embd 384 --block-size 256
    python train_gpt.py --dataset shakespeare_char ... --bdia           # BDIA-GPT, reversible
    python train_gpt.py --text-file book.txt --bdia                   # char-level on any text
    python train_gpt.py --data-dir data/openwebtext --train-fraction 0.0005 --bdia   # Appendix F
    torchrun --nproc_per_node=2 train_gpt.py --dataset shakespeare_char --bdia       # DDP
    python train_gpt.py --out-dir out/gpt --sample 3                  # samples from a checkpoint

A data directory holds nanoGPT-style train.bin / val.bin (uint16 token ids) and, for
character vocabularies, meta.json or meta.pkl. OUT_DIR/log.jsonl gets a line per
evaluation; OUT_DIR/ckpt.pt is written atomically after each; --resume continues exactly.
"""

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

import data
import training
from bdia import BDIAConfig
from models import GPT

# what a CUDA out-of-memory error suggests
LOWER_MEMORY = "a smaller --batch-size (a larger --grad-accum keeps the batch), --bdia (activations rebuilt) or --amp"

# -----------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    p = training.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_bdia_args(p)
    g = p.add_argument_group("model")
    for name, default in (("--n-layer", 12), ("--n-head", 12), ("--n-embd", 768), ("--block-size", 1024)):
        g.add_argument(name, type=int, default=default)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False,
                   help="biases in the Linear layers and LayerNorms (default: none, as nanoGPT's train.py)")
    g = p.add_argument_group("data")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=["shakespeare_char"], default=None)
    source.add_argument("--data-dir", default=None, help="a folder with train.bin, val.bin (and meta.json/meta.pkl)")
    source.add_argument("--text-file", default=None, help="train char-level on this text (90/10 split)")
    g.add_argument("--data-root", default="data", help="where --dataset is downloaded and prepared")
    g.add_argument("--train-fraction", type=float, default=1.0, help="keep only this leading fraction of the training tokens")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=12, help="sequences per process per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step, summed over processes")
    g.add_argument("--max-iters", type=int, default=5000)
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--min-lr", type=float, default=6e-5)
    g.add_argument("--warmup-iters", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 for none")
    g.add_argument("--eval-interval", type=int, default=250)
    g.add_argument("--eval-iters", type=int, default=50)
    p.add_argument("--sample", type=int, default=0, metavar="N", help="print N samples from OUT_DIR/ckpt.pt and exit")
    p.add_argument("--sample-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    training.add_run_args(p, "out/gpt")
    args = p.parse_args(argv)
    training.check_args(p, args, at_least_1=("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                                             "max_iters", "eval_interval", "eval_iters", "top_k"),
                        at_least_0=("warmup_iters", "sample", "min_lr", "weight_decay", "grad_clip", "sample_tokens"),
                        positive=("lr", "temperature"), fractions=("dropout",))
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


def configure_optimizer(model, args):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only, as nanoGPT."""
    return torch.optim.AdamW(training.decay_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))


# -----------------------------------------------------------------------------
# Training loop


def train_step(train_model, model, optimizer, tokens, generator, args, dist, device):
    """One optimizer step: grad_accum micro-batches per process; gradients averaged over all."""
    total_loss = 0.0
    for micro in range(args.grad_accum):
        x, y = global_batch_slice(tokens, generator, args, dist, device)
        last = micro == args.grad_accum - 1
        # DDP all-reduces the gradients on the last micro-step only
        sync = contextlib.nullcontext() if last or not dist.enabled else train_model.no_sync()
        with sync:
            with training.autocast(device, args.amp):
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
            with training.autocast(device, args.amp):
                total += model(x, y)[1].float()
        if dist.enabled:
            torch.distributed.all_reduce(total)
        losses[name] = (total / (args.eval_iters * dist.world_size)).item()
    model.train()
    return losses


def sample(args, device):
    path = Path(args.out_dir) / "ckpt.pt"
    ckpt = training.load_checkpoint(path)
    with training.restoring(path):
        bdia = ckpt["args"]["bdia"]  # the BDIA model samples as it was evaluated: eq. (25) on the 2^-l grid
        model = GPT(**ckpt["model_args"], bdia=BDIAConfig(**bdia) if bdia else None).to(device).eval()
        model.load_state_dict(ckpt["model"])
        itos = ckpt.get("itos")
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    for i in range(args.sample):
        ids = model.generate(start, args.sample_tokens, args.temperature, args.top_k)[0, 1:].tolist()
        text = "".join(itos[t] for t in ids) if itos else " ".join(map(str, ids))
        print(f"--- sample {i + 1}\n{text}")


# -----------------------------------------------------------------------------
# main: build, resume, the iterations (evaluated, logged and checkpointed every eval_interval)



def main(argv=None):
    with training.one_line_errors():
        run(parse_args(argv))


def run(args):
    dist = training.distributed(args.device)
    device = training.pick_device(args.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if args.sample:
        return sample(args, device)
    out, main_process = Path(args.out_dir), dist.rank == 0
    folder = data_folder(args, prepare=main_process)
    if dist.enabled:
        torch.distributed.barrier()  # rank 0 prepared any data first
    meta = data.load_meta(folder)
    vocab_size = meta["vocab_size"] if meta else 50304  # GPT-2 BPE, padded to a multiple of 64
    train_tokens, val_tokens = data.load_tokens(folder, args.train_fraction, args.block_size, vocab_size)
    model_args = dict(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)

    # The same initial weights on every process (DDP broadcasts rank 0's anyway), but dropout
    # masks and BDIA's gammas differ per process, as they would per sample on one process.
    training.seed_everything(args.seed + dist.rank)
    model = GPT(**model_args, bdia=args.bdia_config).to(device)
    optimizer = configure_optimizer(model, args)
    start_iter = 0
    if args.resume:
        ckpt = training.load_checkpoint(out / "ckpt.pt")
        with training.restoring(out / "ckpt.pt"):  # another model's or script's checkpoint: a clear error
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            training.set_rng_state(ckpt["rng"][dist.rank])
            start_iter = ckpt["iter"]
    train_model = training.compiled_model(model, args)
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    log = None
    if main_process:  # lines after the checkpoint's iteration were written by a run killed before its next checkpoint
        log = training.JsonlLog(out / "log.jsonl", resume=args.resume, keep=lambda line: line["iter"] <= start_iter)
        print(f"{'BDIA-GPT' if args.bdia else 'GPT'}: {training.count_params(model) / 1e6:.2f}M parameters, "
              f"{len(train_tokens)} training tokens, {dist.world_size} process(es) on {device}, "
              f"iterations {start_iter}..{args.max_iters}")

    tokens_per_iter = args.batch_size * args.block_size * args.grad_accum * dist.world_size
    splits = {"train": train_tokens, "val": val_tokens}
    bar = tqdm(range(start_iter, args.max_iters + 1), disable=not main_process, dynamic_ncols=True)
    t0, last_eval = time.perf_counter(), start_iter
    for it in bar:
        # a resumed run does not evaluate start_iter again: the log has it, and the weights are the same
        evaluate = (it % args.eval_interval == 0 or it == args.max_iters) and not (args.resume and it == start_iter)
        if evaluate:
            seconds = time.perf_counter() - t0
            with training.failures(f"iteration {it}", out, LOWER_MEMORY):
                losses = estimate_loss(model, splits, args, dist, device)
            # diverged since the last evaluation: stop before the state is logged or checkpointed
            training.check_loss(losses["train"], f"iteration {it}", out)
            rngs = [None] * dist.world_size  # every process's RNG goes into the one checkpoint
            if dist.enabled:
                torch.distributed.all_gather_object(rngs, training.rng_state())
            else:
                rngs = [training.rng_state()]
            if main_process:
                log.write(iter=it, train_loss=losses["train"], val_loss=losses["val"], lr=optimizer.param_groups[0]["lr"],
                          seconds=seconds, tokens_per_s=tokens_per_iter * (it - last_eval) / seconds if it > last_eval else None,
                          peak_memory_mb=training.peak_memory_mb(device))
                bar.write(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if it > start_iter:
                    training.save_checkpoint(out / "ckpt.pt", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                             rng=rngs, iter=it, model_args=model_args, itos=meta["itos"] if meta else None,
                                             args=training.plain_args(args))
            t0, last_eval = time.perf_counter(), it
        if it == args.max_iters:
            break
        # the learning rate follows from the iteration and the flags alone: a resumed run (maybe
        # with a lower --lr after a divergence) continues the same schedule
        lr = training.cosine_lr(it, args.max_iters, args.lr, args.warmup_iters, args.min_lr)
        training.set_lr(optimizer, lr)
        with training.failures(f"iteration {it}", out, LOWER_MEMORY):  # divergence, out of memory: one line
            loss = train_step(train_model, model, optimizer, train_tokens, training.generator(args.seed, it), args, dist,
                              device)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    if dist.enabled:
        torch.distributed.barrier()  # no process tears the group down while another still uses it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
