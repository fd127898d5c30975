"""
The data sets of the paper's experiments, and the file plumbing under them:

    images        CIFAR-10/100 (python pickles) and Fashion-MNIST (idx files), as uint8 tensors
    text          char-level text and nanoGPT's .bin token files, for GPT
    sentence      English-French pairs: tab-separated files, the Kaggle CSV, gettext catalogues
    E2E NLG       the challenge's CSVs, or the LoRA repository's `context||completion` lines
    files         verified downloads, zip members and atomic writes

Everything a script cannot use raises DataError, whose message says what to do; the scripts
turn it into one line on stderr and exit code 2. Downloads check a published checksum (or
size, or a zip's CRC-32 where nothing else is published) and never leave a half-written file.
"""

import contextlib
import csv
import gettext
import gzip
import hashlib
import http.client
import json
import math
import os
import pickle
import random
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch


class DataError(Exception):
    """Data that is missing or unusable; the message says what to do."""


# -----------------------------------------------------------------------------
# Files: atomic writes, verified downloads, zip members


def atomic_write(path, write):
    """write(tmp) to a temporary file beside `path`, then rename it to `path`: a killed run
    never leaves a half-written file, and a failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # a failed write names no file: name the one it was for
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def what_is_wrong(path, size=None, name=None):
    """Why a file (to be called `name`) fails its checksum, in a few words, from the file itself:
    fewer bytes than published, a gzip stream that ends early (truncated) or does not decompress
    (corrupt)."""
    path = Path(path)
    n = path.stat().st_size
    if size and n < size:
        return f"truncated: {n} of {size} bytes"
    if size and n > size:
        return f"{n} bytes, not the {size} published"
    if (name or path.name).endswith(".gz"):
        try:
            with gzip.open(path) as f:
                while f.read(1 << 24):
                    pass
        except EOFError:
            return f"truncated: its gzip stream ends early, at {n} bytes"
        except (OSError, zlib.error):  # gzip.BadGzipFile is an OSError
            return "corrupt: it does not decompress"
    return "checksum mismatch: it is damaged, or another file of that name"


def download(url, dest, md5=None, sha256=None, size=None, manual=""):
    """Fetch `url` to `dest` with a progress bar, verify its checksum (and size, where only
    that is published), and only then move it into place. An existing `dest` is used when it
    verifies; one that does not is a DataError naming it (never silently fetched over). `manual`
    says how to get the file by hand; it ends every error message."""
    from tqdm import tqdm

    dest = Path(dest)
    expected = [(alg, digest) for alg, digest in (("md5", md5), ("sha256", sha256)) if digest]
    checksum = "/".join(alg for alg, _ in expected) or "size"

    def verified(path):
        right_size = size is None or path.stat().st_size == size
        return right_size and all(file_digest(path, alg) == digest for alg, digest in expected)

    hint = f" To get it by hand: {manual}" if manual else ""
    if dest.is_file():
        if verified(dest):
            return dest
        raise DataError(f"{dest} fails its {checksum} check ({what_is_wrong(dest, size)}): delete it and run again "
                        f"to download it.{hint}")
    created = [folder for folder in (dest.parent, *dest.parent.parents) if not folder.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        if not verified(part):
            raise DataError(f"{url} arrived damaged ({checksum} check: {what_is_wrong(part, size or total, dest.name)}) and was "
                            f"discarded, {dest} not written: run again to download it again.{hint}")
        shutil.move(part, dest)
    except (OSError, http.client.HTTPException) as e:  # offline, DNS, HTTP errors; a connection cut short
        raise DataError(f"cannot download {url} ({e!r}).{hint}" if isinstance(e, http.client.HTTPException)
                        else f"cannot download {url} ({e}).{hint}") from e
    finally:
        part.unlink(missing_ok=True)
        if not dest.exists():  # a failed download leaves no empty folder behind (data/fashion-mnist/)
            for folder in created:
                with contextlib.suppress(OSError):  # not empty: another file landed there
                    folder.rmdir()
    return dest


def unzip_member(archive, member, dest):
    """Copy one member of a zip archive to dest, atomically. The archives this project reads
    publish no checksum, so integrity rests on the member's CRC-32, which zipfile checks
    while reading."""
    try:
        with zipfile.ZipFile(archive) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{archive} has no readable {member} ({e}); delete it and run again") from e
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))


NUMPY_ARRAYS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}


class NotPlainData(DataError, pickle.UnpicklingError):
    """A pickle that would build objects other than plain data (and might run code)."""


def load_plain_pickle(path, arrays=False):
    """A pickle file that may hold plain data only: dicts, lists, strings, numbers and, with
    arrays=True, NumPy arrays. A data file someone hands you (a CIFAR batch, nanoGPT's
    meta.pkl) then cannot run code when it is read."""
    allowed = NUMPY_ARRAYS if arrays else set()

    class PlainUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return super().find_class(module, name)
            raise NotPlainData(f"{path} may hold only plain data, not {module}.{name}")

    with open(path, "rb") as f:
        return PlainUnpickler(f, encoding="bytes").load()


# -----------------------------------------------------------------------------
# Images: CIFAR-10/100 and Fashion-MNIST, as uint8 (N, C, 32, 32) and int64 labels

CIFAR = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], labels=b"labels", classes=10),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], labels=b"fine_labels", classes=100),
}
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_FILES = {  # name: md5 as published, md5 of Debian's copy (the same data; its gzip header names no file)
    "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "cf8536b0aa1a6ac5fa3f23001093305c"),
    "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", "10bea18fdb374794d4bb42e356e600c9"),
    "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", "f78720b4224f21cce2f2ccf2d7a94c9a"),
    "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", "0d30e22e447f3c33dab9ed536400ac01"),
}
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
CLASSES = {"cifar10": 10, "cifar100": 100, "fashion-mnist": 10}


def images_folder(name, data_dir):
    """The folder load_images(name, data_dir) reads: Debian's Fashion-MNIST where it is installed."""
    if name == "fashion-mnist":
        system = all((FASHION_SYSTEM_DIR / f).is_file() for f in FASHION_FILES)
        return FASHION_SYSTEM_DIR if system else Path(data_dir) / "fashion-mnist"
    return Path(data_dir) / CIFAR[name]["folder"]


