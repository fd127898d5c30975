"""Nothing lost to a slip or a signal (issue 36). Real signals (SIGINT as Ctrl-C sends it, SIGTERM
as a scheduler, `timeout` or `kill` does) go into real training processes: each script ends the
step it is in, saves that point (within an epoch too), prints one line and exits 130 or 143, and
--resume then ends bit for bit where an uninterrupted run ends. A second Ctrl-C stops at once
with the last checkpoint intact. A new run on a folder that holds one stops before it writes
anything, unless --overwrite."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune_e2e  # noqa: E402
from plumbing import runlib  # noqa: E402
import train_gpt  # noqa: E402
import train_translate  # noqa: E402
import train_vit  # noqa: E402
from test_failures import FLAGS, fill, write_gpt2_and_e2e, write_pairs  # noqa: E402

torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the processes signalled: the same arithmetic
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
SCRIPTS = {"vit": train_vit, "gpt": train_gpt, "translate": train_translate, "e2e": finetune_e2e}
TIMING = {"epoch_seconds", "seconds", "tokens_per_s", "peak_memory_mb"}  # log fields no two runs share
# Runs long enough (hundreds of steps) that a signal sent after their first log line or checkpoint
# lands within an epoch, long before the end
LONG = {"vit": ["--batch-size", "2", "--epochs", "3"],
        "gpt": ["--text-file", "{data}/verse.txt", "--max-iters", "150", "--eval-interval", "10", "--bdia",
                "--dropout", "0.1"],
        "translate": ["--batch-size", "2", "--epochs", "3"],
        "e2e": ["--batch-size", "1", "--epochs", "3", "--eval-interval", "4"]}


@pytest.fixture
def data_of(tmp_path, cifar_dir, text_file):
    def write(script):
        folder = tmp_path / "data"
        if script == "vit":
            shutil.copytree(cifar_dir, folder)
            return folder
        folder.mkdir()
        if script == "gpt":
            shutil.copy(text_file, folder / "verse.txt")
        elif script == "translate":
            write_pairs(folder / "pairs.txt")
        else:
            write_gpt2_and_e2e(folder)
            rows = (folder / "trainset.csv").read_text().splitlines()  # 30 steps an epoch, not 6
            (folder / "trainset.csv").write_text("\n".join(rows[:1] + rows[1:] * 5) + "\n")
        return folder

    return write


def flags(script, data, out, *more):
    return fill([*FLAGS[script], *LONG[script], *more], dict(data=data, out=out))


def signalled(script, argv, ready, signum, then=None):
    """Run SCRIPT.py in a process of its own, send it `signum` once ready(what it wrote on stderr
    so far: its progress bars), and then `then` 0.05 s later; (exit code, the last line of stderr)."""
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPT_FILES[script]), *argv], cwd=ROOT, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: run.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not ready("".join(err)) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert run.poll() is None, f"the run ended before the signal: {''.join(err)[-2000:]}"
        run.send_signal(signum)
        if then is not None:
            time.sleep(0.05)
            run.send_signal(then)
        run.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        run.kill()
        run.wait()
    err = "".join(err)
    assert "Traceback" not in err, err
    return run.returncode, err.replace("\r", "\n").strip().splitlines()[-1]


def steps_shown(err, desc):
    """The most steps a progress bar whose description begins with `desc` has shown."""
    return max((int(n) for n in re.findall(re.escape(desc) + r"[^|\r\n]*\|[^|\r\n]*\|\s*(\d+)/", err)), default=0)


SCRIPT_FILES = {"vit": "train_vit.py", "gpt": "train_gpt.py", "translate": "train_translate.py", "e2e": "finetune_e2e.py"}


def logged(out):
    try:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "log.jsonl").open()]
    except ValueError:  # a line being written
        return []


def weights(out):
    return torch.load(out / "ckpt.pt", weights_only=True)["model"]


@pytest.mark.parametrize("script,signum", [("vit", signal.SIGINT), ("gpt", signal.SIGTERM),
                                           ("translate", signal.SIGTERM), ("e2e", signal.SIGINT)])
def test_a_signal_saves_the_step_it_ends_and_resume_ends_as_an_uninterrupted_run(script, signum, data_of, tmp_path):
    data = data_of(script)
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    # within an epoch (its bar shows a step of epoch 2), or past the checkpoint of iteration 10
    if script == "gpt":
        def past(err):
            return steps_shown(err, "") > 10
    elif script == "e2e":  # its steps are quick: a point of the validation curve within epoch 2 (step 4 or 8)
        def past(err):
            return (stopped / "log.jsonl").is_file() and any(1 < r["epoch"] < 2 for r in logged(stopped))
    else:
        def past(err):
            return steps_shown(err, "epoch 2") > 0
    code, line = signalled(script, flags(script, data, stopped), past, signum)
    ckpt = runlib.read_checkpoint(stopped / "ckpt.pt", SCRIPT_FILES[script])
    where = runlib.position(ckpt)
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    assert code == 128 + signum and line == (f"{SCRIPT_FILES[script]}: stopped by {name} after {where}, saved there in "
                                            f"{stopped / 'ckpt.pt'}: --resume continues it"), line
    assert not runlib.run_is_finished(ckpt)
    assert ckpt["iter"] > 10 if script == "gpt" else ckpt["within"]["step"] > 0, where  # no epoch's or evaluation's end
    assert not (stopped / "run.lock").exists() and [p.name for p in stopped.glob("*.part")] == []
    SCRIPTS[script].main(flags(script, data, stopped, "--resume"))
    SCRIPTS[script].main(flags(script, data, straight))
    a, b = weights(stopped), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), where
    assert logged(stopped) == logged(straight), where


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_stays(data_of, tmp_path):
    """Steps of many micro-batches (about 0.5 s): both signals come within the step after the
    first checkpoint, so only the second can have ended the run."""
    data, out = data_of("gpt"), tmp_path / "out"
    argv = flags("gpt", data, out, "--grad-accum", "150", "--eval-interval", "1", "--max-iters", "20")
    code, line = signalled("gpt", argv, lambda err: (out / "ckpt.pt").is_file(), signal.SIGINT, then=signal.SIGINT)
    ckpt = runlib.read_checkpoint(out / "ckpt.pt", "train_gpt.py")
    assert code == 130 and ckpt["iter"] == 1 and [p.name for p in out.glob("*.part")] == []
    assert line == (f"train_gpt.py: stopped by Ctrl-C (SIGINT); {out / 'ckpt.pt'} (iteration 1) is intact: continue "
                    "with --resume and the same flags"), line


def test_under_torchrun_every_process_stops_at_the_same_step_and_rank_0_saves_it(data_of, tmp_path):
    """SIGTERM to torchrun, which sends it on to each process: one line, from rank 0, and a
    checkpoint of one iteration with both processes' RNG states (each gathered at that step)."""
    data, out = data_of("gpt"), tmp_path / "out"
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py",
            *flags("gpt", data, out)]
    run = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "ckpt.pt").is_file() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        run.send_signal(signal.SIGTERM)
        err = run.communicate(timeout=60)[1]
    finally:
        run.kill()
        run.wait()
    ckpt = runlib.read_checkpoint(out / "ckpt.pt", "train_gpt.py")
    stops = [line for line in err.replace("\r", "\n").splitlines() if "stopped by" in line]
    assert stops == [f"train_gpt.py: stopped by SIGTERM after iteration {ckpt['iter']}, saved there in "
                     f"{out / 'ckpt.pt'}: --resume continues it"], err[-3000:]
    assert len(ckpt["rng"]) == 2 and ckpt["iter"] < 150 and not (out / "run.lock").exists()


