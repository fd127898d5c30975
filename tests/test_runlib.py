"""Tests of what the training scripts share (runlib.py): flags, --resume's flags, the folder
lock, checkpoints (atomic, every RNG state, a full disk), the log, schedules."""

import argparse
import contextlib
import json
import errno
import fcntl
import os
import random
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune_e2e  # noqa: E402
from plumbing import runlib  # noqa: E402
import train_gpt  # noqa: E402
import train_translate  # noqa: E402
import train_vit  # noqa: E402
from bdia import BDIAConfig  # noqa: E402

SCRIPTS = (train_vit, train_gpt, train_translate, finetune_e2e)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser():
    """A script's parser as the scripts build theirs: its own flags, its BDIA flags, the run flags."""
    p = runlib.ArgumentParser(prog="test.py")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--bdia", action="store_true")
    p.add_argument("--gammas", nargs="+", action=runlib.Numbers, default=(-0.5, 0.5))
    p.add_argument("--bits", type=runlib.parse_bits, default=9)
    p.add_argument("--no-reversible", action="store_true")
    p.add_argument("--eval-gamma", type=float, default=0.0)
    p.add_run_flags(out_dir="out")
    return p


def parse(argv):
    p = parser()
    args = p.parse(argv, at_least_1=("width", "epochs"))
    args.bdia_config = p.checked_config(train_vit.bdia_config, args)
    return args


# the flags each script needs beside the BDIA ones to parse (nothing is read while parsing)
NEEDED = {train_vit: [], train_gpt: ["--text-file", "t.txt"], train_translate: ["--dataset", "gettext-fr"], finetune_e2e: []}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.SCRIPT)
def test_each_scripts_bdia_flags_build_the_config_its_model_gets(script):
    def config(*argv):
        return script.parse_args([*NEEDED[script], *argv]).bdia_config

    assert config() is None
    assert config("--bdia", "--compile", "--no-reversible") == BDIAConfig(reversible=False)
    assert config("--bdia", "--compile") == BDIAConfig()  # compiled per block (tests/test_compile.py)
    assert config("--bdia", "--gammas", "-0.25", "0.25", "--bits", "5") == BDIAConfig((-0.25, 0.25), 5)
    assert config("--bdia", "--bits", "none", "--no-reversible", "--gammas=-0.5,0,0.5") == \
        BDIAConfig((-0.5, 0.0, 0.5), None, False, 0.0)  # commas too
    assert config("--bdia", "--eval-gamma", "0.5") == BDIAConfig(eval_gamma=0.5)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.SCRIPT)
def test_a_grid_the_stream_starts_below_is_said_at_the_start(script, capsys):
    """--bits -5 (the paper's l < 0): the stream is rounded to multiples of 32, so a stream near 1 starts
    as 0 and nothing trains for a long while; it is allowed (Table 4 goes to -2) but said, once."""
    for bits, said in (("-5", "multiples of 2^5 = 32: every entry below 16 in magnitude becomes 0"),
                       ("0", "multiples of 2^0 = 1: every entry below 0.5 in magnitude becomes 0"), ("1", None)):
        script.parse_args([*NEEDED[script], "--bdia", "--bits", bits])
        err = capsys.readouterr().err
        if said is None:
            assert err == ""
        else:
            assert err.startswith(f"{script.SCRIPT}: warning: --bits {bits} rounds the residual stream to {said}")
            assert err.count("\n") == 1 and "the paper trains with --bits 9" in err
    script.parse_args([*NEEDED[script], "--bits", "-5"])  # without --bdia nothing is rounded
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, message", [
    (["--bdia", "--gammas", "0.3,-0.3"], "2^-m"),
    (["--bdia", "--bits", "none"], "needs bits"),
    (["--bits", "nine"], "integer"),
    (["--gammas", "a,b"], "comma-separated"),
    (["--bdia", "--bits", "30"], "use --bits 20 or less"),
    (["--width", "0"], "--width must be at least 1, got 0"),
])
def test_bad_flags_exit_with_code_2_and_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("test.py: error: ") and err.count("\n") == 1 and message in err


