"""
The life of a run in its folder, what the four training scripts share so that each reads top to
bottom as its story (flags, data, model, optimizer, loop, evaluation, checkpoint):

    flags      ArgumentParser: the run flags (--device, --amp, --compile, --seed, --out-dir,
               --overwrite, --resume), the checks of a script's flags, --help with defaults,
               --resume with the checkpoint's own flags (checked before any data is read)
    folder     one run per --out-dir (a lock), no new run over an old one (--overwrite),
               checkpoints that survive a kill and resume exactly (every RNG state in them),
               the JSON-lines log
    signals    Ctrl-C and SIGTERM: the step ends, the run is saved there, exit 130 or 143
    errors     what a user can act on as one line and exit code 2 (exit_with)

What is not the run's life is elsewhere: each script defines its BDIA flags, builds the BDIAConfig
its model receives, its --compile, its learning-rate schedule and optimizer groups;
plumbing/distributed.py holds torchrun (DDP) and --fsdp (FSDP2).
"""

import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from bdia import BDIAError, DivergedError, PrecisionError, exact_limit, mantissa_bits
from plumbing.data import DataError, atomic_write

# what a CUDA out-of-memory error suggests, in every script
LOWER_MEMORY = "a smaller --batch-size, --bdia (activations rebuilt, not stored) or --amp"

# Flags a resumed run may change: how long it runs, where and how fast (--fsdp or not), the recovery a failure
# line suggests (--lr, --grad-clip, --bits, --batch-size, --amp or train_vit's --precision), what it evaluates
# and logs, and where its files are (they may have moved). Anything else is the run itself: model, data set,
# BDIA, optimizer, schedule shape and seed come from the checkpoint.
MAY_CHANGE_ON_RESUME = {
    "resume", "out_dir", "device", "fsdp", "compile", "amp", "precision", "epochs", "max_iters", "lr", "grad_clip",
    "bits", "batch_size", "grad_accum", "eval_interval", "eval_iters", "eval_batch_size", "eval_gammas", "bleu_every",
    "bleu_samples", "no_test", "test_limit", "export", "decode_batch", "beam", "length_penalty", "no_repeat_ngram",
    "max_new_tokens",
    "data_dir", "data_root", "text_file", "data", "locale_dir", "cache_dir", "init_from", "tokenizer",
    "train_file", "valid_file", "test_file",
}
# Flags that belong to this invocation, never taken from the checkpoint nor written into a resume command
THIS_INVOCATION = ("out_dir", "resume", "overwrite", "device", "fsdp")

# -----------------------------------------------------------------------------
# Flags


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows the defaults (not those of on/off switches
    or of flags that are unset or empty by default)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


