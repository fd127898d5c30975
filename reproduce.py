"""
One command per table and figure of the paper: runs each configuration over several seeds
(each a `python train_*.py ...` run in its own folder), skips runs that already finished,
resumes interrupted ones, and prints the table in the paper's layout, mean +- std over the
seeds, models as rows, as Markdown and JSON; the paper's numbers beside where the runs are
the paper's own setup (preset paper, no --flags), a note where there is nothing to compare.

    python reproduce.py table2                              # the paper's scale: CIFAR, 400 epochs, 3 seeds
    python reproduce.py table2 --preset cpu --seeds 2       # minutes on a CPU, offline (Fashion-MNIST)
    python reproduce.py table2 --preset cpu-overfit --jobs 2    # 9 runs of about 15 CPU-core minutes
    python reproduce.py appf --preset cpu-overfit           # Appendix F on this machine's license texts
    python reproduce.py table2 --preset cpu-overfit --jobs 2 \\
        --flags="--no-augment --limit-train 1000 --optimizer adam --lr 1e-3 --batch-size 32 --epochs 200"  # overfits
    python reproduce.py table3-gpt --preset cpu-overfit     # Table 3's gammas on appf's GPT
    python reproduce.py table4-gpt --preset cpu-overfit     # Table 4's quantization levels on appf's GPT
    python reproduce.py table2 --dry-run                    # print the commands only

Tables: table2 (ViT, BDIA-ViT, RevViT), table3 (gammas), table4 (quantization l),
table5 (dropout), fig1 (a constant gamma at inference), fig5 (translation), appf (GPT);
table3-gpt, table4-gpt and table5-gpt: Tables 3, 4 and 5's gammas, quantization levels and
dropout rates on appf's GPT, where the plain model overfits on a CPU (they read appf's finished
runs where the flags are the same).
Presets: paper (the paper's setup; CIFAR is downloaded, fig5 needs the Kaggle CSV in
data/eng_-french.csv, appf nanoGPT's OpenWebText .bin files in data/openwebtext);
cpu (a few minutes: tiny models, few epochs, offline data: the machinery at work, not a
result); cpu-overfit (about 15 minutes per run on one CPU core: small models trained long on little
data, where a plain model can overfit, the regime of the paper's claim; see RESULTS.md for
whether it did).

Runs go to RUNS_DIR/TABLE-PRESET/CONFIG/seedN (log.jsonl, ckpt.pt); the table to
RUNS_DIR/TABLE-PRESET/table.md and table.json.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from plumbing import runlib

ROOT = Path(__file__).resolve().parent  # the scripts, and the data/ their presets read, are here
SCRIPT = Path(__file__).name

# -----------------------------------------------------------------------------
# Scale of each preset, per script

# Debian's license texts, one per license in its latest version: 108 kB of English, offline
LICENSES = [Path("/usr/share/common-licenses", name) for name in
            ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-3", "LGPL-3", "MPL-2.0")]

VIT = {  # dataset names are filled in per table
    "paper": [],  # train_vit.py's defaults are the paper's setup
    "cpu": ["--limit-train", "1000", "--limit-val", "500", "--dim", "64", "--mlp-dim", "64", "--heads", "4",
            "--patch", "8", "--epochs", "3", "--device", "cpu"],
    "cpu-overfit": ["--limit-train", "2000", "--limit-val", "2000", "--dim", "128", "--mlp-dim", "128",
                    "--heads", "4", "--patch", "8", "--epochs", "200", "--device", "cpu"],
}
VIT_DATASETS = {"paper": ["cifar10", "cifar100"], "cpu": ["fashion-mnist"], "cpu-overfit": ["fashion-mnist"]}

TRANSLATE = {
    "paper": ["--data", "data/eng_-french.csv", "--epochs", "400"],  # Fig. 5 runs past epoch 200; the count is not given
    "cpu": ["--dataset", "gettext-fr", "--max-pairs", "2000", "--dim", "64", "--heads", "4", "--mlp-dim", "64",
            "--enc-layers", "3", "--dec-layers", "3", "--epochs", "2", "--batch-size", "64", "--bleu-every", "0",
            "--device", "cpu"],
    "cpu-overfit": ["--dataset", "gettext-fr", "--max-pairs", "6000", "--dim", "128", "--heads", "4", "--mlp-dim", "128",
                    "--epochs", "60", "--batch-size", "64", "--bleu-every", "5", "--device", "cpu"],  # BLEU: 599 pairs
}

GPT = {
    # nanoGPT's train.py defaults (a single GPU: gradient accumulation 40), on 0.05 % of OpenWebText
    "paper": ["--data-dir", "data/openwebtext", "--train-fraction", "0.0005", "--n-layer", "12", "--n-head", "12",
              "--n-embd", "768", "--block-size", "1024", "--batch-size", "12", "--grad-accum", "40", "--max-iters", "600000",
              "--lr", "6e-4", "--min-lr", "6e-5", "--warmup-iters", "2000", "--weight-decay", "0.1",
              "--eval-interval", "2000", "--eval-iters", "200", "--dropout", "0.0", "--no-bias"],
    "cpu": ["--n-layer", "4", "--n-head", "4", "--n-embd", "64", "--block-size", "64", "--batch-size", "8",
            "--max-iters", "100", "--eval-interval", "50", "--eval-iters", "5", "--lr", "1e-3", "--warmup-iters", "10",
            "--device", "cpu"],
    "cpu-overfit": ["--n-layer", "4", "--n-head", "4", "--n-embd", "192", "--block-size", "128", "--batch-size", "16",
                    "--max-iters", "2500", "--eval-interval", "100", "--eval-iters", "20", "--lr", "1e-3",
                    "--min-lr", "1e-4", "--warmup-iters", "100", "--device", "cpu"],
}

PRESETS = ("paper", "cpu", "cpu-overfit")

# -----------------------------------------------------------------------------
# The paper's numbers (mean +- std where the paper gives one)

PAPER = {
    "table2": {("cifar10", "RevViT"): "86.22 +- 0.42", ("cifar10", "ViT"): "88.15 +- 0.55",
               ("cifar10", "BDIA-ViT"): "89.10 +- 0.38", ("cifar100", "RevViT"): "61.89 +- 0.31",
               ("cifar100", "ViT"): "61.86 +- 0.47", ("cifar100", "BDIA-ViT"): "66.09 +- 0.80",
               "memory": {"RevViT": "572.7 MB", "ViT": "1570.6 MB", "BDIA-ViT": "693.4 MB"},
               "time": {"RevViT": "41.8 s", "ViT": "30.6 s", "BDIA-ViT": "47.0 s"}},
    "table3": {"0.0": "88.15 +- 0.55", "+-0.25": "88.79 +- 0.29", "+-0.5": "89.12 +- 0.22", "+-0.6": "88.89 +- 0.15"},
    "table4": {("ViT", "5"): "87.90", ("ViT", "0"): "87.76", ("ViT", "-2"): "84.31",
               ("BDIA-ViT", "5"): "89.50", ("BDIA-ViT", "0"): "88.47", ("BDIA-ViT", "-2"): "84.16"},
    "table5": {("cifar10", "ViT", "0.0"): "86.27", ("cifar10", "BDIA-ViT", "0.0"): "89.20",
               ("cifar10", "ViT", "0.1"): "88.15", ("cifar10", "BDIA-ViT", "0.1"): "89.10",
               ("cifar10", "ViT", "0.2"): "87.24", ("cifar10", "BDIA-ViT", "0.2"): "88.22",
               ("cifar100", "ViT", "0.0"): "59.13", ("cifar100", "BDIA-ViT", "0.0"): "64.45",
               ("cifar100", "ViT", "0.1"): "61.86", ("cifar100", "BDIA-ViT", "0.1"): "66.09",
               ("cifar100", "ViT", "0.2"): "61.68", ("cifar100", "BDIA-ViT", "0.2"): "64.24"},
}

# -----------------------------------------------------------------------------
# The tables: the runs each needs and how its cells are read off them


class Table:
    """name, runs {key: (script, flags)}, and rows of cells (row label, column label, run key,
    metric, paper value); metrics are read from each run's folder and averaged over seeds.
    borrowed {key: (table, key)}: runs that are another table's (the same script and flags),
    read from and run in that table's folder, so that one configuration is run once."""

    def __init__(self, name, title, runs, cells, note="", borrowed=None):
        self.name, self.title, self.runs, self.cells, self.note = name, title, runs, cells, note
        self.borrowed = borrowed or {}


