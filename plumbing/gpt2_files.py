"""
GPT-2's files for gpt2.py and finetune_e2e.py: safetensors, the Hugging Face GPT-2 layout and
config, hub downloads (checked against the hub's checksums) and the byte-level BPE tokenizer.
No dependency beyond torch and numpy.

    hf, model_args = load_gpt2("gpt2-medium")   # a local folder/file, or the hub when online
    tok = load_tokenizer("gpt2-medium")          # byte-level BPE
    save_gpt2(state, model_args, "export/")      # model.safetensors + config.json (HF layout)

Sections: safetensors; the Hugging Face GPT-2 layout; hub downloads; byte-level BPE.
"""

import hashlib
import json
import os
import re
import struct
import unicodedata
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from plumbing.data import DataError, atomic_write, download

GPT2_MODELS = {  # name -> (n_layer, n_head, n_embd); all have vocab 50257 and 1024 positions
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
BPE_FILES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))  # OpenAI's, Hugging Face's
HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
DEFAULT_CACHE = os.environ.get("BDIA_CACHE", os.path.join("data", "hf"))


# -----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the bytes.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file (memory-mapped; every tensor copied out)."""
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        (n,) = struct.unpack("<Q", data[:8].tobytes())
        header = json.loads(data[8:8 + n].tobytes())
        header.pop("__metadata__", None)
        entries = {name: (info["data_offsets"], info["dtype"], info["shape"]) for name, info in header.items()}
    except (struct.error, ValueError, TypeError, KeyError, AttributeError) as e:
        raise DataError(f"{path} is not a safetensors file ({type(e).__name__}: {e})") from e
    body, tensors = data[8 + n:], {}
    for name, ((begin, end), dtype_name, shape) in entries.items():
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise DataError(f"{path}: tensor {name} has the unsupported dtype {dtype_name}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(body) or end - begin != nbytes:
            raise DataError(f"{path}: tensor {name} has offsets {begin}..{end} that do not fit its "
                                f"shape {shape} and the file's size; the file is truncated or corrupt")
        raw = torch.from_numpy(np.array(body[begin:end]))
        tensors[name] = raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as .safetensors, atomically (a .part file, then renamed)."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    write_chunks(path, [struct.pack("<Q", len(text)), text, *chunks])


def write_chunks(path, chunks):
    """Write byte strings one after another to `path`, atomically."""

    def write(tmp):
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    atomic_write(path, write)


# -----------------------------------------------------------------------------
# The Hugging Face GPT-2 layout. Its linear layers are Conv1D, weights stored (in, out):
# transposed here. The causal-mask buffers (attn.bias, attn.masked_bias) are dropped;
# lm_head.weight is the tied token embedding.

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_hf_state_dict(hf):
    """An HF GPT-2 state dict (with or without the 'transformer.' prefix) -> GPT's names."""
    state = {}
    for key, value in hf.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        state[f"transformer.{name}"] = value.t().contiguous() if name.endswith(CONV1D) else value
    return state


def to_hf_state_dict(state):
    """GPT's state dict -> the layout GPT2LMHeadModel.save_pretrained writes (tied lm_head left out)."""
    return {key: (value.t().contiguous() if key.endswith(CONV1D) else value)
            for key, value in state.items() if key != "lm_head.weight"}


def hf_config(n_layer, n_head, n_embd, vocab_size=50257, block_size=1024, gelu="tanh"):
    """config.json of GPT2LMHeadModel for a model of this shape."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
        "n_positions": block_size, "n_ctx": block_size, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
        "n_inner": None, "activation_function": "gelu_new" if gelu == "tanh" else "gelu",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
        "initializer_range": 0.02, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    }


def model_args_from_config(config):
    """GPT(...) keyword arguments from an HF GPT-2 config.json dict."""
    if config.get("model_type", "gpt2") != "gpt2":
        raise DataError(f"config.json describes a {config.get('model_type')} model, not GPT-2")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise DataError(f"n_inner {config['n_inner']} is not 4 * n_embd: GPT has a 4x MLP")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise DataError(f"activation {activation!r} is not supported (gelu_new or gelu)")
    return dict(vocab_size=config["vocab_size"], block_size=config.get("n_positions", config.get("n_ctx", 1024)),
                n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                gelu="exact" if activation == "gelu" else "tanh")


def load_gpt2(name_or_path, cache_dir=DEFAULT_CACHE):
    """(HF-layout state dict, GPT keyword arguments) from a directory (model.safetensors or
    pytorch_model.bin, and config.json), a weights file (config.json beside it), or a hub
    name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), downloaded into cache_dir once."""
    path = Path(name_or_path)
    if not path.exists():
        if name_or_path not in GPT2_MODELS:
            raise DataError(f"{name_or_path}: no such file or directory, and not one of {', '.join(GPT2_MODELS)}")
        path = fetch_from_hub(name_or_path, ["config.json", "model.safetensors"], cache_dir)
    if path.is_dir():
        found = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
        if not found:
            raise DataError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        weights, config_file = found[0], path / "config.json"
    else:
        weights, config_file = path, path.parent / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
    elif path.name in GPT2_MODELS or weights.parent.name in GPT2_MODELS:
        config = hf_config(*GPT2_MODELS[path.name if path.name in GPT2_MODELS else weights.parent.name])
    else:
        raise DataError(f"no config.json beside {weights}: it gives n_layer, n_head and n_embd")
    if weights.suffix == ".safetensors":
        hf = read_safetensors(weights)
    else:
        try:
            hf = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"cannot read {weights} as a PyTorch state dict ({e})") from e
    return hf, model_args_from_config(config)


def save_gpt2(state, model_args, directory):
    """Write GPT's state dict as a Hugging Face GPT-2 checkpoint: model.safetensors + config.json."""
    directory = Path(directory)
    config = hf_config(model_args["n_layer"], model_args["n_head"], model_args["n_embd"], model_args["vocab_size"],
                       model_args["block_size"], model_args.get("gelu", "exact"))
    write_safetensors(directory / "model.safetensors", to_hf_state_dict(state), {"format": "pt"})
    write_chunks(directory / "config.json", [json.dumps(config, indent=2).encode()])
    return directory