class Numbers(argparse.Action):
    """--gammas -0.5 0.5 (nargs="+"), or with commas: --gammas=-0.5,0.5. A tuple of floats."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            numbers = tuple(float(v) for item in values for v in item.split(",") if v)
        except ValueError:
            raise argparse.ArgumentError(self, f"expected numbers, space- or comma-separated, such as -0.5 0.5; "
                                               f"got {' '.join(values)!r}")
        setattr(namespace, self.dest, numbers)


def parse_bits(text):
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer l (quantization 2^-l) or 'none', got {text!r}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit code 2) without the usage block, and
    whose --help shows the defaults. The training scripts add their own flags and their BDIA
    flags, then the run flags (add_run_flags), parse with parse(), which checks them and handles
    --resume, and build their BDIAConfig through checked_config()."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_run_flags(self, out_dir, fsdp=False):
        """The run flags, after the script's own and its BDIA flags (--resume's help names --grad-accum where it
        is one); fsdp: --fsdp too (train_gpt.py, finetune_e2e.py)."""
        g = self.add_argument_group("run")
        g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
        g.add_argument("--amp", action="store_true", help="bfloat16 autocast for the blocks (the residual stream stays float32)")
        if fsdp:
            g.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                           "state over the processes (FSDP2, fully_shard on each block and the root) instead of DDP")
        g.add_argument("--compile", action="store_true", help="torch.compile the model, and with reversible --bdia "
                       "each block too (the script's compiled(); slower to start, not always faster on a CPU)")
        g.add_argument("--seed", type=int, default=1337, help="initial weights, data order, dropout and gammas")
        g.add_argument("--out-dir", default=out_dir, help="log.jsonl and ckpt.pt; one run at a time")
        g.add_argument("--overwrite", action="store_true", help="start a new run in an OUT_DIR that holds one, "
                       "replacing it (without it such a run stops: use --resume to continue the run there)")
        speed = "--batch-size, --grad-accum" if any(a.dest == "grad_accum" for a in self._actions) else "--batch-size"
        g.add_argument("--resume", action="store_true", help="continue OUT_DIR/ckpt.pt with its own flags; flags "
                       f"given beside it may change only the run's length, device and speed ({speed}, "
                       "--amp, --compile), evaluation and decoding, file places, --lr, --grad-clip and --bits")

    def parse(self, argv=None, at_least_1=(), at_least_0=(), positive=(), fractions=()):
        """Parse and check the flags. With --resume the flags are the checkpoint's, except those
        given that may change (MAY_CHANGE_ON_RESUME); another given difference is refused. Sets
        args.script (this script); resolves --device auto."""
        args = self.parse_args(argv)
        if args.resume and args.overwrite:
            self.error("--resume continues the run in OUT_DIR, --overwrite replaces it: give one of them")
        if args.resume:
            self.resume_flags(args, argv)
        rules = ((at_least_1, lambda v: v >= 1, "must be at least 1"), (at_least_0, lambda v: v >= 0, "must not be negative"),
                 (positive, lambda v: v > 0, "must be positive"), (fractions, lambda v: 0 <= v < 1, "must be in [0, 1)"))
        for names, ok, rule in rules:
            for name in names:
                if not ok(getattr(args, name)):  # NaN fails every rule
                    self.error(f"--{name.replace('_', '-')} {rule}, got {getattr(args, name)}")
        if getattr(args, "fsdp", False) and "RANK" not in os.environ:
            self.error(f"--fsdp shards the model over the processes of torchrun: run torchrun --nproc_per_node=N "
                       f"{self.prog} ... --fsdp (or leave --fsdp out for one process)")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            self.error(f"--out-dir {args.out_dir} is a file; give a folder for the logs and checkpoints")
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cuda" and not torch.cuda.is_available():
            self.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        args.script = self.prog
        return args

    def checked_config(self, make, args):
        """make(args): the BDIAConfig a script builds of its BDIA flags (None without --bdia), with what
        cannot work as one line and exit code 2: BDIAConfig's refusals (ValueError) named as flags, and a
        grid 2^-l that float32 cannot hold where the stream is. A grid so coarse (l <= 0) that a stream
        near 1 or below rounds to 0 (eq. 18), so that nothing trains until the stream outgrows it, is
        warned of on stderr: the paper's Table 4 goes down to l = -2, so it is not refused."""
        try:
            config = make(args)
        except ValueError as e:  # BDIAConfig's own words, and how its names read as flags
            self.error(f"{e} (as flags: gammas is --gammas, bits --bits, bits=None --bits none, reversible=True the "
                       "default, reversible=False --no-reversible)")
        if config is None or config.bits is None:
            return config
        if exact_limit(torch.float32, config.bits) <= 1:  # the scripts' streams are float32 and near 1
            self.error(f"--bits {config.bits}: a float32 residual stream holds the 2^-l grid exactly only for "
                       f"|x| < 2^(23 - l) <= 1, which a normalised stream exceeds; use --bits "
                       f"{mantissa_bits(torch.float32) - 3} or less (the paper uses 9)")
        if config.bits <= 0 and os.environ.get("RANK", "0") == "0":
            grid = 2 ** -config.bits
            print(f"{self.prog}: warning: --bits {config.bits} rounds the residual stream to multiples of 2^{-config.bits} "
                  f"= {grid}: every entry below {grid / 2:g} in magnitude becomes 0, and a stream that starts near 1 or "
                  "below (embeddings, normalised inputs) starts as 0, so the loss stays where it starts until the "
                  "stream outgrows the grid, if it ever does (RESULTS.md, Table 4 on the GPT: 1,200 to 1,800 "
                  "iterations at --bits -2); the paper trains with --bits 9 and goes down to -2", file=sys.stderr)
        return config

    def resume_flags(self, args, argv):
        """Replace args by the flags of OUT_DIR/ckpt.pt but for those given that may change."""
        path = Path(args.out_dir) / "ckpt.pt"
        flags = read_checkpoint(path, self.prog, mmap=True)["args"]  # its flags, not its weights
        given = self.given_flags(argv)
        differ = [name for name in given if name not in MAY_CHANGE_ON_RESUME and name in flags
                  and as_saved(getattr(args, name)) != as_saved(flags[name])]
        if differ:
            said = ", ".join(f"--{n.replace('_', '-')} {as_saved(getattr(args, n))}" for n in differ)
            self.error(f"{said} differs from the run in {path}, which --resume continues as it was run: "
                       f"{self.command_line(flags, args.out_dir)} (a new run needs another --out-dir)")
        for name, value in flags.items():  # but where the checkpoint is and the machine it runs on are this run's
            if name not in given and hasattr(args, name) and name not in THIS_INVOCATION:
                setattr(args, name, tuple(value) if isinstance(value, list) else value)

    def given_flags(self, argv):
        """The names of the flags given in argv (not left at their defaults)."""
        unset = object()
        names = {a.dest for a in self._actions if a.dest != "help"}
        parsed = self.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
        return {name for name in names if getattr(parsed, name) is not unset}

    def command_line(self, flags, out_dir):
        """The command that continues the run of `flags`: its flags that are not defaults."""
        words = [self.prog]
        for a in self._actions:
            if not a.option_strings or a.dest not in flags or a.dest in (*THIS_INVOCATION, "help"):
                continue
            value, option = flags[a.dest], a.option_strings[0]
            if as_saved(value) == as_saved(a.default):
                continue
            if isinstance(a, argparse.BooleanOptionalAction):
                words.append(option if value else option.replace("--", "--no-", 1))
            elif a.nargs == 0:  # store_true, store_false
                words.append(option)
            elif isinstance(value, (list, tuple)):
                words += [option, *map(str, value)]
            else:
                words += [option, "none" if value is None else str(value)]
        return shlex.join([*words, "--out-dir", str(out_dir), "--resume"])