def run_folder(table, key, base):
    """The folder of a configuration's seeds: base/key, or the other table's for a borrowed run."""
    if key in table.borrowed:
        other, other_key = table.borrowed[key]
        return base.with_name(other + base.name[len(table.name):]) / other_key
    return base / key


def vit_runs(preset, dataset, **configs):
    """{key: ("train_vit.py", flags)} for configs {key: extra flags} on one dataset."""
    return {f"{dataset}/{key}": ("train_vit.py", ["--dataset", dataset, *VIT[preset], *extra])
            for key, extra in configs.items()}


MODELS = {"RevViT": ["--model", "revvit"], "ViT": [], "BDIA-ViT": ["--bdia"]}
ACCURACY_NOTE = ("validation accuracy: at the end of training and the best epoch's, in columns of their own; the "
                 "paper does not say which it reports (its reference repository keeps the best checkpoint)")


def accuracy_cells(row, column, key, paper):
    """A run's validation accuracy as two cells, the final and the best, each mean +- std; the
    paper's figure, where shown, beside the final one."""
    return [(row, f"{column}, final", key, "final_acc", paper), (row, f"{column}, best", key, "best_acc", None)]


def table2(preset):
    runs, cells, paper = {}, [], PAPER["table2"]
    for dataset in VIT_DATASETS[preset]:
        runs.update(vit_runs(preset, dataset, **MODELS))
        cells += [c for m in MODELS
                  for c in accuracy_cells(m, f"{dataset} val. acc.", f"{dataset}/{m}", paper.get((dataset, m)))]
        cells += [(m, f"{dataset} {measure}", f"{dataset}/{m}", name, None) for m in MODELS  # does a model overfit?
                  for measure, name in (("val. loss", "final_val_loss"), ("epoch of best", "best_at"),
                                        ("train loss", "final_train_loss"))]
    first = VIT_DATASETS[preset][0]  # the paper gives one memory and one time per model, the same for both datasets
    for m in MODELS:
        cells += [(m, "peak memory", f"{first}/{m}", "peak_memory", paper["memory"][m]),
                  (m, "time per epoch", f"{first}/{m}", "epoch_time", paper["time"][m])]
    note = f"peak memory and time per epoch: the {first} runs; " if len(VIT_DATASETS[preset]) > 1 else ""
    return Table("table2", "Table 2: validation accuracy (%), peak memory, training time per epoch", runs, cells,
                 note + ACCURACY_NOTE)


