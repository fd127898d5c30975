"""GPT-2 files (safetensors, HF layout, BPE), LoRA, KV-cache beam search and finetune_e2e.py,
on tiny checkpoints, vocabularies and E2E files the tests write."""

import argparse
import csv
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import finetune_e2e  # noqa: E402
from plumbing import data  # noqa: E402
import gpt2  # noqa: E402
from plumbing import gpt2_files  # noqa: E402
from plumbing import runlib  # noqa: E402
from bdia import BDIAConfig  # noqa: E402
from gpt2 import LoRALinear, add_lora, banned_tokens, set_lora_merged  # noqa: E402
from models import GPT  # noqa: E402

torch.set_num_threads(1)
SHAPE = dict(block_size=128, n_layer=2, n_head=2, n_embd=16)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# -----------------------------------------------------------------------------
# Fixtures written independently of gpt2.py: a safetensors writer/reader, the HF layout


def st_write(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.float16: "F16"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def st_read(path):
    """header, {name: float32 tensor} from the raw bytes: 8-byte length, JSON, offsets."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0  # the header is padded so that the data starts 8-byte aligned
    header = json.loads(data[8:8 + n])
    body, out = data[8 + n:], {}
    ends = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and ends[-1][1] == len(body)  # the tensors fill the body exactly
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    for name, info in header.items():
        if name != "__metadata__":
            assert info["dtype"] == "F32"
            begin, end = info["data_offsets"]
            out[name] = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.float32).reshape(info["shape"])
    return header, out


def hf_layout(model):
    """The model's weights as the hub's gpt2 files hold them: no prefix, Conv1D (in, out),
    the causal-mask buffers attn.bias / attn.masked_bias of old transformers versions."""
    hf = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        name = key.removeprefix("transformer.")
        hf[name] = value.t().contiguous() if name.endswith(CONV1D) else value.clone()
    for i in range(model.model_args["n_layer"]):
        T = model.block_size
        hf[f"h.{i}.attn.bias"] = torch.ones(T, T).tril().view(1, 1, T, T)
        hf[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return hf


def write_config(folder, vocab_size):
    config = {"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": SHAPE["block_size"], "n_embd": SHAPE["n_embd"],
              "n_layer": SHAPE["n_layer"], "n_head": SHAPE["n_head"], "activation_function": "gelu_new"}
    (folder / "config.json").write_text(json.dumps(config))


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("t", "h"), ("a", "t"), ("Ġ", "c")]


def tiny_vocab():
    """The 256 byte symbols, the merged symbols and <|endoftext|>."""
    symbols = list(gpt2_files.bytes_to_unicode().values()) + [a + b for a, b in MERGES] + ["<|endoftext|>"]
    return {s: i for i, s in enumerate(dict.fromkeys(symbols))}


def write_tokenizer(folder, hf=True):
    vocab, merges = tiny_vocab(), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (folder / ("vocab.json" if hf else "encoder.json")).write_text(json.dumps(vocab), encoding="utf-8")
    (folder / ("merges.txt" if hf else "vocab.bpe")).write_text(merges, encoding="utf-8")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder with model.safetensors, pytorch_model.bin, config.json, vocab.json, merges.txt."""
    folder = tmp_path_factory.mktemp("gpt2-tiny")
    torch.manual_seed(0)
    model = GPT(len(tiny_vocab()), gelu="tanh", **SHAPE).eval()
    st_write(folder / "model.safetensors", hf_layout(model))
    torch.save(hf_layout(model), folder / "pytorch_model.bin")
    write_config(folder, len(tiny_vocab()))
    write_tokenizer(folder)
    return folder, model


# -----------------------------------------------------------------------------
# Loading and exporting GPT-2


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_from_pretrained_gives_the_logits_of_the_model_built_directly(checkpoint, weights):
    folder, model = checkpoint
    loaded = gpt2.from_pretrained(folder / weights).eval()
    idx = torch.randint(0, model.model_args["vocab_size"], (2, 20))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_from_pretrained_lists_missing_and_unexpected_keys(checkpoint, tmp_path):
    folder, model = checkpoint
    hf = hf_layout(model)
    del hf["h.1.mlp.c_fc.bias"]
    hf["h.0.attn.extra.weight"] = torch.zeros(2)
    st_write(tmp_path / "model.safetensors", hf)
    write_config(tmp_path, model.model_args["vocab_size"])
    with pytest.raises(data.DataError, match=r"missing \['transformer.h.1.mlp.c_fc.bias'\]; "
                                                      r"unexpected \['transformer.h.0.attn.extra.weight'\]"):
        gpt2.from_pretrained(tmp_path)
    with pytest.raises(data.DataError, match="not one of gpt2"):
        gpt2.from_pretrained(tmp_path / "nowhere")


def test_export_then_import_is_identical_and_parses_independently(checkpoint, tmp_path):
    _, model = checkpoint
    gpt2.save_pretrained(model, tmp_path)
    header, tensors = st_read(tmp_path / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"} and "lm_head.weight" not in tensors
    w = tensors["transformer.h.0.attn.c_attn.weight"]
    assert w.shape == (16, 48) and torch.equal(w, model.transformer.h[0].attn.c_attn.weight.t())
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["activation_function"]) == (2, 16, "gelu_new")
    again = gpt2.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, model.model_args["vocab_size"], (3, 17))
    assert torch.equal(again(idx)[0], model(idx)[0])


