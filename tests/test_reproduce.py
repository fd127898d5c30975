"""reproduce.py: runs per table and seed, skipping finished runs and resuming interrupted ones,
and the mean +- std table; on tiny models and a tiny CIFAR-10 the tests write."""

import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reproduce  # noqa: E402
from plumbing import runlib  # noqa: E402


@pytest.fixture
def tiny_cpu_preset(tmp_path, monkeypatch):
    """The cpu preset of the ViT tables on a tiny CIFAR-10 in the real pickle layout and a tiny ViT."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 16)]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}, f)
    flags = ["--data-dir", str(tmp_path / "data"), "--dim", "16", "--heads", "2", "--mlp-dim", "16", "--depth", "2",
             "--patch", "8", "--batch-size", "16", "--epochs", "1", "--device", "cpu"]
    monkeypatch.setitem(reproduce.VIT, "cpu", flags)
    monkeypatch.setitem(reproduce.VIT_DATASETS, "cpu", ["cifar10"])
    return flags


def test_table2_over_two_seeds_then_skips_and_resumes(tiny_cpu_preset, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    reproduce.main(["table2", "--preset", "cpu", "--seeds", "2", "--jobs", "2", "--runs-dir", str(runs)])
    out = capsys.readouterr().out
    assert out.count("finished") == 6 and "FAILED" not in out
    table = json.loads((runs / "table2-cpu" / "table.json").read_text())
    accuracies = [c for c in table["cells"] if c["metric"] == "final_acc"]
    assert len(accuracies) == 3 and all(len(c["values"]) == 2 and None not in c["values"] for c in accuracies)
    for c in accuracies:  # mean and std of the seeds' final accuracies (in %)
        assert c["mean"] == pytest.approx(np.mean(c["values"])) and c["std"] == pytest.approx(np.std(c["values"], ddof=1))
    markdown = (runs / "table2-cpu" / "table.md").read_text()
    assert "| ViT | " in markdown and "| cifar10 val. acc., final | cifar10 val. acc., best | cifar10 val. loss | cifar10 epoch of best | " \
        "cifar10 train loss | time per epoch |" in markdown and markdown in out
    assert "paper 88.15" not in markdown and "nothing to compare" in markdown  # tiny models: not the paper's setup
    assert "peak memory" not in markdown.split("\n\n")[1]  # a CPU run's RSS compares nothing: no column

    reproduce.main(["table2", "--preset", "cpu", "--seeds", "2", "--runs-dir", str(runs)])  # all done: nothing runs
    out = capsys.readouterr().out
    assert out.count("done") == 6 and "start" not in out

    monkeypatch.setitem(reproduce.VIT, "cpu", [*tiny_cpu_preset, "--epochs", "2"])  # now unfinished: resumed
    monkeypatch.setattr(reproduce, "MODELS", {"ViT": []})
    reproduce.main(["table2", "--preset", "cpu", "--seeds", "1", "--runs-dir", str(runs), "--dry-run"])
    assert "--resume" in capsys.readouterr().out
    reproduce.main(["table2", "--preset", "cpu", "--seeds", "1", "--runs-dir", str(runs)])
    log = [json.loads(line) for line in (runs / "table2-cpu" / "cifar10" / "ViT" / "seed1" / "log.jsonl").open()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_every_table_and_preset_builds_runs_whose_flags_parse(tmp_path):
    import train_gpt
    import train_translate
    import train_vit

    parsers = {"train_vit.py": train_vit.parse_args, "train_gpt.py": train_gpt.parse_args,
               "train_translate.py": train_translate.parse_args}
    for name, build in reproduce.TABLES.items():
        for preset in reproduce.PRESETS:
            table = build(preset)
            assert table.runs and table.cells and all(key in table.runs for _, _, key, _, _ in table.cells)
            for script, flags in table.runs.values():
                assert os.path.isfile(os.path.join(reproduce.ROOT, script)) and "--out-dir" not in flags
                flags = [str(tmp_path / "t.txt") if f == "RUN/licenses.txt" else f for f in flags]
                parsers[script]([*flags, "--out-dir", str(tmp_path / "out")])  # a bad flag would exit 2


def test_summaries_of_missing_and_single_values():
    assert reproduce.summarize([None, None], "final_acc")[0] == "not run"
    assert reproduce.summarize([88.0], "final_acc") == ("88.00", 88.0, 0.0)
    assert reproduce.summarize([500.0, 510.0], "peak_memory")[0] == "505 +- 7 MB"
    assert reproduce.summarize([13.0, None, 15.0], "final_bleu")[0] == "14.00 +- 1.41 [2 of 3 seeds]"


def test_flags_vary_a_preset_in_a_folder_of_its_own(tiny_cpu_preset, tmp_path, capsys):
    runs = tmp_path / "runs"
    reproduce.main(["table2", "--preset", "cpu", "--seeds", "1", "--runs-dir", str(runs), "--dry-run",
                    "--flags=--no-randaug --epochs 3"])
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 3 and all(c.split(" --seed")[0].endswith("--no-randaug --epochs 3") for c in commands)
    assert all("table2-cpu+no-randaug+epochs-3/cifar10/" in c for c in commands)
    assert not (runs / "table2-cpu").exists()
    table = reproduce.with_flags(reproduce.TABLES["table2"]("cpu"), ["--epochs", "3"])
    assert reproduce.flag_value(table.runs["cifar10/ViT"][1], "--epochs", None) == "3"  # the last one counts


def test_gpt_ablations_read_and_skip_appfs_finished_runs(tmp_path, capsys):
    """table3-gpt's reversible +-0.5 and table5-gpt's dropout 0 are appf's runs: the same flags, run
    and read in appf's folder, so a finished appf run is neither repeated nor missing from the table."""
    appf = reproduce.appf("cpu")
    assert reproduce.table5_gpt("cpu").runs["BDIA-GPT2/0.0"] == appf.runs["BDIA-GPT2"]
    assert reproduce.table3_gpt("cpu").runs["+-0.5 reversible l=9"] == appf.runs["BDIA-GPT2"]
    assert "--dropout" not in appf.runs["GPT2"][1] and reproduce.table5_gpt("cpu").runs["GPT2/0.0"] == appf.runs["GPT2"]
    runs = tmp_path / "runs"
    folder = runs / "appf-cpu" / "BDIA-GPT2" / "seed1"
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text(json.dumps({"iter": 100, "train_loss": 2.5, "val_loss": 2.75, "lr": 1e-3}) + "\n")
    reproduce.main(["table5-gpt", "--preset", "cpu", "--seeds", "1", "--runs-dir", str(runs), "--dry-run"])
    out = capsys.readouterr().out
    assert "done     BDIA-GPT2/0.0 seed 1" in out and out.count("python ") == 5  # GPT2/0.0 and four new runs
    assert "appf-cpu/GPT2/seed1" in out and "table5-gpt-cpu/BDIA-GPT2/0.1/seed1" in out
    reproduce.main(["table5-gpt", "--preset", "cpu", "--seeds", "1", "--runs-dir", str(runs), "--table-only"])
    cells = json.loads((runs / "table5-gpt-cpu" / "table.json").read_text())["cells"]
    read = {(c["run"], c["metric"]): c["values"] for c in cells}
    assert read["BDIA-GPT2/0.0", "final_val_loss"] == [2.75] and read["GPT2/0.1", "final_val_loss"] == [None]


