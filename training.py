"""
What the four training scripts share, so that each of them reads top to bottom: the BDIA
and run flags and their checks, the device, checkpoints that survive a kill and resume
exactly, JSON-lines logs, the learning-rate schedules, the random draws of each epoch,
one-line errors (training that diverges or runs out of memory names the checkpoint to
continue from), and torchrun (DDP).
"""

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.distributed

import bdia_fused
from bdia import BDIAConfig, DivergedError, exact_limit, mantissa_bits
from data import DataError, atomic_write

# -----------------------------------------------------------------------------
# Flags


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit code 2) without the usage block:
    the message says what to change, and --help has the rest."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_list(values):
    """--gammas -0.5 0.5 (nargs="+"); items may also hold commas: --gammas=-0.5,0.5."""
    try:
        return tuple(float(v) for item in values for v in item.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, space- or comma-separated, such as -0.5 0.5; "
                                         f"got {' '.join(values)!r}")


def parse_bits(text):
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer l (quantization 2^-l) or 'none', got {text!r}")


def add_bdia_args(parser):
    g = parser.add_argument_group("BDIA")
    g.add_argument("--bdia", action="store_true", help="train with BDIA (default: the plain model)")
    g.add_argument("--gammas", nargs="+", default=["-0.5", "0.5"], metavar="G",
                   help="values gamma_k is drawn from (default -0.5 0.5)")
    g.add_argument("--bits", type=parse_bits, default=9, help="quantization level l (2^-l), or 'none' (default 9)")
    g.add_argument("--no-reversible", action="store_true", help="store activations instead of rebuilding them (eq. 24)")
    g.add_argument("--eval-gamma", type=float, default=0.0, help="constant gamma at inference (default 0: the standard model)")


def add_run_args(parser, out_dir):
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast for the blocks (the residual stream stays float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model; with reversible --bdia, "
                   "BDIA's arithmetic instead (BDIAConfig(fused=True))")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--out-dir", default=out_dir, help=f"logs and checkpoints (default {out_dir})")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")


