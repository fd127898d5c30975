"""ViT, RevViT and train_vit.py on tiny models and tiny data files the tests write."""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import runlib  # noqa: E402
import train_vit  # noqa: E402
from bdia import BDIAConfig  # noqa: E402
from models import RevViT, ViT  # noqa: E402
from randaugment import rand_augment  # noqa: E402

torch.set_num_threads(1)
TINY = ["--dim", "16", "--heads", "2", "--mlp-dim", "32", "--depth", "3", "--patch", "8", "--batch-size", "16",
        "--device", "cpu", "--eval-batch-size", "64"]


def run(tmp_path, cifar_dir, *flags, out="out"):
    train_vit.main([*TINY, "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path / out), *flags])
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "flags",
    [[], ["--bdia"], ["--bdia", "--no-reversible"], ["--model", "revvit"], ["--bdia", "--bits", "none", "--no-reversible"],
     ["--bdia", "--gammas=-0.25,0.25"], ["--optimizer", "adamw"]],
)
def test_one_epoch_in_each_mode_writes_log_and_checkpoint(tmp_path, cifar_dir, flags):
    rows = run(tmp_path, cifar_dir, "--epochs", "1", *flags)
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"]) and 0 <= rows[0]["val_acc"] <= 1
    assert set(rows[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "peak_memory_mb"}
    assert (tmp_path / "out" / "ckpt.pt").is_file()


def test_resume_continues_exactly(tmp_path, cifar_dir, monkeypatch, kill_after):
    straight = run(tmp_path, cifar_dir, "--bdia", "--epochs", "3", out="a")
    kill_after(train_vit, "train_epoch", 1)  # killed in epoch 2
    with pytest.raises(kill_after.Killed):
        run(tmp_path, cifar_dir, "--bdia", "--epochs", "3", out="b")
    monkeypatch.undo()
    resumed = run(tmp_path, cifar_dir, "--bdia", "--epochs", "3", "--resume", out="b")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[2]["train_loss"] == straight[2]["train_loss"]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_log_line_gives_the_rate_its_epoch_trained_with(tmp_path, cifar_dir, rates_trained_with):
    rates = rates_trained_with(train_vit.SETAdam)
    log = run(tmp_path, cifar_dir, "--epochs", "3", "--lr", "1e-3")
    per_epoch = len(rates) // 3  # 80 images in batches of 16
    assert per_epoch == 5 and len(set(rates[:per_epoch])) == 1
    assert [r["lr"] for r in log] == rates[::per_epoch] and len(set(rates[::per_epoch])) == 3  # cosine over epochs


def test_gamma_sweep_after_training(tmp_path, cifar_dir, capsys):
    run(tmp_path, cifar_dir, "--bdia", "--epochs", "1", "--eval-gammas", "-0.5", "0", "0.5")
    sweep = json.loads((tmp_path / "out" / "gamma_sweep.json").read_text())
    assert [r["gamma"] for r in sweep] == [-0.5, 0.0, 0.5]
    assert "gamma at inference" in capsys.readouterr().out


def test_fashion_mnist_from_idx_files(tmp_path, fashion_mnist):
    fashion_mnist(tmp_path / "fashion-mnist")
    train_x, train_y, val_x, val_y = data.load_images("fashion-mnist", tmp_path)
    assert train_x.shape == (20, 1, 32, 32) and val_y.shape == (10,) and train_x.dtype == torch.uint8
    train_vit.main([*TINY, "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--epochs", "1",
                    "--out-dir", str(tmp_path / "out"), "--bdia"])


def test_a_run_killed_between_log_and_checkpoint_logs_each_epoch_once(tmp_path, cifar_dir, monkeypatch, kill_after):
    kill_after(runlib, "save_checkpoint", 1)  # killed while saving epoch 2, after its log line
    with pytest.raises(kill_after.Killed):
        run(tmp_path, cifar_dir, "--epochs", "3", out="b")
    monkeypatch.undo()
    assert [r["epoch"] for r in runlib.JsonlLog(tmp_path / "b" / "log.jsonl", resume=True).read()] == [1, 2]
    resumed = run(tmp_path, cifar_dir, "--epochs", "3", "--resume", out="b")  # from the checkpoint of epoch 1
    assert [r["epoch"] for r in resumed] == [1, 2, 3]


def test_training_transform_is_randaugment_then_crop_and_flip(tmp_path, cifar_dir, capsys):
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    args = train_vit.parse_args(["--randaug-n", "2", "--randaug-m", "14"])
    out = train_vit.augment(images, args, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(out, train_vit.crop_and_flip(rand_augment(images, 2, 14, g), g))
    args = train_vit.parse_args(["--no-randaug"])
    assert torch.equal(train_vit.augment(images, args, torch.Generator().manual_seed(5)),
                       train_vit.crop_and_flip(images, torch.Generator().manual_seed(5)))
    rows = run(tmp_path, cifar_dir, "--epochs", "1", "--no-randaug", "--limit-val", "10")
    assert len(rows) == 1
    with pytest.raises(SystemExit):
        train_vit.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--no-randaug", "--randaug-n", "--randaug-m"))


def test_bdia_trained_vit_loads_into_a_plain_vit():
    torch.manual_seed(0)
    bdia_vit = ViT(dim=16, depth=3, heads=2, mlp_dim=32, bdia=BDIAConfig()).train()
    images = torch.randn(4, 3, 32, 32)
    bdia_vit(images).sum().backward()
    plain = ViT(dim=16, depth=3, heads=2, mlp_dim=32)
    plain.load_state_dict(bdia_vit.state_dict())  # strict: the same keys
    plain.eval(), bdia_vit.eval()
    bdia_vit.bdia = BDIAConfig(bits=None, reversible=False)
    assert torch.equal(plain(images), bdia_vit(images))


def test_revvit_reversible_gradients_match_stored_activations():
    torch.manual_seed(0)
    model = RevViT(dim=16, depth=6, heads=2, mlp_dim=32, dropout=0.1).train()
    images = torch.randn(4, 3, 32, 32)
    results = []
    for reversible in (True, False):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(images)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_r, grads_r), (out_s, grads_s) = results
    assert torch.equal(out_r, out_s)
    for a, b in zip(grads_r, grads_s):
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() < 1e-5


def test_set_adam_steps_against_the_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = train_vit.SETAdam([w], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert (w.abs() < torch.tensor([1.0, 2.0, 3.0])).all()


def test_set_adam_first_step_by_hand():
    """One step from the equations in SETAdam's docstring, worked out by hand for d = 2.
    g = (0.2, -0.4), t = 1: m = 0.1 g, v = 0.001 g^2; cos^2(v, 1) = (sum v)^2 / (2 sum v^2)
    = 0.2^2 / (2 (0.2^4 + 0.4^4)) ... in g: (0.04 + 0.16)^2 / (2 (0.0016 + 0.0256)) = 0.04 / 0.0544;
    w = sqrt(v cos^2 / 0.001) = |g| c with c = sqrt(0.04 / 0.0544); w~ = w - min(w) / 2 = (0.1 c, 0.3 c);
    step = lr / 0.1 * m / w~ = (0.02 / 0.1c, -0.04 / 0.3c) with lr = 0.1."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = train_vit.SETAdam([w], lr=0.1)
    w.grad = torch.tensor([0.2, -0.4], dtype=torch.float64)
    opt.step()
    c = (0.04 / 0.0544) ** 0.5
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.02 / (0.1 * c), -2.0 + 0.04 / (0.3 * c)], dtype=torch.float64),
                          rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bdia", "--gammas", "0.3,-0.3"], "2^-m"),
        (["--dim", "15"], "divisible"),
        (["--model", "revvit", "--bdia"], "apply to --model vit"),
        (["--epochs", "0"], "at least 1"),
    ],
)
def test_bad_flags_exit_2_with_a_message(tmp_path, cifar_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, cifar_dir, *flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_or_corrupt_data_exit_2_with_both_alternatives(tmp_path, cifar_dir, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(SystemExit) as e:
        train_vit.main([*TINY, "--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot download" in err and "extracted folder cifar-10-batches-py" in err
    assert not any((tmp_path / "empty").rglob("*.part"))
    bad = tmp_path / "bad" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    (bad / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        train_vit.main([*TINY, "--data-dir", str(tmp_path / "bad"), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(tmp_path, cifar_dir, "--resume", out="never-trained")
    assert e.value.code == 2 and "without --resume" in capsys.readouterr().err