def load_images(name, data_dir):
    """(train_images, train_labels, test_images, test_labels) of cifar10, cifar100 or
    fashion-mnist (padded to 32x32), downloaded into data_dir when missing."""
    data = load_fashion_mnist(data_dir) if name == "fashion-mnist" else load_cifar(name, data_dir)
    if len(data[0]) == 0 or len(data[2]) == 0:
        raise DataError(f"{name} in {data_dir} holds no images")
    return data


def load_cifar(name, data_dir):
    spec, data_dir = CIFAR[name], Path(data_dir)
    folder = data_dir / spec["folder"]
    if not folder.is_dir():
        tarball = data_dir / Path(spec["url"]).name  # one already there is checked, not skipped
        download(spec["url"], tarball, md5=spec["md5"], manual=(
            f"download {spec['url']} on a machine with network and put the tarball, or its extracted "
            f"folder {spec['folder']}/, into {data_dir}/"))
        staging = data_dir / (spec["folder"] + ".extracting")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(tarball) as tar:  # extract beside, then rename: never a half-extracted folder
            tar.extractall(staging, filter="data")
        (staging / spec["folder"]).rename(folder)
        shutil.rmtree(staging)

    def read(files):
        images, labels = [], []
        for f in files:
            try:
                batch = load_plain_pickle(folder / f, arrays=True)  # the data set's own format: pickled dicts
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[spec["labels"]], dtype=np.int64))
            except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                raise DataError(f"cannot read {folder / f}: it is truncated, corrupt or not a CIFAR batch "
                                f"({type(e).__name__}: {e}); "
                                f"delete {folder} and run again to extract (or download) it again") from e
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

    return (*read(spec["train"]), *read(spec["test"]))


