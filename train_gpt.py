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
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

import training
from models import GPT

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_BYTES = 1115394  # no checksum is published for it; its size is verified


class DataError(Exception):
    """Data that is missing or unusable; the message says what to do."""


# -----------------------------------------------------------------------------
# Data: .bin token files with a char vocabulary in meta.json / meta.pkl


def prepare_char_data(text, folder):
    """Character vocabulary and a 90/10 split of `text` into folder/{train,val}.bin + meta.json."""
    if len(text) < 2:
        raise DataError("the text is empty: give a text file with some content")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    split = int(0.9 * len(ids))
    folder.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(folder / "train.bin")
    ids[split:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": len(chars), "itos": chars}))
    return folder


def shakespeare_dir(data_root):
    folder = Path(data_root) / "shakespeare_char"
    if not (folder / "meta.json").is_file():
        try:
            path = training.download(SHAKESPEARE_URL, folder / "input.txt", size=SHAKESPEARE_BYTES,
                                     manual=f"save that file as {folder / 'input.txt'}, or train on any text with --text-file")
        except training.DownloadError as e:
            raise DataError(str(e)) from e
        prepare_char_data(path.read_text(encoding="utf-8"), folder)
    return folder


class _MetaUnpickler(pickle.Unpickler):
    """nanoGPT's meta.pkl holds only dicts, strings and ints: refuse anything else."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl may hold only plain data, not {module}.{name}")


def load_meta(folder):
    """{'vocab_size': int, 'itos': list of str} from meta.json or meta.pkl; None for a BPE dataset."""
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        return {"vocab_size": meta["vocab_size"], "itos": list(meta["itos"])}
    if (folder / "meta.pkl").is_file():
        with open(folder / "meta.pkl", "rb") as f:
            meta = _MetaUnpickler(f).load()
        itos = meta["itos"]
        return {"vocab_size": meta["vocab_size"], "itos": [itos[i] for i in range(len(itos))]}
    return None


def load_tokens(folder, train_fraction, block_size):
    """Memory-mapped train and val token arrays; the training tokens cut to a leading fraction."""
    folder = Path(folder)
    missing = [f for f in ("train.bin", "val.bin") if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}: point --data-dir at a folder of nanoGPT-style "
                        ".bin files, or use --dataset shakespeare_char or --text-file FILE")
    train = np.memmap(folder / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(folder / "val.bin", dtype=np.uint16, mode="r")
    train = train[: int(len(train) * train_fraction)]
    for name, data in (("train", train), ("val", val)):
        if len(data) <= block_size:
            raise DataError(f"the {name} split has {len(data)} tokens, not more than --block-size {block_size}: "
                            "use a smaller --block-size or more data")
    return train, val


def get_batch(data, batch_size, block_size, generator, device):
    """Random windows (x, y = x shifted by one) drawn with `generator`."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i: i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1: i + 1 + block_size].astype(np.int64)) for i in starts])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# -----------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_bdia_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, default=12)
    g.add_argument("--n-head", type=int, default=12)
    g.add_argument("--n-embd", type=int, default=768)
    g.add_argument("--block-size", type=int, default=1024)
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
    args = training.parse_args(p, argv)
    args.bdia_config = training.bdia_config(args, p)
    if not args.sample and not (args.dataset or args.data_dir or args.text_file):
        p.error("give the data: --dataset shakespeare_char, --data-dir DIR or --text-file FILE")
    if not 0 < args.train_fraction <= 1:
        p.error("--train-fraction must be in (0, 1]")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    return args


def data_folder(args, prepare):
    """The folder of .bin files, prepared from --text-file or --dataset when `prepare`
    (only the first process prepares; the others wait for it)."""
    if args.text_file:
        text_file, folder = Path(args.text_file), Path(args.out_dir) / "data"
        if prepare and not text_file.is_file():
            raise DataError(f"no such text file: {text_file}")
        return prepare_char_data(text_file.read_text(encoding="utf-8", errors="replace"), folder) if prepare else folder
    if args.dataset:
        return shakespeare_dir(args.data_root) if prepare else Path(args.data_root) / "shakespeare_char"
    return Path(args.data_dir)


def configure_optimizer(model, args):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


@torch.no_grad()
def estimate_loss(model, splits, args, dist, device):
    """Mean loss over eval_iters batches per split (gamma 0: the plain model), averaged over processes."""
    model.eval()
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(10_000)  # the same batches at every evaluation
        total = torch.zeros((), device=device)
        for _ in range(args.eval_iters):
            x, y = global_batch_slice(data, generator, args, dist, device)
            with training.autocast(device, args.amp):
                total += model(x, y)[1].float()
        if dist.enabled:
            torch.distributed.all_reduce(total)
        losses[name] = (total / (args.eval_iters * dist.world_size)).item()
    model.train()
    return losses


def sample(args, device):
    try:
        ckpt = training.load_checkpoint(Path(args.out_dir) / "ckpt.pt", device)
    except (FileNotFoundError, training.CheckpointError) as e:
        raise DataError(str(e)) from e
    model = GPT(**ckpt["model_args"]).to(device).eval()
    model.load_state_dict(ckpt["model"])
    itos = ckpt.get("itos")
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    for i in range(args.sample):
        ids = model.generate(start, args.sample_tokens, args.temperature, args.top_k)[0, 1:].tolist()
        text = "".join(itos[t] for t in ids) if itos else " ".join(map(str, ids))
        print(f"--- sample {i + 1}\n{text}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    dist = training.distributed(args.device)
    device = torch.device("cuda", dist.local_rank) if dist.enabled and training.pick_device(args.device).type == "cuda" \
        else training.pick_device(args.device)
    if args.sample:
        return sample(args, device)
    out = Path(args.out_dir)
    folder = data_folder(args, prepare=training.is_main(dist))
    if dist.enabled:
        torch.distributed.barrier()  # rank 0 prepared any data first
    train_data, val_data = load_tokens(folder, args.train_fraction, args.block_size)
    meta = load_meta(folder)
    vocab_size = meta["vocab_size"] if meta else 50304  # GPT-2 BPE, padded to a multiple of 64
    model_args = dict(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)

    training.seed_everything(args.seed + dist.rank)  # dropout and gammas differ per process
    model = GPT(**model_args, bdia=args.bdia_config).to(device)
    optimizer = configure_optimizer(model, args)
    start_iter = 0
    if args.resume:
        try:
            ckpt = training.load_checkpoint(out / "ckpt.pt", device)
        except (FileNotFoundError, training.CheckpointError) as e:
            raise DataError(str(e)) from e
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        training.set_rng_state(ckpt["rng"][dist.rank])
        start_iter = ckpt["iter"]
    train_model = torch.compile(model) if args.compile else model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    log = training.JsonlLog(out / "log.jsonl", resume=args.resume) if training.is_main(dist) else None
    if log:
        log.keep_only(lambda line: line["iter"] < start_iter)  # the resumed run logs start_iter again
    if training.is_main(dist):
        mode = "BDIA-GPT" if args.bdia else "GPT"
        print(f"{mode}: {training.count_params(model) / 1e6:.2f}M parameters, {len(train_data)} training tokens, "
              f"{dist.world_size} process(es) on {device}, iterations {start_iter}..{args.max_iters}")

    micro_steps = args.grad_accum
    tokens_per_iter = args.batch_size * args.block_size * micro_steps * dist.world_size
    splits = {"train": train_data, "val": val_data}
    bar = tqdm(range(start_iter, args.max_iters + 1), disable=not training.is_main(dist), dynamic_ncols=True)
    t0, last_eval = time.perf_counter(), start_iter
    for it in bar:
        if it % args.eval_interval == 0 or it == args.max_iters:
            seconds = time.perf_counter() - t0
            losses = estimate_loss(model, splits, args, dist, device)
            if training.is_main(dist):
                log.write(iter=it, train_loss=losses["train"], val_loss=losses["val"], lr=optimizer.param_groups[0]["lr"],
                          seconds=seconds, tokens_per_s=tokens_per_iter * (it - last_eval) / seconds if it > last_eval else None,
                          peak_memory_mb=training.peak_memory_mb(device))
                bar.write(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            rngs = [None] * dist.world_size
            if dist.enabled:
                torch.distributed.all_gather_object(rngs, training.rng_state())
            else:
                rngs = [training.rng_state()]
            if training.is_main(dist) and it > start_iter:
                training.save_checkpoint(out / "ckpt.pt", dict(
                    model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args, iter=it,
                    rng=rngs, itos=meta["itos"] if meta else None,
                    args={k: v for k, v in vars(args).items() if k != "bdia_config"}))
            t0, last_eval = time.perf_counter(), it
        if it == args.max_iters:
            break
        lr = training.cosine_lr(it, args.max_iters, args.lr, args.warmup_iters, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # the global batch of this iteration
        loss = train_step(train_model, model, optimizer, train_data, generator, args, dist, device)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    if dist.enabled:
        torch.distributed.barrier()  # no process tears the group down while another still uses it
        torch.distributed.destroy_process_group()


def global_batch_slice(data, generator, args, dist, device):
    """This process's share of a global batch that every process draws alike from `generator`."""
    x, y = get_batch(data, args.batch_size * dist.world_size, args.block_size, generator, device)
    return (t[dist.rank * args.batch_size: (dist.rank + 1) * args.batch_size] for t in (x, y))


def train_step(train_model, model, optimizer, data, generator, args, dist, device):
    """One optimizer step: grad_accum micro-batches per process; gradients averaged over all.
    Every process draws the whole global batch from `generator` and keeps its own slice,
    so N processes see exactly the batches one process with N times the batch size sees."""
    total_loss = 0.0
    for micro in range(args.grad_accum):
        x, y = global_batch_slice(data, generator, args, dist, device)
        last = micro == args.grad_accum - 1
        sync = contextlib.nullcontext() if last or not dist.enabled else train_model.no_sync()
        with sync:
            with training.autocast(device, args.amp):
                _, loss = train_model(x, y)
            (loss / args.grad_accum).backward()
        total_loss += loss.item() / args.grad_accum
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss


if __name__ == "__main__":
    main()