def check_args(parser, args, at_least_1=(), at_least_0=(), positive=(), fractions=()):
    """Refuse what cannot run, as a parser error (one line, exit code 2): sizes below 1 or 0,
    rates that are not positive, probabilities outside [0, 1), an --out-dir that is a file,
    and a BDIA configuration that cannot work. Sets args.bdia_config (None without --bdia)."""
    rules = ((at_least_1, lambda v: v >= 1, "must be at least 1"), (at_least_0, lambda v: v >= 0, "must not be negative"),
             (positive, lambda v: v > 0, "must be positive"), (fractions, lambda v: 0 <= v < 1, "must be in [0, 1)"))
    for names, ok, rule in rules:
        for name in names:
            if not ok(getattr(args, name)):  # NaN fails every rule
                parser.error(f"--{name.replace('_', '-')} {rule}, got {getattr(args, name)}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"--out-dir {args.out_dir} is a file; give a folder for the logs and checkpoints")
    try:
        args.gammas = number_list(args.gammas)
        reversible = not args.no_reversible
        config = BDIAConfig(args.gammas, args.bits, reversible, args.eval_gamma) if args.bdia else None
        args.bdia_config = bdia_fused.fuse(config) if config and args.compile and reversible else config
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(in_flags(str(e)))
    if args.bdia and args.bits is not None and exact_limit(torch.float32, args.bits) <= 1:  # the scripts' streams
        parser.error(f"--bits {args.bits}: a float32 residual stream holds the 2^-l grid exactly only for "
                     f"|x| < 2^(23 - l) <= 1, which a normalised stream exceeds; use --bits "
                     f"{mantissa_bits(torch.float32) - 3} or less (the paper uses 9)")


def in_flags(message):
    """BDIAConfig's advice in the scripts' flags (it speaks Python: reversible=False, bits)."""
    for api, flag in (("BDIAConfig: ", ""), ("reversible=False", "--no-reversible"),
                      ("reversible=True", "reversible training (the default)"), ("bits=None", "--bits none"),
                      ("set bits", "set --bits")):
        message = message.replace(api, flag)
    return message


def compiled_model(model, args):
    """torch.compile(model) with --compile, but for reversible BDIA: its autograd Function keeps
    Python state between forward and backward, which a whole-model graph cannot hold, so there
    --compile compiles BDIA's element-wise arithmetic instead (BDIAConfig(fused=True))."""
    fused = args.bdia_config is not None and args.bdia_config.arithmetic is not None
    return torch.compile(model) if args.compile and not fused else model


def plain_args(args):
    """vars(args), the BDIA config as a plain dict: checkpoints load with weights_only=True."""
    config = args.bdia_config
    return {k: v for k, v in vars(args).items() if k != "bdia_config"} | {
        "bdia": None if config is None else dict(gammas=list(config.gammas), bits=config.bits, reversible=config.reversible,
                                                 eval_gamma=config.eval_gamma)}


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def autocast(device, enabled):
    """bfloat16 autocast on `device` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def peak_memory_mb(device):
    """Peak memory so far: allocated CUDA memory, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


LOWER_MEMORY = "a smaller --batch-size, --bdia (activations rebuilt, not stored) or --amp"


@contextlib.contextmanager
def one_line_errors():
    """What a user can act on ends the run with one line on stderr and exit code 2, never a
    traceback: missing or bad data, a missing, unreadable or foreign checkpoint, training
    that failed (TrainingFailed), a file that cannot be written, CUDA out of memory."""
    try:
        yield
    except (DataError, CheckpointError, TrainingFailed, OSError) as e:
        exit_with(e)
    except torch.cuda.OutOfMemoryError as e:  # outside the training loop (there: TrainingFailed)
        exit_with(f"{out_of_memory(e)}: use {LOWER_MEMORY}")


def exit_with(message):
    """`message` as one line on stderr, and exit code 2. A progress bar that the failure left
    open is closed first, so that the message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# Checkpoints, random state, logs


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read; the message says what to do."""


def save_checkpoint(path, **state):
    """torch.save(state), atomically: a run killed while saving keeps its previous checkpoint."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    """Load a checkpoint safely (weights_only=True: no code runs on load) into host memory:
    load_state_dict copies the weights to the model's device, and the optimizers' step
    counters stay on the host (on a GPU each step would read them back, a sync per tensor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run without --resume to start a new run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({gist(e)}): it is truncated, corrupt or not a "
                              "checkpoint of these scripts; delete it or start a new --out-dir") from e


def gist(e, limit=160):
    """What an exception says, in one short line: torch's load_state_dict error puts its first
    detail on the line after a header ("Error(s) in loading state_dict for ViT:"), torch.load
    adds paragraphs of advice after its first sentence."""
    if isinstance(e, KeyError):
        return f"it has no {e}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    text = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]).split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def restoring(path):
    """Around restoring a run's state from the checkpoint at `path`: one that another script,
    model or set of flags wrote (missing keys, other shapes) becomes a CheckpointError."""
    try:
        yield
    except (CheckpointError, torch.cuda.OutOfMemoryError):
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise foreign_checkpoint(path, gist(e)) from e


def foreign_checkpoint(path, detail):
    return CheckpointError(f"{path} was written by another script, model or flags ({detail}); give the flags of "
                           "the run that wrote it, or use another --out-dir for a new run")


def rng_state():
    """Every RNG a run draws from, in a form torch.load(weights_only=True) accepts."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def generator(seed, step):
    """The generator of one epoch's (or iteration's) data order and augmentation: seeded by
    (seed, step) alone, so a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class JsonlLog:
    """Appends one JSON object per line to `path` (OUT/log.jsonl). On --resume the lines
    written after the checkpoint the run continues from are dropped (keep), so a run killed
    between its log line and its checkpoint does not log that epoch twice."""

    def __init__(self, path, resume=False, keep=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        if resume and keep is not None:
            lines = "".join(json.dumps(r) + "\n" for r in self.read() if keep(r))
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(lines))

    def write(self, **fields):
        with open(self.path, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def read(self):
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# -----------------------------------------------------------------------------
# Training that fails: one line naming the epoch, the cause, the fix and where to continue


class TrainingFailed(Exception):
    """Training that cannot go on as configured: it diverged or ran out of memory. The
    message names the epoch (or iteration), the cause, what to change and the checkpoint
    to continue from; one_line_errors prints it."""


@contextlib.contextmanager
def failures(where, out_dir, lower_memory=LOWER_MEMORY):
    """Around one epoch (or iteration) `where`, such as "epoch 3": the engine's range errors
    and CUDA out of memory become TrainingFailed. Nothing of `where` has been logged or
    checkpointed yet, so the checkpoint before it is intact."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingFailed(f"{where}: {out_of_memory(e)}: use {lower_memory}; "
                             f"{continue_from(out_dir, 'those flags')}") from e
    except DivergedError as e:
        raise diverged(where, str(e).partition(": training diverged")[0], out_dir) from e
    except RuntimeError as e:
        if not str(e).startswith("BDIA: |x| reached"):
            raise
        change = "a smaller --bits, or a lower --lr if the loss was rising"
        raise TrainingFailed(f"{where}: {e}; {continue_from(out_dir, change)}") from e


def check_loss(loss, where, out_dir):
    """A NaN or infinite training loss ends the run before it is logged or checkpointed.
    Called once per logging interval with a loss already on the host: no extra device sync."""
    if not math.isfinite(loss):
        raise diverged(where, f"the training loss is {loss}", out_dir)


def diverged(where, cause, out_dir):
    return TrainingFailed(f"{where}: training diverged ({cause}): lower --lr or set --grad-clip; "
                          f"{continue_from(out_dir, 'a lower --lr')}")


def out_of_memory(e):
    tried = re.search(r"Tried to allocate [\d.]+ \w+", str(e))  # the rest of torch's message is advice
    return f"CUDA out of memory ({tried.group(0)})" if tried else "CUDA out of memory"


def continue_from(out_dir, change):
    """Where a failed run goes on: from the last checkpoint in out_dir (written atomically,
    so intact), with --resume and `change`; or anew with `change` when none was written."""
    path = Path(out_dir) / "ckpt.pt"
    try:  # mmap: the epoch is read without reading the weights
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        at = f"epoch {ckpt['epoch']}" if "epoch" in ckpt else f"iteration {ckpt['iter']}"
    except FileNotFoundError:
        return f"no checkpoint was written yet: run again with {change}"
    except Exception:
        return f"{path} cannot be read: run again, without --resume, with {change}"
    return f"{path} ({at}) is intact: continue with --resume and {change}"


# -----------------------------------------------------------------------------
# Optimizer groups, learning rate and torchrun


def decay_groups(model, weight_decay):
    """The trainable parameters as optimizer groups: weight decay on the 2-D weights (matmuls,
    embeddings) only, none on biases and LayerNorm gains (as nanoGPT and the LoRA repository)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def cosine_lr(step, total_steps, lr, warmup=0, min_lr=0.0):
    """Linear warmup for `warmup` steps, then cosine decay from lr to min_lr at total_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def linear_lr(step, total_steps, lr, warmup=0):
    """Linear warmup for `warmup` steps, then linear decay to 0 at total_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


Dist = namedtuple("Dist", "rank world_size local_rank enabled")


def distributed(device=None):
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a single
    process when not launched by torchrun. `device`: a torch.device or --device value."""
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, False)
    cuda = torch.cuda.is_available() if device in (None, "auto") else torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, True)
