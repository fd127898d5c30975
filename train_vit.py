"""
Image classification with ViT, BDIA-ViT and RevViT (paper 5.2: Tables 2-5, Fig. 1 and 4).

    python train_vit.py --bdia                       # BDIA-ViT on CIFAR-10, the paper's setup
    python train_vit.py                              # the plain ViT
    python train_vit.py --model revvit               # RevViT
    python train_vit.py --bdia --dataset cifar100 --eval-gammas -0.5,-0.25,0,0.25,0.5

Each epoch appends a line to OUT_DIR/log.jsonl and writes OUT_DIR/ckpt.pt atomically;
--resume continues an interrupted run exactly where it stopped.
"""

import argparse
import gzip
import json
import pickle
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import training
from bdia import BDIAConfig
from models import RevViT, ViT
from randaugment import rand_augment

# -----------------------------------------------------------------------------
# Data: CIFAR-10/100 (python pickles) and Fashion-MNIST (idx), held as uint8 tensors

CIFAR = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], labels=b"labels", classes=10),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], labels=b"fine_labels", classes=100),
}
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_FILES = {  # name: md5
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
MEAN_STD = {  # per channel: the CIFAR values of the reference's train_cifar10.py; Fashion-MNIST's own
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


class DataError(Exception):
    """Data that is missing or unreadable; the message says what to do."""


def load_cifar(name, data_dir):
    """(train_images, train_labels, test_images, test_labels): uint8 (N, 3, 32, 32), int64 (N,)."""
    spec, data_dir = CIFAR[name], Path(data_dir)
    folder = data_dir / spec["folder"]
    if not folder.is_dir():
        tarball = data_dir / Path(spec["url"]).name
        try:
            training.download(spec["url"], tarball, md5=spec["md5"], manual=(
                f"download {spec['url']} on a machine with network and put the tarball, or its extracted "
                f"folder {spec['folder']}/, into {data_dir}/"))
        except training.DownloadError as e:
            raise DataError(str(e)) from e
        staging = data_dir / (spec["folder"] + ".extracting")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(tarball) as tar:  # extract beside, then rename: never a half-extracted folder
            tar.extractall(staging, filter="data")
        (staging / spec["folder"]).rename(folder)
        shutil.rmtree(staging)

    def read(files):
        images, labels = [], []
        for f in files:
            try:
                with open(folder / f, "rb") as fh:
                    batch = pickle.load(fh, encoding="bytes")  # the dataset's own format
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[spec["labels"]], dtype=np.int64))
            except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                raise DataError(f"cannot read {folder / f} ({e!r}); delete {folder} and run again to re-download")
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

    return (*read(spec["train"]), *read(spec["test"]))


def read_idx(path):
    """An idx-ubyte(.gz) file (MNIST format) as a uint8 array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir):
    """Fashion-MNIST padded to 32x32: uint8 (N, 1, 32, 32), int64 (N,)."""
    folder = FASHION_SYSTEM_DIR if all((FASHION_SYSTEM_DIR / f).is_file() for f in FASHION_FILES) else Path(data_dir) / "fashion-mnist"
    for f, md5 in FASHION_FILES.items():
        if not (folder / f).is_file():
            try:
                training.download(FASHION_URL + f, folder / f, md5=md5, manual=(
                    "install Debian's dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist/) or "
                    f"put the four idx-ubyte.gz files into {folder}/"))
            except training.DownloadError as e:
                raise DataError(str(e)) from e

    def read(images, labels):
        try:
            x = torch.from_numpy(read_idx(folder / images).copy()).unsqueeze(1)
            y = torch.from_numpy(read_idx(folder / labels).astype(np.int64))
        except (OSError, ValueError, IndexError, EOFError) as e:
            raise DataError(f"cannot read Fashion-MNIST in {folder} ({e!r})")
        return F.pad(x, (2, 2, 2, 2)), y

    return (*read("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            *read("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


def load_dataset(name, data_dir):
    data = load_fashion_mnist(data_dir) if name == "fashion-mnist" else load_cifar(name, data_dir)
    if len(data[0]) == 0 or len(data[2]) == 0:
        raise DataError(f"{name} in {data_dir} holds no images")
    return data


def crop_and_flip(images, generator):
    """Random crop with 4-pixel zero padding and random horizontal flip, on a uint8 batch on
    any device (one gather, no per-image loop); the random draws come from the CPU generator."""
    B, C, H, W = images.shape
    dx, dy = torch.randint(0, 9, (2, B), generator=generator).to(images.device)
    flips = (torch.rand(B, generator=generator) < 0.5).to(images.device)
    rows = dy[:, None] + torch.arange(H, device=images.device)  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(W, device=images.device)  # (B, W) columns
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    padded = F.pad(images, (4, 4, 4, 4)).permute(0, 2, 3, 1)  # (B, H + 8, W + 8, C)
    batch = torch.arange(B, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment(images, args, generator):
    """The reference's training transform: RandAugment(N, M), then crop and flip (uint8)."""
    if args.randaug:
        images = rand_augment(images, args.randaug_n, args.randaug_m, generator)
    return crop_and_flip(images, generator)


