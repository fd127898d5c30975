"""Nothing lost to a slip or a signal (issue 36). Real signals (SIGINT as Ctrl-C sends it, SIGTERM
as a scheduler, `timeout` or `kill` does) go into real training processes: each script ends the
step it is in, saves that point (within an epoch too), prints one line and exits 130 or 143, and
--resume then ends bit for bit where an uninterrupted run ends. A second Ctrl-C stops at once
with the last checkpoint intact. A new run on a folder that holds one stops before it writes
anything, unless --overwrite.

No verdict here depends on how fast a machine is: each signal is sent by the process itself (or,
under torchrun, by rank 0 to torchrun) where a given step begins (STOP_AT), so the step a run
stops at is fixed whatever the load; the only clocks are hang guards."""

import json
import os
import shutil
import signal
import subprocess
import sys

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
SCRIPT_FILES = {"vit": "train_vit.py", "gpt": "train_gpt.py", "translate": "train_translate.py", "e2e": "finetune_e2e.py"}
TIMING = {"epoch_seconds", "seconds", "tokens_per_s", "peak_memory_mb"}  # log fields no two runs share
# Runs of two epochs (or 30 iterations), and where a signal comes in them: the step (counted from 1 over
# the run, as runlib.Signals.received is asked where each step begins) and the point the run saves there
SHORT = {"vit": ["--batch-size", "8", "--epochs", "2"],  # 80 images: 10 steps an epoch
         "gpt": ["--text-file", "{data}/verse.txt", "--max-iters", "30", "--eval-interval", "10", "--bdia",
                 "--dropout", "0.1"],
         "translate": ["--batch-size", "4", "--epochs", "2"],  # 43 pairs: 11 steps an epoch
         "e2e": ["--batch-size", "1", "--epochs", "2", "--eval-interval", "4"]}  # 30 steps an epoch
SIGNAL_AT = {"vit": (14, "step 3 of 10 in epoch 2"), "gpt": (14, "iteration 13"),
             "translate": (15, "step 3 of 11 in epoch 2"), "e2e": (37, "step 6 of 30 in epoch 2")}

# A training script run with its signals planned: runlib.Signals.received, asked where each step begins,
# sends the plan's signals where step plan["at"] begins (before it answers, or with "after", after it
# answered no, so that they come within the step), and answers as it would. signal.raise_signal runs the
# handler before it returns. Under torchrun rank 0 sends them to torchrun (its parent), which sends them
# on to every process, and waits until its own has come (a hang guard of 300 s ends the wait).
STOP_AT = """
import json, os, runpy, signal, sys, time
sys.path.insert(0, sys.argv[1])
from plumbing import runlib

plan, script = json.loads(sys.argv[2]), sys.argv[3]
sys.argv = sys.argv[3:]
received, calls = runlib.Signals.received, []


def received_at(self, device="cpu"):
    calls.append(1)
    if len(calls) != plan["at"] or os.environ.get("RANK", "0") != "0":
        return received(self, device)
    answer = received(self, device) if plan.get("after") else None
    for signum in plan["signals"]:
        if plan.get("to") == "torchrun":
            os.kill(os.getppid(), signum)
            give_up = time.monotonic() + 300
            while self.signum is None and time.monotonic() < give_up:
                time.sleep(0.001)
        else:
            signal.raise_signal(signum)
    return answer if plan.get("after") else received(self, device)


runlib.Signals.received = received_at
runpy.run_path(script, run_name="__main__")
"""


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
    return fill([*FLAGS[script], *SHORT[script], *more], dict(data=data, out=out))


def signalled(tmp_path, script, argv, at, signals, after=False, torchrun=False):
    """Run SCRIPT.py in a process of its own (under torchrun on 2 processes) with `signals` sent where its
    step `at` begins; (exit code, stderr)."""
    wrapper = tmp_path / "stop_at.py"
    wrapper.write_text(STOP_AT)
    plan = json.dumps(dict(at=at, signals=[int(s) for s in signals], after=after, to="torchrun" if torchrun else "self"))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else \
        [sys.executable]
    run = subprocess.run([*launch, str(wrapper), ROOT, plan, os.path.join(ROOT, SCRIPT_FILES[script]), *map(str, argv)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)  # a hang guard
    assert "Traceback" not in run.stderr or torchrun, run.stderr[-3000:]
    return run.returncode, run.stderr


def last_line(err):
    return err.replace("\r", "\n").strip().splitlines()[-1]


def logged(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "log.jsonl").open()]


def weights(out):
    return torch.load(out / "ckpt.pt", weights_only=True)["model"]


def same_run(a, b):
    """The weights and the log of the runs in folders a and b are the same, bit for bit."""
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and logged(a) == logged(b)


@pytest.mark.parametrize("script,signum", [("vit", signal.SIGINT), ("gpt", signal.SIGTERM),
                                           ("translate", signal.SIGTERM), ("e2e", signal.SIGINT)])