def read_idx(path):
    """An idx-ubyte(.gz) file (MNIST format) as a uint8 array; a file that is not one is a
    ValueError."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise ValueError("not an idx file of bytes")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != 4 + 4 * ndim + math.prod(shape):
        raise ValueError(f"{len(data)} bytes do not hold the {'x'.join(map(str, shape))} its header gives")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir):
    """The four idx files from Debian's dataset-fashion-mnist when all are installed, else from
    data_dir/fashion-mnist (downloaded when missing). Each is checked against its md5 (that
    published, or that of Debian's copy) before it is read."""
    folder = images_folder("fashion-mnist", data_dir)
    system = folder == FASHION_SYSTEM_DIR
    manual = ("install Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`: the files land in "
              f"{FASHION_SYSTEM_DIR}/) or put the four idx-ubyte.gz files of {FASHION_URL} into {folder}/")
    fix = "reinstall it (`apt-get install --reinstall dataset-fashion-mnist`)" if system else "delete it and run again"
    for f, md5s in FASHION_FILES.items():
        path = folder / f
        if not path.is_file():
            download(FASHION_URL + f, path, md5=md5s[0], manual=manual)
        elif file_digest(path, "md5") not in md5s:
            raise DataError(f"{path} fails its md5 check ({what_is_wrong(path)}): {fix}. To get it by hand: {manual}")

    def read(name):
        try:
            return read_idx(folder / name)
        except (OSError, ValueError, IndexError, EOFError, zlib.error) as e:
            raise DataError(f"cannot read {folder / name} ({type(e).__name__}: {e}): {fix}") from e

    def split(images, labels):
        x, y = read(images), read(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{folder / images} and {folder / labels} are not images and their labels: {fix}")
        x = torch.from_numpy(x.copy()).unsqueeze(1)
        return torch.nn.functional.pad(x, (2, 2, 2, 2)), torch.from_numpy(y.astype(np.int64))

    return (*split("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            *split("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


# -----------------------------------------------------------------------------
# Text for GPT: nanoGPT's train.bin / val.bin (uint16 token ids) with meta.json or meta.pkl

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_BYTES = 1115394  # no checksum is published for it; its size is verified


def prepare_char_data(text, folder):
    """Character vocabulary and a 90/10 split of `text` into folder/{train,val}.bin + meta.json."""
    if len(text) < 2:
        raise DataError("the text is empty: give a text file with some content")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    split = int(0.9 * len(ids))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "train.bin", ids[:split].tofile)  # atomic: a full disk names the file, leaves no half of it
    atomic_write(folder / "val.bin", ids[split:].tofile)
    atomic_write(folder / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps({"vocab_size": len(chars), "itos": chars})))
    return folder


def prepare_text_file(path, folder):
    """A text file as char-level .bin files in folder."""
    if not Path(path).is_file():
        raise DataError(f"no such text file: {path}")
    return prepare_char_data(Path(path).read_text(encoding="utf-8", errors="replace"), Path(folder))


def shakespeare_dir(data_root):
    """tiny-shakespeare, downloaded once and prepared as char-level .bin files."""
    folder = Path(data_root) / "shakespeare_char"
    if not (folder / "meta.json").is_file():
        path = download(SHAKESPEARE_URL, folder / "input.txt", size=SHAKESPEARE_BYTES,
                        manual=f"save that file as {folder / 'input.txt'}, or train on any text with --text-file")
        prepare_char_data(path.read_text(encoding="utf-8"), folder)
    return folder


def load_meta(folder):
    """{'vocab_size': int, 'itos': list of str} from meta.json or meta.pkl; None for a BPE data set."""
    path = next((folder / f for f in ("meta.json", "meta.pkl") if (folder / f).is_file()), None)
    if path is None:
        return None
    try:
        if path.suffix == ".json":
            meta = json.loads(path.read_text())
        else:
            meta = {k.decode() if isinstance(k, bytes) else k: v for k, v in load_plain_pickle(path).items()}
        itos = meta["itos"]
        return {"vocab_size": int(meta["vocab_size"]), "itos": [itos[i] for i in range(len(itos))]}
    except DataError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}): it should hold vocab_size and itos; "
                        "prepare the data again") from e


def load_tokens(folder, train_fraction, block_size, vocab_size=None):
    """Memory-mapped train and val token arrays; the training tokens cut to a leading fraction.
    With vocab_size, every token id is checked against it (a corrupt file or one of another
    vocabulary would index past the embedding, on CUDA as an opaque device-side assert)."""
    folder = Path(folder)
    missing = [f for f in ("train.bin", "val.bin") if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}: point --data-dir at a folder of nanoGPT-style "
                        ".bin files, or use --dataset shakespeare_char or --text-file FILE")
    train, val = memmap_tokens(folder / "train.bin"), memmap_tokens(folder / "val.bin")
    train = train[: int(len(train) * train_fraction)]
    for name, data in (("train", train), ("val", val)):
        if len(data) <= block_size:
            raise DataError(f"the {name} split has {len(data)} tokens, not more than --block-size {block_size}: "
                            "use a smaller --block-size or more data")
        if vocab_size is not None and (largest := largest_token(data)) >= vocab_size:
            raise DataError(f"{folder / name}.bin holds token id {largest}, but the vocabulary has {vocab_size} "
                            "tokens: the file is corrupt or was made with another vocabulary; prepare it again")
    return train, val