# -----------------------------------------------------------------------------
# Hugging Face hub downloads. The hub publishes each file's checksum in its response
# headers: for a large (LFS) file X-Linked-Etag is its sha256, for a small one the ETag is
# its git blob sha1. Both are checked before the file is moved into the cache.


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def hub_checksum(url):
    """(kind, digest, size) of a hub file from a HEAD request: ('sha256', ...) or ('git-sha1', ...)."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        response = opener.open(urllib.request.Request(url, method="HEAD"), timeout=30)
    except urllib.error.HTTPError as e:  # a 302 to the CDN arrives as an "error" without redirects
        response = e
        if e.code >= 400:
            raise
    return checksum_from_headers(response.status, response.headers)


def checksum_from_headers(status, headers):
    """(kind, digest, size) from the hub's answer to HEAD (redirects not followed). An LFS file
    is a 302 to the CDN with X-Linked-Etag (sha256) and X-Linked-Size; a small file a 200 whose
    ETag (maybe weak, W/"...") is its git blob sha1. digest "" if the hub sent none."""
    linked = (headers.get("X-Linked-Etag") or "").strip('"')
    if linked:
        return "sha256", linked, int(headers.get("X-Linked-Size") or 0) or None
    etag = (headers.get("ETag") or "").removeprefix("W/").strip('"')
    size = int(headers.get("Content-Length") or 0) or None if status == 200 else None  # a redirect's body is not the file
    return "git-sha1", etag, size


def git_blob_sha1(path):
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


HUB_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")  # what from_pretrained + load_tokenizer fetch


def hub_manual(name, folder):
    """How to get a hub model's files by hand: every one of them that `folder` lacks."""
    missing = [f for f in HUB_FILES if not (Path(folder) / f).is_file()]
    have = [f for f in HUB_FILES if f not in missing]
    return (f"download {and_list(missing)} from https://huggingface.co/openai-community/{name}/tree/main into {folder}/"
            f"{f' (beside its {and_list(have)})' if have else ''}, or pass a local folder that holds config.json, "
            "model.safetensors (or pytorch_model.bin) and vocab.json + merges.txt (or encoder.json + vocab.bpe)")


def missing_files(folder, tokenizer=True):
    """What a local GPT-2 folder lacks of config.json, the weights and (tokenizer) the BPE files."""
    folder = Path(folder)
    needs = [("config.json",)] if folder.name not in GPT2_MODELS else []  # a hub name's shape is known
    needs.append(("model.safetensors", "pytorch_model.bin"))
    if tokenizer:
        needs.append(tuple(" + ".join(pair) for pair in BPE_FILES[::-1]))
    return [f"{first} (or {', '.join(rest)})" if rest else first for first, *rest in needs
            if not any(all((folder / f).is_file() for f in option.split(" + ")) for option in (first, *rest))]


def and_list(items):
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else "".join(items)


