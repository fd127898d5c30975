"""GPT and train_gpt.py on tiny models and text files the tests write."""

import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing import data  # noqa: E402
import train_gpt  # noqa: E402
from bdia import BDIAConfig  # noqa: E402
from models import GPT  # noqa: E402

torch.set_num_threads(1)
TINY = ["--n-layer", "3", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "4", "--lr", "3e-3", "--warmup-iters", "5", "--device", "cpu"]
# How far a run split over processes may drift from one process over a few Adam steps. The
# gradients agree to float rounding (tests/test_bdia_fsdp.py checks one step to 1e-5 relative), but
# Q_l's steps and Adam magnify rounding: on an AVX2-only CPU, one process's reversible and stored
# runs of the FSDP test below differ by 4e-5 in loss and 6e-5 in a weight after 4 steps. Wiring
# errors are far beyond that: half the global batch is off by 3e-3 or more in loss, 2.5e-2 in a weight.
DRIFT = 2e-4


def run(tmp_path, *flags, out="out"):
    train_gpt.main([*TINY, "--out-dir", str(tmp_path / out), *flags])
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]


def test_reversible_gradients_match_stored_and_eval_is_the_plain_gpt():
    torch.manual_seed(0)
    model = GPT(50, block_size=16, n_layer=4, n_head=2, n_embd=32, dropout=0.1).train()
    idx = torch.randint(0, 50, (4, 16))
    results = []
    for reversible in (True, False):
        model.bdia = BDIAConfig(reversible=reversible)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        logits, loss = model(idx, idx)
        loss.backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_r, g_r), (l_s, g_s) = results
    assert torch.equal(l_r, l_s)
    for a, b in zip(g_r, g_s):
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() < 1e-5
    model.eval()
    model.bdia = None
    plain = model(idx)[0]
    model.bdia = BDIAConfig(bits=None, reversible=False)
    assert torch.equal(model(idx)[0], plain)


def test_each_log_line_gives_the_rate_its_iterations_step_trains_with(tmp_path, text_file, rates_trained_with):
    """As nanoGPT's: the line of iteration N holds the losses before step N and the rate step N
    trains with (iteration 0: the warm-up's first, not the optimizer's initial --lr)."""
    rates = rates_trained_with(torch.optim.AdamW)
    log = run(tmp_path, "--text-file", str(text_file), "--max-iters", "12", "--eval-interval", "4")
    assert [r["iter"] for r in log] == [0, 4, 8, 12] and len(rates) == 12
    assert [r["lr"] for r in log[:3]] == [rates[0], rates[4], rates[8]]
    assert log[0]["lr"] == pytest.approx(3e-3 / 5) and log[3]["lr"] == pytest.approx(6e-5)  # the schedule's ends


def test_the_progress_bar_counts_optimizer_steps_to_max_iters(tmp_path, text_file, capsys):
    run(tmp_path, "--text-file", str(text_file), "--max-iters", "6", "--eval-interval", "3")
    bar = capsys.readouterr().err
    assert "6/6 [" in bar and "/7 [" not in bar


@pytest.mark.parametrize("flags", [[], ["--bdia"], ["--bdia", "--no-reversible", "--bias"], ["--bdia", "--amp"]])
def test_training_on_a_text_file_learns(tmp_path, text_file, flags):
    rows = run(tmp_path, "--text-file", str(text_file), "--max-iters", "60", "--eval-interval", "30", *flags)
    assert [r["iter"] for r in rows] == [0, 30, 60]
    model_args = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model_args"]
    assert model_args["bias"] == ("--bias" in flags)  # nanoGPT's default: no biases
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    assert (tmp_path / "out" / "ckpt.pt").is_file()