def normalize(images, mean, std):
    return (images.float() / 255 - mean) / std


# -----------------------------------------------------------------------------
# SET-Adam


class SETAdam(torch.optim.Optimizer):
    """SET-Adam (Zhang, arXiv 2302.01029 / ECML 2024), the optimizer the paper trains BDIA-ViT with.
    Adam's second moment v is down-scaled, epsilon-embedded and down-translated per layer (here:
    per parameter tensor, d elements) before the step:

        m_t = b1 m_{t-1} + (1 - b1) g_t,   v_t = b2 v_{t-1} + (1 - b2) g_t^2      (Adam)
        v~_t = cos^2(v_t, 1) v_t = v_t (sum v_t)^2 / (d sum v_t^2)             (down-scaling)
        w_t = sqrt(v~_t / (1 - b2^t) + eps)                                   (epsilon-embedding)
        w~_t = w_t - tau min(w_t),  tau = 1/2                                 (down-translating)
        theta_t = theta_{t-1} - lr / (1 - b1^t) m_t / w~_t

    The three operations and their order are the paper's abstract's; these formulas are the
    only line-by-line statement that was reachable (a third-party description), not the
    paper's Algorithm 1 itself, which could not be read from here: treat them as unverified."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-18, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                grad = p.grad if group["weight_decay"] == 0 else p.grad + group["weight_decay"] * p
                state["m"].lerp_(grad, 1 - b1)
                state["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                v = state["v"]
                v_tilde = v * v.sum() ** 2 / (v.numel() * (v * v).sum()).clamp_min(1e-38)
                w = (v_tilde / (1 - b2**t) + eps).sqrt()
                w_tilde = w - 0.5 * w.min()
                p.addcdiv_(state["m"], w_tilde, value=-lr / (1 - b1**t))


def make_optimizer(name, model, lr, weight_decay):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return SETAdam(model.parameters(), lr=lr, weight_decay=weight_decay)


# -----------------------------------------------------------------------------
# Training and evaluation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_bdia_args(p)
    p.add_argument("--model", choices=["vit", "revvit"], default="vit")
    p.add_argument("--no-rev-backprop", action="store_true", help="RevViT: store activations instead")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "fashion-mnist"], default="cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N training images")
    p.add_argument("--limit-val", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--no-randaug", dest="randaug", action="store_false",
                   help="no RandAugment before crop and flip (the reference applies it by default)")
    p.add_argument("--randaug-n", type=int, default=2, help="RandAugment: operations per image (default 2)")
    p.add_argument("--randaug-m", type=int, default=14, help="RandAugment: magnitude 0..30 (default 14)")
    p.add_argument("--epochs", type=int, default=400, help="default 400, as in the paper")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["adam", "adamw", "set-adam"], default="set-adam")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--emb-dropout", type=float, default=0.1)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp-dim", type=int, default=512)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--eval-gammas", type=training.parse_gammas, default=None,
                   help="after training, validation accuracy with each constant gamma (paper Fig. 1)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    training.add_run_args(p, "out/vit")
    args = training.parse_args(p, argv)
    args.bdia_config = training.bdia_config(args, p)
    if args.model == "revvit" and (args.bdia or args.eval_gammas):
        p.error("--bdia and --eval-gammas apply to --model vit; RevViT is the reversible baseline without BDIA")
    for name in ("epochs", "batch_size", "depth", "dim", "heads", "mlp_dim", "patch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.randaug_n < 0 or not 0 <= args.randaug_m <= 30:
        p.error("--randaug-n must be at least 0 and --randaug-m within 0..30")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    if 32 % args.patch:
        p.error(f"--patch {args.patch} must divide the image size 32")
    return args


def build_model(args, channels, classes):
    common = dict(num_classes=classes, channels=channels, patch=args.patch, dim=args.dim, depth=args.depth,
                  heads=args.heads, mlp_dim=args.mlp_dim, dropout=args.dropout, emb_dropout=args.emb_dropout)
    if args.model == "revvit":
        return RevViT(**common, reversible=not args.no_rev_backprop)
    return ViT(**common, bdia=args.bdia_config)


def train_epoch(model, optimizer, images, labels, args, epoch, mean, std, device):
    """One epoch over a permutation fixed by (seed, epoch), so a resumed run sees the same batches."""
    model.train()
    generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    order = torch.randperm(len(images), generator=generator)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
    correct, seen = torch.zeros((), dtype=torch.int64, device=device), 0
    bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
    for step, start in enumerate(bar):
        idx = order[start: start + args.batch_size]
        x = normalize(augment(images[idx].to(device, non_blocking=True), args, generator), mean, std)
        y = labels[idx].to(device, non_blocking=True)
        with training.autocast(device, args.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(-1) == y).sum()
        seen += len(idx)
        if step % 20 == 0 and bar.format_dict["elapsed"]:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}", img_s=f"{seen / bar.format_dict['elapsed']:.0f}")
    return total_loss.item() / seen, correct.item() / seen


@torch.no_grad()
def evaluate(model, images, labels, args, mean, std, device):
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(images), args.eval_batch_size):
        x = normalize(images[start: start + args.eval_batch_size].to(device), mean, std)
        y = labels[start: start + args.eval_batch_size].to(device)
        with training.autocast(device, args.amp):
            logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return total_loss / len(images), correct / len(images)


def gamma_sweep(model, args, val, mean, std, device):
    """Validation accuracy with one constant gamma across all blocks at inference (Fig. 1)."""
    trained_config = model.bdia
    bits = trained_config.bits if trained_config else None
    results = []
    for gamma in args.eval_gammas:
        model.bdia = BDIAConfig(gammas=(-0.5, 0.5), bits=bits, reversible=False, eval_gamma=gamma)
        results.append(dict(gamma=gamma, val_acc=evaluate(model, *val, args, mean, std, device)[1]))
    model.bdia = trained_config
    return results


def main(argv=None):
    args = parse_args(argv)
    device = training.pick_device(args.device)
    out = Path(args.out_dir)
    try:
        train_x, train_y, val_x, val_y = load_dataset(args.dataset, args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.limit_train:
        train_x, train_y = train_x[: args.limit_train], train_y[: args.limit_train]
    if args.limit_val:
        val_x, val_y = val_x[: args.limit_val], val_y[: args.limit_val]
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in MEAN_STD[args.dataset])
    classes = CIFAR[args.dataset]["classes"] if args.dataset in CIFAR else 10

    training.seed_everything(args.seed)
    model = build_model(args, train_x.shape[1], classes).to(device)
    optimizer = make_optimizer(args.optimizer, model, args.lr, args.weight_decay)
    start_epoch, best_acc = 1, 0.0
    if args.resume:
        try:
            ckpt = training.load_checkpoint(out / "ckpt.pt", device)
        except (FileNotFoundError, training.CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        training.set_rng_state(ckpt["rng"])
        start_epoch, best_acc = ckpt["epoch"] + 1, ckpt["best_acc"]
    model_to_run = torch.compile(model) if args.compile else model
    log = training.JsonlLog(out / "log.jsonl", resume=args.resume)
    log.keep_only(lambda line: line["epoch"] < start_epoch)
    mode = "RevViT" if args.model == "revvit" else ("BDIA-ViT" if args.bdia else "ViT")
    print(f"{mode}: {training.count_params(model) / 1e6:.2f}M parameters, {len(train_x)} training images, "
          f"{args.dataset}, {device}, epochs {start_epoch}..{args.epochs}")

    epoch_seconds = []
    val_acc = None
    for epoch in range(start_epoch, args.epochs + 1):
        for group in optimizer.param_groups:  # cosine schedule over epochs
            group["lr"] = training.cosine_lr(epoch - 1, args.epochs, args.lr)
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(model_to_run, optimizer, train_x, train_y, args, epoch, mean, std, device)
        epoch_seconds.append(time.perf_counter() - t0)
        val_loss, val_acc = evaluate(model_to_run, val_x, val_y, args, mean, std, device)
        best_acc = max(best_acc, val_acc)
        log.write(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                  lr=optimizer.param_groups[0]["lr"], epoch_seconds=epoch_seconds[-1], peak_memory_mb=training.peak_memory_mb(device))
        print(f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}, val loss {val_loss:.4f} acc {val_acc:.4f}, "
              f"{epoch_seconds[-1]:.1f}s")
        training.save_checkpoint(out / "ckpt.pt", dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                                       rng=training.rng_state(), epoch=epoch, best_acc=best_acc,
                                                       args={k: v for k, v in vars(args).items() if k != "bdia_config"}))

    if args.eval_gammas:
        sweep = gamma_sweep(model, args, (val_x, val_y), mean, std, device)
        (out / "gamma_sweep.json").write_text(json.dumps(sweep, indent=1))
        print("gamma at inference   val acc")
        for row in sweep:
            print(f"{row['gamma']:>18.3f}   {row['val_acc']:.4f}")
    if val_acc is None and start_epoch > args.epochs:
        print(f"checkpoint already at epoch {args.epochs}")
    else:
        print(f"best val acc {best_acc:.4f}, final val acc {val_acc:.4f}, peak memory {training.peak_memory_mb(device):.0f} MB, "
              f"{np.mean(epoch_seconds):.1f} s/epoch")


if __name__ == "__main__":
    main()
