"""
The paper's figures, drawn from this project's own outputs (matplotlib, optional):

    python plot.py curves OUT_A/log.jsonl OUT_B/log.jsonl --labels BDIA-ViT,ViT -o curves.png  # Fig. 4, 5, 9
    python plot.py curves OUT_A/log.jsonl OUT_B/log.jsonl --x time -o time.png             # Fig. 7
    python plot.py gamma-sweep OUT_A/gamma_sweep.json OUT_B/gamma_sweep.json -o gamma.png       # Fig. 1
    python plot.py reconstruction -o reconstruction.png              # Fig. 2, 6: also prints the table
    python plot.py bench bench.json -o bench.png                  # memory and step time vs depth

Without -o a figure goes to out/plots/FIGURE.png (out/ is git-ignored), not into the repository.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from bdia import BDIAConfig, bdia_block, bdia_unstep, draw_gamma, quantize, residual_of


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py: error: plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        sys.exit(f"plot.py: error: {path} is not a JSON file ({e})")


def read_jsonl(path):
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (ValueError, OSError) as e:
        sys.exit(f"plot.py: error: {path} is not a log.jsonl of this project's scripts ({e})")
    if not rows or not all(isinstance(r, dict) for r in rows):
        sys.exit(f"plot.py: error: {path} holds no log lines (JSON objects, one per line)")
    return rows


def labels_for(paths, labels):
    names = labels.split(",") if labels else [Path(p).parent.name or str(p) for p in paths]
    if len(names) != len(paths):
        sys.exit(f"plot.py: error: {len(paths)} files but {len(names)} labels")
    return names


def x_values(rows, x):
    """The x coordinate of each log line: its epoch, iteration or step, or with x == "time" the
    wall-clock minutes of training so far (the sum of the lines' epoch_seconds or seconds)."""
    if x == "time":
        if not all("epoch_seconds" in r or "seconds" in r for r in rows):
            sys.exit("plot.py: error: --x time needs a log with epoch_seconds or seconds on every line")
        elapsed, out = 0.0, []
        for r in rows:
            elapsed += r.get("epoch_seconds", r.get("seconds")) or 0.0
            out.append(elapsed / 60)
        return out
    key = x if x != "auto" else next((k for k in ("epoch", "iter", "step") if rows and k in rows[0]), "epoch")
    if any(key not in r for r in rows):
        sys.exit(f"plot.py: error: --x {key}: not every log line has {key!r}")
    return [r[key] for r in rows]


def label_colours(names):
    """One colour per distinct label: the seeds of one model share it."""
    return {name: f"C{i}" for i, name in enumerate(dict.fromkeys(names))}


SCORES = {"val_acc": "validation accuracy", "val_bleu": "validation BLEU"}


def logged_score(runs):
    """The right-hand panel's measure: validation accuracy (ViT) or BLEU (translation), or None."""
    return next((key for key in SCORES if any(row.get(key) is not None for _, rows in runs for row in rows)), None)


def plot_curves(args, plt):
    """Training and validation loss per epoch, iteration, step or minute, and beside it the
    validation accuracy or BLEU when the logs have it. Files that share a label (the seeds of
    one model) share its colour and legend entry."""
    runs = [(name, read_jsonl(p)) for name, p in zip(labels_for(args.files, args.labels), args.files)]
    colours = label_colours(name for name, _ in runs)
    score = logged_score(runs)
    fig, axes = plt.subplots(1, 2 if score else 1, figsize=(11 if score else 6, 4), squeeze=False)
    labelled = set()
    for name, rows in runs:
        xs = x_values(rows, args.x)
        first = name not in labelled
        labelled.add(name)
        for key, style in (("train_loss", "--"), ("val_loss", "-")):
            points = [(x, r[key]) for x, r in zip(xs, rows) if r.get(key) is not None]
            if points:
                axes[0, 0].plot(*zip(*points), style, color=colours[name],
                                label=f"{name} {key.split('_')[0]}" if first else None)
        points = [(x, r[score]) for x, r in zip(xs, rows) if r.get(score) is not None] if score else []
        if points:  # BLEU is logged every few epochs only: a line through the epochs that have it
            axes[0, 1].plot(*zip(*points), "o-" if score == "val_bleu" else "-", color=colours[name],
                            label=name if first else None)
    label = "wall-clock time (min)" if args.x == "time" else (args.x if args.x != "auto" else
                                                               ("epoch" if "epoch" in runs[0][1][0] else "iter"))
    for ax in axes[0]:
        ax.set_xlabel(label)
    axes[0, 0].set_ylabel("loss")
    if score:
        axes[0, 1].set_ylabel(SCORES[score])
    return fig, axes.ravel()


def read_gamma_sweep(path):
    """(gammas, values, what the values are) from gamma_sweep.json: {"gamma": acc} or a list of
    {"gamma": g, "val_acc": a} (train_vit.py) or {"gamma": g, "val_loss": l} (train_gpt.py) records."""
    data = read_json(path)
    if isinstance(data, dict) and "results" in data:
        data = data["results"]
    if isinstance(data, dict):
        return *zip(*sorted((float(g), a) for g, a in data.items())), "val_acc"
    measure = "val_loss" if data and "val_loss" in data[0] else "val_acc"
    return *zip(*sorted((float(r["gamma"]), r[measure]) for r in data)), measure


def plot_gamma_sweep(args, plt):
    """Validation accuracy (or loss) with one constant gamma across blocks at inference (Fig. 1).
    Files that share a label (the seeds of one model) share its colour and legend entry."""
    names = labels_for(args.files, args.labels)
    sweeps = [read_gamma_sweep(path) for path in args.files]
    measures = {measure for _, _, measure in sweeps}
    if len(measures) > 1:
        sys.exit("plot.py: error: gamma-sweep draws files of one kind on one axis: all accuracies (train_vit.py) "
                 "or all losses (train_gpt.py)")
    fig, ax = plt.subplots(figsize=(6, 4))
    colours, labelled = label_colours(names), set()
    for name, (gammas, values, _) in zip(names, sweeps):
        ax.plot(gammas, values, "o-", color=colours[name], label=None if name in labelled else name)
        labelled.add(name)
    ax.set_xlabel("gamma at inference")
    ax.set_ylabel({"val_acc": "validation accuracy", "val_loss": "validation loss"}[measures.pop()])
    return fig, [ax]


@torch.no_grad()
def reconstruction_errors(depth=12, dim=256, heads=8, batch=4, seq=64, bits=9, seed=0):
    """Per k, max |rebuilt x_k - x_k| reversing randomly initialised pre-norm transformer blocks run with
    gammas +-1/2, by (16) (no quantization, float32) and by (24) (l = bits, side information): bdia.py's
    functions, block by block, in the open."""
    torch.manual_seed(seed)
    blocks = [nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0, batch_first=True, norm_first=True) for _ in range(depth)]
    x0, errors = torch.randn(batch, seq, dim), {}
    gammas = [None] + [draw_gamma(torch.tensor(BDIAConfig().gammas), x0) for _ in range(1, depth)]  # gamma_k per sample, k >= 1
    for name, b in (("eq16", None), ("eq24", bits)):
        config, xs, sides = BDIAConfig(bits=b, reversible=False), [quantize(x0, b)], []  # every x_k, s_{k-1}
        for k, block in enumerate(blocks):  # forward: (18), (19), then (21) or (10); x_prev unused at k = 0
            h = residual_of(block, block, xs[k], (), {})[0]
            x_next, side = bdia_block(k, xs[k - 1], xs[k], h, gammas[k], config)
            xs, sides = xs + [x_next], sides + [side]
        rebuilt = list(xs)  # then from the top pair down, each x_{k-1} by (24) or (16)
        for k in range(depth - 1, 0, -1):
            h = residual_of(blocks[k], blocks[k], rebuilt[k], (), {})[0]
            rebuilt[k - 1] = bdia_unstep(rebuilt[k + 1], rebuilt[k], h, gammas[k], b, sides[k])
        errors[name] = [(r - x).abs().max().item() for r, x in zip(rebuilt, xs)]
    return errors


