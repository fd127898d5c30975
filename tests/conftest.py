"""What several test files share."""

import gzip
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest


class Killed(BaseException):
    """What kill_after raises: no script catches it, as no process can catch SIGKILL (the scripts
    catch KeyboardInterrupt, SIGINT's exception, and end with a line of their own)."""


@pytest.fixture
def kill_after(monkeypatch):
    """kill_after(module, name, n): module.name runs n times, then raises Killed, like a run
    killed at that point (monkeypatch.undo() restores it); pytest.raises(kill_after.Killed)."""

    def patch(module, name, n):
        real, calls = getattr(module, name), []

        def killed(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, killed)

    patch.Killed = Killed
    return patch


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A tiny CIFAR-10 in the real "python version" layout: pickled dicts of bytes keys."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 16) for i in range(1, 6)] + [("test_batch", 40)]:
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024] = (labels * 25)[:, None]  # learnable: the red channel tells the class
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    return root


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A text to train a char-level GPT on."""
    path = tmp_path_factory.mktemp("text") / "verse.txt"
    path.write_text("the cat sat on the mat. the dog sat on the log. " * 60)
    return path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process whose files may not grow past LIMIT bytes (RLIMIT_FSIZE, no root needed): with
# SIGXFSZ ignored, a write past it fails with EFBIG, as a write to a full disk fails with ENOSPC.
FILE_SIZE_LIMIT = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def with_file_size_limit():
    """run(limit, "train_gpt.py", *flags): the script in a child process whose file system refuses
    every write past `limit` bytes of a file; returns the CompletedProcess."""

    def run(limit, script, *argv):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(limit), os.path.join(ROOT, script),
                               *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)

    return run


@pytest.fixture
def fashion_mnist(monkeypatch):
    """write(folder): a tiny Fashion-MNIST (20 training, 10 test images) as the four idx-ubyte.gz
    files, whose md5s data.FASHION_FILES then lists (as it lists those of the real files)."""

    def write(folder, system=False):
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        md5s = {}
        for split, n in (("train", 20), ("t10k", 10)):
            for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", rng.integers(0, 10, n))):
                header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
                path = folder / f"{split}-{kind}-ubyte.gz"
                path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))
                md5s[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
        from plumbing import data

        monkeypatch.setattr(data, "FASHION_FILES", {name: ("0" * 32, md5) for name, md5 in md5s.items()})
        if not system:
            monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", folder.parent / "not-installed")
        return folder

    return write


@pytest.fixture
def rates_trained_with(monkeypatch):
    """rates_trained_with(OptimizerClass) -> a list that gets the learning rate of every step
    optimizers of that class take (the step itself runs as it would)."""

    def spy(cls):
        rates, real_step = [], cls.step

        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", step)
        return rates

    return spy


def counting(compile_graph, runs):
    """A torch.compile backend: each graph dynamo captures is compiled by compile_graph(graph,
    example_inputs) (inductor's compile_fx, aot_eager, or graph.forward to run it as captured), and
    each run of a compiled graph is noted in the list `runs` as that graph's number (0, 1, ... in the
    order they were compiled): which graphs ran, and how often."""
    compiled = []

    def backend(graph, example_inputs):
        number, run_graph = len(compiled), compile_graph(graph, example_inputs)
        compiled.append(run_graph)

        def run(*args):
            runs.append(number)
            return run_graph(*args)

        return run

    return backend
