"""
Image classification with ViT, BDIA-ViT and RevViT (paper 5.2: Tables 2-5, Fig. 1 and 4).

    python train_vit.py --bdia                       # BDIA-ViT on CIFAR-10, the paper's setup
    python train_vit.py                              # the plain ViT
    python train_vit.py --model revvit               # RevViT
    python train_vit.py --bdia --dataset cifar100 --eval-gammas -0.5 -0.25 0 0.25 0.5

A small run that finishes on a CPU in under a minute (timed on one quiet 2-core CPU: 84 s on a busy
one, and with --compile 289 s there), at about 0.8 validation accuracy after its 4 epochs (chance:
0.1; Fashion-MNIST: offline from Debian's copy, `apt-get install dataset-fashion-mnist`, or from
the four idx-ubyte.gz files put into DATA_DIR/fashion-mnist/; downloaded there when online):

    python train_vit.py --bdia --dataset fashion-mnist --limit-train 5000 --limit-val 1000 --epochs 4 --lr 2e-3 \\
        --no-augment --patch 8 --depth 2 --dim 64 --heads 4 --mlp-dim 128 --batch-size 64 --out-dir out/vit-small

The defaults are the paper's setup (5.2, Table 2, Fig. 4): SET-Adam (lr 1e-4, betas 0.9, 0.999,
eps 1e-18), dropout 0.1, batch 128, 400 epochs; for the rest the paper defers to
kentaroy47/vision-transformers-cifar10 (train_cifar10.py, whose own defaults are Adam, batch 512,
200 epochs): RandAugment (N=2, M=14) before random crop and flip, a cosine schedule over the
epochs, no weight decay or clipping, and on CUDA fp16 autocast with a GradScaler (--precision
auto; on a CPU float32: the reference runs on CUDA only). Departures from the two:
SET-Adam is built from the equations reachable here (see SETAdam); RandAugment is the reference's
PIL operations in torch, with torch's random numbers; the reference's scheduler.step(epoch - 1)
runs its cosine two epochs late, here epoch e = 1..E trains at lr (1 + cos(pi (e - 1) / E)) / 2; the
reference keeps the checkpoint of the best validation accuracy, here ckpt.pt is the last epoch's
(to resume) and each epoch's val_acc is logged (reproduce.py reports the best and the final).
Evaluation is float32 whatever --precision, as the reference's. The residual stream stays
float32 under autocast, so BDIA stays exact. Each epoch appends a line to OUT_DIR/log.jsonl and
writes OUT_DIR/ckpt.pt atomically (the GradScaler's state too); --resume continues an
interrupted run exactly where it stopped.
"""

import json
import math
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bdia import BDIAConfig
from models import RevViT, ViT, constant_gamma
from plumbing import data, runlib
from plumbing.randaugment import rand_augment

SCRIPT = Path(__file__).name