def test_safetensors_reader_refuses_a_truncated_file(checkpoint, tmp_path):
    raw = (checkpoint[0] / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        gpt2_files.read_safetensors(tmp_path / "cut.safetensors")
    header = b'{"w": {"dtype": "F32", "shape": [1]}}'  # no data_offsets
    for name, content in (("empty", b""), ("no-offsets", struct.pack("<Q", len(header)) + header + b"\0" * 4)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(data.DataError, match="not a safetensors file"):
            gpt2_files.read_safetensors(tmp_path / name)


def test_hub_download_checks_the_hubs_checksums(checkpoint, tmp_path, monkeypatch):
    import hashlib
    import shutil

    hub = tmp_path / "hub" / "gpt2"  # a stand-in for the hub, reached through file:// URLs
    hub.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint[0] / f, hub / f)
    weights, config = (hub / "model.safetensors").read_bytes(), (hub / "config.json").read_bytes()
    checks = {"model.safetensors": ("sha256", hashlib.sha256(weights).hexdigest(), len(weights)),
              "config.json": ("git-sha1", hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest(), len(config))}
    monkeypatch.setattr(gpt2_files, "HUB_URL", (tmp_path / "hub").as_uri() + "/{name}/{file}")
    monkeypatch.setattr(gpt2_files, "hub_checksum", lambda url: checks[url.rsplit("/", 1)[1]])
    hf, model_args = gpt2_files.load_gpt2("gpt2", tmp_path / "cache")
    assert model_args["n_layer"] == 2 and (tmp_path / "cache" / "gpt2" / "model.safetensors").read_bytes() == weights
    checks["config.json"] = ("git-sha1", "0" * 40, len(config))
    with pytest.raises(data.DataError, match="corrupted"):
        gpt2_files.load_gpt2("gpt2", tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "gpt2" / "config.json").exists()
    assert list((tmp_path / "cache2" / "gpt2").iterdir()) == []  # nothing unverified left behind
    checks["config.json"] = ("git-sha1", "", len(config))  # the hub sent no checksum: refused
    with pytest.raises(data.DataError, match="no checksum"):
        gpt2_files.load_gpt2("gpt2", tmp_path / "cache3")


def test_hub_checksums_are_read_from_the_hubs_headers():
    lfs = {"X-Linked-Etag": '"ab12"', "X-Linked-Size": "1000", "Content-Length": "1320"}  # 302 to the CDN
    assert gpt2_files.checksum_from_headers(302, lfs) == ("sha256", "ab12", 1000)
    small = {"ETag": 'W/"cd34"', "Content-Length": "665"}
    assert gpt2_files.checksum_from_headers(200, small) == ("git-sha1", "cd34", 665)
    assert gpt2_files.checksum_from_headers(302, {"ETag": '"ef56"', "Content-Length": "12"}) == ("git-sha1", "ef56", None)
    assert gpt2_files.checksum_from_headers(200, {}) == ("git-sha1", "", None)


# -----------------------------------------------------------------------------
# BPE


def test_bpe_round_trips_utf8_and_applies_merges_in_rank_order(tmp_path):
    write_tokenizer(tmp_path, hf=False)
    tok = gpt2_files.GPT2Tokenizer.from_dir(tmp_path)
    assert tok.bpe("Ġthe") == ["Ġthe"]  # Ġ t -> Ġt (rank 0), h e -> he (1), Ġt he -> Ġthe (2)
    assert tok.bpe("the") == ["t", "he"]  # h e (rank 1) before t h (rank 3), then no (t, he) merge
    assert tok.bpe("that") == ["th", "at"]
    assert tok.encode(" the cat") == [tok.encoder["Ġthe"], tok.encoder["Ġc"], tok.encoder["at"]]
    for text in ["the cat's 3 hats\n\n  ", "Café £30 — naïve 日本語 🙂\t½", "", "'s'll 'RE x\u00a0y"]:
        assert tok.decode(tok.encode(text)) == text
    # GPT-2's pre-tokenizer: contractions, a space joined to the next word, digits apart
    assert gpt2_files.pretokenizer().findall("I'll pay £30 now  ok") == ["I", "'ll", " pay", " £", "30", " now", " ", " ok"]
    # GPT-2's \s is Unicode's White_Space: the separators U+001C..U+001F (whitespace to Python) are not
    assert gpt2_files.pretokenizer().findall("x \x1cy\u3000z") == ["x", " \x1c", "y", "\u3000", "z"]
    reversed_ranks = gpt2_files.GPT2Tokenizer(tok.encoder, MERGES[::-1])
    assert reversed_ranks.bpe("the") == ["th", "e"]  # now t h has the lower rank
    write_tokenizer(tmp_path, hf=True)  # the HF file names give the same tokenizer
    assert gpt2_files.load_tokenizer(tmp_path).encode("the cat") == tok.encode("the cat")


# -----------------------------------------------------------------------------
# LoRA


def lora_model(checkpoint, bdia=None):
    torch.manual_seed(3)
    model = gpt2.from_pretrained(checkpoint[0], dropout=0.1, bdia=bdia)
    adapters = add_lora(model, rank=2, alpha=8, dropout=0.1, mlp=True)
    for p in adapters:
        torch.nn.init.normal_(p, std=0.1)  # B starts at zero; make the update non-trivial
    return model, adapters


def test_lora_adapters_get_the_same_gradients_reversible_and_stored(checkpoint):
    model, adapters = lora_model(checkpoint)
    assert not model.transformer.wte.weight.requires_grad  # the stack's input needs no grad
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRALinear) and len(adapters) == 2 * 3 * 2
    idx = torch.randint(0, model.model_args["vocab_size"], (4, 24))
    grads = []
    for reversible in (True, False):
        model.bdia = BDIAConfig(reversible=reversible)
        model.train().zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model(idx, idx)[1].backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        grads.append([p.grad.clone() for p in adapters])
    for a, b in zip(*grads):
        assert b.norm() > 0 and ((a - b).norm() / b.norm()).item() < 1e-5