def fetch_from_hub(name, files, cache_dir=DEFAULT_CACHE):
    """Download `files` of openai-community/<name> into cache_dir/<name> (once); returns that folder."""
    folder = Path(cache_dir) / name
    for file in files:
        dest = folder / file
        if dest.is_file():
            continue
        url = HUB_URL.format(name=name, file=file)
        manual = hub_manual(name, folder)
        try:
            kind, digest, size = hub_checksum(url)
            if kind == "sha256":
                download(url, dest, sha256=digest, size=size, manual=manual)
                continue
            if not digest:
                raise DataError(f"the hub sent no checksum for {url}, so it cannot be verified. To get it by hand: {manual}")
            unverified = download(url, folder / (file + ".unverified"), size=size, manual=manual)
            if git_blob_sha1(unverified) != digest:
                unverified.unlink()
                raise DataError(f"{url} arrived corrupted (git sha1 mismatch). To get it by hand: {manual}")
            os.replace(unverified, dest)
        except OSError as e:  # the HEAD request: offline, DNS, HTTP errors
            raise DataError(f"cannot reach {url} ({e}). To get it by hand: {manual}") from e
    return folder


# -----------------------------------------------------------------------------
# Byte-level BPE (Radford et al. 2019): text -> pre-tokens (GPT-2's pattern) -> UTF-8 bytes
# mapped to printable characters -> merges applied lowest rank first -> ids.


@lru_cache(maxsize=1)
def bytes_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _ranges(predicate):
    """A regex character class of every code point whose unicode category passes predicate."""
    spans, start = [], None
    for cp in range(0x110000):
        if predicate(unicodedata.category(chr(cp))):
            start = cp if start is None else start
        elif start is not None:
            spans.append((start, cp - 1))
            start = None
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in spans)


# Unicode's White_Space, GPT-2's \s (Python's \s also takes the separators U+001C..U+001F).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@lru_cache(maxsize=1)
def pretokenizer():
    r"""GPT-2's pattern, 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+,
    with \p{L}, \p{N} and \s spelt out (Python's re has no \p{...}, and its \s differs)."""
    letters, numbers, space = _ranges(lambda c: c[0] == "L"), _ranges(lambda c: c[0] == "N"), WHITESPACE
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
                      rf"|[{space}]+(?![^{space}])|[{space}]+")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE in pure Python. encoder: {token string: id}; merges: list of
    (a, b) pairs, rank = position. decode(encode(text)) == text for any str."""

    def __init__(self, encoder, merges):
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.eos_id = self.encoder.get("<|endoftext|>")
        self.cache = {}

    @classmethod
    def from_files(cls, vocab_file, merges_file):
        encoder = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        merges = [tuple(line.split()) for line in Path(merges_file).read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise DataError(f"{merges_file}: merge lines must hold two symbols, got {bad[0]}")
        return cls(encoder, merges)

    @classmethod
    def from_dir(cls, folder):
        """From encoder.json + vocab.bpe (OpenAI) or vocab.json + merges.txt (Hugging Face)."""
        folder = Path(folder)
        for vocab, merges in BPE_FILES:
            if (folder / vocab).is_file() and (folder / merges).is_file():
                return cls.from_files(folder / vocab, folder / merges)
        raise DataError(f"{folder} holds neither encoder.json + vocab.bpe nor vocab.json + merges.txt")

    @property
    def vocab_size(self):
        return len(self.encoder)

    def bpe(self, word):
        """Merge the symbols of one pre-token, always the pair of lowest rank first."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word)
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged = []
            i = 0
            while i < len(symbols):  # merge every occurrence of that pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text):
        ids = []
        for piece in pretokenizer().findall(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for symbol in self.bpe(word):
                if symbol not in self.encoder:
                    raise DataError(f"BPE symbol {symbol!r} is not in the vocabulary: vocab and merges do not match")
                ids.append(self.encoder[symbol])
        return ids

    def decode(self, ids):
        data = bytes(self.byte_decoder[c] for i in ids for c in self.decoder[i])
        return data.decode("utf-8", errors="replace")


def load_tokenizer(name_or_path, cache_dir=DEFAULT_CACHE):
    """The tokenizer from a folder (or the folder of a weights file), or a hub name (downloaded)."""
    path = Path(name_or_path)
    if path.is_file():
        path = path.parent
    if not path.exists():
        if name_or_path not in GPT2_MODELS:
            raise DataError(f"{name_or_path}: no such folder, and not one of {', '.join(GPT2_MODELS)}")
        path = fetch_from_hub(name_or_path, ["vocab.json", "merges.txt"], cache_dir)
    return GPT2Tokenizer.from_dir(path)