def memmap_tokens(path):
    try:
        return np.memmap(path, dtype=np.uint16, mode="r")
    except ValueError as e:  # an empty file, or an odd number of bytes: not whole uint16 tokens
        raise DataError(f"{path} is not a file of uint16 token ids ({e}); prepare it again") from e


def largest_token(tokens, chunk=1 << 24):
    """The largest id in a memory-mapped token array, read a chunk at a time."""
    return max(int(tokens[i: i + chunk].max()) for i in range(0, len(tokens), chunk))


# -----------------------------------------------------------------------------
# English-French sentence pairs


def read_tsv_pairs(path):
    """`English<TAB>French[<TAB>anything]` per line (eng-fra.txt, Tatoeba/manythings files)."""
    pairs = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
                raise DataError(f"{path}, line {n}: expected 'English<TAB>French', got {line.strip()[:60]!r}")
            pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def read_csv_pairs(path):
    """Two columns English, French; a header row (the Kaggle file's 'English words/sentences',
    'French words/sentences') is skipped."""
    pairs = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not any(cell.strip() for cell in row):
                continue
            if n == 1 and row and "english" in row[0].lower():
                continue  # header
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}, row {n}: expected two columns English,French, got {row[:3]!r}")
            pairs.append((row[0].strip(), row[1].strip()))
    return pairs


PLACEHOLDER = re.compile(r"%|\{|\}|\$|<[^>]*>|\\|_[^\W_]|&[^\W_]")  # printf, {0}, ${x}, markup, mnemonics


def usable_message(english, french, min_words=2, max_words=25):
    """Keep a gettext message as a sentence pair only if it is one line, has no
    placeholders, markup or keyboard mnemonics, is translated, and has min..max words."""
    if "\n" in english or "\n" in french or "\t" in english + french:
        return False
    if PLACEHOLDER.search(english) or PLACEHOLDER.search(french):
        return False
    return english.strip() != french.strip() and min_words <= len(english.split()) <= max_words


def read_gettext_pairs(locale_dir, min_words=2, max_words=25):
    """English-French pairs from the compiled gettext catalogues (*.mo) in locale_dir,
    read with Python's gettext; plural forms and the header are skipped, a message
    context ('ctx\\x04msgid') is dropped, and each English string is kept once."""
    files = sorted(Path(locale_dir).glob("*.mo"))
    if not files:
        raise DataError(f"no *.mo files in {locale_dir}; on Debian/Ubuntu French catalogues come with the "
                        "packages themselves (or `apt-get install language-pack-fr`); or pass --data PAIRS.txt")
    pairs = {}
    for path in files:
        with open(path, "rb") as f:
            try:
                catalog = gettext.GNUTranslations(f)._catalog  # msgid -> msgstr, decoded
            except (OSError, UnicodeError, struct.error, IndexError) as e:  # bad magic: OSError; truncated: struct.error
                raise DataError(f"{path} is not a readable .mo file ({e})") from e
        for msgid, msgstr in catalog.items():
            if not isinstance(msgid, str) or not msgid:  # plural forms are (msgid, n); "" is the header
                continue
            english = msgid.split("\x04")[-1]
            if usable_message(english, msgstr, min_words, max_words):
                pairs.setdefault(english.strip(), msgstr.strip())
    return sorted(pairs.items())


ENG_FRA_URL = "https://download.pytorch.org/tutorial/data.zip"


def fetch_eng_fra(data_dir):
    """eng-fra.txt of the PyTorch seq2seq tutorial (Tatoeba pairs), downloaded once.
    No checksum is published for data.zip, so integrity rests on the zip's CRC-32 per member."""
    dest = Path(data_dir) / "eng-fra.txt"
    if not dest.is_file():
        archive = download(ENG_FRA_URL, Path(data_dir) / "data.zip",
                           manual=f"download {ENG_FRA_URL}, unzip it and pass --data data/eng-fra.txt")
        unzip_member(archive, "data/eng-fra.txt", dest)
    return dest


def text_file(reader, path, what):
    """reader(path); a file that is not UTF-8 text, or not CSV where CSV is read, is a DataError."""
    try:
        return reader(path)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a UTF-8 {what} ({e})") from e