# Table 3's gamma_k, as the paper ran them: stored activations, no quantization
TABLE3 = {g: ["--bdia", "--gammas", *v, "--bits", "none", "--no-reversible"]
          for g, v in {"0.0": ["0"], "+-0.25": ["-0.25", "0.25"], "+-0.5": ["-0.5", "0.5"], "+-0.6": ["-0.6", "0.6"]}.items()}


def table3(preset):
    dataset = VIT_DATASETS[preset][0]
    cells = [c for g in TABLE3 for c in accuracy_cells(f"gamma {g}", f"{dataset} val. acc.", f"{dataset}/{g}",
                                                      PAPER["table3"][g])]
    return Table("table3", "Table 3: gamma_k of BDIA-ViT without quantization or online back-propagation, "
                 "validation accuracy (%)", vit_runs(preset, dataset, **TABLE3), cells, ACCURACY_NOTE)


def table4(preset):
    dataset = VIT_DATASETS[preset][0]
    configs, cells = {}, []
    for l in ("5", "0", "-2"):
        configs[f"ViT/{l}"] = ["--bdia", "--gammas", "0", "--bits", l, "--no-reversible"]  # eq. (25) in training
        configs[f"BDIA-ViT/{l}"] = ["--bdia", "--bits", l]
        for model in ("ViT", "BDIA-ViT"):
            cells += accuracy_cells(model, f"l = {l}", f"{dataset}/{model}/{l}", PAPER["table4"][(model, l)])
    return Table("table4", f"Table 4: quantization level l, validation accuracy (%) on {dataset}",
                 vit_runs(preset, dataset, **configs), cells,
                 "ViT with quantization: every block output rounded to 2^-l, eq. (25), during training too; "
                 + ACCURACY_NOTE)