def print_reconstruction(errors):
    print(f"max|rebuilt x_k - x_k|, {len(errors['eq16']) - 1} pre-norm transformer blocks, gammas +-0.5, float32 "
          f"(Fig. 2, 6)\n{'x_k':>5} {'eq. (16), no quantization':>28} {'eq. (24), l = 9':>18}")
    for k in reversed(range(len(errors["eq16"]))):
        print(f"{k:>5} {errors['eq16'][k]:>28.3e} {errors['eq24'][k]:>18.3e}")


def plot_reconstruction(args, plt):
    """max |rebuilt x_k - x_k| per block, eq. (16) vs eq. (24), log scale (Fig. 2 and 6)."""
    errors = args.errors
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("eq16", "no quantization, eq. (16)"), ("eq24", "l = 9 with side info, eq. (24)")):
        values = [max(e, 1e-12) for e in errors[key]]  # log scale: exact zeros drawn at 1e-12
        ax.semilogy(range(len(values)), values, "o-", label=label)
    ax.set_xlabel("k (x_k rebuilt from the top pair)")
    ax.set_ylabel("max |rebuilt x_k - x_k| (0 drawn at 1e-12)")
    return fig, [ax]


def plot_bench(args, plt):
    """Activation memory and step time relative to the plain model, per depth."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for path in args.files:
        results = read_json(path)["results"]
        for mode in dict.fromkeys(r["mode"] for r in results):
            rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["depth"])
            for ax, key in zip(axes, ("memory_vs_plain", "time_vs_plain")):
                points = [(r["depth"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), "o-", label=mode)
    for ax, what in zip(axes, ("activation memory", "step time")):
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel(f"{what} / plain")
    return fig, axes


FIGURES = {"curves": plot_curves, "gamma-sweep": plot_gamma_sweep, "reconstruction": plot_reconstruction, "bench": plot_bench}
INPUTS = {"curves": "log.jsonl files of the training scripts",
          "gamma-sweep": "gamma_sweep.json files of train_vit.py or train_gpt.py", "bench": "JSON files of bench.py --json"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit code 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    """Every error a user can act on is one line on stderr and exit code 2: the helpers above
    end with sys.exit("plot.py: error: ..."), which this turns into code 2."""
    try:
        draw(argv)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(" ".join(e.code.split()), file=sys.stderr)  # one line
        raise SystemExit(2)


def draw(argv):
    p = ArgumentParser(prog="plot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=FIGURES)
    p.add_argument("files", nargs="*", help="log.jsonl, gamma_sweep.json or bench JSON files")
    p.add_argument("--labels", default=None, help="comma-separated legend names, one per file")
    p.add_argument("--x", choices=["auto", "epoch", "iter", "step", "time"], default="auto",
                   help="curves: the x axis (auto: epoch, else iteration; time: wall-clock minutes, Fig. 7)")
    p.add_argument("--depth", type=int, default=12, help="reconstruction: blocks in the stack")
    p.add_argument("-o", "--output", default=None, help="PNG file (default: out/plots/FIGURE.png)")
    args = p.parse_args(argv)
    if args.figure != "reconstruction" and not args.files:
        p.error(f"{args.figure} needs at least one input file")
    if missing := [f for f in args.files if not Path(f).is_file()]:
        p.error(f"no such file: {', '.join(missing)}")
    if args.figure == "reconstruction" and args.depth < 2:
        p.error("--depth must be at least 2: x_k is rebuilt from the top pair (x_{K-1}, x_K)")
    if args.figure == "reconstruction":
        args.errors = reconstruction_errors(depth=args.depth)
        print_reconstruction(args.errors)
        if importlib.util.find_spec("matplotlib") is None:
            print("(the figure needs matplotlib: pip install matplotlib)")
            return
    plt = pyplot()
    try:
        fig, axes = FIGURES[args.figure](args, plt)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # JSON of another shape
        if not args.files:
            raise
        sys.exit(f"plot.py: error: {args.figure} needs {INPUTS[args.figure]}; {', '.join(args.files)} "
                 f"{'holds' if len(args.files) == 1 else 'hold'} something else ({type(e).__name__}: {e})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    output = args.output or f"out/plots/{args.figure}.png"
    try:
        if args.output is None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=100)
    except (OSError, ValueError) as e:  # no such folder; a suffix matplotlib cannot write
        sys.exit(f"plot.py: error: cannot write {output} ({e})")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
