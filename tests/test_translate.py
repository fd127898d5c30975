"""Tests of the translation transformer (models.Seq2Seq) and train_translate.py: BDIA through
encoder and decoder, learning, decoding, data parsing, BLEU, resume and errors."""

import itertools
import json
import os
import struct
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import data  # noqa: E402
from plumbing import runlib  # noqa: E402
import train_translate as tt  # noqa: E402
from bdia import BDIAConfig  # noqa: E402
from models import Seq2Seq  # noqa: E402

torch.set_num_threads(1)  # CI has 2 cores; small tensors are fastest single-threaded

PAD, BOS, EOS = tt.PAD_ID, tt.BOS_ID, tt.EOS_ID


def tiny_model(config=None, dropout=0.0, enc=3, dec=4, seed=0, **kw):
    torch.manual_seed(seed)
    return Seq2Seq(11, 13, dim=16, heads=2, mlp_dim=32, enc_layers=enc, dec_layers=dec, dropout=dropout,
                   max_len=16, bdia=config, **kw)


def padded_batch():
    torch.manual_seed(1)
    src = torch.randint(4, 11, (3, 7))
    src[0, 5:] = PAD  # source padding
    tgt = torch.randint(4, 13, (3, 6))
    tgt[:, 0] = BOS
    tgt[1, 4:] = PAD  # target padding
    return src, tgt