def table5(preset):
    runs, cells = {}, []
    for dataset in VIT_DATASETS[preset]:
        configs = {f"{m}/{p}": [*MODELS[m], "--dropout", p] for m in ("ViT", "BDIA-ViT") for p in ("0.0", "0.1", "0.2")}
        runs.update(vit_runs(preset, dataset, **configs))
        cells += [c for p in ("0.0", "0.1", "0.2") for m in ("ViT", "BDIA-ViT")
                  for c in accuracy_cells(f"{m}, dropout {p}", f"{dataset} val. acc.", f"{dataset}/{m}/{p}",
                                          PAPER["table5"].get((dataset, m, p)))]
    return Table("table5", "Table 5: dropout rate, validation accuracy (%)", runs, cells, ACCURACY_NOTE)


FIG1_GAMMAS = ["-0.5", "-0.25", "0", "0.25", "0.5"]


def fig1(preset):
    dataset = VIT_DATASETS[preset][0]
    configs = {m: [*MODELS[m], "--eval-gammas", *FIG1_GAMMAS] for m in ("ViT", "BDIA-ViT")}
    cells = [(m, f"gamma = {g}", f"{dataset}/{m}", f"sweep:{g}", None) for m in configs for g in FIG1_GAMMAS]
    return Table("fig1", f"Fig. 1: validation accuracy (%) with one constant gamma in every block at inference, "
                 f"{dataset}", vit_runs(preset, dataset, **configs), cells,
                 "the paper gives Fig. 1 as a plot only; `python plot.py gamma-sweep` draws it from gamma_sweep.json")


def fig5(preset):
    runs = {m: ("train_translate.py", [*TRANSLATE[preset], *flags]) for m, flags in (("Transformer", []), ("BDIA", ["--bdia"]))}
    cells = [(m, metric, m, key, None) for m in runs
             for metric, key in (("val. loss", "final_val_loss"), ("epoch of best", "best_at"),
                                 ("train loss", "final_train_loss"), ("val. BLEU", "final_bleu"))]
    return Table("fig5", "Fig. 5: English -> French translation, validation loss and BLEU", runs, cells,
                 "the paper gives Fig. 5 as curves only; `python plot.py curves` draws them from log.jsonl")


def appf(preset):
    data = ["--text-file", "RUN/licenses.txt"] if preset != "paper" else []
    runs = {m: ("train_gpt.py", [*data, *GPT[preset], *flags]) for m, flags in (("GPT2", []), ("BDIA-GPT2", ["--bdia"]))}
    cells = [(m, metric, m, key, None) for m in runs
             for metric, key in (("val. loss", "final_val_loss"), ("iteration of best", "best_at"),
                                 ("train loss", "final_train_loss"))]
    return Table("appf", "Appendix F, Fig. 9: GPT2 vs BDIA-GPT2 on little data, validation loss", runs, cells,
                 "the paper gives Fig. 9 as curves only; `python plot.py curves` draws them from log.jsonl")


def gpt_ablation(name, title, preset, configs, cells, borrowed, papers="Tables 3 and 5"):
    """A table of GPT runs on appf's data and model: configs {key: extra flags}, and the
    runs borrowed from appf {key: appf's key}, whose flags are appf's own; `papers` names the
    paper's tables (of ViT accuracies) that it varies."""
    runs = {key: ("train_gpt.py", [*appf(preset).runs["GPT2"][1], *extra]) for key, extra in configs.items()}
    runs.update({key: appf(preset).runs[other] for key, other in borrowed.items()})
    measures = (("val. loss", "final_val_loss"), ("iteration of best", "best_at"), ("train loss", "final_train_loss"))
    return Table(name, title, runs, [(row, m, key, k, None) for row, key in cells for m, k in measures],
                 f"the paper's figures are ViT accuracies on CIFAR ({papers}): nothing here to compare them with",
                 {key: ("appf", other) for key, other in borrowed.items()})