def test_lora_merged_equals_unmerged_and_exports_merged(checkpoint, tmp_path):
    model, _ = lora_model(checkpoint)
    model.eval()
    idx = torch.randint(0, model.model_args["vocab_size"], (2, 30))
    unmerged = model(idx)[0]
    base = model.transformer.h[1].attn.c_attn.weight.clone()
    set_lora_merged(model, True)
    assert torch.allclose(model(idx)[0], unmerged, atol=1e-5)
    delta = model.transformer.h[1].attn.c_attn.weight - base
    assert delta[:16].abs().sum() > 0 and torch.equal(delta[16:32], torch.zeros(16, 16))  # key rows untouched
    lora = model.transformer.h[1].attn.c_attn  # rank 2, alpha 8: W += (alpha / r) B A on query and value
    A, B = lora.lora_A.view(2, 2, 16), lora.lora_B
    for part, rows in ((0, slice(0, 16)), (1, slice(32, 48))):
        assert torch.allclose(delta[rows], 8 / 2 * B[part] @ A[part], atol=1e-6)
    set_lora_merged(model, False)
    assert torch.allclose(model.transformer.h[1].attn.c_attn.weight, base, atol=1e-6)
    gpt2.save_pretrained(model, tmp_path)  # adapters folded in: a plain GPT-2 checkpoint
    assert not any("lora" in k for k in st_read(tmp_path / "model.safetensors")[1])
    assert torch.allclose(gpt2.from_pretrained(tmp_path).eval()(idx)[0], unmerged, atol=1e-5)