def test_resume_reproduces_the_uninterrupted_run_and_samples(tmp_path, text_file, capsys, monkeypatch, kill_after):
    flags = ["--text-file", str(text_file), "--eval-interval", "10", "--bdia", "--dropout", "0.1", "--max-iters", "20"]
    straight = run(tmp_path, *flags, out="a")
    kill_after(train_gpt, "train_step", 13)  # killed at iteration 13
    with pytest.raises(kill_after.Killed):
        run(tmp_path, *flags, out="b")
    monkeypatch.undo()
    resumed = run(tmp_path, *flags, "--resume", out="b")  # continues from the checkpoint of iteration 10
    assert [r["iter"] for r in resumed] == [0, 10, 20]  # iteration 10 is logged once
    assert resumed[-1]["iter"] == 20 and resumed[-1]["val_loss"] == straight[-1]["val_loss"]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    built = []  # the BDIA model samples as it was evaluated: with its config, eq. (25) on the grid
    monkeypatch.setattr(train_gpt, "GPT", lambda **kw: built.append(kw.get("bdia")) or GPT(**kw))
    train_gpt.main(["--out-dir", str(tmp_path / "a"), "--sample", "2", "--sample-tokens", "20", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and len(out.splitlines()[1]) > 0
    assert built == [BDIAConfig(gammas=(-0.5, 0.5), bits=9, reversible=True)]


@pytest.mark.parametrize("flags", [[], ["--bdia"]], ids=["plain", "bdia-l9"])
def test_gamma_sweep_of_a_finished_run_leaves_it_as_it_is_and_gamma_0_is_the_logged_loss(tmp_path, text_file, flags,
                                                                                       capsys):
    flags = ["--text-file", str(text_file), "--max-iters", "10", "--eval-interval", "10", "--dropout", "0.1", *flags]
    log = run(tmp_path, *flags)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    capsys.readouterr()
    run(tmp_path, *flags, "--resume", "--eval-gammas", "-0.5", "0", "0.5")  # no training: a finished run
    sweep = json.loads((tmp_path / "out" / "gamma_sweep.json").read_text())
    assert [r["gamma"] for r in sweep] == [-0.5, 0, 0.5] and "gamma at inference   val loss" in capsys.readouterr().out
    assert sweep[1]["val_loss"] == log[-1]["val_loss"]  # gamma 0 is the model as evaluated in training (25)
    assert sweep[0]["val_loss"] != sweep[1]["val_loss"] != sweep[2]["val_loss"]
    assert {name: (tmp_path / "out" / name).read_bytes() for name in before} == before


def test_torchrun_two_processes_match_one_process_with_the_global_batch(tmp_path, text_file):
    # One gamma, so that each sample's gamma is the same however the batch is split.
    flags = [*TINY, "--text-file", str(text_file), "--max-iters", "3", "--eval-interval", "3", "--bdia", "--gammas", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py", *flags,
           "--out-dir", str(tmp_path / "ddp")]
    run_ddp = subprocess.run(ddp, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # a hang guard
    assert run_ddp.returncode == 0, run_ddp.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = run(tmp_path, *flags[len(TINY):], "--batch-size", "16", out="single")
    ddp_rows = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(ddp_rows, single):
        assert abs(a["val_loss"] - b["val_loss"]) < DRIFT and abs(a["train_loss"] - b["train_loss"]) < DRIFT


def test_fsdp_under_torchrun_matches_one_process_with_the_global_batch_and_resumes_without_fsdp(tmp_path, text_file):
    # One gamma (each sample's gamma is then the same however the batch is split) and a constant
    # learning rate (so that a run to iteration 4 and one to 6 share their schedule).
    flags = [*TINY, "--text-file", str(text_file), "--eval-interval", "2", "--bdia", "--gammas", "0.5", "--grad-accum", "2",
             "--warmup-iters", "0", "--min-lr", "3e-3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    fsdp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py", *flags,
            "--max-iters", "4", "--fsdp", "--out-dir", str(tmp_path / "fsdp")]
    run_fsdp = subprocess.run(fsdp, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # a hang guard
    assert run_fsdp.returncode == 0, run_fsdp.stderr[-3000:]
    fsdp_rows = [json.loads(line) for line in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = run(tmp_path, *flags[len(TINY):], "--batch-size", "16", "--max-iters", "6", out="single")
        # the checkpoint FSDP wrote is the unsharded model's: one process continues it
        train_gpt.main(["--out-dir", str(tmp_path / "fsdp"), "--resume", "--batch-size", "16", "--max-iters", "6",
                        "--device", "cpu"])
    resumed = [json.loads(line) for line in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in fsdp_rows] == [0, 2, 4] and [r["iter"] for r in resumed] == [0, 2, 4, 6]
    for a, b in zip(resumed, single):  # FSDP's iterations 0-4, then one process's 6
        assert abs(a["val_loss"] - b["val_loss"]) < DRIFT and abs(a["train_loss"] - b["train_loss"]) < DRIFT
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("fsdp", "single"))
    assert a["model"].keys() == b["model"].keys() and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert all((a["model"][k] - b["model"][k]).abs().max() < DRIFT for k in b["model"])


def test_bin_files_with_meta_pkl_and_train_fraction(tmp_path):
    folder = tmp_path / "bins"
    folder.mkdir()
    np.arange(1000, dtype=np.uint16).__mod__(7).tofile(folder / "train.bin")
    np.arange(200, dtype=np.uint16).__mod__(7).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 7, "itos": {i: c for i, c in enumerate("abcdefg")}, "stoi": {}}, f)
    assert data.load_meta(folder) == {"vocab_size": 7, "itos": list("abcdefg")}
    train, val = data.load_tokens(folder, 0.5, 32)
    assert len(train) == 500 and len(val) == 200
    rows = run(tmp_path, "--data-dir", str(folder), "--max-iters", "2", "--eval-interval", "2", "--train-fraction", "0.5")
    assert rows[-1]["iter"] == 2
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 7, "itos": np.arange(3)}, f)  # not plain data: refused
    with pytest.raises(pickle.UnpicklingError, match="plain data"):
        data.load_meta(folder)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data-dir", "MISSING"], "lacks train.bin, val.bin"),
        (["--text-file", "TEXT", "--block-size", "4000"], "not more than --block-size"),
        (["--text-file", "NOPE.txt"], "no such text file"),
        (["--text-file", "TEXT", "--bdia", "--gammas", "0.3,-0.3"], "2^-m"),
        (["--text-file", "TEXT", "--n-embd", "33"], "divisible"),
        ([], "give the data"),
        (["--text-file", "TEXT", "--resume"], "without --resume"),
        (["--text-file", "TEXT", "--fsdp"], "torchrun --nproc_per_node=N train_gpt.py"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, text_file, capsys, flags, message):
    flags = [str(text_file) if f == "TEXT" else str(tmp_path / f) if f in ("MISSING", "NOPE.txt") else f for f in flags]
    with pytest.raises(SystemExit) as e:
        train_gpt.main([*TINY, "--max-iters", "1", "--out-dir", str(tmp_path / "o"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_shakespeare_download_failure_names_the_alternative(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(SystemExit) as e:
        train_gpt.main([*TINY, "--dataset", "shakespeare_char", "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "--text-file" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.part"))


def test_shakespeare_is_prepared_from_a_verified_download(tmp_path, monkeypatch):
    source = tmp_path / "input.txt"
    source.write_text(("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30000)[: data.SHAKESPEARE_BYTES])
    monkeypatch.setattr(data, "SHAKESPEARE_URL", source.as_uri())
    folder = data.shakespeare_dir(tmp_path / "data")
    meta = data.load_meta(folder)
    assert meta["vocab_size"] == len(set(source.read_text()))
    assert len(np.fromfile(folder / "train.bin", dtype=np.uint16)) == int(0.9 * data.SHAKESPEARE_BYTES)