def table3_gpt(preset):
    """Table 3's gammas on appf's GPT (where the plain model overfits), stored activations and no
    quantization as in the paper's Table 3, and appf's reversible BDIA-GPT2 (+-0.5, l = 9) beside."""
    bridge = "+-0.5 reversible l=9"
    cells = [(f"gamma {g}", g) for g in TABLE3] + [(f"gamma {bridge} (appf's BDIA-GPT2)", bridge)]
    return gpt_ablation("table3-gpt", "Table 3 on appf's GPT: gamma_k without quantization or online "
                        "back-propagation, validation loss", preset, TABLE3, cells, {bridge: "BDIA-GPT2"})


def table4_gpt(preset):
    """Table 4's quantization levels l on appf's GPT: BDIA-GPT2 (+-0.5, reversible) and, as table4's
    "ViT with quantization", GPT2 with every block output rounded to 2^-l in training too (gamma 0,
    stored activations: eq. (25)); beside them appf's own pair, BDIA-GPT2 at l = 9 and the
    unquantized GPT2."""
    configs = {}
    for l in ("5", "0", "-2"):
        configs[f"GPT2/{l}"] = ["--bdia", "--gammas", "0", "--bits", l, "--no-reversible"]  # eq. (25) in training
        configs[f"BDIA-GPT2/{l}"] = ["--bdia", "--bits", l]
    cells = [("GPT2, no quantization (appf's GPT2)", "GPT2/none"), ("BDIA-GPT2, l = 9 (appf's BDIA-GPT2)", "BDIA-GPT2/9")]
    cells += [(f"{m}, l = {l}", f"{m}/{l}") for l in ("5", "0", "-2") for m in ("GPT2", "BDIA-GPT2")]
    return gpt_ablation("table4-gpt", "Table 4 on appf's GPT: quantization level l, validation loss", preset,
                        configs, cells, {"GPT2/none": "GPT2", "BDIA-GPT2/9": "BDIA-GPT2"}, papers="Table 4")


def table5_gpt(preset):
    """Table 5's dropout rates on appf's GPT, plain and BDIA (+-0.5, l = 9, reversible); dropout 0
    is appf's own pair."""
    models = {"GPT2": [], "BDIA-GPT2": ["--bdia"]}
    configs = {f"{m}/{p}": [*flags, "--dropout", p] for m, flags in models.items() for p in ("0.1", "0.2")}
    cells = [(f"{m}, dropout {p}", f"{m}/{p}") for p in ("0.0", "0.1", "0.2") for m in models]
    return gpt_ablation("table5-gpt", "Table 5 on appf's GPT: dropout rate, validation loss", preset, configs, cells,
                        {f"{m}/0.0": m for m in models})


TABLES = {"table2": table2, "table3": table3, "table4": table4, "table5": table5, "fig1": fig1, "fig5": fig5, "appf": appf,
          "table3-gpt": table3_gpt, "table4-gpt": table4_gpt, "table5-gpt": table5_gpt}

# -----------------------------------------------------------------------------
# Runs: finished, interrupted or new


def read_log(folder):
    path = folder / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flag_value(flags, name, default):
    """The value argparse takes for `name`: that of its last occurrence."""
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1] if name in flags else default


def finished(script, flags, folder):
    """A run is finished when its log reaches the last epoch (iteration) and, for a gamma
    sweep, gamma_sweep.json exists."""
    rows = read_log(folder)
    if script == "train_gpt.py":
        done = bool(rows) and rows[-1]["iter"] == int(flag_value(flags, "--max-iters", 5000))
    else:
        default = {"train_vit.py": 400, "train_translate.py": 50}[script]
        done = bool(rows) and rows[-1]["epoch"] == int(flag_value(flags, "--epochs", default))
    return done and ("--eval-gammas" not in flags or (folder / "gamma_sweep.json").is_file())