# -----------------------------------------------------------------------------
# KV cache and beam search


def test_kv_cache_matches_the_full_forward(checkpoint):
    model = checkpoint[1]
    idx = torch.randint(0, model.model_args["vocab_size"], (3, 25))
    cache = gpt2.new_cache(model)
    parts = [gpt2.forward_cached(model, idx[:, a:b], cache) for a, b in ((0, 10), (10, 11), (11, 25))]
    assert torch.allclose(torch.cat(parts, 1), model(idx)[0], atol=1e-5)
    ids, scores = gpt2.beam_search(model, idx[:, :6], eos_id=5, beam=4, max_new=12, no_repeat_ngram=2)
    ids_nc, scores_nc = gpt2.beam_search(model, idx[:, :6], eos_id=5, beam=4, max_new=12, no_repeat_ngram=2, use_cache=False)
    assert ids == ids_nc and scores == pytest.approx(scores_nc, abs=1e-5)


class Bigram(GPT):
    """A 'model' whose next-token distribution depends on the last token only (a table)."""

    def __init__(self, table):
        super().__init__(len(table), block_size=32, n_layer=1, n_head=1, n_embd=4)
        self.logp = torch.tensor(table).log()

    def forward(self, idx, targets=None):
        return self.logp[idx], None

    def forward_cached(self, idx, cache):
        kv = idx[:, None, :, None].float()
        cache[0]["k"] = cache[0]["v"] = torch.cat([cache[0]["k"], kv], 2) if "k" in cache[0] else kv
        return self.logp[idx]


@pytest.fixture
def bigram_decoding(monkeypatch):
    """gpt2.beam_search decodes a Bigram through its own forward_cached."""
    monkeypatch.setattr(gpt2, "forward_cached", lambda model, idx, cache: model.forward_cached(idx, cache))


def test_beam_search_on_a_bigram_table(bigram_decoding):
    # tokens 0, 1, 2 and eos 3. After 0: 1 (0.5), 2 (0.4), eos (0.1); after 1: 1 (0.4),
    # 2 (0.3), eos (0.3); after 2: eos (0.9). Greedy runs 1 1 1 1; beam 2 finds "2 eos"
    # with p = 0.36 (better than "1 eos", 0.15, and "eos", 0.1).
    table = [[0.0, 0.5, 0.4, 0.1], [0.0, 0.4, 0.3, 0.3], [0.05, 0.025, 0.025, 0.9], [0.25] * 4]
    model = Bigram(table).eval()
    contexts = torch.tensor([[1, 0], [1, 2]])
    for use_cache in (True, False):
        ids, scores = gpt2.beam_search(model, contexts, 3, beam=2, max_new=4, length_penalty=0.8, no_repeat_ngram=0,
                                        use_cache=use_cache)
        assert ids == [[2], []]
        assert scores == pytest.approx([math.log(0.36) / 2**0.8, math.log(0.9)])
    ids, scores = gpt2.beam_search(model, contexts[:1], 3, beam=1, max_new=4, length_penalty=1.0, no_repeat_ngram=0)
    assert ids == [[1, 1, 1, 1]] and scores == pytest.approx([math.log(0.5 * 0.4**3) / 4])
    # no-repeat-ngram 2: after "1 1", the bigram (1, 1) is banned, so greedy takes 2, then eos
    ids, _ = gpt2.beam_search(model, contexts[:1], 3, beam=1, max_new=4, no_repeat_ngram=2)
    assert ids == [[1, 1, 2]]
    assert banned_tokens([5, 6, 7, 5, 6], 3) == [7] and banned_tokens([5, 6], 3) == []