def as_saved(value):
    """A flag's value as a checkpoint holds it (tuples load as lists)."""
    return list(value) if isinstance(value, tuple) else value


# -----------------------------------------------------------------------------
# One run per folder


class FolderInUse(Exception):
    """Another live process holds the --out-dir."""


@contextlib.contextmanager
def folder_lock(folder, flag="--out-dir"):
    """Hold FOLDER/run.lock for the run: a second run on the folder stops at once (FolderInUse,
    naming the holder's process id, and `flag` as the way to another folder). The lock is an
    flock, which the OS releases when the holder dies, so a run that was killed does not block
    --resume (its run.lock stays behind, harmless). A run that ends, well or with an error,
    removes run.lock, and the folder when the lock was all it held. Under torchrun rank 0
    holds it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    path = folder / "run.lock"
    f = lock_file(path, flag)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a run waiting on this file sees it gone (lock_file)
        f.close()
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                folder.rmdir()


def refuse_to_replace(args):
    """A run without --resume never replaces the run in OUT_DIR unasked: where OUT_DIR/ckpt.pt is,
    it stops before writing anything (a CheckpointError naming what the folder holds and the two
    ways on). With --overwrite the old run's files stay until the new run writes its own (its log
    when training starts, its checkpoint at the first save), so a new run that fails on its data
    or flags leaves the old one intact."""
    path = Path(args.out_dir) / "ckpt.pt"
    if args.resume or args.overwrite or not path.is_file():
        return
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        held = (f"{'a finished' if run_is_finished(ckpt) else 'an unfinished'} run of "
                f"{ckpt.get('script') or 'another program'} ({position(ckpt)})")
    except Exception:  # damaged: still not this run's to replace unasked, and --resume cannot continue it
        raise CheckpointError(f"{args.out_dir} holds {path}, which cannot be read ({checkpoint_damage(path)}), so "
                              "--resume cannot continue it: start over with --overwrite (which replaces it), or delete "
                              "it, or use another --out-dir") from None
    raise CheckpointError(f"{args.out_dir} holds {held}: continue it with --resume, or start over with --overwrite "
                          "(which replaces it), or use another --out-dir")


def lock_file(path, flag):
    """The open, flock-ed path, with this process's id in it."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")
        except (FileNotFoundError, FileExistsError):  # the run that held it ended and removed its new folder just
            continue  # now (mkdir: after it found the folder there, before it saw it was a folder)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "process id unknown"
            f.close()
            raise FolderInUse(f"{path.parent} is in use by a running process ({holder}): wait for it to end or stop "
                              f"it, or use another {flag}") from None
        except BaseException:  # another error of flock (no locks on this file system): not left open
            f.close()
            raise
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        f.close()  # the run that held it ended and removed this file after it was opened: lock the new one
    try:
        f.truncate(0)
        f.write(f"process {os.getpid()}\n")
        f.flush()
    except BaseException:  # a full disk: the error goes on, the file is not left open
        f.close()
        raise
    return f