def test_a_new_run_on_a_folder_with_a_run_stops_before_writing_and_overwrite_starts_over(data_of, tmp_path, capsys):
    data, out = data_of("gpt"), tmp_path / "out"
    short = flags("gpt", data, out, "--max-iters", "4", "--eval-interval", "2")
    train_gpt.main(short)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for argv, held in ((short, "a finished run of train_gpt.py (iteration 4)"),  # finished by its own --max-iters
                       ([*short, "--max-iters", "6"], "a finished run of train_gpt.py (iteration 4)")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train_gpt.main(argv)
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"train_gpt.py: error: {out} holds {held}: continue it with --resume, or start over with --overwrite "
            "(which replaces it), or use another --out-dir\n")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(SystemExit) as e:
        train_gpt.main([*short, "--resume", "--overwrite"])
    assert e.value.code == 2 and "give one of them" in capsys.readouterr().err
    train_gpt.main([*short, "--overwrite", "--max-iters", "2"])  # starts over: a new log, a new checkpoint
    assert [r["iter"] for r in logged(out)] == [0, 2] and runlib.read_checkpoint(out / "ckpt.pt", "train_gpt.py")["iter"] == 2


@pytest.mark.parametrize("script", ["vit", "translate", "e2e"])
def test_each_script_refuses_a_new_run_over_an_unfinished_one(script, tmp_path, capsys):
    """Before any data is read: the check runs on the flags and the checkpoint alone."""
    argv = fill([*FLAGS[script], "--epochs", "3"], dict(data=tmp_path / "nowhere", out=tmp_path / "out"))
    args = SCRIPTS[script].parse_args(argv)
    runlib.save_checkpoint(tmp_path / "out" / "ckpt.pt", args, epoch=1)
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script].main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"{SCRIPT_FILES[script]}: error: {tmp_path / 'out'} holds an unfinished run of {SCRIPT_FILES[script]} (epoch 1): "
        "continue it with --resume, or start over with --overwrite (which replaces it), or use another --out-dir\n")


def test_a_stopped_main_called_from_python_leaves_the_callers_handlers(data_of, tmp_path, capsys, monkeypatch):
    """train_gpt.main() called in this process, a real SIGINT raised as its first checkpoint is
    written: the run stops and saves as from a shell (SystemExit 130), and Ctrl-C works in the
    caller afterwards."""
    data, out = data_of("gpt"), tmp_path / "out"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    save_checkpoint = runlib.save_checkpoint

    sent = []

    def save_then_ctrl_c(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        if not sent:
            sent.append(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(runlib, "save_checkpoint", save_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        train_gpt.main(flags("gpt", data, out))
    assert stop.value.code == 130 and "stopped by Ctrl-C (SIGINT) after iteration" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