def test_beam_search_lets_hypotheses_open_at_max_new_compete_and_refuses_negative_penalty(bigram_decoding):
    # After 0: 1 (0.6) or eos (0.4); after 1: 1 (0.9) or eos (0.1). With max_new 2 and no length
    # penalty, "eos" ends with p = 0.4 but the open "1 1" has p = 0.54: as in the LoRA
    # repository's decoder, open hypotheses of max_new tokens compete at the end.
    table = [[0.0, 0.6, 0.0, 0.4], [0.0, 0.9, 0.0, 0.1], [0.25] * 4, [0.25] * 4]
    model = Bigram(table).eval()
    for use_cache in (True, False):
        ids, scores = gpt2.beam_search(model, torch.tensor([[0]]), 3, beam=2, max_new=2, length_penalty=0.0,
                                        no_repeat_ngram=0, use_cache=use_cache)
        assert ids == [[1, 1]] and scores == pytest.approx([math.log(0.54)])
    with pytest.raises(ValueError, match="length_penalty"):
        gpt2.beam_search(model, torch.tensor([[0]]), 3, length_penalty=-0.5)


# -----------------------------------------------------------------------------
# finetune_e2e.py end to end

RESTAURANTS = [("The Vaults", "pub", "more than £30"), ("Café Adriatic", "coffee shop", "cheap"),
               ("The Eagle", "restaurant", "moderate"), ("Zizzi", "pub", "cheap")]


def write_e2e(folder):
    rows = [(f"name[{n}], eatType[{t}], priceRange[{p}]", f"{n} is a {t} with {p} prices.") for n, t, p in RESTAURANTS]
    rows += [(mr, ref.replace(" is a", " is a nice")) for mr, ref in rows]
    for name, part in (("trainset.csv", rows * 3), ("devset.csv", rows[:4]), ("testset_w_refs.csv", rows[2:])):
        with open(folder / name, "w", encoding="utf-8") as f:
            f.write("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in part))
    return folder


TINY = ["--epochs", "2", "--batch-size", "4", "--warmup-steps", "2", "--lr", "3e-3", "--beam", "2",
        "--max-new-tokens", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory):
    return write_e2e(tmp_path_factory.mktemp("e2e"))


def finetune(checkpoint, e2e_dir, out, *flags):
    finetune_e2e.main(["--init-from", str(checkpoint[0]), "--data-dir", str(e2e_dir), "--out-dir", str(out), *TINY, *flags])
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags,mode", [([], "FT"), (["--bdia"], "FT-BDIA"), (["--lora-rank", "2", "--lora-alpha", "8"], "LoRA"),
                                        (["--lora-rank", "2", "--bdia", "--gammas", "-0.5", "0", "0.5", "--bits", "none",
                                          "--no-reversible"], "LoRA+BDIA")])
def test_finetune_e2e_modes(checkpoint, e2e_dir, tmp_path, flags, mode, capsys):
    log = finetune(checkpoint, e2e_dir, tmp_path, *flags)
    assert [r["epoch"] for r in log] == [1, 2] and all(r["mode"] == mode for r in log)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in log)
    assert (tmp_path / "ckpt.pt").is_file()
    scores = json.loads((tmp_path / "e2e_scores.json").read_text())
    assert scores["mode"] == mode and scores["contexts"] == 4 and scores["references"] == 6  # 2 MRs have 2 refs
    assert set(scores["scores"]) == {"BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"}
    assert len((tmp_path / "predictions.txt").read_text(encoding="utf-8").splitlines()) == 4
    assert "Method" in capsys.readouterr().out


