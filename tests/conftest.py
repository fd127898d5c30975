"""What several test files share."""

import pickle

import numpy as np
import pytest


@pytest.fixture
def kill_after(monkeypatch):
    """kill_after(module, name, n): module.name runs n times, then raises KeyboardInterrupt,
    like a run killed at that point (monkeypatch.undo() restores it)."""

    def patch(module, name, n):
        real, calls = getattr(module, name), []

        def killed(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, killed)

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
