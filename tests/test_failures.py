"""Failures a user can act on (issue 14). Every bad input a user plausibly gives a script ends
it with exit code 2 and one line on stderr that begins `NAME.py: error:` (as argparse's), never
a traceback, and leaves an existing checkpoint and log byte for byte as they were. Training
that diverges or runs out of memory names the epoch (iteration), the cause, what to change and
the intact checkpoint to continue from; --resume from it with a lower --lr then works. --resume
with a flag that would make it another run is refused with the checkpoint's command line.

Each script's catalogue runs against a copy of a finished tiny run: OUT (its ckpt.pt and
log.jsonl) and DATA (its data). Flags may name {out}, {data}, {tmp}, {file} (a regular
file), and the checkpoints of the other scripts' runs: {vit}, {gpt}, {translate}, {e2e}."""

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bdia  # noqa: E402
import finetune_e2e  # noqa: E402
import gpt2  # noqa: E402
from plumbing import gpt2_files  # noqa: E402
import plot  # noqa: E402
import train_gpt  # noqa: E402
import train_translate  # noqa: E402
import train_vit  # noqa: E402
from plumbing import runlib  # noqa: E402
from models import GPT  # noqa: E402

torch.set_num_threads(1)
SCRIPTS = {"vit": train_vit, "gpt": train_gpt, "translate": train_translate, "e2e": finetune_e2e}

# The tiny runs: the flags of each script's run, with the data in {data} and the run in {out}
FLAGS = {
    "vit": ["--dim", "16", "--heads", "2", "--mlp-dim", "32", "--depth", "3", "--patch", "8", "--batch-size", "16",
            "--eval-batch-size", "64", "--no-randaug", "--device", "cpu", "--data-dir", "{data}", "--out-dir", "{out}"],
    "gpt": ["--n-layer", "3", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
            "--eval-iters", "4", "--lr", "3e-3", "--warmup-iters", "5", "--eval-interval", "10", "--device", "cpu",
            "--out-dir", "{out}"],
    "translate": ["--dim", "16", "--heads", "2", "--mlp-dim", "32", "--enc-layers", "2", "--dec-layers", "2",
                  "--batch-size", "8", "--bleu-samples", "4", "--device", "cpu", "--data", "{data}/pairs.txt",
                  "--out-dir", "{out}"],
    "e2e": ["--init-from", "{data}/gpt2", "--data-dir", "{data}", "--batch-size", "2", "--warmup-steps", "1",
            "--lr", "3e-3", "--no-test", "--device", "cpu", "--out-dir", "{out}"],
}
FIRST = {"vit": ["--epochs", "1"], "gpt": ["--text-file", "{data}/verse.txt", "--max-iters", "10"],
         "translate": ["--epochs", "1"], "e2e": ["--epochs", "1"]}