def prepare_text(folder):
    """The license texts as one file: the offline corpus of appf (train_gpt.py keeps the last 10 %
    for validation: most of the MPL-2.0)."""
    if missing := [str(p) for p in LICENSES if not p.is_file()]:
        sys.exit(f"{SCRIPT}: error: {', '.join(missing)} not found; on Debian the license texts come with base-files")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "licenses.txt").write_text("".join(p.read_text(encoding="utf-8") for p in LICENSES))


def command(script, flags, folder, seed):
    flags = [str(folder.parent / "licenses.txt") if f == "RUN/licenses.txt" else f for f in flags]
    argv = [sys.executable, str(ROOT / script), *flags, "--seed", str(seed), "--out-dir", str(folder)]
    if (folder / "ckpt.pt").is_file():
        argv.append("--resume")  # continue where an interrupted run stopped
    return argv


def run_all(table, args, base):
    """Run every (configuration, seed) that has not finished, up to args.jobs at a time."""
    todo = []
    for key, (script, flags) in table.runs.items():
        for seed in range(1, args.seeds + 1):
            folder = run_folder(table, key, base) / f"seed{seed}"
            if finished(script, flags, folder):
                print(f"done     {key} seed {seed}")
            else:
                todo.append((key, seed, command(script, flags, folder, seed), folder))
    if any(f == "RUN/licenses.txt" for _, (_, flags) in table.runs.items() for f in flags):
        for key in table.runs:
            if not args.dry_run and not (run_folder(table, key, base) / "licenses.txt").is_file():
                prepare_text(run_folder(table, key, base))
    if args.dry_run:
        for _, _, argv, _ in todo:
            print("python " + " ".join(os.path.relpath(a) if a.startswith("/") else a for a in argv[1:]))
        return True
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
    running, failed = [], []
    while todo or running:
        while todo and len(running) < args.jobs:
            key, seed, argv, folder = todo.pop(0)
            folder.mkdir(parents=True, exist_ok=True)
            print(f"start    {key} seed {seed}", flush=True)
            with open(folder / "stdout.txt", "a") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                running.append((key, seed, folder, process))
        time.sleep(1)
        for item in list(running):
            key, seed, folder, process = item
            if process.poll() is not None:
                running.remove(item)
                status = "finished" if process.returncode == 0 else f"FAILED ({process.returncode})"
                print(f"{status} {key} seed {seed}" + ("" if process.returncode == 0 else
                                                       f": see {folder / 'stdout.txt'}"), flush=True)
                if process.returncode:
                    failed.append((key, seed))
    return not failed


# -----------------------------------------------------------------------------
# Reading results and printing the table


def metric(folder, name):
    """One number from a run's folder (the table asks finished runs only): accuracies in %, memory
    in MB, time in s."""
    rows = read_log(folder)
    if not rows:
        return None
    if name.startswith("sweep:"):
        path = folder / "gamma_sweep.json"
        sweep = json.loads(path.read_text()) if path.is_file() else []
        return next((100 * r["val_acc"] for r in sweep if r["gamma"] == float(name[6:])), None)
    step = "iter" if "iter" in rows[0] else "epoch"
    losses = [(r["val_loss"], r[step]) for r in rows if r.get("val_loss") is not None]
    bleus = [r["val_bleu"] for r in rows if r.get("val_bleu") is not None]
    return {
        "final_acc": lambda: 100 * rows[-1]["val_acc"],
        "best_acc": lambda: 100 * max(r["val_acc"] for r in rows),
        "peak_memory": lambda: max(r["peak_memory_mb"] for r in rows),
        "epoch_time": lambda: statistics.median(r["epoch_seconds"] for r in rows),
        "final_val_loss": lambda: rows[-1]["val_loss"],
        "best_val_loss": lambda: min(losses)[0],
        "best_at": lambda: min(losses)[1],
        "final_train_loss": lambda: rows[-1]["train_loss"],
        "final_bleu": lambda: bleus[-1] if bleus else None,  # train_translate logs it every --bleu-every epochs
        "best_bleu": lambda: max(bleus) if bleus else None,
    }[name]()