def load_pairs(data=None, dataset=None, data_dir="data", locale_dir=None):
    """Sentence pairs from a pair file (data: .csv or tab-separated), or a dataset: eng-fra
    (downloaded into data_dir) or gettext-fr (the catalogues in locale_dir)."""
    if dataset == "gettext-fr":
        pairs, where = read_gettext_pairs(locale_dir), locale_dir
    else:
        path = Path(data) if data else fetch_eng_fra(data_dir)
        if not path.is_file():
            raise DataError(f"--data {path}: no such file")
        reader = read_csv_pairs if path.suffix.lower() == ".csv" else read_tsv_pairs
        pairs = text_file(reader, path, "text file of sentence pairs")
        where = path
    if not pairs:
        raise DataError(f"no sentence pairs in {where}")
    return pairs


def split_pairs(pairs, val_fraction=0.1, limit=0, seed=0):
    """Shuffle with a fixed seed (independent of --seed), keep `limit` pairs (0: all) and
    split off the validation part."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    order = order[:limit] if limit else order
    n_val = max(1, round(len(order) * val_fraction)) if len(order) > 1 else 0
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


# -----------------------------------------------------------------------------
# E2E NLG: the challenge's CSVs (mr, ref) or the LoRA repository's `context||completion` lines

E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_CSV = {"train": "trainset.csv", "valid": "devset.csv", "test": "testset_w_refs.csv"}
LORA_TXT = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}  # the LoRA repository's files
MR_KEYS = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}  # as the LoRA repo writes them


def mr_to_context(mr):
    """'name[The Vaults], eatType[pub]' -> 'name : The Vaults | Type : pub' (the LoRA repo's form)."""
    fields = []
    for part in mr.split("],"):
        key, _, value = part.strip().rstrip("]").partition("[")
        fields.append(f"{MR_KEYS.get(key.strip(), key.strip())} : {value.strip()}")
    return " | ".join(fields)


def read_e2e_csv(path):
    """(context, reference) pairs from an E2E CSV with columns mr and ref (any case)."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of "mr"
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    if "mr" not in header or "ref" not in header:
        raise DataError(f"{path}: expected the columns mr and ref, got {rows[0]}")
    i, j = header.index("mr"), header.index("ref")
    return [(mr_to_context(row[i]), row[j].strip()) for row in rows[1:] if len(row) > max(i, j)]


def read_lora_txt(path):
    """(context, reference) pairs from lines `name : X | Type : Y ||reference`."""
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            context, sep, completion = line.partition("||")
            if not sep:
                raise DataError(f"{path}:{n}: expected `context||completion`, got {line[:80]!r}")
            pairs.append((context.strip(), completion.strip()))
    return pairs


def read_e2e_pairs(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    pairs = text_file(read_e2e_csv if path.suffix.lower() == ".csv" else read_lora_txt, path,
                      "E2E CSV or `context||completion` file")
    if not pairs:
        raise DataError(f"no examples in {path}")
    return pairs


def fetch_e2e(data_dir):
    """The three E2E CSVs in data_dir, downloaded once from the data set's GitHub release. No
    checksum is published for the zip, so integrity rests on its CRC-32 per member."""
    data_dir = Path(data_dir)
    if all((data_dir / f).is_file() for f in E2E_CSV.values()):
        return data_dir
    manual = (f"download {E2E_URL} and put {', '.join(E2E_CSV.values())} into {data_dir}, or pass "
              "--train-file/--valid-file/--test-file (E2E CSV or the LoRA repository's train.txt format)")
    archive = download(E2E_URL, data_dir / "e2e-dataset.zip", manual=manual)
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive} is corrupt ({e}); delete it and run again. {manual}") from e
    for name in E2E_CSV.values():
        member = next((m for m in names if m.endswith("/" + name) or m == name), None)
        if member is None:
            raise DataError(f"{archive} lacks {name}; delete it and run again. {manual}")
        unzip_member(archive, member, data_dir / name)
    return data_dir


def e2e_files(data_dir, train=None, valid=None, test=None):
    """{split: path}: the given files, else the LoRA .txt or E2E .csv files in data_dir (the
    CSVs downloaded when missing)."""
    given = {"train": train, "valid": valid, "test": test}
    folder = Path(data_dir)
    if not all(given.values()):
        if all((folder / f).is_file() for f in LORA_TXT.values()):
            found = {k: folder / f for k, f in LORA_TXT.items()}
        else:
            found = {k: fetch_e2e(folder) / f for k, f in E2E_CSV.items()}
        given = {k: v or found[k] for k, v in given.items()}
    return {k: Path(v) for k, v in given.items()}


def group_references(pairs):
    """Distinct contexts in first-seen order, each with all its references."""
    refs = {}
    for context, ref in pairs:
        refs.setdefault(context, []).append(ref)
    return list(refs.items())
