"""The house (issue 43): the root shows what a reader studies and the commands a user types, the
plumbing they import is in plumbing/, each training script shows in its own text how its BDIA
flags become the BDIAConfig its model gets and what --compile does to the blocks, and a checkpoint
written before the move resumes after it."""

import argparse
import ast
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402
import train_vit  # noqa: E402
from plumbing import runlib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CARD = ["bdia.py", "models.py", "gpt2.py", "train_vit.py", "train_translate.py", "train_gpt.py", "finetune_e2e.py",
        "reproduce.py", "bench.py", "plot.py"]
PLUMBING = ["runlib.py", "distributed.py", "data.py", "metrics.py", "randaugment.py", "gpt2_files.py"]
TRAINING = ["train_vit.py", "train_translate.py", "train_gpt.py", "finetune_e2e.py"]


def imported(path):
    """The top-level names of the modules a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_root_holds_the_card_and_plumbing_the_rest():
    """(A file of your own saved at the root, as README's first recipe suggests, is no failure.)"""
    assert all((ROOT / name).is_file() for name in CARD)
    assert all((ROOT / "plumbing" / name).is_file() for name in PLUMBING)
    assert not [name for name in PLUMBING if (ROOT / name).exists()]  # none left at the root too


def test_bdia_imports_only_torch_and_the_standard_library_and_models_only_bdia_beside_them():
    assert imported(ROOT / "bdia.py") - set(sys.stdlib_module_names) == {"torch"}
    assert imported(ROOT / "models.py") - set(sys.stdlib_module_names) == {"torch", "bdia"}


@pytest.mark.parametrize("name", TRAINING)
def test_each_training_script_shows_its_bdia_flags_becoming_the_config_and_what_compile_does(name):
    """In the script's own text: the five BDIA flags, bdia_config(args) returning BDIAConfig(...) of them,
    and compiled(model, args) calling .compile() on the blocks; runlib defines none of them."""
    tree = ast.parse((ROOT / name).read_text())
    flags = {node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", None) == "add_argument" and isinstance(node.args[0], ast.Constant)}
    assert {"--bdia", "--gammas", "--bits", "--no-reversible", "--eval-gamma"} <= flags
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    calls = {name: {getattr(c.func, "id", None) or getattr(c.func, "attr", None) for c in ast.walk(f)
                    if isinstance(c, ast.Call)} for name, f in functions.items()}
    block_compiles = [c for c in ast.walk(functions["compiled"]) if isinstance(c, ast.Call)
                      and getattr(c.func, "attr", None) == "compile" and getattr(c.func.value, "id", None) != "torch"]
    assert "BDIAConfig" in calls["bdia_config"] and block_compiles  # block.compile(), beside torch.compile(model)
    runlib_text = (ROOT / "plumbing" / "runlib.py").read_text()
    assert '"--gammas"' not in runlib_text and "BDIAConfig(" not in runlib_text and ".compile(" not in runlib_text


# -----------------------------------------------------------------------------
# Checkpoints written before the move. A checkpoint holds tensors and plain types only, and
# runlib.read_checkpoint loads it with weights_only=True, which refuses any other class: so no module
# path is in it for a move to break. tests/fixtures/premove-c3677aa/ holds two that the code of commit
# c3677aa (before the move) wrote, on the data of conftest's cifar_dir and text_file fixtures:
#     python stop_at.py 14 train_vit.py --dim 16 --heads 2 --mlp-dim 32 --depth 3 --patch 8 --batch-size 8 \
#         --eval-batch-size 64 --no-randaug --device cpu --data-dir tinycifar --out-dir vit --epochs 2 --bdia
#         (stop_at.py: tests/test_signals.py's STOP_AT, a Ctrl-C where step 14 begins: step 3 of epoch 2)
#     python train_gpt.py --n-layer 2 --n-head 2 --n-embd 16 --block-size 16 --batch-size 4 --eval-iters 2 \
#         --eval-interval 5 --max-iters 10 --bdia --dropout 0.1 --device cpu --text-file verse.txt --out-dir gpt
# They resume with this code: what it restores is what they hold, and the run goes on to its end.

FIXTURES = ROOT / "tests" / "fixtures" / "premove-c3677aa"


def held_as_saved(ckpt, model, optimizer):
    """The model's weights, the optimizer's state and torch's RNG are those the checkpoint holds."""
    weights, state = model.state_dict(), optimizer.state_dict()["state"]
    rng = (ckpt["rng"][0] if isinstance(ckpt["rng"], list) else ckpt["rng"])["torch"]
    return (all(torch.equal(weights[k], v) for k, v in ckpt["model"].items())
            and all(torch.equal(torch.as_tensor(state[i][k]), torch.as_tensor(v))
                    for i, s in ckpt["optimizer"]["state"].items() for k, v in s.items())
            and torch.equal(torch.get_rng_state(), rng))


@pytest.fixture
def restored(monkeypatch):
    """A list that gets, for each runlib.restore, (the checkpoint, the model it built, whether the model,
    its optimizer and torch's RNG hold what the checkpoint holds right after it)."""
    got, restore = [], runlib.restore

    def spy(ckpt, model, optimizer, rank=None):
        restore(ckpt, model, optimizer, rank)
        got.append((ckpt, model, held_as_saved(ckpt, model, optimizer)))

    monkeypatch.setattr(runlib, "restore", spy)
    return got


def test_a_vit_checkpoint_written_before_the_move_resumes_within_its_epoch(tmp_path, cifar_dir, restored, capsys):
    out = tmp_path / "vit"
    shutil.copytree(FIXTURES / "vit", out)
    train_vit.main(["--out-dir", str(out), "--resume", "--data-dir", str(cifar_dir)])
    (ckpt, model, as_saved), = restored
    assert runlib.position(ckpt) == "step 3 of 10 in epoch 2" and as_saved
    assert f"resuming {out / 'ckpt.pt'}, saved after step 3 of 10 in epoch 2" in capsys.readouterr().out
    assert [r["epoch"] for r in runlib.JsonlLog(out / "log.jsonl", resume=True).read()] == [1, 2]
    assert runlib.run_is_finished(runlib.read_checkpoint(out / "ckpt.pt", "train_vit.py"))


def test_a_gpt_checkpoint_written_before_the_move_resumes(tmp_path, text_file, restored):
    out = tmp_path / "gpt"
    shutil.copytree(FIXTURES / "gpt", out)
    train_gpt.main(["--out-dir", str(out), "--resume", "--text-file", str(text_file), "--max-iters", "20"])
    (ckpt, model, as_saved), = restored
    assert ckpt["iter"] == 10 and as_saved
    assert [r["iter"] for r in runlib.JsonlLog(out / "log.jsonl", resume=True).read()] == [0, 5, 10, 15, 20]
    assert train_gpt.bdia_config(argparse.Namespace(**ckpt["args"])) == model.bdia  # its BDIA flags, as saved
