"""
Pretrained GPT-2 beside this project's GPT (models.py), for fine-tuning (finetune_e2e.py):
its files, its tokenizer, LoRA, and decoding with a KV cache and beam search. No dependency
beyond torch and numpy.

    model = from_pretrained("gpt2-medium", bdia=BDIAConfig())   # a local folder/file, or the hub when online
    tok = load_tokenizer("gpt2-medium")                          # byte-level BPE
    add_lora(model, rank=4, alpha=32)                             # adapters on query and value
    ids, scores = beam_search(model.eval(), contexts, tok.eos_id)
    save_pretrained(model, "export/")                             # model.safetensors + config.json (HF layout)

Sections: safetensors; the Hugging Face GPT-2 layout; hub downloads; byte-level BPE;
from_pretrained / save_pretrained; LoRA; KV-cache decoding and beam search.
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
import torch.nn as nn
import torch.nn.functional as F

from bdia import run_blocks
from plumbing.data import DataError, atomic_write, download
from models import GPT

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


# -----------------------------------------------------------------------------
# A pretrained GPT in and out


def from_pretrained(name_or_path, cache_dir=DEFAULT_CACHE, **kwargs):
    """GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) as this project's GPT, from a local folder
    or weights file (model.safetensors or pytorch_model.bin with config.json), or from the hub
    when online. kwargs (dropout, bdia) go to GPT(...). Missing or unexpected weights are an
    error listing them."""
    hf, model_args = load_gpt2(name_or_path, cache_dir)
    model = GPT(**model_args, **kwargs)
    state = from_hf_state_dict(hf)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise DataError(
            f"{name_or_path} does not fit GPT{model_args}: missing {missing or 'none'}; unexpected "
            f"{unexpected or 'none'}; wrong shape {[(k, tuple(state[k].shape)) for k in wrong] or 'none'}")
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    model.load_state_dict(state)
    return model


def merged_state_dict(model):
    """The state dict of the plain GPT: LoRA updates folded into the weights, adapters left out."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight()
    return state


def save_pretrained(model, directory):
    """Export as a standard Hugging Face GPT-2 checkpoint: model.safetensors + config.json."""
    if not model.model_args["bias"]:
        raise ValueError("a GPT-2 checkpoint has biases in every linear layer: this GPT was built with bias=False")
    return save_gpt2(merged_state_dict(model), model.model_args, directory)


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021)