UNITS = {"peak_memory": " MB", "epoch_time": " s"}
# a final figure is shown with its best in brackets (accuracies: in columns of their own, accuracy_cells)
BEST = {"final_val_loss": "best_val_loss", "final_bleu": "best_bleu"}


def summarize(values, name, unfinished=0):
    """('mean +- std' of the seeds' values, mean, std), 'k of n seeds' said where only some have
    one, and how many runs are unfinished (left out); 'not run' when none has."""
    seeds, values = len(values), [v for v in values if v is not None]
    if not values:
        return (f"unfinished ({unfinished} of {seeds} seeds)" if unfinished else "not run"), None, None
    some = f" [{len(values)} of {seeds} seeds{f'; {unfinished} unfinished' if unfinished else ''}]" \
        if len(values) < seeds else ""
    if name == "epoch_time":  # the seeds' medians over epochs, their median: one slow seed (a busy machine) moves nothing
        return f"{statistics.median(values):.1f} s{some}", statistics.median(values), None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    percent = "acc" in name or "bleu" in name or name.startswith("sweep")
    digits = 0 if name in ("peak_memory", "best_at") else (2 if percent else 4)
    text = f"{mean:.{digits}f} +- {std:.{digits}f}{UNITS.get(name, '')}" if len(values) > 1 else \
        f"{mean:.{digits}f}{UNITS.get(name, '')}"
    return text + some, mean, std


def with_flags(table, flags):
    """The table with `flags` added to every run (a variation on a preset, e.g. --no-randaug)."""
    table.runs = {key: (script, [*run_flags, *flags]) for key, (script, run_flags) in table.runs.items()}
    return table


def folder_tag(flags):
    """'' or the flags as part of a folder name: '--no-randaug --limit-train 1000' -> '+no-randaug+limit-train-1000'."""
    words = [w.lstrip("-").replace("=", "-").replace("/", "-") for w in shlex.split(flags)]
    return "".join(("+" if flag.startswith("-") else "-") + w for flag, w in zip(shlex.split(flags), words))


def on_gpu(flags, folders):
    """Whether the runs trained on a GPU, as their logs say (older logs: as --device says; with
    neither, not known, and their memory is left out)."""
    logged = {rows[0].get("device") for rows in map(read_log, folders) if rows} - {None}
    return "cuda" in logged if logged else flag_value(flags, "--device", "auto") == "cuda"