# -----------------------------------------------------------------------------
# Checkpoints, random states, logs


class CheckpointError(Exception):
    """A checkpoint that is missing, cannot be read or written, or belongs to another run."""


class WriteWatch:
    """A binary file for torch.save that keeps the OSError of a write that failed (a full disk,
    a file size limit): torch's zip writer reports a short write as a RuntimeError of its own."""

    def __init__(self, f):
        self.f, self.failed = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.failed = e
            raise

    def flush(self):
        self.f.flush()


def save_checkpoint(path, args, **state):
    """torch.save of the run's state, its flags and every RNG state, atomically: a run killed
    (or a disk filled) while saving keeps its previous checkpoint. A write the file system
    refuses is a CheckpointError (torch turns it into a RuntimeError; WriteWatch sees the OSError)."""
    flags = {k: as_saved(v) for k, v in vars(args).items() if k not in ("script", "bdia_config")}
    state = dict(script=args.script, args=flags, **{"rng": random_states(), **state})

    def write(tmp):
        with open(tmp, "wb") as f:
            out = WriteWatch(f)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.failed is None:  # not a failed write: torch's own error
                    raise
                raise out.failed from None

    try:
        atomic_write(path, write)
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}): {continue_from(Path(path).parent, 'the same flags')} "
                              "once there is space (or permission)") from e


