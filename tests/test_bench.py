"""bench.py on a tiny configuration: every mode runs, the JSON is valid and physical."""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_every_mode_and_reversible_keeps_least(tmp_path):
    out = tmp_path / "bench.json"
    argv = [sys.executable, "bench.py", "--family", "gpt", "--dim", "64", "--heads", "4", "--depths", "12",
            "--tokens", "128", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"plain", "checkpoint", "bdia", "bdia-rev"}
    assert all(r["step_ms"] > 0 and r["activation_mb"] > 0 for r in results.values())
    assert results["bdia-rev"]["activation_mb"] < 0.5 * results["plain"]["activation_mb"]
    assert results["checkpoint"]["activation_mb"] < results["plain"]["activation_mb"]
    assert results["bdia-rev"]["side_info_mb"] == 11 * 8 * 128 * 64 / 8 / 2**20  # --tokens 128, not gpt's 256
    assert "128 tokens" in run.stdout and "bdia-rev" in run.stdout and "x plain" in run.stdout


def test_bench_vit_family_includes_revvit(tmp_path):
    out = tmp_path / "bench.json"
    argv = [sys.executable, "bench.py", "--family", "vit", "--dim", "32", "--heads", "2", "--depths", "2",
            "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--no-memory",
            "--modes", "plain,revvit", "--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["plain", "revvit"]


def test_bench_rejects_unknown_modes():
    run = subprocess.run([sys.executable, "bench.py", "--modes", "plain,magic"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "unknown mode" in run.stderr


def test_kernel_count_shows_what_bdia_adds_per_block(tmp_path):
    """The engine adds at most 47 operations per block and step beyond the block's own: 47 since gamma_k
    is drawn block by block (a model's own loop does not say its depth ahead; 2026-12-07), 45 since each
    h_k's fingerprint is compared between forward and recomputation (44 with (21) and (24)
    written as the paper writes them, 27 with the factors of (21) folded into a table, 54 before the
    arithmetic was first trimmed); stored BDIA adds fewer still.
    The profiler's own log lines stay out of the output."""
    out = tmp_path / "kernels.json"
    argv = [sys.executable, "bench.py", "--kernels", "--family", "vit", "--dim", "32", "--heads", "2", "--batch-size", "2",
            "--modes", "plain,checkpoint,bdia,bdia-rev", "--device", "cpu", "--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    rows = {r["mode"]: r for r in json.loads(out.read_text())["kernels"]}
    assert rows["bdia"]["baseline"] == "plain" and rows["bdia-rev"]["baseline"] == "checkpoint"
    assert 0 < rows["bdia"]["added"] < rows["bdia-rev"]["added"] <= 47
    assert rows["plain"]["added"] is None and "added" in run.stdout
    assert "USDT" not in run.stderr + run.stdout and "gpuGetDeviceCount" not in run.stderr


def test_bench_compile_refuses_kernel_counts_it_cannot_make():
    """--compile adds MODE+compile rows to the timing; counting eager ops of compiled code would mislead."""
    run = subprocess.run([sys.executable, "bench.py", "--kernels", "--compile"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "--kernels counts the operations of eager code; drop --compile" in run.stderr


TERM_AT_SECOND_DEPTH = """
import signal, sys
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[2:]
import bench
measure_depth, depths = bench.measure_depth, []


def measured_until_the_second(args, depth, device):
    depths.append(depth)
    if len(depths) == 2:
        signal.raise_signal(signal.SIGTERM)  # as `timeout` ends a job: the default action, no handler
    return measure_depth(args, depth, device)


bench.measure_depth = measured_until_the_second
bench.main()
"""


def test_a_bench_cut_short_keeps_the_depths_it_measured(tmp_path):
    """--json is written after each depth: a run a job's time limit ends (SIGTERM, as `timeout` sends)
    where its second depth begins keeps the first depth's rows. The run signals itself there, so the
    verdict does not depend on how fast the machine is."""
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-c", TERM_AT_SECOND_DEPTH, ROOT, "bench.py", "--family", "vit", "--dim", "16", "--heads",
            "2", "--depths", "1,2", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--no-memory", "--modes",
            "plain", "--device", "cpu", "--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         timeout=600)  # a hang guard only
    assert run.returncode == -signal.SIGTERM, run.stderr
    assert [(r["mode"], r["depth"]) for r in json.loads(out.read_text())["results"]] == [("plain", 1)]


def test_hf_gpt2_family_runs_its_three_modes(tmp_path):
    """A Hugging Face GPT2LMHeadModel as a user runs it: plain, HF's gradient checkpointing, the one-statement
    BDIAStack, timed at two depths in one process. Its memory runs (a fresh process each, ~6 s of imports
    apiece here) are left to the measurement; that reversible BDIA's memory is flat in depth on this model is
    tests/test_one_line.py's (c)."""
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    argv = [sys.executable, "bench.py", "--family", "hf-gpt2", "--dim", "64", "--heads", "4", "--depths", "2,6",
            "--tokens", "128", "--batch-size", "8", "--vocab-size", "64", "--modes", "plain,checkpoint,bdia-rev",
            "--steps", "1", "--warmup", "1", "--no-memory", "--device", "cpu", "--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    table = json.loads(out.read_text())
    assert [(r["mode"], r["depth"]) for r in table["results"]] == [
        (m, d) for d in (2, 6) for m in ("plain", "checkpoint", "bdia-rev")]
    assert all(r["step_ms"] > 0 and r["state_mb"] > 0 and r["activation_mb"] is None for r in table["results"])
    assert "GPT2LMHeadModel, vocabulary 64" in run.stdout


def test_bench_help_names_the_families():
    run = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "hf-gpt2" in run.stdout and "gradient_checkpointing_enable()" in run.stdout, run.stderr


def test_hf_gpt2_family_without_transformers_says_what_to_install(monkeypatch, capsys):
    monkeypatch.syspath_prepend(ROOT)
    import bench

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    monkeypatch.setattr(sys, "argv", ["bench.py", "--family", "hf-gpt2"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and "--family hf-gpt2 needs transformers (pip install transformers)" in capsys.readouterr().err