def build_table(table, args, base):
    """The table as Markdown (models as rows, datasets and measures as columns; each cell mean +- std
    with its best, and the paper's figure beside it where the runs are the paper's own setup) and as
    records, one per metric and cell, with the seeds' values."""
    rows, columns, grid, records = [], [], {}, []
    comparable = args.preset == "paper" and not args.flags  # the paper's datasets and model size, nothing varied
    hidden = []  # what was left out, and why

    def seed_folders(key):
        return [run_folder(table, key, base) / f"seed{s}" for s in range(1, args.seeds + 1)]

    status = {}  # key -> each seed's (folder, finished, logged anything), read once a table

    def seed_status(key):
        if key not in status:
            script, flags = table.runs[key]
            status[key] = [(folder, finished(script, flags, folder), bool(read_log(folder))) for folder in seed_folders(key)]
        return status[key]

    def record(row, column, key, name, paper):
        # the table is of the end of training: a run in progress or interrupted is counted, not read
        values = [metric(folder, name) if done else None for folder, done, _ in seed_status(key)]
        unfinished = sum(started and not done for _, done, started in seed_status(key))
        text, mean, std = summarize(values, name, unfinished)
        if mean is None and any(done for _, done, _ in seed_status(key)):
            text = "not logged"  # the runs are there, this measure is not in their logs (e.g. --bleu-every 0)
        records.append(dict(row=row, column=column, run=key, metric=name, values=values, mean=mean, std=std, paper=paper))
        return text, mean is not None

    for row, column, key, name, paper in table.cells:
        if name == "peak_memory" and on_gpu(table.runs[key][1], seed_folders(key)):
            hidden.append("peak memory: CUDA's max_memory_allocated during training")
        elif name == "peak_memory":
            hidden.append("peak memory: left out for CPU runs and runs whose device the logs do not say (on a CPU "
                          "the process's RSS is mostly data and evaluation batches and compares nothing); "
                          "`python bench.py` measures the activation memory of each mode")
            continue
        if paper is not None and not comparable:
            hidden.append("the paper's figures are not shown: they are for CIFAR at the paper's model size and schedule, "
                          f"and these runs (preset {args.preset}{' with ' + args.flags if args.flags else ''}) are not, "
                          "so there is nothing to compare")
            paper = None
        notes = [f"best {record(row, column, key, BEST[name], None)[0]}"] if name in BEST else []
        notes += [f"paper {paper}"] if paper else []
        text, measured = record(row, column, key, name, paper)
        grid[row, column] = text + (f" ({'; '.join(notes)})" if notes and measured else "")
        rows += [row] if row not in rows else []
        columns += [column] if column not in columns else []
    extra = f" with {args.flags}" if args.flags else ""
    times = ", time per epoch the median of the seeds' median epochs" if any(c[3] == "epoch_time" for c in table.cells) else ""
    brackets = " (the best evaluation in brackets)" if any(c[3] in BEST for c in table.cells) else ""
    lines = [f"{table.title}. Preset {args.preset}{extra}, {args.seeds} seed(s) per cell, mean +- std at the end of "
             f"training{brackets}{times}; runs in {os.path.relpath(base)}.", ""]
    lines.append("| | " + " | ".join(columns) + " |")
    lines.append("| --- |" + " --- |" * len(columns))
    lines += ["| " + row + " | " + " | ".join(grid.get((row, c), "") for c in columns) + " |" for row in rows]
    notes = [table.note] if table.note else []
    notes += [n for i, n in enumerate(hidden) if n not in hidden[:i]]
    lines += [line for n in notes for line in ("", n[0].upper() + n[1:] + ".")]
    return "\n".join(lines) + "\n", records


def main(argv=None):
    p = runlib.ArgumentParser(description=__doc__)  # runlib's --help: the docstring's layout, and the defaults
    p.add_argument("table", choices=TABLES, help="the table or figure to reproduce")
    p.add_argument("--preset", choices=PRESETS, default="paper", help="the scale of the runs (see above)")
    p.add_argument("--seeds", type=int, default=3, help="runs per configuration, seeds 1..N")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cpu_count / jobs threads)")
    p.add_argument("--runs-dir", default="runs", help="where the runs and tables go")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do, run nothing")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of the finished runs there are (unfinished ones counted, not averaged), run nothing")
    p.add_argument("--flags", default="", help='more flags for every run, after the preset\'s (so they override it), '
                   'e.g. --flags="--no-randaug --limit-train 1000"; the runs get a folder of their own')
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        p.error("--seeds and --jobs must be at least 1")
    table = with_flags(TABLES[args.table](args.preset), shlex.split(args.flags))
    base = Path(args.runs_dir).resolve() / (f"{args.table}-{args.preset}" + folder_tag(args.flags))
    if args.dry_run:
        run_all(table, args, base)  # prints the commands only: nothing to hold
        return
    ok = True
    if not args.table_only:
        try:
            with runlib.folder_lock(base, "--runs-dir"):  # one reproduce per table folder
                ok = run_all(table, args, base)
        except runlib.FolderInUse as e:
            runlib.exit_with(e, SCRIPT)
    markdown, records = build_table(table, args, base)
    base.mkdir(parents=True, exist_ok=True)
    (base / "table.md").write_text(markdown)
    (base / "table.json").write_text(json.dumps(dict(table=args.table, preset=args.preset, seeds=args.seeds,
                                                     cells=records), indent=1))
    print("\n" + markdown)
    if not ok:
        sys.exit(f"{SCRIPT}: error: some runs failed (see their stdout.txt); the table shows the others")


if __name__ == "__main__":
    main()