class LoRALinear(nn.Linear):
    """A frozen linear layer plus low-rank adapters: y = x W^T + b + (alpha / r) sum_j B_j A_j x
    on the output parts j that have one (c_attn's query and value, as the LoRA repository
    does for GPT-2: parts=(True, False, True)). A_j (r, in) starts Kaiming-uniform, B_j zero,
    so training starts from the base model. merge() folds the update into W, unmerge() takes
    it out; the state_dict keeps W's name and adds lora_A, lora_B."""

    def __init__(self, in_features, out_features, bias=True, rank=4, alpha=32, dropout=0.0, parts=(True,)):
        super().__init__(in_features, out_features, bias)
        assert out_features % len(parts) == 0 and any(parts)
        self.rank, self.scaling, self.parts, self.merged = rank, alpha / rank, tuple(parts), False
        n, chunk = sum(parts), out_features // len(parts)
        self.lora_A = nn.Parameter(torch.empty(n * rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(n, chunk, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        self.lora_dropout = nn.Dropout(dropout)

    @classmethod
    def from_linear(cls, linear, rank, alpha, dropout=0.0, parts=(True,)):
        """Wrap an existing nn.Linear: its weight and bias (the same Parameters) become frozen."""
        lora = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha, dropout, parts)
        lora.weight, lora.bias = linear.weight, linear.bias
        for p in (lora.weight, lora.bias):
            if p is not None:
                p.requires_grad_(False)
        return lora.to(linear.weight.device)

    def delta_weight(self):
        """(alpha / r) B A as an (out, in) matrix, zero on the parts without an adapter."""
        n, chunk, r = self.lora_B.shape
        parts = torch.einsum("pcr,pri->pci", self.lora_B, self.lora_A.view(n, r, -1)) * self.scaling
        full, it = [], iter(parts)
        for on in self.parts:
            full.append(next(it) if on else parts.new_zeros(chunk, self.in_features))
        return torch.cat(full, dim=0)

    def merged_weight(self):
        return self.weight.detach().clone() if self.merged else (self.weight + self.delta_weight()).detach()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        n, chunk, r = self.lora_B.shape
        z = (self.lora_dropout(x) @ self.lora_A.t()).unflatten(-1, (n, r))
        update = torch.einsum("...pr,pcr->...pc", z, self.lora_B) * self.scaling  # (..., n, chunk)
        full, it = [], iter(update.unbind(-2))
        for on in self.parts:
            full.append(next(it) if on else y.new_zeros(y.shape[:-1] + (chunk,)))
        return y + torch.cat(full, dim=-1)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False


def add_lora(model, rank=4, alpha=32, dropout=0.0, mlp=False):
    """Freeze every parameter of `model` and put LoRA adapters on each block's attention
    (c_attn: query and value) and, with mlp=True, on mlp.c_fc and mlp.c_proj. Returns the
    adapter parameters (the only ones that train)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        block.attn.c_attn = LoRALinear.from_linear(block.attn.c_attn, rank, alpha, dropout, parts=(True, False, True))
        if mlp:
            block.mlp.c_fc = LoRALinear.from_linear(block.mlp.c_fc, rank, alpha, dropout)
            block.mlp.c_proj = LoRALinear.from_linear(block.mlp.c_proj, rank, alpha, dropout)
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def set_lora_merged(model, merged):
    """merge() or unmerge() every LoRA layer of model."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge() if merged else module.unmerge()


# -----------------------------------------------------------------------------
# Decoding with a KV cache, and the LoRA repository's beam search


def new_cache(model):
    """An empty KV cache: one dict per block, filled by forward_cached."""
    return [{} for _ in model.transformer.h]


def forward_cached(model, idx, cache):
    """Logits (batch, T, vocab) of the new tokens idx (batch, T) that follow the tokens
    whose keys and values `cache` holds (it is extended). Eval mode: the blocks run through
    run_blocks as in GPT.forward, so BDIA models decode with eq. (25)."""
    assert not model.training, "forward_cached is for decoding: call model.eval() first"
    past = cache[0]["k"].shape[2] if "k" in cache[0] else 0
    if past + idx.shape[1] > model.block_size:
        raise ValueError(f"{past + idx.shape[1]} tokens exceed block_size {model.block_size}")
    pos = torch.arange(past, past + idx.shape[1], device=idx.device)
    x = model.transformer.drop(model.transformer.wte(idx) + model.transformer.wpe(pos)).float()
    blocks = nn.ModuleList(CachedBlock(b, c) for b, c in zip(model.transformer.h, cache)).train(False)
    return model.lm_head(model.transformer.ln_f(run_blocks(blocks, x, model.bdia)))


@torch.no_grad()
def beam_search(model, contexts, eos_id, beam=10, max_new=64, length_penalty=0.8, no_repeat_ngram=4, use_cache=True):
    """Batched beam search from contexts (batch, L) of one length L, as the LoRA repository's
    E2E decoder: per example the `beam` best of beam x vocab continuations; one that ends in
    eos becomes a candidate with score log p / length^length_penalty (length counts the eos),
    and so does every hypothesis still open after max_new tokens; tokens that would repeat
    an n-gram of the generated text are banned. An example stops when no open hypothesis
    can beat its best candidate. Returns (lists of ids without eos, their scores)."""
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0 (got {length_penalty}): the early stop assumes that "
                         "a longer hypothesis cannot score better")
    batch, length = contexts.shape
    if length + max_new > model.block_size:
        raise ValueError(f"context {length} + max_new {max_new} tokens exceed block_size {model.block_size}")
    device, rows = contexts.device, torch.arange(batch, device=contexts.device)[:, None] * beam
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis per example at first
    out = torch.zeros((batch * beam, 0), dtype=torch.long, device=device)
    best = [(float("-inf"), []) for _ in range(batch)]
    cache = new_cache(model) if use_cache else None
    logits = (forward_cached(model, contexts, cache) if use_cache else model(contexts)[0])[:, -1]
    logits = logits.repeat_interleave(beam, 0)
    if use_cache:
        reorder_cache(cache, torch.arange(batch, device=device).repeat_interleave(beam))
    for step in range(1, max_new + 1):
        logp = logits.float().log_softmax(-1)
        for row, seq in enumerate(out.tolist()):
            logp[row, banned_tokens(seq, no_repeat_ngram)] = float("-inf")
        vocab = logp.shape[-1]
        top, idx = (scores.view(-1, 1) + logp).view(batch, beam * vocab).topk(beam, dim=1)
        source, tokens = (idx // vocab + rows).flatten(), idx % vocab
        out = torch.cat([out[source], tokens.view(-1, 1)], dim=1)
        scores = top.clone()
        for b, k in (tokens == eos_id).nonzero().tolist():
            if top[b, k] / step**length_penalty > best[b][0]:
                best[b] = ((top[b, k] / step**length_penalty).item(), out[b * beam + k, :-1].tolist())
        scores[tokens == eos_id] = float("-inf")
        # An open hypothesis's log p only falls, so it can end at best at max / max_new^penalty.
        bound = scores.max(dim=1).values / max_new**length_penalty
        scores[torch.tensor([b[0] for b in best], device=device) >= bound] = float("-inf")
        if torch.isinf(scores).all() or step == max_new:
            break
        if use_cache:
            reorder_cache(cache, source)
            logits = forward_cached(model, tokens.view(-1, 1), cache)[:, -1]
        else:
            logits = model(torch.cat([contexts.repeat_interleave(beam, 0), out], dim=1))[0][:, -1]
    for (b, k), score in zip(torch.isfinite(scores).nonzero().tolist(), scores[torch.isfinite(scores)].tolist()):
        if score / max_new**length_penalty > best[b][0]:  # open after max_new tokens: a candidate too
            best[b] = (score / max_new**length_penalty, out[b * beam + k].tolist())
    return [ids for _, ids in best], [score for score, _ in best]


class CachedBlock(nn.Module):
    """A GPT block for incremental decoding: its attention also sees the keys and values of
    the earlier tokens, kept in `cache` (this block's dict)."""

    def __init__(self, block, cache):
        super().__init__()
        self.block, self.cache = block, cache

    def residual(self, x):
        b = self.block
        f = cached_attention(b.attn, b.ln_1(x), self.cache)
        return f + b.mlp(b.ln_2(x + f))  # (4)

    def forward(self, x):
        return x + self.residual(x)


def reorder_cache(cache, rows):
    """Keep the cached keys and values of these rows (beam search's surviving hypotheses)."""
    for c in cache:
        c["k"], c["v"] = c["k"][rows], c["v"][rows]


def banned_tokens(seq, n):
    """The tokens that would complete an n-gram already in seq (no-repeat-ngram)."""
    if n <= 0 or len(seq) < n:
        return []
    prefix = seq[len(seq) - n + 1:]
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix]


def cached_attention(attn, x, cache):
    """Causal self-attention (models.Attention attn) of new tokens x (batch, T, dim) to themselves
    and to the keys and values in `cache` (a dict, updated here)."""
    q, k, v = (attn.split_heads(t) for t in attn.c_attn(x).chunk(3, dim=-1))
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    cache["k"], cache["v"] = k, v
    past = k.shape[2] - q.shape[2]  # new token i sees the past and new tokens 0..i
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=x.device).tril(past)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.resid_dropout(attn.c_proj(y.transpose(1, 2).flatten(2)))