def test_a_signal_saves_the_step_it_ends_and_resume_ends_as_an_uninterrupted_run(script, signum, data_of, tmp_path):
    data = data_of(script)
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    at, where = SIGNAL_AT[script]  # within an epoch, or between two evaluations
    code, err = signalled(tmp_path, script, flags(script, data, stopped), at, [signum])
    ckpt = runlib.read_checkpoint(stopped / "ckpt.pt", SCRIPT_FILES[script])
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    assert runlib.position(ckpt) == where
    assert code == 128 + signum and last_line(err) == (f"{SCRIPT_FILES[script]}: stopped by {name} after {where}, saved "
                                                       f"there in {stopped / 'ckpt.pt'}: --resume continues it"), err
    assert not runlib.run_is_finished(ckpt)
    assert not (stopped / "run.lock").exists() and [p.name for p in stopped.glob("*.part")] == []
    SCRIPTS[script].main(flags(script, data, stopped, "--resume"))
    SCRIPTS[script].main(flags(script, data, straight))
    assert same_run(stopped, straight), where


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_stays(data_of, tmp_path):
    """Both signals come within the step after the checkpoint of iteration 10: only the second can have
    ended the run, at once, without saving the step it was in."""
    data, out = data_of("gpt"), tmp_path / "out"
    code, err = signalled(tmp_path, "gpt", flags("gpt", data, out), 11, [signal.SIGINT, signal.SIGINT], after=True)
    ckpt = runlib.read_checkpoint(out / "ckpt.pt", "train_gpt.py")
    assert code == 130 and ckpt["iter"] == 10 and [p.name for p in out.glob("*.part")] == []
    assert last_line(err) == (f"train_gpt.py: stopped by Ctrl-C (SIGINT); {out / 'ckpt.pt'} (iteration 10) is intact: "
                              "continue with --resume and the same flags"), err


def test_under_torchrun_every_process_stops_at_the_same_step_and_rank_0_saves_it(data_of, tmp_path):
    """SIGTERM to torchrun, which sends it on to each process: one line, from rank 0, and a
    checkpoint of the iteration where it came, with both processes' RNG states (each gathered at
    that step)."""
    data, out = data_of("gpt"), tmp_path / "out"
    code, err = signalled(tmp_path, "gpt", flags("gpt", data, out), 14, [signal.SIGTERM], torchrun=True)
    ckpt = runlib.read_checkpoint(out / "ckpt.pt", "train_gpt.py")
    stops = [line for line in err.replace("\r", "\n").splitlines() if "stopped by" in line]
    assert stops == [f"train_gpt.py: stopped by SIGTERM after iteration 13, saved there in {out / 'ckpt.pt'}: "
                     "--resume continues it"], err[-3000:]
    assert ckpt["iter"] == 13 and len(ckpt["rng"]) == 2 and not (out / "run.lock").exists()


def test_a_run_stopped_twice_within_one_epoch_ends_as_an_uninterrupted_run(data_of, tmp_path, capsys, monkeypatch):
    """Stopped at step 3 of epoch 2, resumed, stopped again at step 7 of that epoch (the second point
    saved counts the steps before the first), resumed to the end: the weights and the log of the run
    that was never stopped. In this process: a real SIGINT where the step begins."""
    data, stopped, straight = data_of("vit"), tmp_path / "stopped", tmp_path / "straight"
    received, calls = runlib.Signals.received, []

    def ctrl_c_at(at):
        calls.clear()

        def received_at(self, device="cpu"):
            calls.append(1)
            if len(calls) == at:
                signal.raise_signal(signal.SIGINT)
            return received(self, device)

        monkeypatch.setattr(runlib.Signals, "received", received_at)

    for at, resume, where in ((14, [], "step 3 of 10 in epoch 2"), (5, ["--resume"], "step 7 of 10 in epoch 2")):
        ctrl_c_at(at)
        with pytest.raises(SystemExit) as stop:
            train_vit.main(flags("vit", data, stopped, *resume))
        ckpt = runlib.read_checkpoint(stopped / "ckpt.pt", "train_vit.py")
        assert stop.value.code == 130 and runlib.position(ckpt) == where
        assert f"stopped by Ctrl-C (SIGINT) after {where}, saved there" in capsys.readouterr().err
    monkeypatch.setattr(runlib.Signals, "received", received)
    train_vit.main(flags("vit", data, stopped, "--resume"))
    assert f"resuming {stopped / 'ckpt.pt'}, saved after step 7 of 10 in epoch 2" in capsys.readouterr().out
    train_vit.main(flags("vit", data, straight))
    assert same_run(stopped, straight)


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


def test_a_new_run_over_a_truncated_checkpoint_does_not_send_the_user_to_resume(tmp_path, capsys):
    """--resume cannot continue a checkpoint that cannot be read: the line says what it holds and the
    ways that work."""
    argv = fill([*FLAGS["vit"], "--epochs", "3"], dict(data=tmp_path / "nowhere", out=tmp_path / "out"))
    runlib.save_checkpoint(tmp_path / "out" / "ckpt.pt", train_vit.parse_args(argv), epoch=1)
    path = tmp_path / "out" / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        train_vit.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (
        f"train_vit.py: error: {tmp_path / 'out'} holds {path}, which cannot be read (it is truncated (a zip archive "
        "without its end, 1000 bytes)), so --resume cannot continue it: start over with --overwrite (which replaces "
        "it), or delete it, or use another --out-dir\n")


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