def step(model, src, tgt, seed):
    """Forward and backward of the teacher-forced loss; returns logits and named grads."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(src, tgt[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD).backward()
    return logits, {n: p.grad for n, p in model.named_parameters()}


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# -----------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reversible_bdia_matches_stored_activations_in_encoder_and_decoder(dropout):
    src, tgt = padded_batch()
    model = tiny_model(BDIAConfig(reversible=True), dropout)
    out_rev, g_rev = step(model, src, tgt, seed=5)
    model.bdia = BDIAConfig(reversible=False)
    out_sto, g_sto = step(model, src, tgt, seed=5)
    assert torch.equal(out_rev, out_sto)  # same gammas and dropout masks, bit for bit
    assert g_rev.keys() == g_sto.keys()
    for name in g_sto:
        assert g_rev[name] is not None, name
        assert rel_err(g_rev[name], g_sto[name]) < 1e-5, name
    # The encoder learns only through the decoder's cross-attention to its memory.
    for name in ("encoder.0.attn.c_attn.weight", "encoder.2.mlp.c_fc.weight", "src_emb.weight", "ln_enc.weight"):
        assert g_rev[name].abs().sum() > 0, name
    # Plain and BDIA training really differ (the test above is not comparing a model with itself).
    model.bdia = None
    out_plain, _ = step(model, src, tgt, seed=5)
    assert not torch.allclose(out_plain, out_rev)


def test_source_padding_gets_no_gradient_and_does_not_change_outputs():
    src, tgt = padded_batch()
    model = tiny_model(BDIAConfig(reversible=True), dropout=0.0)
    _, grads = step(model, src, tgt, seed=0)
    assert torch.all(grads["src_emb.weight"][PAD] == 0)  # <pad> appears only at masked positions
    assert grads["src_emb.weight"][src[0, 0]].abs().sum() > 0
    for config in (None, BDIAConfig()):
        model.bdia = config
        model.eval()
        with torch.no_grad():
            base = model(src, tgt)
            longer = model(torch.cat([src, torch.full((3, 4), PAD)], 1), tgt)  # more padding
            other = src.clone()
            other[0, 5:] = 7  # row 0's padding replaced by real tokens
            changed = model(other, tgt)
            tgt2 = tgt.clone()
            tgt2[1, 4:] = 9  # content after row 1's real target tokens (causal: unseen)
            after = model(src, tgt2)
        assert torch.allclose(base, longer, atol=1e-6)
        assert not torch.allclose(base[0], changed[0])  # the mask is not masking real tokens
        assert torch.equal(base[1:], changed[1:])
        assert torch.equal(base[1, :4], after[1, :4])


def test_bdia_inference_without_quantization_is_the_plain_model_and_state_dicts_match():
    src, tgt = padded_batch()
    model = tiny_model(None).eval()
    with torch.no_grad():
        plain = model(src, tgt)
        model.bdia = BDIAConfig(bits=None, reversible=False)
        assert torch.equal(model(src, tgt), plain)  # eq. (25) with gamma 0 and no Q_l
    trained = tiny_model(BDIAConfig(), seed=3)
    assert trained.state_dict().keys() == model.state_dict().keys()
    model.load_state_dict(trained.state_dict())


def reverse_task(config, steps=300, seed=0):
    """Train on "reverse 6 tokens" and return the token accuracy of greedy decoding."""
    torch.manual_seed(seed)
    model = Seq2Seq(12, 12, dim=32, heads=2, mlp_dim=64, enc_layers=2, dec_layers=2, dropout=0.0,
                    max_len=16, bdia=config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)

    def batch(n):
        src = torch.randint(4, 12, (n, 6))
        return src, torch.cat([torch.full((n, 1), BOS), src.flip(1), torch.full((n, 1), EOS)], 1)

    model.train()
    for _ in range(steps):
        src, tgt = batch(32)
        loss = tt.loss_of(model, src, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, tgt = batch(200)
    out = tt.greedy(model, src, max_new=8)
    return (out[:, :6] == tgt[:, 1:7]).float().mean().item()


@pytest.mark.parametrize("config", [None, BDIAConfig()], ids=["plain", "bdia-reversible"])
def test_reverse_task_is_learned(config):
    assert reverse_task(config) > 0.9  # chance is 1/8


def test_greedy_is_the_argmax_of_the_full_forward():
    src, _ = padded_batch()
    model = tiny_model(BDIAConfig(), seed=4).eval()
    out = tt.greedy(model, src, max_new=6)
    for row in range(src.shape[0]):
        ids = [BOS]
        for t in range(out.shape[1]):
            with torch.no_grad():
                logits = model(src[row:row + 1], torch.tensor([ids]))
            nxt = logits[0, -1].argmax().item()
            assert out[row, t].item() == (PAD if nxt == EOS else nxt)
            if nxt == EOS:
                assert torch.all(out[row, t:] == PAD)
                break
            ids.append(nxt)


def sequence_logprob(model, src, ids):
    with torch.no_grad():
        logp = model(src, torch.tensor([[BOS] + ids[:-1]])).log_softmax(-1)[0]
    return sum(logp[t, i].item() for t, i in enumerate(ids))


def test_exhaustive_beam_search_finds_the_best_sequence():
    torch.manual_seed(0)
    model = Seq2Seq(7, 6, dim=8, heads=2, mlp_dim=16, enc_layers=1, dec_layers=2, max_len=8, tie=True).eval()
    with torch.no_grad():
        model.tgt_emb.weight.mul_(8)  # sharper distributions (the tied head too): hypotheses differ clearly
    src = torch.tensor([[4, 5, 6, EOS]])
    max_new = 3
    best, best_score = None, float("-inf")  # brute force over every sequence that ends in <eos>
    for length in range(max_new):
        for body in itertools.product([t for t in range(6) if t != EOS], repeat=length):
            score = sequence_logprob(model, src, [*body, EOS]) / (length + 1)
            if score > best_score:
                best, best_score = list(body), score
    found = tt.beam_search(model, src, beam=6**max_new, max_new=max_new)
    assert found == best and len(best) > 0
    small = tt.beam_search(model, src, beam=2, max_new=max_new)
    assert len(small) < max_new and EOS not in small


# -----------------------------------------------------------------------------
# Data


def write_mo(path, messages):
    """A GNU .mo file (little-endian, no hash table) with the given {msgid: msgstr}."""
    keys = sorted(messages)
    ids = [k.encode() for k in keys]
    strs = [messages[k].encode() for k in keys]
    n = len(keys)
    originals, translations = 28, 28 + 8 * n
    data = 28 + 16 * n
    table_o, table_t, blob = [], [], b""
    for s in ids:
        table_o.append((len(s), data + len(blob)))
        blob += s + b"\0"
    for s in strs:
        table_t.append((len(s), data + len(blob)))
        blob += s + b"\0"
    head = struct.pack("<7I", 0x950412DE, 0, n, originals, translations, 0, data)
    tables = b"".join(struct.pack("<2I", *e) for e in table_o + table_t)
    path.write_bytes(head + tables + blob)


def test_gettext_reader_keeps_real_sentences_only(tmp_path):
    write_mo(tmp_path / "a.mo", {
        "": "Content-Type: text/plain; charset=UTF-8\n",
        "Open the file": "Ouvrir le fichier",
        "menu\x04Save all files": "Enregistrer tous les fichiers",  # message context dropped
        "cannot read %s": "impossible de lire %s",  # placeholder
        "line one\nline two": "ligne un\nligne deux",  # multi-line
        "File": "Fichier",  # too short
        "_Open file": "_Ouvrir le fichier",  # keyboard mnemonic
        "Not translated here": "Not translated here",
        "one file\x00many files": "un fichier\x00des fichiers",  # plural forms
        "Disk is full": "Le disque est plein, désolé",  # non-ASCII decoded as UTF-8
    })
    write_mo(tmp_path / "b.mo", {"Open the file": "Ouvre le fichier", "Quit the program": "Quitter le programme"})
    (tmp_path / "c.txt").write_text("not a catalogue")
    pairs = data.read_gettext_pairs(tmp_path)
    assert pairs == [
        ("Disk is full", "Le disque est plein, désolé"),
        ("Open the file", "Ouvrir le fichier"),  # first catalogue wins
        ("Quit the program", "Quitter le programme"),
        ("Save all files", "Enregistrer tous les fichiers"),
    ]


def test_gettext_errors_are_clear(tmp_path):
    with pytest.raises(data.DataError, match="no \\*.mo files"):
        data.read_gettext_pairs(tmp_path)
    (tmp_path / "bad.mo").write_bytes(b"\x00" * 40)
    with pytest.raises(data.DataError, match="not a readable .mo"):
        data.read_gettext_pairs(tmp_path)
    write_mo(tmp_path / "bad.mo", {"Open the file": "Ouvrir le fichier"})
    whole = (tmp_path / "bad.mo").read_bytes()
    for size in (2, 30, len(whole) - 5):  # truncated downloads or copies
        (tmp_path / "bad.mo").write_bytes(whole[:size])
        with pytest.raises(data.DataError, match="not a readable .mo"):
            data.read_gettext_pairs(tmp_path)


def test_pair_files_tsv_and_kaggle_csv(tmp_path):
    tsv = tmp_path / "eng-fra.txt"
    tsv.write_text("Go.\tVa !\n\nWho?\tQui ?\tCC-BY 2.0 (France) Attribution: tatoeba.org\n", encoding="utf-8")
    assert data.read_tsv_pairs(tsv) == [("Go.", "Va !"), ("Who?", "Qui ?")]
    csv_path = tmp_path / "eng_-french.csv"
    csv_path.write_text('English words/sentences,French words/sentences\nHi.,Salut!\n"Run, now.","Cours, maintenant."\n')
    assert data.read_csv_pairs(csv_path) == [("Hi.", "Salut!"), ("Run, now.", "Cours, maintenant.")]
    bad = tmp_path / "bad.txt"
    bad.write_text("Go.\tVa !\nno tab here\n")
    with pytest.raises(data.DataError, match="line 2"):
        data.read_tsv_pairs(bad)


def test_eng_fra_download_is_unzipped_atomically(tmp_path, monkeypatch):
    archive = tmp_path / "made.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/eng-fra.txt", "Go.\tVa !\n")
    calls = []

    def fake_download(url, dest, **kw):
        calls.append((url, kw["manual"]))
        return archive

    monkeypatch.setattr(data, "download", fake_download)
    path = data.fetch_eng_fra(tmp_path / "data")
    assert data.read_tsv_pairs(path) == [("Go.", "Va !")]
    assert calls[0][0] == data.ENG_FRA_URL and "--data" in calls[0][1]
    data.fetch_eng_fra(tmp_path / "data")  # present: no second download
    assert len(calls) == 1


def test_tokenizer_round_trip_and_vocab():
    text = "Don't  open   \"the\" file, l'homme!  Ça va? 3.5 km"
    tokens = tt.tokenize(text, lowercase=False)
    assert tokens[:5] == ["Don", "@@'", "@@t", "open", '"']
    assert tt.detokenize(tokens) == " ".join(text.split())
    assert tt.detokenize(tt.tokenize(text)) == " ".join(text.lower().split())
    assert tt.detokenize(tt.tokenize("a @@ b", lowercase=False)) == "a @@ b"  # the marker itself is safe
    vocab = tt.Vocab.build([["b", "a", "b"], ["c", "b", "a"], ["d"]], min_freq=2)
    assert vocab.itos == ["<unk>", "<pad>", "<bos>", "<eos>", "b", "a"]
    ids = vocab.encode(["a", "d", "b"])
    assert ids == [5, tt.UNK_ID, 4]
    assert vocab.decode([BOS, *ids, EOS, 4]) == ["a", "<unk>", "b"]


def test_split_and_length_buckets():
    pairs = [(f"e{i}", f"f{i}") for i in range(50)]
    train, val = data.split_pairs(pairs, 0.1)
    assert len(val) == 5 and sorted(train + val) == sorted(pairs)
    assert data.split_pairs(pairs, 0.1) == (train, val)  # fixed seed
    examples = [([4] * (i % 9 + 1), [2, 4, 3]) for i in range(100)]
    batches = tt.length_batches(examples, 10, torch.Generator().manual_seed(0), pool=10)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert all(len({len(examples[i][0]) for i in b}) <= 2 for b in batches)  # one pool sorted by length
    src, tgt = tt.collate(examples, [0, 5], "cpu")
    assert src.tolist() == [[4, PAD, PAD, PAD, PAD, PAD], [4] * 6]


def test_corpus_bleu_against_hand_computed_values():
    ref = "the cat is on the mat".split()
    assert tt.corpus_bleu([ref], [ref]) == pytest.approx(100.0)
    # hyp "the cat the mat": p1 = 4/4, p2 = 2/3 (the cat, the mat), p3 = 0/2 -> BLEU 0
    assert tt.corpus_bleu(["the cat the mat".split()], [ref]) == 0.0
    # hyp "the cat is on the" (5 tokens, ref 6): p1..p4 = 1 -> BLEU = BP = exp(1 - 6/5)
    assert tt.corpus_bleu(["the cat is on the".split()], [ref]) == pytest.approx(100 * 0.8187307530779818)
    # clipping: "the the the the the the" has p1 = 2/6, p2 = 0 -> 0; with max_n = 1: 100/3
    assert tt.corpus_bleu([["the"] * 6], [ref], max_n=1) == pytest.approx(100 / 3)
    # corpus-level sums: hyps "a b c d" (exact) and "a b x d" vs "a b y d":
    # p1 = 7/8, p2 = 4/6, p3 = 2/4, p4 = 1/2, BP = 1 -> 100 (7/8 * 2/3 * 1/2 * 1/2)^(1/4)
    hyps, refs = [list("abcd"), list("abxd")], [list("abcd"), list("abyd")]
    assert tt.corpus_bleu(hyps, refs) == pytest.approx(100 * (7 / 8 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)


# -----------------------------------------------------------------------------
# The script


def write_corpus(path, n=48):
    words = ["red", "blue", "big", "small", "cat", "dog", "house", "car"]
    french = {"red": "rouge", "blue": "bleu", "big": "grand", "small": "petit", "cat": "chat", "dog": "chien",
              "house": "maison", "car": "voiture"}
    lines = []
    for i in range(n):
        en = [words[(i + k * 3) % 8] for k in range(2 + i % 3)]
        lines.append(" ".join(en) + ".\t" + " ".join(french[w] for w in en) + " .")
    path.write_text("\n".join(lines) + "\n")
    return path


TINY = ["--dim", "16", "--heads", "2", "--mlp-dim", "32", "--enc-layers", "2", "--dec-layers", "2",
        "--batch-size", "8", "--bleu-samples", "4", "--device", "cpu"]


def run_script(*argv):
    return tt.main([str(a) for a in argv])


@pytest.mark.parametrize("bdia", [[], ["--bdia", "--dropout", "0.1"]], ids=["plain", "bdia"])
def test_resume_continues_exactly(tmp_path, bdia):
    data = write_corpus(tmp_path / "pairs.txt")
    full = run_script("--data", data, "--epochs", 2, "--out-dir", tmp_path / "a", *TINY, *bdia)
    run_script("--data", data, "--epochs", 1, "--out-dir", tmp_path / "b", *TINY, *bdia)
    resumed = run_script("--data", data, "--epochs", 2, "--out-dir", tmp_path / "b", "--resume", *TINY, *bdia)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log_b] == [1, 2]
    for ra, rb in zip(log_a, log_b):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_loss"] == rb["val_loss"]
        assert 0 <= ra["val_bleu"] <= 100
    ckpt = runlib.read_checkpoint(tmp_path / "b" / "ckpt.pt", "train_translate.py")
    assert ckpt["epoch"] == 2 and ckpt["args"]["bdia"] == bool(bdia)


def test_each_log_line_gives_the_rate_of_the_last_step_it_counts(tmp_path, rates_trained_with, capsys):
    rates = rates_trained_with(torch.optim.Adam)
    data = write_corpus(tmp_path / "pairs.txt")
    run_script("--data", data, "--epochs", 2, "--cosine", "--warmup", 2, "--out-dir", tmp_path, *TINY)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == len(rates) and len(set(rates)) > 2
    assert [r["lr"] for r in log] == [rates[r["step"] - 1] for r in log]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]  # like the other scripts' epoch lines
    assert all(", val loss " in line and ", val BLEU " in line and line.endswith(" s") for line in lines)


def test_bleu_decoding_leaves_training_as_it_is(tmp_path):
    """BLEU's greedy decoding draws no random numbers: --bleu-every changes the log, not the run."""
    data = write_corpus(tmp_path / "pairs.txt")
    flags = ["--data", data, "--epochs", 2, *TINY, "--bdia", "--dropout", "0.1"]
    with_bleu = run_script(*flags, "--out-dir", tmp_path / "a", "--bleu-every", 1)
    without = run_script(*flags, "--out-dir", tmp_path / "b", "--bleu-every", 0)
    for (name, a), b in zip(with_bleu.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert all("val_bleu" in r for r in logs[0]) and not any("val_bleu" in r for r in logs[1])


def test_translate_prints_from_a_checkpoint(tmp_path, capsys):
    data = write_corpus(tmp_path / "pairs.txt")
    run_script("--data", data, "--epochs", 1, "--out-dir", tmp_path / "o", *TINY, "--bdia")
    capsys.readouterr()
    for beam in (1, 3):
        run_script("--translate", "red cat.", "--beam", beam, "--out-dir", tmp_path / "o", "--device", "cpu")
        line = capsys.readouterr().out
        assert line.endswith("\n") and "<" not in line  # specials never printed


def test_translate_says_so_when_the_model_outputs_nothing(tmp_path, capsys, monkeypatch):
    data = write_corpus(tmp_path / "pairs.txt")
    run_script("--data", data, "--epochs", 1, "--out-dir", tmp_path / "o", *TINY)
    monkeypatch.setattr(tt, "beam_search", lambda *args, **kwargs: [])  # <eos> first
    capsys.readouterr()
    run_script("--translate", "red cat.", "--out-dir", tmp_path / "o", "--device", "cpu")
    assert capsys.readouterr().out == "(the model translates this as nothing: it ends at once)\n"


@pytest.mark.parametrize(
    "content, argv, message",
    [
        (None, [], "no data"),
        ("", ["--data", "{f}"], "no sentence pairs"),
        ("Go.\tVa !\njust english\n", ["--data", "{f}"], "line 2"),
        ("Go.\tVa !\n", ["--data", "{f}", "--dataset", "gettext-fr"], "not both"),
        ("Go.\tVa !\n", ["--data", "{f}/missing.txt"], "no such file"),
        ("Go.\tVa !\n", ["--dataset", "gettext-fr", "--locale-dir", "{d}"], "no *.mo files"),
        ("Go.\tVa !\n", ["--data", "{f}", "--dim", "10", "--heads", "3"], "divisible"),
        ("Go.\tVa !\n", ["--data", "{f}", "--bdia", "--gammas", "0.3,-0.3"], "2^-m"),
        ("Go.\tVa !\n", ["--translate", "hello", "--out-dir", "{d}"], "no checkpoint"),
    ],
)
def test_bad_input_exits_with_code_2_and_says_what_to_do(tmp_path, capsys, content, argv, message):
    f = tmp_path / "pairs.txt"
    if content is not None:
        f.write_text(content)
    argv = [a.format(f=f, d=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        tt.main(argv + ["--device", "cpu"] + ([] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "out")]))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path, capsys):
    data = write_corpus(tmp_path / "pairs.txt")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        run_script("--data", data, "--out-dir", tmp_path / "o", "--resume", *TINY)
    assert e.value.code == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