def test_each_log_line_gives_the_rate_of_the_last_step_it_counts(checkpoint, e2e_dir, tmp_path, rates_trained_with):
    rates = rates_trained_with(torch.optim.AdamW)
    log = finetune(checkpoint, e2e_dir, tmp_path, "--no-test", "--eval-interval", "4")
    assert [r["step"] for r in log] == [4, 6, 8, 12] and len(rates) == 12 and len(set(rates)) > 2
    assert [r["lr"] for r in log] == [rates[r["step"] - 1] for r in log]


def test_finetune_e2e_resumes_exactly_and_exports(checkpoint, e2e_dir, tmp_path, monkeypatch, kill_after):
    flags = ["--lora-rank", "2", "--bdia", "--no-test"]
    whole = finetune(checkpoint, e2e_dir, tmp_path / "whole", *flags, "--export", str(tmp_path / "hf"))
    kill_after(finetune_e2e, "loss_on", 9)  # killed in epoch 2 (epoch 1: 6 steps and 1 validation batch)
    with pytest.raises(kill_after.Killed):
        finetune(checkpoint, e2e_dir, tmp_path / "split", *flags)
    monkeypatch.undo()
    split = finetune(checkpoint, e2e_dir, tmp_path / "split", *flags, "--resume")
    assert [(r["train_loss"], r["val_loss"]) for r in split] == [(r["train_loss"], r["val_loss"]) for r in whole]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("whole", "split"))
    assert set(a) == set(b) and all(".lora_" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    exported = gpt2.from_pretrained(tmp_path / "hf")  # LoRA merged into a plain GPT-2
    assert not torch.equal(exported.transformer.h[0].attn.c_attn.weight, checkpoint[1].transformer.h[0].attn.c_attn.weight)


@pytest.mark.filterwarnings("ignore:BDIAConfig. the mean of gammas")  # one gamma, on purpose (below)
def test_fsdp_under_torchrun_matches_one_process_with_the_global_batch(checkpoint, e2e_dir, tmp_path):
    # 21 examples in global batches of 10: the last batch leaves process 0 nothing (it runs with
    # weight 0). One gamma: each sample's gamma is then the same however the batch is split.
    flags = ["--init-from", str(checkpoint[0]), "--data-dir", str(e2e_dir), *TINY, "--train-limit", "21",
             "--eval-interval", "1", "--lora-rank", "2", "--lora-dropout", "0", "--bdia", "--gammas", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    fsdp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune_e2e.py",
            *flags, "--batch-size", "5", "--fsdp", "--out-dir", str(tmp_path / "fsdp")]
    run_fsdp = subprocess.run(fsdp, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # a hang guard
    assert run_fsdp.returncode == 0, run_fsdp.stderr[-3000:]
    finetune_e2e.main([*flags, "--batch-size", "10", "--out-dir", str(tmp_path / "single")])
    rows = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("fsdp", "single")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(*rows):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("fsdp", "single"))
    assert a["model"].keys() == b["model"].keys() and all(".lora_" in k for k in a["model"])
    assert all((a["model"][k] - b["model"][k]).abs().max() < 1e-5 for k in b["model"])
    # rank 0 decoded with the whole model: the predictions are those of the single process
    assert (tmp_path / "fsdp" / "predictions.txt").read_text() == (tmp_path / "single" / "predictions.txt").read_text()


def test_lora_resume_refuses_another_base_model_and_accepts_the_same_one_moved(checkpoint, e2e_dir, tmp_path, capsys):
    """A LoRA checkpoint holds only the adapters: a base of the same shape but other weights would load."""
    flags = ["--lora-rank", "2", "--no-test", "--epochs", "1"]
    finetune(checkpoint, e2e_dir, tmp_path / "run", *flags)
    moved, other = tmp_path / "moved", tmp_path / "other"
    shutil.copytree(checkpoint[0], moved)
    shutil.copytree(checkpoint[0], other)
    torch.manual_seed(1)
    st_write(other / "model.safetensors", hf_layout(GPT(len(tiny_vocab()), gelu="tanh", **SHAPE)))
    (other / "pytorch_model.bin").unlink()
    argv = ["--data-dir", str(e2e_dir), "--out-dir", str(tmp_path / "run"), *TINY, *flags[:-2], "--resume"]
    with pytest.raises(SystemExit) as e:
        finetune_e2e.main(["--init-from", str(other), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the frozen weights differ" in err and "Traceback" not in err
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "frozen_sha256"}, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(SystemExit):  # a LoRA checkpoint of an older version: nothing to tell the base by
        finetune_e2e.main(["--init-from", str(moved), *argv])
    assert "written before checkpoints kept the base model's SHA-256" in capsys.readouterr().err
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    finetune_e2e.main(["--init-from", str(moved), *argv])  # epochs 2..2 on the same weights, from another folder
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_validation_curve_every_eval_interval_steps_and_resume_keeps_it(checkpoint, e2e_dir, tmp_path, monkeypatch,
                                                                       kill_after):
    """6 steps per epoch, --eval-interval 4: points at steps 4 and 8 within the epochs, and at 6 and 12."""
    flags = ["--no-test", "--eval-interval", "4"]
    whole = finetune(checkpoint, e2e_dir, tmp_path / "whole", *flags)
    assert [r["step"] for r in whole] == [4, 6, 8, 12]
    assert [r["epoch"] for r in whole] == pytest.approx([4 / 6, 1, 8 / 6, 2])
    # killed in epoch 2 after its validation point (epoch 1: 6 steps, 2 validations; epoch 2: 2 steps, 1 validation)
    kill_after(finetune_e2e, "loss_on", 11)
    with pytest.raises(kill_after.Killed):
        finetune(checkpoint, e2e_dir, tmp_path / "split", *flags)
    monkeypatch.undo()
    assert [r["step"] for r in runlib.JsonlLog(tmp_path / "split" / "log.jsonl", resume=True).read()] == [4, 6, 8]
    split = finetune(checkpoint, e2e_dir, tmp_path / "split", *flags, "--resume")  # epoch 2 again, from its start
    assert [(r["step"], r["val_loss"]) for r in split] == [(r["step"], r["val_loss"]) for r in whole]


def test_outputs_are_in_the_e2e_challenges_measure_scores_format(checkpoint, e2e_dir, tmp_path):
    finetune(checkpoint, e2e_dir, tmp_path, "--epochs", "1")
    predictions = (tmp_path / "predictions.txt").read_text(encoding="utf-8").splitlines()
    groups = (tmp_path / "references.txt").read_text(encoding="utf-8").rstrip("\n").split("\n\n")
    test_rows = list(csv.reader(open(e2e_dir / "testset_w_refs.csv", encoding="utf-8")))[1:]
    by_mr = {}
    for mr, ref in test_rows:
        by_mr.setdefault(mr, []).append(ref)
    assert len(predictions) == len(groups) == len(by_mr) == 4  # one line per MR; references grouped per MR
    assert [g.split("\n") for g in groups] == list(by_mr.values())  # in the test file's order


def test_loss_is_label_smoothed_on_completion_tokens_only_and_lr_is_linear():
    # a context of 2 tokens and a completion of 2 (the last is eos): only positions 1 and 2 are scored
    x, y = finetune_e2e.collate([([7, 8, 9, 3], 2)], [0], device="cpu")
    assert x.tolist() == [[7, 8, 9]] and y.tolist() == [[-1, 9, 3]]

    class Uniform(torch.nn.Module):  # logits 0 everywhere but 2 at token 9: p(9) = e^2 / (e^2 + 9)
        def forward(self, x):
            logits = torch.zeros(*x.shape, 10)
            logits[..., 9] = 2.0
            return logits, None

    logp9, logp_other = 2 - math.log(math.exp(2) + 9), -math.log(math.exp(2) + 9)
    mean_logp = (logp9 + 9 * logp_other) / 10
    eps = 0.1  # smoothed target: (1 - eps) on the label plus eps / 10 on every token
    expected = [-(1 - eps) * lp - eps * mean_logp for lp in (logp9, logp_other)]
    assert finetune_e2e.loss_on(Uniform(), x, y, eps).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    args = argparse.Namespace(lr=1.0, warmup_steps=4)
    assert [finetune_e2e.learning_rate(s, 10, args) for s in (0, 3, 4, 7, 10)] == [0.25, 1.0, 1.0, 0.5, 0.0]


def test_lora_repo_line_format_and_mr_conversion(tmp_path):
    assert data.mr_to_context("name[The Vaults], eatType[pub], priceRange[more than £30], familyFriendly[yes]") == \
        "name : The Vaults | Type : pub | price : more than £30 | family friendly : yes"
    (tmp_path / "train.txt").write_text("name : A | Type : pub||A is a pub .\n\nname : B||B .\n", encoding="utf-8")
    assert data.read_e2e_pairs(tmp_path / "train.txt") == [("name : A | Type : pub", "A is a pub ."), ("name : B", "B .")]
    (tmp_path / "bad.txt").write_text("no separator here\n")
    with pytest.raises(data.DataError, match="bad.txt:1"):
        data.read_e2e_pairs(tmp_path / "bad.txt")
    tok = gpt2_files.GPT2Tokenizer(tiny_vocab(), MERGES)
    examples = [finetune_e2e.encode_example(tok, "name : A", "the cat", 64)]
    x, y = finetune_e2e.collate(examples, [0], "cpu")
    ids, n_ctx = examples[0]
    assert ids[n_ctx - 1] == ids[-1] == tok.eos_id and x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [-1] * (n_ctx - 1) + ids[n_ctx:]  # loss on the completion (and its eos) only


def test_under_torchrun_without_fsdp_is_one_line_not_n_runs_on_one_folder(checkpoint, e2e_dir, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what torchrun sets in each process
    argv = ["--init-from", str(checkpoint[0]), "--data-dir", str(e2e_dir), "--out-dir", str(tmp_path / "o"), *TINY]
    with pytest.raises(SystemExit) as e:
        finetune_e2e.main(argv)
    assert e.value.code == 2 and "trains with --fsdp only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,message", [
    (["--train-file", "missing.csv"], "no such data file"),
    (["--init-from", "no-such-model"], "not one of gpt2"),
    (["--lora-rank", "-1"], "must not be negative"),
    (["--bdia", "--gammas=-0.5,0,0.5"], "revers"),
    (["--fsdp"], "torchrun --nproc_per_node=N finetune_e2e.py"),
])
def test_finetune_e2e_errors_exit_2_without_traceback(checkpoint, e2e_dir, tmp_path, flags, message, capsys):
    argv = ["--init-from", str(checkpoint[0]), "--data-dir", str(e2e_dir), "--out-dir", str(tmp_path), *TINY, *flags]
    with pytest.raises(SystemExit) as e:
        finetune_e2e.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_table_prints_runs_in_table_1_layout(tmp_path, capsys):
    for name, bleu in (("ft", 68.2), ("ft-bdia", 69.1)):
        (tmp_path / name).mkdir()
        scores = {"BLEU": bleu, "NIST": 8.62, "METEOR": None, "ROUGE-L": 71.04, "CIDEr": 2.47}
        (tmp_path / name / "e2e_scores.json").write_text(json.dumps({"mode": name.upper(), "scores": scores}))
    finetune_e2e.main(["--table", str(tmp_path / "ft"), str(tmp_path / "ft-bdia")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["Method", "BLEU", "NIST", "MET", "ROUGE-L", "CIDEr"]
    assert lines[1].split() == ["FT", "68.2", "8.62", "-", "71.0", "2.47"] and lines[2].split()[:2] == ["FT-BDIA", "69.1"]