def write_log(folder, rows):
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paper_numbers_only_beside_the_papers_setup_and_time_as_a_median(tmp_path, capsys):
    runs = tmp_path / "runs"
    for dataset in ("cifar10", "cifar100"):
        for model in ("RevViT", "ViT", "BDIA-ViT"):
            for seed, seconds in ((1, [31] * 399 + [300]), (2, [33] * 400), (3, [30] * 400)):  # finished; one slow epoch
                write_log(runs / "table2-paper" / dataset / model / f"seed{seed}",
                          [dict(epoch=e + 1, val_acc=0.8 + 0.01 * seed - 0.01 * (e == 399), val_loss=0.5, train_loss=0.4, epoch_seconds=s, peak_memory_mb=500.0 + seed)
                           for e, s in enumerate(seconds)])
    reproduce.main(["table2", "--preset", "paper", "--runs-dir", str(runs), "--table-only"])
    markdown = (runs / "table2-paper" / "table.md").read_text()
    header, *rows = markdown.split("\n\n")[1].splitlines()
    columns = ("val. acc., final", "val. acc., best", "val. loss", "epoch of best", "train loss")
    assert header == "| | " + " | ".join(f"{d} {c}" for d in ("cifar10", "cifar100") for c in columns) \
        + " | time per epoch |"  # no GPU here
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| RevViT", "| ViT", "| BDIA-ViT"]
    vit = rows[2].split(" | ")
    assert vit[1:3] == ["81.00 +- 1.00 (paper 88.15 +- 0.55)", "82.00 +- 1.00"]  # the last epoch 1 point lower
    assert vit[6].endswith("paper 61.86 +- 0.47)") and vit[11] == "31.0 s (paper 30.6 s) |"  # median of 31, 33, 30
    assert "the paper does not say which it reports" in markdown
    assert "nothing to compare" not in markdown and "left out for CPU runs" in markdown

    # the logs do not say the device (and the preset leaves it to --device auto): memory left out, above
    for log in (runs / "table2-paper").glob("*/*/seed*/log.jsonl"):  # the same runs, their logs saying cuda
        rows = [dict(json.loads(line), device="cuda") for line in log.read_text().splitlines()]
        log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reproduce.main(["table2", "--preset", "paper", "--runs-dir", str(runs), "--table-only"])
    markdown = (runs / "table2-paper" / "table.md").read_text()
    assert "| peak memory |" in markdown and "502 +- 1 MB (paper 1570.6 MB)" in markdown

    shutil.copytree(runs / "table2-paper", runs / "table2-paper+dim-64")  # the same logs, as runs of another size
    reproduce.main(["table2", "--preset", "paper", "--runs-dir", str(runs), "--table-only", "--flags=--dim 64"])
    table = (runs / "table2-paper+dim-64" / "table.md").read_text().split("\n\n")[1]
    assert "81.00 +- 1.00 | 82.00 +- 1.00" in table and "paper" not in table  # nothing beside a run of another model size