@pytest.fixture(autouse=True)
def quiet_and_offline(monkeypatch):
    """Progress bars write to stderr too, and these tests read stderr for the one error line;
    a data set that is not there must not be downloaded."""
    def no_bar(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    for script in SCRIPTS.values():
        monkeypatch.setattr(script, "tqdm", no_bar)

    def offline(*args, **kwargs):
        raise OSError("network unreachable (tests run offline)")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.setattr("urllib.request.OpenerDirector.open", offline)  # the hub's HEAD requests


# -----------------------------------------------------------------------------
# The data and the finished tiny runs


def write_pairs(path, n=48):
    words = {"red": "rouge", "blue": "bleu", "big": "grand", "small": "petit", "cat": "chat", "dog": "chien"}
    english = list(words)
    lines = []
    for i in range(n):
        en = [english[(i + 3 * k) % len(english)] for k in range(2 + i % 3)]
        lines.append(" ".join(en) + ".\t" + " ".join(words[w] for w in en) + " .\n")
    path.write_text("".join(lines))


def write_gpt2_and_e2e(folder):
    """A random tiny GPT-2 (folder/gpt2: model.safetensors, config.json, a byte-level
    tokenizer) and the three E2E CSVs."""
    symbols = [*gpt2_files.bytes_to_unicode().values(), "<|endoftext|>"]
    (folder / "gpt2").mkdir()
    (folder / "gpt2" / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (folder / "gpt2" / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    gpt2.save_pretrained(GPT(len(symbols), block_size=64, n_layer=2, n_head=2, n_embd=16, gelu="tanh", bias=True),
                         folder / "gpt2")
    places = (("Aromi", "pub"), ("Zizzi", "cafe"), ("Loch", "bar"))
    rows = [(f"name[{n}], eatType[{t}]", f"{n} is a {t}.") for n, t in places]
    for name, part in (("trainset.csv", rows * 2), ("devset.csv", rows[:2]), ("testset_w_refs.csv", rows[1:])):
        (folder / name).write_text("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in part))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_dir, text_file):
    """{script: (data folder, out folder of one finished epoch, or 10 iterations)}."""
    root = tmp_path_factory.mktemp("runs")
    data = {name: root / f"{name}-data" for name in SCRIPTS}
    shutil.copytree(cifar_dir, data["vit"])
    data["gpt"].mkdir()
    shutil.copy(text_file, data["gpt"] / "verse.txt")
    data["translate"].mkdir()
    write_pairs(data["translate"] / "pairs.txt")
    data["e2e"].mkdir()
    write_gpt2_and_e2e(data["e2e"])
    result = {}
    for name, script in SCRIPTS.items():
        places = dict(data=data[name], out=root / f"{name}-out")
        script.main(fill([*FLAGS[name], *FIRST[name]], places))
        result[name] = places["data"], places["out"]
    return result


@pytest.fixture
def places(runs, tmp_path):
    """Fresh copies of the finished runs' data and out folders, for a test to damage."""
    def copy(script):
        data, out = runs[script]
        found = dict(data=tmp_path / "data", out=tmp_path / "out", tmp=tmp_path, file=tmp_path / "a-file",
                     **{name: runs[name][1] / "ckpt.pt" for name in SCRIPTS})
        shutil.copytree(data, found["data"])
        shutil.copytree(out, found["out"])
        found["file"].write_text("a regular file, not a folder\n")
        return found

    return copy


def fill(argv, places):
    return [str(a).format(**places) for a in argv]


def fails(main, argv, capsys, *expected):
    """main(argv) exits with code 2 and one line on stderr, which holds each of `expected`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(text in lines[0] for text in expected), lines[0]
    return lines[0]


def saved(out):
    """The bytes of a run's checkpoint and log: what a failure leaves as they were."""
    return {name: (out / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncated_tarball(p):
    """An interrupted download's tarball in --data-dir, without its extracted folder."""
    shutil.rmtree(p["data"] / "cifar-10-batches-py")
    whole = gzip.compress(os.urandom(50_000))
    (p["data"] / "cifar-10-python.tar.gz").write_bytes(whole[: len(whole) // 2])


def remove(*names):
    return lambda p: [(p["data"] / name).unlink() for name in names]


def garbage(path):
    path.write_bytes(b"\x80\x02 not what this file should hold \xff\x00" * 20)


# -----------------------------------------------------------------------------
# The catalogue: (script, flags, what the line says, damage done first to the copies)

DIVERGED = ["training diverged", "is intact: continue with --resume and a lower --lr"]
NAN = ["training diverged (the training loss is nan): lower --lr or set --grad-clip", *DIVERGED]
REFUSED = ["differs from the run in", "which --resume continues as it was run:", "--resume (a new run needs another --out-dir)"]


def written_by(script, reader):
    return [f"was written by {script}, not {reader}"]


def in_out(name, damage):
    return lambda p: damage(p["out"] / name)


def in_data(name, damage):
    return lambda p: damage(p["data"] / name)


def checkpoint_of(script):
    return lambda p: shutil.copy(p[script], p["out"] / "ckpt.pt")


def bdia_run(script):
    """Replace the plain run in OUT by a BDIA run of the same flags: --resume keeps BDIA or not."""
    def run(p):
        shutil.rmtree(p["out"])
        SCRIPTS[script].main(fill([*FLAGS[script], *FIRST[script], "--bdia"], p))

    return run


BINS = ["--data-dir", "{out}/data"]  # train_gpt: the .bin files the run prepared from its text
CATALOGUE = {  # case: (script, flags, what the line says, damage to the copies done first)
    # train_vit.py
    "vit: reversible gammas not +-2^-m": ("vit", ["--bdia", "--gammas", "0.3", "-0.3"], ["2^-m", "--no-reversible"], None),
    "vit: --bits 30": ("vit", ["--bdia", "--bits", "30"], ["use --bits 20 or less"], None),
    "vit: --epochs 0": ("vit", ["--epochs", "0"], ["--epochs must be at least 1"], None),
    "vit: --batch-size 0": ("vit", ["--batch-size", "0"], ["--batch-size must be at least 1"], None),
    "vit: --lr -1": ("vit", ["--lr", "-1"], ["--lr must be positive"], None),
    "vit: --dropout 1.5": ("vit", ["--dropout", "1.5"], ["--dropout must be in [0, 1)"], None),
    "vit: --epochs abc": ("vit", ["--epochs", "abc"], ["invalid int value: 'abc'"], None),
    "vit: no data, offline": ("vit", ["--data-dir", "{tmp}/nowhere"], ["cannot download", "cifar-10-batches-py"], None),
    "vit: truncated data batch": ("vit", [], ["cannot read", "data_batch_1"],
                                  in_data("cifar-10-batches-py/data_batch_1", truncate)),
    "vit: truncated CIFAR tarball in --data-dir": ("vit", [], ["cifar-10-python.tar.gz fails its md5 check (truncated",
                                                           "delete it and run again"], truncated_tarball),
    "vit: garbage data batch": ("vit", [], ["cannot read", "data_batch_2"],
                                in_data("cifar-10-batches-py/data_batch_2", garbage)),
    "vit: --resume reads the checkpoint before the data": ("vit", ["--resume", "--data-dir", "{tmp}/nowhere"],
                                                           ["cannot read checkpoint"], in_out("ckpt.pt", truncate)),
    "vit: --resume without a checkpoint": ("vit", ["--resume", "--out-dir", "{tmp}/new"], ["without --resume"], None),
    "vit: truncated checkpoint": ("vit", ["--resume"], ["cannot read checkpoint", "truncated"],
                                  in_out("ckpt.pt", truncate)),
    "vit: garbage checkpoint": ("vit", ["--resume"], ["cannot read checkpoint"], in_out("ckpt.pt", garbage)),
    "vit: checkpoint of a narrower ViT": ("vit", ["--resume", "--dim", "32"],
                                          [*REFUSED, "--dim 32 differs", "train_vit.py --data-dir", "--dim 16"], None),
    "vit: ViT checkpoint resumed as --model revvit": ("vit", ["--resume", "--model", "revvit"],
                                                      [*REFUSED, "--model revvit differs"], None),
    "vit: SET-Adam checkpoint resumed with --optimizer adam": ("vit", ["--resume", "--optimizer", "adam"],
                                                             [*REFUSED, "--optimizer adam differs"], None),
    "vit: checkpoint of train_gpt": ("vit", ["--resume"], written_by("train_gpt.py", "train_vit.py"), checkpoint_of("gpt")),
    "vit: --out-dir is a file": ("vit", ["--out-dir", "{file}"], ["is a file"], None),
    "vit: diverging --lr": ("vit", ["--bdia", "--resume", "--epochs", "2", "--lr", "1e4"],
                            ["epoch 2: BDIA: |x| reached", "(epoch 1) is intact", *DIVERGED], bdia_run("vit")),
    "vit: diverging --lr, plain (NaN loss)": ("vit", ["--resume", "--epochs", "2", "--lr", "1e4"],
                                              ["epoch 2: " + NAN[0], *NAN], None),
    # train_gpt.py
    "gpt: --bits 30": ("gpt", [*BINS, "--bdia", "--bits", "30"], ["use --bits 20 or less"], None),
    "gpt: --max-iters 0": ("gpt", [*BINS, "--max-iters", "0"], ["--max-iters must be at least 1"], None),
    "gpt: --batch-size 0": ("gpt", [*BINS, "--batch-size", "0"], ["--batch-size must be at least 1"], None),
    "gpt: --top-k 0": ("gpt", ["--sample", "1", "--top-k", "0"], ["--top-k must be at least 1"], None),
    "gpt: no data given": ("gpt", [], ["give the data"], None),
    "gpt: missing text file": ("gpt", ["--text-file", "{tmp}/missing.txt"], ["no such text file"], None),
    "gpt: truncated train.bin": ("gpt", BINS, ["train.bin is not a file of uint16 token ids"],
                                 in_out("data/train.bin", lambda path: path.write_bytes(b"\x01\x00\x02"))),
    "gpt: garbage train.bin": ("gpt", BINS, ["train.bin holds token id", "corrupt"], in_out("data/train.bin", garbage)),
    "gpt: garbage meta.json": ("gpt", BINS, ["cannot read", "meta.json"], in_out("data/meta.json", garbage)),
    "gpt: truncated checkpoint": ("gpt", [*BINS, "--resume"], ["cannot read checkpoint"], in_out("ckpt.pt", truncate)),
    "gpt: checkpoint of another width": ("gpt", [*BINS, "--resume", "--n-embd", "16"], [*REFUSED, "--n-embd 16 differs"],
                                         None),
    "gpt: checkpoint of train_vit": ("gpt", [*BINS, "--resume"], written_by("train_vit.py", "train_gpt.py"),
                                     checkpoint_of("vit")),
    "gpt: --sample from train_vit's checkpoint": ("gpt", ["--sample", "1"], written_by("train_vit.py", "train_gpt.py"),
                                                  checkpoint_of("vit")),
    "gpt: --out-dir is a file": ("gpt", [*BINS, "--out-dir", "{file}"], ["is a file"], None),
    "gpt: diverging --lr": ("gpt", [*BINS, "--resume", "--max-iters", "20", "--lr", "1e4"],
                            ["iteration 20: training diverged (the training loss is nan)", "(iteration 10) is intact",
                             *DIVERGED], None),
    # train_translate.py
    "translate: reversible gammas not +-2^-m": ("translate", ["--bdia", "--gammas", "0.3", "-0.3"], ["2^-m"], None),
    "translate: --epochs 0": ("translate", ["--epochs", "0"], ["--epochs must be at least 1"], None),
    "translate: --batch-size 0": ("translate", ["--batch-size", "0"], ["--batch-size must be at least 1"], None),
    "translate: missing pairs file": ("translate", ["--data", "{tmp}/missing.txt"], ["no such file"], None),
    "translate: binary pairs file": ("translate", [], ["not a UTF-8 text file"], in_data("pairs.txt", garbage)),
    "translate: truncated checkpoint": ("translate", ["--resume"], ["cannot read checkpoint"],
                                        in_out("ckpt.pt", truncate)),
    "translate: checkpoint of train_vit": ("translate", ["--resume"], written_by("train_vit.py", "train_translate.py"),
                                           checkpoint_of("vit")),
    "translate: --translate with train_gpt's checkpoint": ("translate", ["--translate", "red cat", "--checkpoint", "{gpt}"],
                                                           written_by("train_gpt.py", "train_translate.py"), None),
    "translate: --out-dir is a file": ("translate", ["--out-dir", "{file}"], ["is a file"], None),
    "translate: diverging --lr": ("translate", ["--bdia", "--resume", "--epochs", "2", "--lr", "1e6"],
                                  ["epoch 2: BDIA: |x| reached", "(epoch 1) is intact", *DIVERGED],
                                  bdia_run("translate")),
    # finetune_e2e.py
    "e2e: reversible gamma 0": ("e2e", ["--bdia", "--gammas", "-0.5", "0", "0.5"],
                                ["reversible=True needs all gammas +-2^-m", "not 0", "reversible=False --no-reversible"], None),
    "e2e: --epochs 0": ("e2e", ["--epochs", "0"], ["--epochs must be at least 1"], None),
    "e2e: --batch-size 0": ("e2e", ["--batch-size", "0"], ["--batch-size must be at least 1"], None),
    "e2e: missing train file": ("e2e", ["--train-file", "{tmp}/missing.csv"], ["no such data file"], None),
    "e2e: binary train file": ("e2e", [], ["trainset.csv is not a UTF-8 E2E CSV"], in_data("trainset.csv", garbage)),
    "e2e: truncated config.json": ("e2e", [], ["cannot load --init-from", "config.json"], in_data("gpt2/config.json", truncate)),
    "e2e: truncated model.safetensors": ("e2e", [], ["model.safetensors", "truncated"],
                                         in_data("gpt2/model.safetensors", truncate)),
    "e2e: --init-from a folder without its tokenizer and weights": (
        "e2e", [], ["gpt2 lacks model.safetensors (or pytorch_model.bin) and vocab.json + merges.txt (or encoder.json"],
        remove("gpt2/merges.txt", "gpt2/model.safetensors")),
    "e2e: a hub model, offline": ("e2e", ["--init-from", "gpt2", "--cache-dir", "{tmp}/hf"],
                                  ["download config.json, model.safetensors, vocab.json and merges.txt from"], None),
    "e2e: truncated checkpoint": ("e2e", ["--resume"], ["cannot read checkpoint"], in_out("ckpt.pt", truncate)),
    "e2e: FT checkpoint resumed with LoRA": ("e2e", ["--resume", "--lora-rank", "2"], [*REFUSED, "--lora-rank 2 differs"],
                                             None),
    "e2e: checkpoint of train_vit": ("e2e", ["--resume"], written_by("train_vit.py", "finetune_e2e.py"),
                                     checkpoint_of("vit")),
    "e2e: --table of a non-JSON file": ("e2e", ["--table", "{out}"], ["is not an e2e_scores.json"],
                                        in_out("e2e_scores.json", garbage)),
    "e2e: --out-dir is a file": ("e2e", ["--out-dir", "{file}"], ["is a file"], None),
    "e2e: diverging --lr": ("e2e", ["--bdia", "--resume", "--epochs", "2", "--lr", "1e4"],
                            ["epoch 2: BDIA: |x| reached", "(epoch 1) is intact", *DIVERGED], bdia_run("e2e")),
    "e2e: diverging --lr, plain (NaN loss)": ("e2e", ["--resume", "--epochs", "2", "--lr", "1e4"],
                                              ["epoch 2: " + NAN[0], *NAN], None),
}


@pytest.mark.parametrize("case", CATALOGUE)
def test_bad_input_is_one_line_exit_2_and_leaves_the_run_intact(case, places, capsys):
    script, flags, expected, damage = CATALOGUE[case]
    found = places(script)
    if damage:
        damage(found)
    before = saved(found["out"])
    new = [] if "--resume" in flags else ["--overwrite"]  # a new run over the run there, explicitly: still intact
    fails(SCRIPTS[script].main, fill([*FLAGS[script], *flags, *new], found), capsys, *expected)
    assert saved(found["out"]) == before


# -----------------------------------------------------------------------------
# Divergence end to end: the failed epoch is named, the checkpoint before it continues


def test_vit_divergence_names_the_intact_checkpoint_and_resume_with_the_normal_lr_finishes(places, capsys):
    found = places("vit")
    bdia_run("vit")(found)
    flags = fill([*FLAGS["vit"], "--resume", "--epochs", "2"], found)  # BDIA, from the checkpoint's flags
    before = saved(found["out"])
    line = fails(train_vit.main, [*flags, "--lr", "1e4"], capsys)
    assert line.startswith("train_vit.py: error: epoch 2: BDIA: |x| reached") and "training diverged" in line
    assert f"{found['out'] / 'ckpt.pt'} (epoch 1) is intact: continue with --resume and a lower --lr" in line
    assert saved(found["out"]) == before
    train_vit.main(flags)  # the normal --lr
    log = [json.loads(line) for line in (found["out"] / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["lr"] < 1
    assert torch.load(found["out"] / "ckpt.pt", weights_only=True)["epoch"] == 2


def test_gpt_divergence_names_the_intact_checkpoint_and_resume_with_the_normal_lr_finishes(places, capsys):
    found = places("gpt")
    flags = fill([*FLAGS["gpt"], *BINS, "--resume", "--max-iters", "20"], found)
    before = saved(found["out"])
    line = fails(train_gpt.main, [*flags, "--lr", "1e4"], capsys)
    assert line.startswith("train_gpt.py: error: iteration 20: training diverged") and "(iteration 10) is intact" in line
    assert saved(found["out"]) == before
    train_gpt.main(flags)
    log = [json.loads(line) for line in (found["out"] / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [0, 10, 20]
    assert (found["out"] / "log.jsonl").read_bytes().startswith(before["log.jsonl"])  # the first lines as they were


def test_the_error_starts_a_line_of_its_own_after_a_progress_bar(places, capsys, monkeypatch):
    monkeypatch.setattr(train_gpt, "tqdm", tqdm)  # the bar a user sees, left open by the failure
    found = places("gpt")
    with pytest.raises(SystemExit):
        train_gpt.main(fill([*FLAGS["gpt"], *BINS, "--resume", "--max-iters", "20", "--lr", "1e4"], found))
    err = capsys.readouterr().err
    assert "it/s" in err and err.split("\n")[-2].startswith("train_gpt.py: error: iteration 20: training diverged")


def test_divergence_before_any_checkpoint_says_none_was_written(places, capsys):
    found = places("vit")
    argv = fill([*FLAGS["vit"], "--out-dir", "{tmp}/new", "--epochs", "1", "--lr", "1e4"], found)
    fails(train_vit.main, argv, capsys, "epoch 1: training diverged",
          "no checkpoint was written yet: run again with a lower --lr")


# -----------------------------------------------------------------------------
# Out of memory and bits the measured |x| cannot hold, raised where training runs

TRAINING_STEP = {"vit": "train_epoch", "gpt": "train_step", "translate": "train_epoch", "e2e": "train_epoch"}
NEXT = {"vit": ["--epochs", "2"], "gpt": [*BINS, "--max-iters", "20"], "translate": ["--epochs", "2"],
        "e2e": ["--epochs", "2"]}
WHERE = {"vit": "epoch 2", "gpt": "iteration 10", "translate": "epoch 2", "e2e": "epoch 2"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_cuda_out_of_memory_names_the_flags_that_lower_memory(script, places, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.10 GiB of which 1.2 GiB is free.\nSee the documentation")

    found = places(script)
    monkeypatch.setattr(SCRIPTS[script], TRAINING_STEP[script], out_of_memory)
    before = saved(found["out"])
    fails(SCRIPTS[script].main, fill([*FLAGS[script], "--resume", *NEXT[script]], found), capsys,
          f"{SCRIPTS[script].SCRIPT}: error: {WHERE[script]}: CUDA out of memory (Tried to allocate 2.00 GiB): use a "
          "smaller --batch-size", "--bdia", "--amp", "is intact: continue with --resume and a smaller --batch-size or --amp")
    assert saved(found["out"]) == before


LIMIT = 16384  # bytes a file may grow to in the child: more than a log, less than a checkpoint


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_while_the_checkpoint_is_written_is_one_line_and_keeps_the_previous_one(script, places,
                                                                                          with_file_size_limit):
    """The file system itself refuses the write (a child with RLIMIT_FSIZE: EFBIG, as ENOSPC on a
    full disk), and torch's zip writer turns that into a RuntimeError: still one line, exit 2."""
    found = places(script)
    ckpt = found["out"] / "ckpt.pt"
    before = saved(found["out"])
    assert len(before["ckpt.pt"]) > LIMIT > len(before["log.jsonl"]) + 1000
    run = with_file_size_limit(LIMIT, SCRIPTS[script].SCRIPT, *fill([*FLAGS[script], "--resume", *NEXT[script]], found))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.split("\n")[-2].startswith(
        f"{SCRIPTS[script].SCRIPT}: error: cannot write {ckpt} ({os.strerror(errno.EFBIG)}): {ckpt} ("), run.stderr
    assert ") is intact: continue with --resume and the same flags once there is space" in run.stderr
    assert ckpt.read_bytes() == before["ckpt.pt"] and [p.name for p in found["out"].glob("ckpt*")] == ["ckpt.pt"]


def test_a_log_line_the_disk_refuses_is_one_line_and_leaves_the_log_whole(places, with_file_size_limit):
    found = places("vit")
    before = saved(found["out"])
    log = found["out"] / "log.jsonl"
    run = with_file_size_limit(len(before["log.jsonl"]) + 10, "train_vit.py",  # 10 bytes of the next line fit
                               *fill([*FLAGS["vit"], "--resume", "--epochs", "2"], found))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.split("\n")[-2] == (
        f"train_vit.py: error: cannot write {log} ({os.strerror(errno.EFBIG)}): {found['out'] / 'ckpt.pt'} (epoch 1) is "
        "intact: continue with --resume and the same flags once there is space"), run.stderr
    assert saved(found["out"]) == before  # the part of the line that was written is cut off again


FINISHED = {"vit": "(epoch 1, --epochs 1)", "gpt": "(iteration 10, --max-iters 10)", "translate": "(epoch 1, --epochs 1)",
            "e2e": "(epoch 1, --epochs 1)"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_of_a_finished_run_says_it_is_finished_and_changes_nothing(script, places, capsys):
    found = places(script)
    before = saved(found["out"])
    capsys.readouterr()
    SCRIPTS[script].main(fill([*FLAGS[script], "--resume", *(BINS if script == "gpt" else [])], found))
    out = capsys.readouterr().out
    assert f"the run in {found['out']} is finished {FINISHED[script]}: nothing left to train; a larger" in out, out
    assert "..10" not in out and "..1" not in out and saved(found["out"]) == before


def test_a_signal_after_the_last_step_says_training_is_finished(tmp_path, capsys):
    """A signal that comes after the last step's check ends the run as the loop ends (runlib.Signals
    raises Stopped then), before what follows training (a test, an export, --eval-gammas): the line
    says training is finished and that --resume runs the rest, not that it continues training."""
    with pytest.raises(runlib.Stopped) as stopped:
        with runlib.Signals():  # a loop's last step, which saved the checkpoint of the trained model
            os.kill(os.getpid(), signal.SIGTERM)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        runlib.exit_stopped(stopped.value, "finetune_e2e.py", tmp_path)
    assert stop.value.code == 143
    assert capsys.readouterr().err == (f"finetune_e2e.py: stopped by SIGTERM after the last step: training is finished, "
                                       f"saved in {tmp_path / 'ckpt.pt'}; --resume runs what comes after it\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_run_on_a_held_folder_names_the_process_and_touches_nothing(script, places, capsys):
    found = places(script)
    before = saved(found["out"])
    with runlib.folder_lock(found["out"]):
        fails(SCRIPTS[script].main, fill([*FLAGS[script], "--resume", *NEXT[script]], found), capsys,
              f"{SCRIPTS[script].SCRIPT}: error: {found['out']} is in use by a running process (process {os.getpid()})")
    assert saved(found["out"]) == before


def test_bits_beyond_the_measured_range_say_fewer_bits(places, capsys, monkeypatch):
    def too_large(*args, **kwargs):
        bdia.check_magnitudes([torch.aminmax(torch.tensor(100.0))], torch.float32, 20)  # the engine's own error

    found = places("vit")
    bdia_run("vit")(found)
    monkeypatch.setattr(train_vit, "train_epoch", too_large)
    argv = fill([*FLAGS["vit"], "--bits", "20", "--resume", "--epochs", "2"], found)  # --bits may change on --resume
    fails(train_vit.main, argv, capsys, "train_vit.py: error: epoch 2: BDIA: |x| reached 100", "use fewer bits",
          "(epoch 1) is intact: continue with --resume and a smaller --bits")


# -----------------------------------------------------------------------------
# bench.py and plot.py


@pytest.mark.parametrize("flags, expected", [
    (["--depths", "0"], "--depths must be at least 1"),
    (["--depths", "abc"], "comma-separated integers"),
    (["--modes", "plain,magic"], "unknown mode(s) ['magic']"),
    (["--family", "gpt", "--modes", "revvit"], "no mode is left"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--dim", "10", "--heads", "3"], "must be divisible by the heads 3"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--json", "/nonexistent-folder/bench.json"], "no such folder"),
    (["--family", "resnet"], "invalid choice: 'resnet'"),
])
def test_bench_bad_flags(flags, expected, capsys, monkeypatch):
    import bench

    def bench_main(argv):
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
        bench.main()

    fails(bench_main, flags, capsys, expected)


def test_bench_cuda_without_a_gpu(capsys, monkeypatch):
    import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cuda"])
    fails(lambda argv: bench.main(), [], capsys, "torch sees no CUDA device")


def test_bench_a_failed_memory_run_is_one_line(capsys, monkeypatch):
    import bench

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback (most recent call last):\n  ...\n"
                                                                  "RuntimeError: not enough memory")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: failed)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--depths", "1", "--modes", "plain"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    err = capsys.readouterr().err  # the depths bar, closed, then the one error line
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.split("\n")[-2].startswith("bench.py: error: the memory run of plain at depth 1 failed (RuntimeError: not "
                                           "enough memory)") and "--no-memory" in err


PLOT_FILES = {
    "log.jsonl": '{"epoch": 1, "train_loss": 2.0, "val_loss": 2.1}\n',
    "empty.jsonl": "",
    "text.jsonl": "epoch 1 loss 2.0\n",
    "sweep.json": "{not json",
    "bench.json": '{"rows": []}',
    "binary.json": "\udcff\x00",
}


@pytest.mark.parametrize("argv, expected", [
    (["curves", "{tmp}/missing.jsonl"], "no such file"),
    (["curves"], "needs at least one input file"),
    (["curves", "{tmp}/text.jsonl"], "text.jsonl is not a log.jsonl"),
    (["curves", "{tmp}/empty.jsonl"], "holds no log lines"),
    (["curves", "{tmp}/log.jsonl", "--labels", "a,b"], "1 files but 2 labels"),
    (["curves", "{tmp}/log.jsonl", "--x", "time"], "needs a log with epoch_seconds or seconds"),
    (["curves", "{tmp}/log.jsonl", "-o", "{tmp}/no/such/folder.png"], "cannot write"),
    (["gamma-sweep", "{tmp}/sweep.json"], "sweep.json is not a JSON file"),
    (["gamma-sweep", "{tmp}/log.jsonl"], "gamma-sweep needs gamma_sweep.json files"),
    (["gamma-sweep", "{tmp}/binary.json"], "is not a JSON file"),
    (["bench", "{tmp}/bench.json"], "bench needs JSON files of bench.py --json"),
    (["reconstruction", "--depth", "1"], "--depth must be at least 2"),
    (["histogram", "{tmp}/log.jsonl"], "invalid choice: 'histogram'"),
])
def test_plot_bad_files_and_flags(argv, expected, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional")
    for name, text in PLOT_FILES.items():
        (tmp_path / name).write_text(text, errors="surrogateescape")
    line = fails(plot.main, [a.format(tmp=tmp_path) for a in argv], capsys, expected)
    assert line.startswith("plot.py: error: ") and not list(tmp_path.glob("*.png"))