# -----------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    p = runlib.ArgumentParser(prog=SCRIPT, description=__doc__)
    p.add_argument("--model", choices=["vit", "revvit"], default="vit", help="revvit: the reversible baseline")
    p.add_argument("--no-rev-backprop", action="store_true", help="RevViT: store activations instead")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "fashion-mnist"], default="cifar10",
                   help="fashion-mnist is read offline from Debian's dataset-fashion-mnist when installed "
                        "(/usr/share/datasets/fashion-mnist), else from DATA_DIR/fashion-mnist")
    p.add_argument("--data-dir", default="data", help="where the data set is (or is downloaded to)")
    p.add_argument("--limit-train", type=int, default=0, help="train on the first N training images (0: all)")
    p.add_argument("--limit-val", type=int, default=0, help="evaluate on the first N test images (0: all)")
    p.add_argument("--no-randaug", dest="randaug", action="store_false",
                   help="no RandAugment before crop and flip (the reference applies it)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no augmentation at all: no RandAugment, crop or flip (to reach overfitting on few images)")
    p.add_argument("--randaug-n", type=int, default=2, help="RandAugment: operations per image")
    p.add_argument("--randaug-m", type=int, default=14, help="RandAugment: magnitude 0..30")
    p.add_argument("--epochs", type=int, default=400, help="the paper's 400")
    p.add_argument("--batch-size", type=int, default=128, help="training images per step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: none, as the "
                   "reference)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "set-adam"], default="set-adam", help="the paper's SET-Adam")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="the blocks' autocast: auto is fp16 on CUDA (the reference's autocast with a GradScaler), fp32 "
                   "on a CPU; fp16 always with a GradScaler; bf16 without one; the residual stream stays float32 "
                   "and evaluation is float32; may change on --resume")
    g = p.add_argument_group("model (defaults: the paper's ViT)")
    for name, default, meaning in (("--depth", 6, "blocks"),
                                   ("--dim", 512, "width of the residual stream"),
                                   ("--heads", 8, "attention heads"),
                                   ("--mlp-dim", 512, "hidden width of the MLP"),
                                   ("--patch", 4, "patch size in pixels (divides 32)")):
        g.add_argument(name, type=int, default=default, help=meaning)
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in the blocks")
    g.add_argument("--emb-dropout", type=float, default=0.1, help="dropout after the patch embedding")
    p.add_argument("--eval-gammas", nargs="+", type=float, default=None, metavar="G",
                   help="after training, validation accuracy with each constant gamma (paper Fig. 1)")
    p.add_argument("--eval-batch-size", type=int, default=1000, help="images per evaluation batch")
    g = p.add_argument_group("BDIA (bdia.py; what they train: bdia_config below)")
    g.add_argument("--bdia", action="store_true", help="train the ViT with BDIA (otherwise the plain ViT)")
    g.add_argument("--gammas", nargs="+", action=runlib.Numbers, default=(-0.5, 0.5), metavar="G",
                   help="the values gamma_k is drawn from, uniformly, per image and block k >= 1")
    g.add_argument("--bits", type=runlib.parse_bits, default=9, help="l: the residual stream is rounded to multiples of "
                   "2^-l (Q_l, eq. 17), or 'none'; gammas of +-2^-m keep m side bits per element and block")
    g.add_argument("--no-reversible", action="store_true", help="store the activations instead of rebuilding them "
                   "in the backward pass (eq. 24)")
    g.add_argument("--eval-gamma", type=float, default=0.0, help="the constant gamma at inference (0: the standard "
                   "ViT, eq. 25)")
    p.add_run_flags(out_dir="out/vit")
    amp = next(a for a in p._actions if a.dest == "amp")
    amp.help = "the same as --precision bf16 (kept for compatibility)"
    args = p.parse(argv, at_least_1=("epochs", "batch_size", "depth", "dim", "heads", "mlp_dim", "patch",
                                     "eval_batch_size"),
                   at_least_0=("limit_train", "limit_val", "randaug_n", "weight_decay", "grad_clip"), positive=("lr",),
                   fractions=("dropout", "emb_dropout"))
    args.bdia_config = p.checked_config(bdia_config, args)  # None without --bdia; what cannot work: one line, exit 2
    if args.amp:  # --amp, or the flags of a checkpoint written before --precision: bf16
        given = p.given_flags(argv)
        if "amp" in given and "precision" in given and args.precision != "bf16":
            p.error(f"--amp is --precision bf16, and --precision {args.precision} is given too: give one of them")
        if "precision" not in given:
            args.precision = "bf16"
        args.amp = False  # said once, as --precision
    if args.model == "revvit" and (args.bdia or args.eval_gammas):
        p.error("--bdia and --eval-gammas apply to --model vit; RevViT is the reversible baseline without BDIA")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    if 32 % args.patch:
        p.error(f"--patch {args.patch} must divide the image size 32")
    if not 0 <= args.randaug_m <= 30:
        p.error("--randaug-m must be within 0..30")
    return args


# -----------------------------------------------------------------------------
# Data: the images stay uint8 and are augmented on the training device, in batches

MEAN_STD = {  # per channel: the CIFAR values of the reference's train_cifar10.py; Fashion-MNIST's own
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
Images = namedtuple("Images", "train_x train_y val_x val_y mean std")


def load_images(args, device):
    train_x, train_y, val_x, val_y = data.load_images(args.dataset, args.data_dir)
    n, m = args.limit_train or len(train_x), args.limit_val or len(val_x)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in MEAN_STD[args.dataset])
    return Images(train_x[:n], train_y[:n], val_x[:m], val_y[:m], mean, std)


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
    if not args.augment:
        return images
    if args.randaug:
        images = rand_augment(images, args.randaug_n, args.randaug_m, generator)
    return crop_and_flip(images, generator)


def normalize(images, mean, std):
    return (images.float() / 255 - mean) / std


# -----------------------------------------------------------------------------
# Model and optimizer


def bdia_config(args):
    """What the BDIA flags train: the BDIAConfig that ViT(bdia=...) hands to bdia.run_blocks with its blocks
    (None without --bdia: the plain ViT). --bdia --gammas -0.25 0.25 --bits 9, for instance, trains the
    ViT's blocks by eq. (21): every image draws, for each block k >= 1, gamma_k = -1/4 or +1/4 (equally
    likely), the residual stream is rounded to multiples of 2^-9 (eqs. 17-19), and the backward pass
    rebuilds each block's input by eq. (24) instead of storing it (2 side bits per element and block,
    as |gamma| = 2^-2). Evaluation (model.eval()) runs eq. (25) with gamma = --eval-gamma, 0: the
    standard ViT, on the 2^-9 grid; the state_dict is the plain ViT's."""
    if not args.bdia:
        return None
    return BDIAConfig(gammas=args.gammas, bits=args.bits, reversible=not args.no_reversible, eval_gamma=args.eval_gamma)


def build_model(args, channels, classes):
    """The paper's ViT (or RevViT). With --bdia its blocks run BDIA in training (eqs. 18-21)
    and the standard transformer at inference (eq. 25): the state_dict is the plain ViT's."""
    common = dict(num_classes=classes, channels=channels, patch=args.patch, dim=args.dim, depth=args.depth,
                  heads=args.heads, mlp_dim=args.mlp_dim, dropout=args.dropout, emb_dropout=args.emb_dropout)
    if args.model == "revvit":
        return RevViT(**common, reversible=not args.no_rev_backprop)
    return ViT(**common, bdia=args.bdia_config)


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
                t = state["step"].item()  # a CPU tensor: no device sync
                grad = p.grad if group["weight_decay"] == 0 else p.grad + group["weight_decay"] * p
                state["m"].lerp_(grad, 1 - b1)
                state["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                v = state["v"]
                v_tilde = v * v.sum() ** 2 / (v.numel() * (v * v).sum()).clamp_min(1e-38)
                w = (v_tilde / (1 - b2**t) + eps).sqrt()
                w_tilde = w - 0.5 * w.min()
                p.addcdiv_(state["m"], w_tilde, value=-lr / (1 - b1**t))


def compiled(model, args):
    """--compile: torch.compile(model). With reversible --bdia each block is compiled on its own too
    (block.compile(), as torchtitan does; the state_dict keys stay): bdia.run_blocks keeps the
    reversible stack out of the model's graph, because a block's forward and its recomputation in the
    backward pass must run the same compiled code for eq. (24) to be exact. Compiling takes minutes
    on a CPU (the small run of the docstring, once on a busy 2-core CPU: 289 s compiled, 84 s eager);
    it pays off only on long runs."""
    if not args.compile:
        return model
    if args.bdia_config is not None and args.bdia_config.reversible:
        for block in model.blocks:
            block.compile()
    return torch.compile(model)


def make_optimizer(name, model, lr, weight_decay):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return SETAdam(model.parameters(), lr=lr, weight_decay=weight_decay)


# -----------------------------------------------------------------------------
# Precision: the blocks under autocast, the residual stream and the loss in float32

AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision(args, device):
    """--precision resolved: auto is fp16 on CUDA (the reference's train_cifar10.py), fp32 on a CPU.
    Resolved where the run runs, so a run resumed on another device takes that device's."""
    if args.precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return args.precision


def grad_scaler(args, device):
    """fp16 trains with a GradScaler (the reference's defaults: scale 2^16, halved on an inf or NaN
    gradient, whose step is skipped, doubled after 2,000 good steps); otherwise a disabled one,
    whose scale, step and update are loss.backward() and optimizer.step() unchanged."""
    return torch.amp.GradScaler(device.type, enabled=precision(args, device) == "fp16")


# -----------------------------------------------------------------------------
# Training loop


def learning_rate(epoch, args):
    """The cosine schedule over the epochs: epoch e = 1..E trains at lr (1 + cos(pi (e - 1) / E)) / 2."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - 1) / args.epochs))) * args.lr


def train_step(model, optimizer, scaler, x, y, args):
    """One step on the batch (x, y); returns (loss, logits). The blocks run under --precision's
    autocast; BDIA's residual stream stays float32 (models.PatchEmbedding casts it), so the
    reversible backward stays exact; the loss is scaled by the GradScaler under fp16."""
    dtype = AUTOCAST[precision(args, x.device)]
    with torch.autocast(x.device.type, dtype or torch.float32, enabled=dtype is not None):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # with --bdia (reversible): the blocks' activations are rebuilt here by eq. (24)
    if args.grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)  # skipped when a gradient is inf or NaN (fp16 only)
    scaler.update()
    return loss, logits


def train_epoch(model, optimizer, scaler, images, args, epoch, signals, stop_within, within=None):
    """One epoch; its order and augmentation come from a generator seeded by (seed, epoch),
    so a resumed run sees the same batches. Returns (mean loss, accuracy). Where a step begins
    after a signal, stop_within(the point: step, the generator's state, the sums so far) saves
    the run and stops it; `within` (such a point) continues the epoch from there."""
    model.train()  # dropout on; with --bdia the blocks draw a gamma per sample and block (eq. 21)
    device = images.mean.device
    generator = runlib.step_generator(args.seed, epoch)  # the order, then every crop, flip and RandAugment op
    order = torch.randperm(len(images.train_x), generator=generator)
    # Sums stay on the device: reading them every step would sync the host with a GPU.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct, seen, first = torch.zeros((), dtype=torch.int64, device=device), 0, 0
    if within is not None:  # a run stopped within this epoch: its draws and its sums so far
        generator.set_state(within["generator"])
        total_loss, correct = within["loss_sum"].to(device), within["correct"].to(device)
        seen, first = within["seen"], within["step"]
    steps = range(0, len(order), args.batch_size)
    bar = tqdm(steps, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, initial=first)
    for step, start in enumerate(steps[first:], first):
        if signals.received(device):
            stop_within(dict(epoch=epoch, step=step, steps=len(steps), batch=args.batch_size, seen=seen,
                             generator=generator.get_state(), loss_sum=total_loss.cpu(), correct=correct.cpu()))
        idx = order[start: start + args.batch_size]
        x = normalize(augment(images.train_x[idx].to(device, non_blocking=True), args, generator), images.mean, images.std)
        y = images.train_y[idx].to(device, non_blocking=True)
        loss, logits = train_step(model, optimizer, scaler, x, y, args)
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(-1) == y).sum()
        seen += len(idx)
        bar.update(1)
        if step % 20 == 0 and bar.format_dict["elapsed"]:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}", img_s=f"{seen / bar.format_dict['elapsed']:.0f}")
    bar.close()
    return total_loss.item() / seen, correct.item() / seen


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, images, args):
    """(loss, accuracy) on the validation images, in float32 whatever --precision (as the
    reference's test()). model.eval(): a BDIA-ViT is the standard ViT here (eq. 25, gamma =
    E[gamma] = 0), up to the 2^-l rounding of each block's output."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in tqdm(range(0, len(images.val_x), args.eval_batch_size), desc="evaluating", leave=False, dynamic_ncols=True):
        x = normalize(images.val_x[start: start + args.eval_batch_size].to(images.mean.device), images.mean, images.std)
        y = images.val_y[start: start + args.eval_batch_size].to(images.mean.device)
        logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return total_loss / len(images.val_x), correct / len(images.val_x)


def gamma_sweep(model, images, args):
    """Validation accuracy with one constant gamma in every block at inference (Fig. 1)."""
    results = []
    for gamma in args.eval_gammas:
        with constant_gamma(model, gamma):
            results.append(dict(gamma=gamma, val_acc=evaluate(model, images, args)[1]))
    return results


def write_gamma_sweep(out, sweep):
    """OUT_DIR/gamma_sweep.json, written atomically (reproduce.py counts a run with it as swept), and printed."""
    data.atomic_write(out / "gamma_sweep.json", lambda tmp: Path(tmp).write_text(json.dumps(sweep, indent=1)))
    print("gamma at inference   val acc")
    for row in sweep:
        print(f"{row['gamma']:>18.3f}   {row['val_acc']:.4f}")


# -----------------------------------------------------------------------------
# main: flags (with --resume the checkpoint's), data, model, the epochs (each logged and
# checkpointed), the gamma sweep


def main(argv=None):
    args = None
    try:
        args = parse_args(argv)
        with runlib.folder_lock(args.out_dir):  # one run per folder
            runlib.refuse_to_replace(args)  # without --resume or --overwrite, never over another run
            train(args)
    except runlib.ERRORS as e:  # data, checkpoint, divergence, precision, out of memory, a failed write
        runlib.exit_with(e, SCRIPT)
    except (runlib.Stopped, KeyboardInterrupt) as e:  # Ctrl-C, SIGTERM
        runlib.exit_stopped(e, SCRIPT, args and args.out_dir)


def train(args):
    device, out = torch.device(args.device), Path(args.out_dir)
    ckpt = runlib.read_checkpoint(out / "ckpt.pt", SCRIPT) if args.resume else None  # before the data: fail fast
    print(f"loading {args.dataset} from {data.images_folder(args.dataset, args.data_dir)} ...", flush=True)
    images = load_images(args, device)
    torch.manual_seed(args.seed)  # initial weights; each epoch then draws from its own generator
    model = build_model(args, images.train_x.shape[1], data.CLASSES[args.dataset]).to(device)  # BDIA enters here
    optimizer = make_optimizer(args.optimizer, model, args.lr, args.weight_decay)
    scaler = grad_scaler(args, device)
    start_epoch, best_acc = 1, 0.0
    if ckpt is not None:
        print(f"resuming {out / 'ckpt.pt'}, saved after {runlib.position(ckpt)}")
        runlib.restore(ckpt, model, optimizer)
        start_epoch, best_acc = ckpt["epoch"] + 1, ckpt["best_acc"]
        if scaler.is_enabled() and ckpt.get("scaler"):  # none: the run trained in another precision until now
            scaler.load_state_dict(ckpt["scaler"])
    within = runlib.point_within(ckpt, args.batch_size)  # stopped by a signal within start_epoch
    train_model = compiled(model, args)  # `model` keeps the plain state_dict's names
    log = runlib.JsonlLog(out / "log.jsonl", resume=args.resume, keep=lambda line: line["epoch"] < start_epoch)
    mode = "RevViT" if args.model == "revvit" else ("BDIA-ViT" if args.bdia else "ViT")
    print(f"{mode}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(images.train_x)} "
          f"training images, {args.dataset}, {device}, {precision(args, device)}"
          f"{' autocast with a GradScaler' if scaler.is_enabled() else ''}" + (f", epochs {start_epoch}..{args.epochs}"
                                                         if start_epoch <= args.epochs else ""))
    if start_epoch > args.epochs:
        print(runlib.finished(out, start_epoch - 1, args.epochs, "epoch", "--epochs"))

    def save(epoch, within=None):  # at the end of `epoch`, or stopped at a point within the next
        runlib.save_checkpoint(out / "ckpt.pt", args, model=model.state_dict(), optimizer=optimizer.state_dict(),
                               scaler=scaler.state_dict(), epoch=epoch, best_acc=best_acc, within=within)

    def stop_within(point):  # a signal came: save this point of the epoch, and stop
        save(point["epoch"] - 1, point)
        signals.stop(runlib.position(dict(within=point)))

    epoch_seconds, val_acc = [], None
    with runlib.Signals() as signals:  # Ctrl-C, SIGTERM: the step ends, the run is saved there, it stops
        for epoch in range(start_epoch, args.epochs + 1):
            # an error names this epoch and the intact checkpoint before it
            with runlib.at(f"epoch {epoch}", out):
                # from the flags, not the checkpoint: a run resumed with a lower --lr uses it
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(epoch, args)
                t0 = time.perf_counter()
                train_loss, train_acc = train_epoch(train_model, optimizer, scaler, images, args, epoch, signals,
                                                    stop_within, within if epoch == start_epoch else None)
                runlib.check_loss(train_loss)  # NaN: stop before a diverged state is logged or saved
                epoch_seconds.append(time.perf_counter() - t0)
                val_loss, val_acc = evaluate(train_model, images, args)
            best_acc = max(best_acc, val_acc)
            # the log line first, then the checkpoint: a run killed between the two resumes from the
            # previous checkpoint, and --resume drops the log lines written after it
            log.write(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                      lr=optimizer.param_groups[0]["lr"], epoch_seconds=epoch_seconds[-1],
                      peak_memory_mb=runlib.peak_memory_mb(device), device=device.type,
                      precision=precision(args, device),
                      **({"grad_scale": scaler.get_scale()} if scaler.is_enabled() else {}))
            print(f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}, val loss {val_loss:.4f} "
                  f"acc {val_acc:.4f}, {epoch_seconds[-1]:.1f}s")
            save(epoch)

    if args.eval_gammas:  # Fig. 1: how the trained model fares with other integrators at inference
        write_gamma_sweep(out, gamma_sweep(model, images, args))
    if val_acc is not None:
        print(f"best val acc {best_acc:.4f}, final val acc {val_acc:.4f}, peak memory "
              f"{runlib.peak_memory_mb(device):.0f} MB, {np.mean(epoch_seconds):.1f} s/epoch")


if __name__ == "__main__":
    main()
