"""data.py: verified downloads, atomic files and the pickles a user hands in, which may hold
plain data only."""

import hashlib
import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def test_download_verifies_and_never_leaves_a_partial_file(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc" * 1000)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "file.bin"
    assert data.download(source.as_uri(), dest, md5=md5) == dest
    assert dest.read_bytes() == source.read_bytes()
    dest.unlink()
    with pytest.raises(data.DataError, match="checksum mismatch.*by hand: copy it"):
        data.download(source.as_uri(), dest, md5="0" * 32, manual="copy it")
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.download(source.as_uri(), dest, size=2999)
    with pytest.raises(data.DataError, match="cannot download"):
        data.download((tmp_path / "missing").as_uri(), dest)
    assert list((tmp_path / "data").iterdir()) == []


class Payload:
    """Unpickling this would run os.system: what a crafted data file could do."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_batches_and_meta_pkl_are_read_as_plain_data_only(tmp_path):
    batch = {b"data": np.arange(6, dtype=np.uint8).reshape(1, 6), b"labels": [3]}
    with open(tmp_path / "batch", "wb") as f:
        pickle.dump(batch, f)
    loaded = data.load_plain_pickle(tmp_path / "batch", arrays=True)  # CIFAR's own format: dicts and arrays
    assert loaded[b"labels"] == [3] and loaded[b"data"].tolist() == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(pickle.UnpicklingError, match="plain data"):
        data.load_plain_pickle(tmp_path / "batch")  # meta.pkl holds no arrays
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        data.load_plain_pickle(tmp_path / "evil", arrays=True)


def test_a_crafted_cifar_batch_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(data.DataError, match="cannot read .*data_batch_1"):
        data.load_images("cifar10", tmp_path)


def test_unzip_member_is_atomic_and_says_what_is_missing(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("data/x.txt", "hello")
    data.unzip_member(tmp_path / "a.zip", "data/x.txt", tmp_path / "out" / "x.txt")
    assert (tmp_path / "out" / "x.txt").read_text() == "hello"
    with pytest.raises(data.DataError, match="no readable data/y.txt"):
        data.unzip_member(tmp_path / "a.zip", "data/y.txt", tmp_path / "out" / "y.txt")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.txt"]
