"""plot.py renders every figure from tiny inputs to a non-empty PNG."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("matplotlib", reason="matplotlib is optional; .ci/run installs it")
import plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000


def test_curves_from_vit_and_gpt_logs(tmp_path):
    vit = write_jsonl(tmp_path / "vit.jsonl", [{"epoch": e, "train_loss": 2 - e / 3, "val_loss": 2 - e / 4, "val_acc": 0.3 + e / 10} for e in range(1, 4)])
    gpt = write_jsonl(tmp_path / "gpt.jsonl", [{"iter": i, "train_loss": 3 - i / 100, "val_loss": 3.1 - i / 120} for i in (0, 100, 200)])
    for files, name in (([vit], "a.png"), ([vit, gpt], "b.png")):
        plot.main(["curves", *files, "-o", str(tmp_path / name)])
        assert_png(tmp_path / name)


def test_gamma_sweep_in_both_layouts(tmp_path, capsys):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"-0.5": 0.8, "0.0": 0.9, "0.5": 0.82}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"gamma": g, "val_acc": 0.9 - abs(g)} for g in (-0.5, 0.0, 0.5)]))
    plot.main(["gamma-sweep", str(a), str(b), "--labels", "BDIA-ViT,ViT", "-o", str(tmp_path / "g.png")])
    assert_png(tmp_path / "g.png")
    c = tmp_path / "c.json"  # train_gpt.py's: validation losses
    c.write_text(json.dumps([{"gamma": g, "val_loss": 1.5 + abs(g)} for g in (-0.5, 0.0, 0.5)]))
    assert list(plot.read_gamma_sweep(c)) == [(-0.5, 0.0, 0.5), (2.0, 1.5, 2.0), "val_loss"]
    plot.main(["gamma-sweep", str(c), "-o", str(tmp_path / "l.png")])
    assert_png(tmp_path / "l.png")
    with pytest.raises(SystemExit):  # losses and accuracies on one axis
        plot.main(["gamma-sweep", str(b), str(c), "-o", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert "files of one kind on one axis" in err and "holds something else" not in err


def test_reconstruction_and_bench(tmp_path):
    plot.main(["reconstruction", "--depth", "4", "-o", str(tmp_path / "r.png")])
    assert_png(tmp_path / "r.png")
    rows = [{"mode": m, "depth": d, "memory_vs_plain": 1 / (i + 1), "time_vs_plain": 1 + i / 5} for i, m in enumerate(["plain", "bdia-rev"]) for d in (6, 12)]
    (tmp_path / "bench.json").write_text(json.dumps({"results": rows}))
    plot.main(["bench", str(tmp_path / "bench.json"), "-o", str(tmp_path / "b.png")])
    assert_png(tmp_path / "b.png")


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main(["curves", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


def test_curves_against_wall_clock_time(tmp_path):
    rows = [{"epoch": e, "train_loss": 2 - e / 3, "val_loss": 2 - e / 4, "epoch_seconds": 60.0 * e} for e in (1, 2, 3)]
    assert plot.x_values(rows, "time") == [1.0, 3.0, 6.0]  # minutes so far: 1, 1 + 2, 1 + 2 + 3
    assert plot.x_values([{"iter": 0, "seconds": 0.0}, {"iter": 100, "seconds": 30.0}], "time") == [0.0, 0.5]
    assert plot.x_values(rows, "auto") == [1, 2, 3]
    plot.main(["curves", write_jsonl(tmp_path / "a.jsonl", rows), "--x", "time", "-o", str(tmp_path / "t.png")])
    assert_png(tmp_path / "t.png")
    with pytest.raises(SystemExit, match="epoch_seconds or seconds"):
        plot.x_values([{"epoch": 1}], "time")


def test_seeds_of_one_model_share_a_colour_and_a_legend_entry(tmp_path):
    import argparse

    logs = [write_jsonl(tmp_path / f"{i}.jsonl", [{"iter": t, "train_loss": 3 - t / 100 - i, "val_loss": 3 - t / 90}
                                                  for t in (0, 100)]) for i in range(3)]
    args = argparse.Namespace(files=logs, labels="GPT2,GPT2,BDIA-GPT2", x="auto")
    fig, axes = plot.plot_curves(args, plot.pyplot())
    lines = axes[0].get_lines()
    assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == \
        ["GPT2 train", "GPT2 val", "BDIA-GPT2 train", "BDIA-GPT2 val"]
    assert lines[0].get_color() == lines[2].get_color() != lines[4].get_color()


def test_curves_show_bleu_beside_the_loss_when_logged(tmp_path):
    """Translation logs BLEU every few epochs: the right-hand panel plots those epochs only."""
    import argparse

    rows = [{"epoch": e, "train_loss": 5 - e / 5, "val_loss": 5 - e / 6, **({"val_bleu": 2.0 * e} if e % 5 == 0 else {})}
            for e in range(1, 11)]
    args = argparse.Namespace(files=[write_jsonl(tmp_path / "t.jsonl", rows)], labels="Transformer", x="auto")
    fig, axes = plot.plot_curves(args, plot.pyplot())
    assert axes[1].get_ylabel() == "validation BLEU"
    assert [list(line.get_xdata()) for line in axes[1].get_lines()] == [[5, 10]]
    assert [list(line.get_ydata()) for line in axes[1].get_lines()] == [[10.0, 20.0]]


def test_a_figure_without_o_goes_to_out_plots_not_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # as from the repository's root
    plot.main(["reconstruction", "--depth", "3"])
    assert_png(tmp_path / "out" / "plots" / "reconstruction.png")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and "wrote out/plots/reconstruction.png" in capsys.readouterr().out