def read_checkpoint(path, script, mmap=False):
    """The checkpoint `script` wrote at `path`, loaded safely (weights_only=True: no code runs on
    load) into host memory: load_state_dict copies the weights to the model's device, and the
    optimizers' step counters stay on the host (on a GPU each step would read them back, a sync
    per tensor). mmap: read what is used only (the flags, not the weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: run without --resume to start a new run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        wrong = None if isinstance(ckpt, dict) and "args" in ckpt else "it holds no run flags: not a checkpoint of these scripts"
    except Exception:  # torch.load's errors are of many types, and its text is advice for another case
        wrong = checkpoint_damage(path)
    if wrong:
        raise CheckpointError(f"cannot read checkpoint {path}: {wrong}; delete it (a new run starts there) or use "
                              "another --out-dir")
    if ckpt.get("script") != script:
        wrote = ckpt.get("script") or "an older version of these scripts or another program"
        raise CheckpointError(f"{path} was written by {wrote}, not {script}: use that script, or another --out-dir "
                              "for a new run")
    return ckpt


def checkpoint_damage(path):
    """What is wrong with a file torch.load cannot read, from the file itself: torch.save writes a
    zip archive, whose directory is at its end."""
    with open(path, "rb") as f:
        start = f.read(4)
    if not start:
        return "it is empty"
    if start == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"it is truncated (a zip archive without its end, {path.stat().st_size} bytes)"
    if start == b"PK\x03\x04":
        return "it is corrupt (a zip archive whose contents torch cannot load)"
    return "it is corrupt or not a checkpoint of these scripts (not the zip archive torch.save writes)"


def restore(ckpt, model, optimizer, rank=None):
    """Continue the run of `ckpt` (read_checkpoint's): the model's weights (or, of a model that
    trains only some, those it trains), the optimizer's state and the RNG states (of process
    `rank` under torchrun), so that the dropout masks and gammas continue where they were. A
    process the saved run did not have (more processes now) keeps the RNG it was seeded with.
    Under --fsdp this runs before fully_shard, on the whole model (shard_model shards it after)."""
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        state = model.state_dict(keep_vars=True)
        loaded = {state[name].data_ptr() for name in ckpt["model"] if name in state}  # tied weights: loaded once
        lacking = [name for name in missing if state[name].requires_grad and state[name].data_ptr() not in loaded]
        if unexpected or lacking:
            raise KeyError((unexpected or lacking)[0])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:  # torch's load_state_dict errors
        detail = str(e).strip().splitlines()
        raise CheckpointError(f"the checkpoint's state does not fit the model and optimizer its flags build "
                              f"({detail[-1].strip() if detail else type(e).__name__}): it is damaged or of another "
                              "version of this script; start a new run in another --out-dir") from e
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one per process under torchrun
    if (rank or 0) < len(states):
        restore_random_states(states[rank or 0])


def position(ckpt):
    """Where a checkpoint is: "iteration N", "epoch N" (its end), or "step K of M in epoch N" (a run
    stopped by a signal within epoch N, its first K steps done)."""
    if "iter" in ckpt:
        return f"iteration {ckpt['iter']}"
    within = ckpt.get("within")
    if within:
        return f"step {within['step']} of {within['steps']} in epoch {within['epoch']}"
    return f"epoch {ckpt['epoch']}"


def point_within(ckpt, batch):
    """The point within an epoch where a signal stopped the run of `ckpt` (None: an epoch's end).
    The epoch goes on only with the batch size that cut its batches (`batch`, over all processes)."""
    within = ckpt.get("within") if ckpt is not None else None
    if within and within["batch"] != batch:
        raise CheckpointError(f"the run was stopped within epoch {within['epoch']}, whose batches hold {within['batch']} "
                              f"examples, not {batch}: resume with that --batch-size (and number of processes); it may "
                              "change from the next epoch on")
    return within


def run_is_finished(ckpt):
    """Whether a checkpoint is at its run's end (its --max-iters or --epochs)."""
    flags = ckpt.get("args", {})
    if "iter" in ckpt:
        return ckpt["iter"] >= flags.get("max_iters", math.inf)
    return not ckpt.get("within") and ckpt.get("epoch", 0) >= flags.get("epochs", math.inf)


def random_states():
    """Every RNG a run draws from, in a form torch.load(weights_only=True) accepts."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_random_states(state):
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_generator(seed, step):
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
        """Append a line; a line the file system refuses (a full disk) is cut off again, so that
        the log stays whole lines, and is a CheckpointError naming the log."""
        line = memoryview((json.dumps(fields) + "\n").encode())
        with open(self.path, "ab", buffering=0) as f:  # unbuffered: a failed write fails here, not at close
            size = f.seek(0, os.SEEK_END)
            try:
                while line:
                    line = line[f.write(line):]  # a full disk may first take part of it
            except OSError as e:
                f.truncate(size)  # shrinking needs no space
                raise CheckpointError(f"cannot write {self.path} ({e.strerror or e}): "
                                      f"{continue_from(self.path.parent, 'the same flags')} once there is space") from e

    def read(self):
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def finished(out_dir, done, total, unit, flag):
    """The line of a --resume whose checkpoint is at or past the end: nothing is left to train."""
    return (f"the run in {out_dir} is finished ({unit} {done}, {flag} {total}): nothing left to train; a larger "
            f"{flag} trains it further")


def peak_memory_mb(device):
    """Peak memory so far: allocated CUDA memory, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -----------------------------------------------------------------------------
# Errors: what a user can act on is one line and exit code 2


ERRORS = (DataError, CheckpointError, FolderInUse, BDIAError, torch.cuda.OutOfMemoryError, OSError)


@contextlib.contextmanager
def at(where, out_dir):
    """Name the epoch (or iteration) `where` in the line of an error raised inside, and the
    folder whose checkpoint (from before `where`, so intact) the run continues from."""
    try:
        yield
    except Exception as e:
        e.where, e.out_dir = getattr(e, "where", where), getattr(e, "out_dir", out_dir)
        raise


def check_loss(loss):
    """A NaN or infinite training loss ends the run before it is logged or checkpointed."""
    if not math.isfinite(loss):
        raise DivergedError(f"training diverged (the training loss is {loss}): lower --lr or set --grad-clip")


def exit_with(e, script):
    """One of ERRORS as one line on stderr, `script: error: ...` as argparse's, and exit code 2.
    Training that failed names where, what to change and the checkpoint to continue from. A
    progress bar that the failure left open is closed first, so that the line starts a line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    message = str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        tried = re.search(r"Tried to allocate [\d.]+ \w+", message)  # the rest of torch's message is advice
        message = f"CUDA out of memory{f' ({tried.group(0)})' if tried else ''}: use {LOWER_MEMORY}"
    elif isinstance(e, OSError) and e.strerror:
        message = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if hasattr(e, "where"):
        change = {DivergedError: "a lower --lr", PrecisionError: "a smaller --bits",
                  torch.cuda.OutOfMemoryError: "a smaller --batch-size or --amp"}.get(type(e), "the same flags")
        message = f"{e.where}: {message}; {continue_from(e.out_dir, change)}"
    print(f"{script}: error: " + " ".join(message.split()), file=sys.stderr)
    raise SystemExit(2)


def continue_from(out_dir, change):
    """Where a failed run goes on: from the last checkpoint in out_dir (written atomically,
    so intact), with --resume and `change`; or anew with `change` when none was written."""
    path = Path(out_dir) / "ckpt.pt"
    try:  # mmap: the epoch is read without reading the weights
        at_step = position(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except FileNotFoundError:
        return f"no checkpoint was written yet: run again with {change}"
    except Exception:
        return f"{path} cannot be read: run again, without --resume, with {change}"
    return f"{path} ({at_step}) is intact: continue with --resume and {change}"


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM: the step in progress ends, the run is saved there, the process exits


class Stopped(BaseException):
    """A run ended by SIGINT or SIGTERM: saved at `where` (the end of a step), or, where is None,
    stopped at once (a second signal) with the last checkpoint as it was; finished: the signal came
    after the last step, whose checkpoint is the trained model (what follows training, such as a
    test or an export, did not run)."""

    def __init__(self, signum, where=None, finished=False):
        super().__init__(signum, where)
        self.signum, self.where, self.finished = signum, where, finished


class Signals:
    """Around a training loop: SIGINT (Ctrl-C) and SIGTERM (how a scheduler preempts a job, and
    how `timeout`, `docker stop` and `kill` end one) are noted, not obeyed at once. The loop asks
    received() where a step begins, writes a checkpoint of that point and calls stop(). A second
    signal stops at once (Stopped without a place): checkpoints are written atomically, so the
    last one stays intact. A signal that comes after the last step stops the run as the loop
    ends. Under torchrun (which forwards its signal to every process) received() is agreed over
    the processes, so that every one stops at the same step."""

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, error, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if kind is None and self.signum is not None:  # after the last step: the last checkpoint is the run's end
            raise Stopped(self.signum, finished=True)

    def note(self, signum, frame):
        if self.signum is not None:
            raise Stopped(signum)
        self.signum = signum

    def received(self, device="cpu"):
        """Whether a signal came (to any process under torchrun): then save, and stop()."""
        if torch.distributed.is_initialized():
            flag = torch.tensor(self.signum or 0, device=device)
            torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
            self.signum = self.signum or int(flag.item()) or None
        return self.signum is not None

    def stop(self, where):
        """The run is saved at `where`: end it (every process, once rank 0 has written)."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        raise Stopped(self.signum, where)


def exit_stopped(e, script, out_dir):
    """One line for a run a signal ended (Stopped, or a KeyboardInterrupt outside the training
    loop), and exit code 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM. While the line
    goes out one more Ctrl-C changes nothing; then the handlers are the caller's again, so a main()
    called from Python keeps its Ctrl-C (as a script, a Ctrl-C during the interpreter's exit may
    then print a traceback)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        say_stopped(e, script, out_dir)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    raise SystemExit(128 + getattr(e, "signum", signal.SIGINT))


def say_stopped(e, script, out_dir):
    """The stop's one line (rank 0's under torchrun), the progress bars closed first."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    signum = getattr(e, "signum", signal.SIGINT)
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
    if getattr(e, "where", None):
        said = f"stopped by {name} after {e.where}, saved there in {Path(out_dir) / 'ckpt.pt'}: --resume continues it"
    elif out_dir is None:
        said = f"stopped by {name}; nothing was written"
    elif getattr(e, "finished", False):
        said = (f"stopped by {name} after the last step: training is finished, saved in {Path(out_dir) / 'ckpt.pt'}; "
                "--resume runs what comes after it")
    else:
        said = f"stopped by {name}; {continue_from(out_dir, 'the same flags')}"
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one line, rank 0's
        print(f"{script}: {said}", file=sys.stderr)
    if torch.distributed.is_initialized() and getattr(e, "where", None):
        torch.distributed.destroy_process_group()
