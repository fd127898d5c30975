"""ViT, RevViT and train_vit.py on tiny models and tiny data files the tests write."""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import data  # noqa: E402
from plumbing import runlib  # noqa: E402
import train_vit  # noqa: E402
from bdia import BDIAConfig  # noqa: E402
from models import RevViT, ViT  # noqa: E402
from plumbing.randaugment import rand_augment  # noqa: E402

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


def restless_scaler(monkeypatch):
    """GradScalers that grow every step (the reference's: every 2,000), so that within a few
    steps the scale overflows fp16's gradients, backs off and skips steps: a resumed run that
    did not restore it would scale, and skip, otherwise."""
    real = train_vit.grad_scaler

    def grad_scaler(args, device):
        scaler = real(args, device)
        scaler._growth_interval = 1  # noqa: SLF001 (the constructor's growth_interval, set on the instance)
        return scaler

    monkeypatch.setattr(train_vit, "grad_scaler", grad_scaler)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_continues_exactly(tmp_path, cifar_dir, monkeypatch, kill_after, precision):
    flags = ["--bdia", "--epochs", "3", "--precision", precision]
    restless_scaler(monkeypatch)
    straight = run(tmp_path, cifar_dir, *flags, out="a")
    kill_after(train_vit, "train_epoch", 1)  # killed in epoch 2
    with pytest.raises(kill_after.Killed):
        run(tmp_path, cifar_dir, *flags, out="b")
    monkeypatch.undo()
    restless_scaler(monkeypatch)
    resumed = run(tmp_path, cifar_dir, "--epochs", "3", "--resume", out="b")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    a, b = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True) for out in ("a", "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"] == b["scaler"] and bool(a["scaler"]) == (precision == "fp16")
    if precision == "fp16":  # the scale moved, up and down: restoring it mattered
        assert [r["precision"] for r in resumed] == ["fp16"] * 3 and len({r["grad_scale"] for r in straight}) > 1


def test_precision_may_change_on_resume_and_an_amp_checkpoint_resumes_in_bf16(tmp_path, cifar_dir):
    run(tmp_path, cifar_dir, "--epochs", "1", "--amp")
    rows = run(tmp_path, cifar_dir, "--epochs", "2", "--precision", "fp16", "--resume")
    assert [r["precision"] for r in rows] == ["bf16", "fp16"]
    path = tmp_path / "out" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)  # as written before --precision: --amp, no scaler
    ckpt["args"]["amp"], ckpt["scaler"] = True, {}
    del ckpt["args"]["precision"]
    torch.save(ckpt, path)
    assert run(tmp_path, cifar_dir, "--epochs", "3", "--resume")[-1]["precision"] == "bf16"


def test_fp16_with_a_grad_scaler_reversible_bdia_equals_stored_activations():
    """The paper's recipe on CUDA, on the CPU's fp16 autocast: the blocks in fp16, the residual
    stream in float32, the loss scaled by a GradScaler. One train_step of reversible BDIA and of
    stored-activation BDIA: the same logits and loss bit for bit, the same (unscaled) gradients
    to about fp16's step (2^-11): the two backwards sum dL/dx_k in another order, and a last-bit
    difference can flip an fp16 rounding where the gradient enters a block's autocast region
    (seen here: 2e-7 to 6e-5 by seed at this size, 4.4e-4 for the paper's ViT)."""
    args = train_vit.parse_args(["--bdia", "--precision", "fp16", "--device", "cpu"])
    torch.manual_seed(2)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    results = []
    for reversible in (True, False):
        torch.manual_seed(0)
        model = ViT(dim=16, depth=4, heads=2, mlp_dim=32, patch=8, bdia=BDIAConfig(reversible=reversible)).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = train_vit.grad_scaler(args, x.device)
        torch.manual_seed(1)  # the same dropout masks and gammas
        loss, logits = train_vit.train_step(model, optimizer, scaler, x, y, args)
        assert scaler.is_enabled() and scaler.get_scale() == 2.0**16 and logits.dtype == torch.float16
        results.append((loss.detach(), logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_r, logits_r, grads_r), (loss_s, logits_s, grads_s) = results
    assert torch.equal(loss_r, loss_s) and torch.equal(logits_r, logits_s)
    for a, b in zip(grads_r, grads_s):  # unscaled by scaler.step
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() < 2**-9


def test_precision_auto_is_the_references_fp16_on_cuda_and_amp_is_bf16(tmp_path, capsys):
    args = train_vit.parse_args(["--device", "cpu"])
    assert args.precision == "auto" and train_vit.precision(args, torch.device("cpu")) == "fp32"
    assert train_vit.precision(args, torch.device("cuda")) == "fp16"  # resolved where the run runs
    assert not train_vit.grad_scaler(args, torch.device("cpu")).is_enabled()
    args = train_vit.parse_args(["--amp", "--device", "cpu"])
    assert args.precision == "bf16" and not args.amp and train_vit.precision(args, torch.device("cuda")) == "bf16"
    with pytest.raises(SystemExit):
        train_vit.parse_args(["--amp", "--precision", "fp16"])
    assert "--amp is --precision bf16" in capsys.readouterr().err


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