# -----------------------------------------------------------------------------
# --resume: the checkpoint's flags


def checkpoint_of(tmp_path, argv):
    args = parse([*argv, "--out-dir", str(tmp_path)])
    runlib.save_checkpoint(tmp_path / "ckpt.pt", args, epoch=1)
    return args


def test_resume_takes_the_checkpoints_flags_and_the_ones_that_may_change(tmp_path):
    checkpoint_of(tmp_path, ["--width", "16", "--bdia", "--gammas", "-0.25", "0.25", "--epochs", "2"])
    args = parse(["--resume", "--out-dir", str(tmp_path), "--epochs", "5"])
    assert (args.width, args.epochs, args.bdia_config) == (16, 5, BDIAConfig((-0.25, 0.25)))
    assert parse(["--resume", "--out-dir", str(tmp_path), "--width", "16"]).epochs == 2  # the same value is no change


def test_resume_refuses_another_flag_and_prints_the_runs_command_line(tmp_path, capsys):
    checkpoint_of(tmp_path, ["--width", "16", "--bdia", "--gammas", "-0.25", "0.25", "--bits", "none",
                             "--no-reversible", "--no-bias", "--no-augment", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        parse(["--resume", "--out-dir", str(tmp_path), "--width", "32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--width 32 differs from the run in" in err
    command = err.split("continues as it was run: ")[1].split(" (a new run")[0]
    argv = shlex.split(command)
    assert argv[0] == "test.py" and argv[-1] == "--resume"
    assert vars(parse(argv[1:])) == vars(parse(["--resume", "--out-dir", str(tmp_path)]))  # the line resumes as it is
    new_run = parse(argv[1:-1])  # without --resume: the run's own flags
    assert new_run.bdia_config == BDIAConfig((-0.25, 0.25), None, False) and not new_run.bias and not new_run.augment


def test_a_checkpoint_of_another_script_names_it(tmp_path):
    checkpoint_of(tmp_path, [])
    p = runlib.ArgumentParser(prog="other.py")
    p.add_run_flags(out_dir="out")
    with pytest.raises(runlib.CheckpointError, match=r"was written by test.py, not other.py"):
        p.parse(["--resume", "--out-dir", str(tmp_path)])


# -----------------------------------------------------------------------------
# One run per folder


HOLD = "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); " \
       "f.write('process 4242'); f.flush(); print('held', flush=True); sys.stdin.read()"  # holds it until killed


def test_a_live_run_holds_the_folder_and_a_killed_one_does_not(tmp_path):
    (tmp_path / "out").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out" / "run.lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(runlib.FolderInUse, match=r"out is in use by a running process \(process 4242\)"):
            with runlib.folder_lock(tmp_path / "out"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runlib.folder_lock(tmp_path / "out"):  # the OS dropped the killed holder's lock
        assert (tmp_path / "out" / "run.lock").read_text() == f"process {os.getpid()}\n"
        with pytest.raises(runlib.FolderInUse):  # and this process now holds it
            with runlib.folder_lock(tmp_path / "out"):
                pass


def test_a_second_run_on_a_held_folder_is_one_line_exit_2(tmp_path, capsys):
    with runlib.folder_lock(tmp_path):
        with pytest.raises(SystemExit) as e:
            train_gpt.main(["--text-file", "missing.txt", "--out-dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"train_gpt.py: error: {tmp_path} is in use by a running process (process "
                                         f"{os.getpid()}): wait for it to end or stop it, or use another --out-dir\n")


# -----------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_is_atomic_and_loads_safely(tmp_path, monkeypatch):
    args = parse(["--out-dir", str(tmp_path)])
    runlib.save_checkpoint(tmp_path / "ckpt.pt", args, step=1, w=torch.ones(3))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        runlib.save_checkpoint(tmp_path / "ckpt.pt", args, step=2, w=torch.zeros(3))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.pt"]  # no partial file left behind
    assert runlib.read_checkpoint(tmp_path / "ckpt.pt", "test.py")["step"] == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_torch_save_turns_a_refused_write_into_a_runtimeerror_and_writewatch_keeps_the_oserror():
    """Why save_checkpoint watches its file: on a short write torch's zip writer raises its own
    RuntimeError ("unexpected pos ..."), and only the file saw the OSError."""
    with open("/dev/full", "wb") as f:  # a device whose every write fails with ENOSPC
        out = runlib.WriteWatch(f)
        with pytest.raises(RuntimeError):
            torch.save({"w": torch.zeros(1 << 16)}, out)  # larger than the file's buffer: written inside torch.save
        with contextlib.suppress(OSError):  # the buffer's rest cannot be flushed either
            f.close()
    assert isinstance(out.failed, OSError) and out.failed.errno == errno.ENOSPC


def test_a_full_disk_while_saving_is_one_line_and_resume_works_once_there_is_space(tmp_path, text_file,
                                                                                    with_file_size_limit):
    flags = ["--text-file", str(text_file), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
             "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "5", "--device", "cpu", "--out-dir",
             str(tmp_path)]
    train_gpt.main([*flags, "--max-iters", "5"])
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert len(before) > 8192  # so the next one cannot be written under the limit
    run = with_file_size_limit(8192, "train_gpt.py", *flags, "--max-iters", "10", "--resume")
    ckpt = tmp_path / "ckpt.pt"
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.split("\n")[-2] == (  # after the progress bar, closed
        f"train_gpt.py: error: cannot write {ckpt} ({os.strerror(errno.EFBIG)}): {ckpt} (iteration 5) is intact: "
        "continue with --resume and the same flags once there is space (or permission)"), run.stderr
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.glob("ckpt*")) == ["ckpt.pt"]
    train_gpt.main([*flags, "--max-iters", "10", "--resume"])  # space again
    assert runlib.read_checkpoint(ckpt, "train_gpt.py")["iter"] == 10


def test_checkpoint_errors_say_what_to_do(tmp_path):
    with pytest.raises(runlib.CheckpointError, match="without --resume"):
        runlib.read_checkpoint(tmp_path / "missing.pt", "test.py")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(runlib.CheckpointError, match="cannot read checkpoint"):
        runlib.read_checkpoint(tmp_path / "bad.pt", "test.py")


@pytest.mark.parametrize("damage, what", [
    (lambda data: data[: len(data) // 2], "it is truncated (a zip archive without its end"),
    (lambda data: b"", "it is empty"),
    (lambda data: b"\x80\x02" + data[2:], "it is corrupt or not a checkpoint of these scripts"),
])
def test_an_unreadable_checkpoint_is_said_in_our_words_with_its_name_and_the_fix(tmp_path, damage, what):
    path = tmp_path / "ckpt.pt"
    runlib.save_checkpoint(path, parse([]), w=torch.ones(1000))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(runlib.CheckpointError) as e:
        runlib.read_checkpoint(path, "test.py")
    assert str(e.value).startswith(f"cannot read checkpoint {path}: {what}")
    assert str(e.value).endswith("; delete it (a new run starts there) or use another --out-dir")
    assert "If you are seeing this" not in str(e.value) and "PytorchStreamReader" not in str(e.value)


def test_random_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    runlib.save_checkpoint(tmp_path / "c.pt", parse([]))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    runlib.restore_random_states(runlib.read_checkpoint(tmp_path / "c.pt", "test.py")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_jsonl_log_appends_and_resumes(tmp_path):
    log = runlib.JsonlLog(tmp_path / "log.jsonl")
    log.write(epoch=1, loss=0.5)
    runlib.JsonlLog(tmp_path / "log.jsonl", resume=True).write(epoch=2, loss=0.25)
    assert [r["epoch"] for r in log.read()] == [1, 2]
    assert runlib.JsonlLog(tmp_path / "log.jsonl").read() == []  # a fresh run starts a new log


@pytest.mark.parametrize("script", [train_gpt, train_translate], ids=lambda s: s.SCRIPT)
def test_cosine_lr_warms_up_then_decays_to_min_lr(script):
    if script is train_gpt:
        args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
        lrs = [train_gpt.learning_rate(s, args) for s in range(101)]
    else:
        args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup=10, cosine=True)
        lrs = [train_translate.learning_rate(s, 100, args) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert all(type(lr) is float for lr in lrs)  # numpy scalars would not load with weights_only=True


# -----------------------------------------------------------------------------
# --help


def small_command(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    return shlex.split(text.split("under a minute")[1].split("\n\n")[1].replace("\\\n", " "))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.SCRIPT)
def test_help_shows_the_defaults_and_a_small_command_that_parses(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    assert "(default: 1337)" in capsys.readouterr().out  # --seed's default, in the shared group
    argv = small_command(script, capsys)
    assert argv[:2] == ["python", script.SCRIPT]
    script.parse_args(argv[2:])  # its flags are this script's


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.SCRIPT)
def test_the_readme_gives_the_same_small_command(script, capsys):
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = readme.split("finishes on a CPU in under a minute:")[1].split("```")[1]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").strip().splitlines()]
    assert small_command(script, capsys) in commands


def test_a_run_that_fails_before_training_leaves_no_lock_nor_a_new_empty_folder(tmp_path, text_file, capsys):
    with pytest.raises(SystemExit):  # a new --out-dir: the lock was all the run put there
        train_gpt.main(["--text-file", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "new"), "--device", "cpu"])
    assert not (tmp_path / "new").exists()
    flags = ["--text-file", str(text_file), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
             "--batch-size", "4", "--eval-iters", "1", "--max-iters", "2", "--device", "cpu", "--out-dir", str(tmp_path)]
    train_gpt.main(flags)  # a run that ends well removes its lock too
    assert not (tmp_path / "run.lock").exists() and (tmp_path / "ckpt.pt").is_file()
    with pytest.raises(SystemExit):
        train_gpt.main([*flags, "--resume", "--n-layer", "2"])  # refused: the folder and its files stay
    assert not (tmp_path / "run.lock").exists() and (tmp_path / "ckpt.pt").is_file()


def test_a_run_that_waited_on_a_removed_lock_file_locks_the_new_one(tmp_path):
    """A run removes its lock file when it ends; a process that opened that file before and locks
    it afterwards holds a file that is no longer there, which blocks no later run: the folder is
    locked on the file at its path. (The retry in runlib.lock_file, for a run that opened the file
    just before it was removed, cannot be stopped at from a test; the race below drives it.)"""
    stale = open(tmp_path / "run.lock", "a+")  # opened by a run that is about to lock it
    with runlib.folder_lock(tmp_path):  # this run holds it (the same file) and, ending, removes it
        pass
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the stale run now locks a file that is no longer there
    with runlib.folder_lock(tmp_path):  # a third run is not blocked by it
        with pytest.raises(runlib.FolderInUse):
            with runlib.folder_lock(tmp_path):
                pass
    stale.close()


RACE = """
import os, sys
sys.path.insert(0, sys.argv[3])
from plumbing import runlib
folder, inside = sys.argv[1], sys.argv[2]
held = 0
for _ in range(300):
    try:
        with runlib.folder_lock(folder):
            fd = os.open(inside, os.O_CREAT | os.O_EXCL)  # FileExistsError: another run holds it too
            os.close(fd)
            os.unlink(inside)
            held += 1
    except runlib.FolderInUse:
        pass
print(held)
"""


def test_runs_racing_for_one_folder_never_hold_it_at_once(tmp_path):
    """Three processes take and give back one --out-dir 300 times each, as fast as they can: the
    run.lock one opened is removed under it before its flock (runlib.lock_file's retry on the
    file at the path: without it, this failed in 3 of 3 tries), and no two ever hold the folder at once
    (a file made with O_EXCL while held would exist already)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-c", RACE, str(tmp_path / "out"), str(tmp_path / "held"), root]
    racers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [racer.communicate(timeout=600) for racer in racers]  # a hang guard
    assert [racer.returncode for racer in racers] == [0, 0, 0], [err for _, err in results]
    assert all(int(out) > 0 for out, _ in results)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no run.lock left behind


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.SCRIPT)
def test_resume_in_the_help_names_grad_accum_only_where_it_is_a_flag(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    assert ("--grad-accum" in text) == (script is train_gpt)


def test_resume_of_a_finished_run_says_so(tmp_path, text_file, capsys):
    flags = ["--text-file", str(text_file), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
             "--batch-size", "4", "--eval-iters", "1", "--max-iters", "2", "--device", "cpu", "--out-dir", str(tmp_path)]
    train_gpt.main(flags)
    log = (tmp_path / "log.jsonl").read_bytes()
    capsys.readouterr()
    train_gpt.main([*flags, "--resume"])
    out = capsys.readouterr().out
    assert f"the run in {tmp_path} is finished (iteration 2, --max-iters 2): nothing left to train" in out, out
    assert "iterations 2..2" not in out and (tmp_path / "log.jsonl").read_bytes() == log


def test_a_killed_run_leaves_its_lock_and_resume_continues(tmp_path, text_file):
    """SIGKILL, which no process can catch, where iteration 3 begins (the run kills itself there, so the
    point does not depend on the machine's speed): the lock file stays, the OS released the lock, and
    --resume continues from the checkpoint of iteration 2."""
    from test_signals import STOP_AT

    flags = ["--text-file", str(text_file), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
             "--batch-size", "4", "--eval-iters", "1", "--eval-interval", "2", "--device", "cpu", "--out-dir",
             str(tmp_path / "out"), "--max-iters", "100000"]
    (tmp_path / "stop_at.py").write_text(STOP_AT)
    plan = json.dumps(dict(at=4, signals=[int(signal.SIGKILL)]))
    run = subprocess.Popen([sys.executable, str(tmp_path / "stop_at.py"), ROOT, plan, os.path.join(ROOT, "train_gpt.py"),
                            *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.wait(timeout=600) == -signal.SIGKILL  # a hang guard
    out = tmp_path / "out"
    assert (out / "run.lock").read_text() == f"process {run.pid}\n"  # the killed run's lock file is still there
    assert runlib.read_checkpoint(out / "ckpt.pt", "train_gpt.py")["iter"] == 2
    train_gpt.main(["--out-dir", str(out), "--resume", "--max-iters", "4"])  # not blocked
    assert runlib.read_checkpoint(out / "ckpt.pt", "train_gpt.py")["iter"] == 4


def test_finetune_e2e_resumes_with_other_decoding_flags(tmp_path):
    """The README's promise: a resumed fine-tuning run may decode differently (beam, length
    penalty, n-gram ban, output length)."""
    import finetune_e2e

    args = finetune_e2e.parse_args(["--out-dir", str(tmp_path), "--lora-rank", "4"])
    runlib.save_checkpoint(tmp_path / "ckpt.pt", args, epoch=1)
    decoding = ["--beam", "2", "--length-penalty", "1.0", "--no-repeat-ngram", "0", "--max-new-tokens", "32",
                "--decode-batch", "4"]
    resumed = finetune_e2e.parse_args(["--out-dir", str(tmp_path), "--resume", *decoding])
    assert (resumed.beam, resumed.length_penalty, resumed.no_repeat_ngram, resumed.max_new_tokens, resumed.lora_rank) == \
        (2, 1.0, 0, 32, 4)
