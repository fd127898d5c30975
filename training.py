"""
Pieces every training script shares: the BDIA and run flags, device and autocast,
atomic checkpoints with exact resume, JSON-lines logs, verified downloads, the learning
rate schedule and torchrun (DDP) setup. Each script stays readable top to bottom; what
they have in common lives here once.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from bdia import BDIAConfig

# -----------------------------------------------------------------------------
# Command-line flags


def parse_gammas(text):
    try:
        return tuple(float(g) for g in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as -0.5,0.5, got {text!r}")


def parse_bits(text):
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer l (quantization 2^-l) or 'none', got {text!r}")


NUMBER_LIST_FLAGS = ("--gammas", "--eval-gammas")


def parse_args(parser, argv=None):
    """parser.parse_args, letting number lists start with a minus: `--gammas -0.5,0.5`
    (argparse alone would take -0.5,0.5 for an option)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    joined = []
    while argv:
        arg = argv.pop(0)
        if arg in NUMBER_LIST_FLAGS and argv and argv[0][:2] in [f"-{c}" for c in "0123456789."]:
            arg = f"{arg}={argv.pop(0)}"
        joined.append(arg)
    return parser.parse_args(joined)


def add_bdia_args(parser):
    g = parser.add_argument_group("BDIA")
    g.add_argument("--bdia", action="store_true", help="train with BDIA (default: the plain model)")
    g.add_argument("--gammas", type=parse_gammas, default=(-0.5, 0.5), help="values gamma_k is drawn from (default -0.5,0.5)")
    g.add_argument("--bits", type=parse_bits, default=9, help="quantization level l (2^-l), or 'none' (default 9)")
    g.add_argument("--no-reversible", action="store_true", help="store activations instead of rebuilding them (eq. 24)")
    g.add_argument("--eval-gamma", type=float, default=0.0, help="constant gamma at inference (default 0: the standard model)")


def bdia_config(args, parser=None):
    """The BDIAConfig the flags ask for, or None without --bdia. A configuration that
    cannot work is a parser error (exit code 2) when a parser is given."""
    if not args.bdia:
        return None
    try:
        return BDIAConfig(args.gammas, args.bits, not args.no_reversible, args.eval_gamma)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))


def add_run_args(parser, out_dir):
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast for the blocks (the residual stream stays float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--out-dir", default=out_dir, help=f"logs and checkpoints (default {out_dir})")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA device; use --device cpu")
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


# -----------------------------------------------------------------------------
# Checkpoints, RNG state and logs


def atomic_write(path, write):
    """write(tmp) to a temporary file beside `path`, then rename it to `path`: a killed run
    never leaves a half-written file, and a failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, state):
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be read."""


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint safely (weights_only=True: no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run without --resume to start a new run")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e}); delete it or start a new --out-dir") from e


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


class JsonlLog:
    """Appends one JSON object per line to `path` (OUT/log.jsonl)."""

    def __init__(self, path, resume=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()

    def write(self, **fields):
        with open(self.path, "a") as f:
            f.write(json.dumps(fields) + "\n")
            f.flush()

    def read(self):
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_only(self, keep):
        """Keep the lines for which keep(line) is true. On --resume: those written before the
        checkpoint the run continues from, so that a run killed between its log line and its
        checkpoint does not log that epoch twice."""
        lines = "".join(json.dumps(r) + "\n" for r in self.read() if keep(r))
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(lines))


# -----------------------------------------------------------------------------
# Downloads


class DownloadError(RuntimeError):
    pass


def file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, md5=None, sha256=None, size=None, manual=""):
    """Fetch `url` to `dest` with a progress bar, verify its checksum (and size, where only
    that is published), and only then move it into place; an existing verified `dest` is
    used as is."""
    from tqdm import tqdm

    dest = Path(dest)
    expected = [(alg, digest) for alg, digest in (("md5", md5), ("sha256", sha256)) if digest]

    def verified(path):
        right_size = size is None or path.stat().st_size == size
        return right_size and all(file_digest(path, alg) == digest for alg, digest in expected)

    if dest.is_file() and verified(dest):
        return dest
    hint = f" To get it by hand: {manual}" if manual else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        if not verified(part):
            raise DownloadError(f"{url} arrived corrupted (checksum mismatch).{hint}")
        shutil.move(part, dest)
    except DownloadError:
        raise
    except OSError as e:  # URLError is an OSError: offline, DNS, HTTP errors
        raise DownloadError(f"cannot download {url} ({e}).{hint}") from e
    finally:
        part.unlink(missing_ok=True)
    return dest


def unzip_member(archive, member, dest):
    """Copy one member of a zip archive to dest, atomically. The archives this project reads
    publish no checksum, so integrity rests on the member's CRC-32, which zipfile checks
    while reading (BadZipFile on a mismatch; KeyError for a missing member)."""
    with zipfile.ZipFile(archive) as z:
        data = z.read(member)
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))


# -----------------------------------------------------------------------------
# Learning rate and torchrun


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


def is_main(dist):
    return dist.rank == 0