def test_fig5_shows_the_last_and_best_logged_bleu_and_says_when_runs_logged_none(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, bleus in ((1, [10.0] * 10 + [14.0, 13.0]), (2, [11.0] * 10 + [12.0, 15.0])):  # every 5 epochs, and at the end
        write_log(runs / "fig5-cpu-overfit" / "Transformer" / f"seed{seed}",
                  [dict(epoch=e, train_loss=2.0, val_loss=3.5, **({"val_bleu": bleus[e // 5 - 1]} if e % 5 == 0 else {}))
                   for e in range(1, 61)])
    write_log(runs / "fig5-cpu-overfit" / "BDIA" / "seed1",  # --bleu-every 0
              [dict(epoch=e, train_loss=2.0, val_loss=3.6) for e in range(1, 61)])
    reproduce.main(["fig5", "--preset", "cpu-overfit", "--seeds", "2", "--runs-dir", str(runs), "--table-only"])
    rows = (runs / "fig5-cpu-overfit" / "table.md").read_text().split("\n\n")[1].splitlines()
    assert rows[0].endswith("| val. BLEU |")
    assert rows[2].endswith("| 14.00 +- 1.41 (best 14.50 +- 0.71) |")  # the last: 13 and 15; the best: 14 and 15
    assert rows[3].endswith("| not logged |")


def test_a_second_reproduce_on_a_table_folder_a_live_one_holds_is_one_line_exit_2(tmp_path, capsys):
    """Two reproduce.py on one table would start the same runs twice: the second stops at once,
    naming the folder and the process that holds it; the runs' own folders are left alone."""
    base = tmp_path / "runs" / "appf-cpu"
    with runlib.folder_lock(base, "--runs-dir"):
        with pytest.raises(SystemExit) as e:
            reproduce.main(["appf", "--preset", "cpu", "--seeds", "1", "--runs-dir", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "start" not in out and not (base / "GPT2").exists()
    assert err == (f"reproduce.py: error: {base} is in use by a running process (process {os.getpid()}): wait for "
                   "it to end or stop it, or use another --runs-dir\n")
    reproduce.main(["appf", "--preset", "cpu", "--seeds", "1", "--runs-dir", str(tmp_path / "runs"), "--dry-run"])
    assert capsys.readouterr().out.count("python ") == 2  # a dry run only reads, and the lock is free again


def test_table4_gpt_runs_six_quantized_configurations_beside_appfs_finished_pair(tmp_path, capsys):
    """table4-gpt: GPT2 rounded to 2^-l in training (gamma 0, stored activations, as table4's
    "ViT with quantization") and reversible BDIA-GPT2 at l = 5, 0, -2, appf's finished GPT2 and
    BDIA-GPT2 (l = 9) read from appf's folder, neither run again."""
    appf = reproduce.appf("cpu-overfit")
    table = reproduce.table4_gpt("cpu-overfit")
    assert table.runs["GPT2/none"] == appf.runs["GPT2"] and table.runs["BDIA-GPT2/9"] == appf.runs["BDIA-GPT2"]
    runs = tmp_path / "runs"
    for model, loss in (("GPT2", 1.96), ("BDIA-GPT2", 1.77)):  # finished: the last iteration of the preset
        write_log(runs / "appf-cpu-overfit" / model / "seed1", [dict(iter=i, train_loss=1.0, val_loss=loss - i / 1e4)
                                                                for i in (0, 1250, 2500)])
    reproduce.main(["table4-gpt", "--preset", "cpu-overfit", "--seeds", "1", "--runs-dir", str(runs), "--dry-run"])
    out = capsys.readouterr().out
    assert "done     GPT2/none seed 1" in out and "done     BDIA-GPT2/9 seed 1" in out
    commands = [line for line in out.splitlines() if line.startswith("python ")]
    appf_flags = " ".join(appf.runs["GPT2"][1][2:])  # after --text-file RUN/licenses.txt
    expected = {"GPT2/5": "--bdia --gammas 0 --bits 5 --no-reversible", "BDIA-GPT2/5": "--bdia --bits 5",
                "GPT2/0": "--bdia --gammas 0 --bits 0 --no-reversible", "BDIA-GPT2/0": "--bdia --bits 0",
                "GPT2/-2": "--bdia --gammas 0 --bits -2 --no-reversible", "BDIA-GPT2/-2": "--bdia --bits -2"}
    assert len(commands) == 6 and "appf-cpu-overfit" not in out.split("done     BDIA-GPT2/9 seed 1")[1]
    for c, (key, flags) in zip(commands, expected.items()):
        assert c.endswith(f"{appf_flags} {flags} --seed 1 --out-dir {os.path.relpath(runs)}/table4-gpt-cpu-overfit/{key}/seed1")
    reproduce.main(["table4-gpt", "--preset", "cpu-overfit", "--seeds", "1", "--runs-dir", str(runs), "--table-only"])
    read = {(c["run"], c["metric"]): c["values"]
            for c in json.loads((runs / "table4-gpt-cpu-overfit" / "table.json").read_text())["cells"]}
    assert read["GPT2/none", "final_val_loss"] == [1.96 - 0.25] and read["BDIA-GPT2/9", "best_at"] == [2500]
    assert read["BDIA-GPT2/-2", "final_val_loss"] == [None]
    markdown = (runs / "table4-gpt-cpu-overfit" / "table.md").read_text()
    assert "| BDIA-GPT2, l = 9 (appf's BDIA-GPT2) | 1.5200" in markdown and "| GPT2, l = -2 | not run |" in markdown


def test_a_run_in_progress_or_interrupted_is_left_out_of_the_table_and_said_so(tmp_path, capsys):
    """The table is of the end of training: a run whose log stops short of the preset's last
    iteration (still running, or killed) is not averaged in as if it had ended there."""
    runs = tmp_path / "runs"
    for seed, last in ((1, 2500), (2, 2500), (3, 600)):  # seed 3 stopped at iteration 600
        write_log(runs / "appf-cpu-overfit" / "GPT2" / f"seed{seed}",
                  [dict(iter=i, train_loss=1.0, val_loss=2.0 - seed / 10 if i == 2500 else 4.0) for i in range(0, last + 1, 100)])
    write_log(runs / "appf-cpu-overfit" / "BDIA-GPT2" / "seed1", [dict(iter=0, train_loss=4.4, val_loss=4.4)])
    reproduce.main(["appf", "--preset", "cpu-overfit", "--seeds", "3", "--runs-dir", str(runs), "--table-only"])
    read = {(c["run"], c["metric"]): c["values"]
            for c in json.loads((runs / "appf-cpu-overfit" / "table.json").read_text())["cells"]}
    assert read["GPT2", "final_val_loss"] == [1.9, 1.8, None] and read["BDIA-GPT2", "final_val_loss"] == [None] * 3
    rows = (runs / "appf-cpu-overfit" / "table.md").read_text()
    assert "| 1.8500 +- 0.0707 [2 of 3 seeds; 1 unfinished] (best 1.8500 +- 0.0707 [2 of 3 seeds; 1 unfinished])" in rows
    assert "unfinished (1 of 3 seeds)" in rows
