"""data.py: verified downloads, atomic files and the pickles a user hands in, which may hold
plain data only."""

import gzip
import hashlib
import io
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import data  # noqa: E402


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
    with pytest.raises(data.DataError, match=r"arrived damaged \(size check: 3000 bytes, not the 2999 published\)"):
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


# -----------------------------------------------------------------------------
# Damaged files are named, with what is wrong and what to do (issue 28)


def cifar_tarball():
    """The bytes of a tar.gz in the layout of CIFAR-10's (its md5 is not the published one)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        member.size = 60_000
        tar.addfile(member, io.BytesIO(np.random.default_rng(0).integers(0, 256, 60_000, dtype=np.uint8).tobytes()))
    return buffer.getvalue()


def offline(*args, **kwargs):
    raise OSError("network unreachable (tests run offline)")


def corrupted(whole):
    middle = len(whole) // 2
    return whole[:middle] + bytes(b ^ 0xFF for b in whole[middle: middle + 64]) + whole[middle + 64:]


@pytest.mark.parametrize("damage, what", [
    (lambda whole: whole[: len(whole) // 2], "truncated: its gzip stream ends early"),
    (corrupted, "corrupt: it does not decompress"),
    (lambda whole: gzip.compress(b"another file"), "checksum mismatch: it is damaged, or another file of that name"),
])
def test_a_damaged_cifar_tarball_in_the_data_dir_is_named_not_skipped(tmp_path, monkeypatch, damage, what):
    monkeypatch.setattr("urllib.request.urlopen", offline)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    tarball.write_bytes(damage(cifar_tarball()))
    before = tarball.read_bytes()
    with pytest.raises(data.DataError) as e:
        data.load_images("cifar10", tmp_path)
    assert str(e.value).startswith(f"{tarball} fails its md5 check ({what}")
    assert "): delete it and run again to download it. To get it by hand: download https://" in str(e.value)
    assert tarball.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [tarball.name]


def test_a_download_that_arrives_truncated_names_it_and_leaves_nothing(tmp_path):
    whole = cifar_tarball()
    source = tmp_path / "source.tar.gz"
    source.write_bytes(whole[: len(whole) // 2])  # the server sent half of it
    dest = tmp_path / "data" / "file.tar.gz"
    with pytest.raises(data.DataError) as e:
        data.download(source.as_uri(), dest, md5=hashlib.md5(whole).hexdigest(), manual="copy it")
    assert str(e.value).startswith(f"{source.as_uri()} arrived damaged (md5 check: truncated: its gzip stream ends "
                                   f"early, at {len(whole) // 2} bytes) and was discarded, {dest} not written: run again")
    with pytest.raises(data.DataError, match=r"arrived damaged \(size check: truncated: 5 of 9 bytes\)"):
        source.write_bytes(b"12345")
        data.download(source.as_uri(), dest, size=9)
    assert not (tmp_path / "data").exists()  # nor the folder it made for it


@pytest.mark.parametrize("damage, what", [
    (lambda whole: whole[: len(whole) // 2], "truncated: its gzip stream ends early"),
    (corrupted, "corrupt: it does not decompress"),
])
def test_fashion_mnist_files_are_checked_and_a_damaged_one_is_named(tmp_path, monkeypatch, fashion_mnist, damage, what):
    monkeypatch.setattr("urllib.request.urlopen", offline)
    folder = fashion_mnist(tmp_path / "fashion-mnist")
    assert data.load_images("fashion-mnist", tmp_path)[0].shape == (20, 1, 32, 32)  # intact: read
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(data.DataError) as e:
        data.load_images("fashion-mnist", tmp_path)
    assert str(e.value).startswith(f"{path} fails its md5 check ({what}")
    assert "): delete it and run again. To get it by hand: install Debian's dataset-fashion-mnist (`apt-get install " \
           "dataset-fashion-mnist`" in str(e.value)


def test_debians_fashion_mnist_files_are_checked_too(tmp_path, monkeypatch, fashion_mnist):
    folder = fashion_mnist(tmp_path / "usr-share-datasets", system=True)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", folder)
    assert data.load_images("fashion-mnist", tmp_path / "elsewhere")[2].shape == (10, 1, 32, 32)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-9])  # the gzip trailer, and the last bytes of the stream, gone
    with pytest.raises(data.DataError, match=f"^{path} fails its md5 check \\(truncated.*reinstall it "
                                             r"\(`apt-get install --reinstall dataset-fashion-mnist`\)"):
        data.load_images("fashion-mnist", tmp_path / "elsewhere")


def test_fashion_mnist_offline_leaves_no_empty_folder_and_the_folder_read_is_named(tmp_path, monkeypatch, fashion_mnist):
    """A newcomer offline without Debian's package gets the error, and no empty data/fashion-mnist/
    that would later sit beside the package's copy; with the package, the folder named is the package's."""
    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "not-installed")
    with pytest.raises(data.DataError, match="cannot download"):
        data.load_images("fashion-mnist", tmp_path / "data")
    assert not (tmp_path / "data").exists()
    system = fashion_mnist(tmp_path / "usr-share" / "fashion-mnist", system=True)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", system)
    assert data.images_folder("fashion-mnist", tmp_path / "data") == system  # what train_vit.py says it loads
    assert data.load_images("fashion-mnist", tmp_path / "data")[0].shape == (20, 1, 32, 32)
    assert not (tmp_path / "data").exists()
