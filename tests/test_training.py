"""Tests of the shared training pieces (training.py)."""

import argparse
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune_e2e  # noqa: E402
import train_gpt  # noqa: E402
import train_translate  # noqa: E402
import train_vit  # noqa: E402
import training  # noqa: E402
from bdia import BDIAConfig  # noqa: E402


def parser():
    p = argparse.ArgumentParser()
    training.add_bdia_args(p)
    training.add_run_args(p, "out")
    return p


def bdia_config(argv):
    p = parser()
    args = p.parse_args(argv)
    training.check_args(p, args)
    return args.bdia_config


def test_bdia_flags_build_the_config():
    assert bdia_config([]) is None
    assert bdia_config(["--bdia", "--compile"]) == BDIAConfig(fused=True)  # --compile fuses BDIA's arithmetic
    assert bdia_config(["--bdia", "--compile", "--no-reversible"]) == BDIAConfig(reversible=False)
    assert bdia_config(["--bdia", "--gammas", "-0.25", "0.25", "--bits", "5"]) == BDIAConfig((-0.25, 0.25), 5, True, 0.0)
    config = bdia_config(["--bdia", "--bits", "none", "--no-reversible", "--gammas=-0.5,0,0.5"])  # commas too
    assert config == BDIAConfig((-0.5, 0.0, 0.5), None, False, 0.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bdia", "--gammas", "0.3,-0.3"], "2^-m"),
        (["--bdia", "--bits", "none"], "needs quantization"),
        (["--bits", "nine"], "integer"),
        (["--gammas", "a,b"], "comma-separated"),
        (["--bdia", "--bits", "30"], "use --bits 20 or less"),
    ],
)
def test_bad_flags_exit_with_code_2_and_say_why(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bdia_config(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_checkpoint_is_atomic_and_loads_safely(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    training.save_checkpoint(path, step=1, w=torch.ones(3))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(path, step=2, w=torch.zeros(3))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [path]  # no partial file left behind
    assert training.load_checkpoint(path)["step"] == 1


def test_checkpoint_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        training.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        training.load_checkpoint(tmp_path / "bad.pt")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    training.seed_everything(3)
    training.save_checkpoint(tmp_path / "c.pt", rng=training.rng_state())
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    training.set_rng_state(training.load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_jsonl_log_appends_and_resumes(tmp_path):
    log = training.JsonlLog(tmp_path / "log.jsonl")
    log.write(epoch=1, loss=0.5)
    training.JsonlLog(tmp_path / "log.jsonl", resume=True).write(epoch=2, loss=0.25)
    assert [r["epoch"] for r in log.read()] == [1, 2]
    assert training.JsonlLog(tmp_path / "log.jsonl").read() == []  # a fresh run starts a new log


def test_cosine_lr_warms_up_then_decays_to_min_lr():
    lrs = [training.cosine_lr(s, 100, 1.0, warmup=10, min_lr=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert all(type(lr) is float for lr in lrs)  # numpy scalars would not load with weights_only=True


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    dist = training.distributed()
    assert dist == training.Dist(0, 1, 0, False)


def test_every_script_writes_to_its_own_folder_under_out():
    scripts = {"vit": (train_vit, []), "gpt": (train_gpt, ["--text-file", "t.txt"]),
               "translate": (train_translate, ["--data", "pairs.txt"]), "e2e": (finetune_e2e, [])}
    for name, (script, data) in scripts.items():
        assert script.parse_args(data).out_dir == f"out/{name}"
