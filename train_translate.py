"""
English -> French translation with an encoder-decoder transformer, plain or with BDIA in
both the encoder and the decoder (paper 5.3, Fig. 5: validation loss per epoch).

    python train_translate.py --data eng-fra.txt                  # plain transformer
    python train_translate.py --data eng-fra.txt --bdia           # BDIA: gammas +-0.5, l = 9, reversible
    python train_translate.py --data eng_-french.csv --bdia       # the Kaggle CSV the paper used
    python train_translate.py --dataset eng-fra --bdia            # download the PyTorch tutorial's pairs
    python train_translate.py --dataset gettext-fr --bdia         # offline: this machine's French .mo files
    python train_translate.py --translate "Open the file"         # translate with OUT_DIR/ckpt.pt

Writes OUT_DIR/log.jsonl (one line per epoch: train_loss, val_loss, val_bleu, ...) and
OUT_DIR/ckpt.pt (atomic, after every epoch; --resume continues exactly).
"""

import argparse
import csv
import gettext
import random
import re
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import training
from bdia import BDIAConfig
from metrics import corpus_bleu
from models import Seq2Seq

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<bos>", "<eos>"
SPECIALS = (UNK, PAD, BOS, EOS)  # ids 0, 1, 2, 3
UNK_ID, PAD_ID, BOS_ID, EOS_ID = range(4)

# -----------------------------------------------------------------------------
# Sentence pairs: tab-separated files, the Kaggle CSV, gettext catalogues


class DataError(ValueError):
    """Unusable input data; the message says what is wrong and where."""


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
            except (OSError, UnicodeError) as e:  # gettext raises OSError for a bad .mo
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
    if dest.is_file():
        return dest
    archive = training.download(
        ENG_FRA_URL, Path(data_dir) / "data.zip",
        manual=f"download {ENG_FRA_URL}, unzip it and pass --data data/eng-fra.txt",
    )
    try:
        training.unzip_member(archive, "data/eng-fra.txt", dest)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{archive} has no readable data/eng-fra.txt ({e}); delete it and run again") from e
    return dest


def load_pairs(args):
    if args.dataset == "gettext-fr":
        pairs, where = read_gettext_pairs(args.locale_dir), args.locale_dir
    else:
        path = Path(args.data) if args.data else fetch_eng_fra(args.data_dir)
        if not path.is_file():
            raise DataError(f"--data {path}: no such file")
        pairs = read_csv_pairs(path) if path.suffix.lower() == ".csv" else read_tsv_pairs(path)
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
# Tokenizer and vocabulary

JOIN = "@@"  # marks a token written without a space before it: "don't." -> don @@' @@t @@.
TOKEN = re.compile(r"\w+|[^\w\s]")  # runs of letters/digits, and every other symbol alone


def tokenize(text, lowercase=True):
    """Word-level tokens: letter/digit runs and single punctuation marks. A token that was
    glued to the previous one gets the JOIN prefix, so detokenize() restores the text
    (with its whitespace collapsed to single spaces)."""
    if lowercase:
        text = text.lower()
    return [("" if m.start() == 0 or text[m.start() - 1].isspace() else JOIN) + m.group()
            for m in TOKEN.finditer(text)]


def detokenize(tokens):
    return "".join(t[len(JOIN):] if t.startswith(JOIN) else " " + t for t in tokens).strip()


def words(tokens):
    """Tokens without the JOIN marks: what BLEU counts."""
    return [t[len(JOIN):] if t.startswith(JOIN) else t for t in tokens]


class Vocab:
    """Token <-> id, specials first: <unk> 0, <pad> 1, <bos> 2, <eos> 3."""

    def __init__(self, itos):
        assert tuple(itos[:4]) == SPECIALS, "a vocabulary starts with <unk> <pad> <bos> <eos>"
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, token_lists, min_freq=1):
        """Tokens seen at least min_freq times, most frequent first (ties alphabetical)."""
        counts = Counter(t for tokens in token_lists for t in tokens)
        kept = sorted((t for t, c in counts.items() if c >= min_freq and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        return cls(list(SPECIALS) + kept)

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens):
        return [self.stoi.get(t, UNK_ID) for t in tokens]

    def decode(self, ids):
        """Tokens up to the first <eos>, without <pad>/<bos>."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(self.itos[i])
        return out


def encode_pairs(pairs, src_vocab, tgt_vocab, lowercase, max_tokens):
    """(source ids + <eos>, <bos> + target ids + <eos>), pairs longer than max_tokens dropped."""
    examples = []
    for english, french in pairs:
        src, tgt = tokenize(english, lowercase), tokenize(french, lowercase)
        if len(src) <= max_tokens and len(tgt) <= max_tokens:
            examples.append((src_vocab.encode(src) + [EOS_ID], [BOS_ID] + tgt_vocab.encode(tgt) + [EOS_ID]))
    return examples


def length_batches(examples, batch_size, generator=None, pool=50):
    """Length-bucketed batches: shuffle (when a generator is given), sort pools of
    pool * batch_size examples by length, cut them into batches, shuffle the batches."""
    n = len(examples)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    batches = []
    for start in range(0, n, pool * batch_size):
        chunk = sorted(order[start:start + pool * batch_size], key=lambda i: (len(examples[i][0]), len(examples[i][1])))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def collate(examples, batch, device):
    """Right-padded (src, tgt) LongTensors for the examples with indices `batch`."""
    def pad(seqs):
        out = torch.full((len(seqs), max(map(len, seqs))), PAD_ID, dtype=torch.long)
        for row, seq in enumerate(seqs):
            out[row, : len(seq)] = torch.tensor(seq)
        return out.to(device)

    return pad([examples[i][0] for i in batch]), pad([examples[i][1] for i in batch])


# -----------------------------------------------------------------------------
# Training and evaluation


def loss_of(model, src, tgt):
    """Teacher forcing: predict tgt[1:] from tgt[:-1]; padding is not scored."""
    logits = model(src, tgt[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten(), ignore_index=PAD_ID)


@torch.no_grad()
def validation_loss(model, examples, batch_size, device, amp):
    model.eval()
    total = tokens = 0
    for batch in length_batches(examples, batch_size):
        src, tgt = collate(examples, batch, device)
        with training.autocast(device, amp):
            n = int((tgt[:, 1:] != PAD_ID).sum())
            total += loss_of(model, src, tgt).item() * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def validation_bleu(model, examples, tgt_vocab, batch_size, device, amp, limit):
    """BLEU of greedy translations of the first `limit` validation pairs."""
    model.eval()
    examples = examples[:limit]
    hyps, refs = [], []
    for batch in length_batches(examples, batch_size):
        src, tgt = collate(examples, batch, device)
        with training.autocast(device, amp):
            out = model.greedy(src, BOS_ID, EOS_ID, max_new=min(tgt.shape[1] + 10, model.pos.shape[0] - 1))
        hyps += [words(tgt_vocab.decode(row)) for row in out.tolist()]
        refs += [words(tgt_vocab.decode(row)) for row in tgt.tolist()]
    return corpus_bleu(hyps, refs)


def model_args(args, src_vocab, tgt_vocab):
    return dict(src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), dim=args.dim, heads=args.heads,
                mlp_dim=args.mlp_dim, enc_layers=args.enc_layers, dec_layers=args.dec_layers,
                dropout=args.dropout, max_len=args.max_tokens + 2, pad_id=PAD_ID, tie=args.tie)


def bdia_dict(config):
    """A BDIAConfig as plain values (checkpoints load with weights_only=True)."""
    if config is None:
        return None
    return dict(gammas=list(config.gammas), bits=config.bits, reversible=config.reversible, eval_gamma=config.eval_gamma)


def train(args, parser):
    device = training.pick_device(args.device)
    config = training.bdia_config(args, parser)
    out = Path(args.out_dir)
    ckpt_path = out / "ckpt.pt"
    training.seed_everything(args.seed)
    train_pairs, val_pairs = split_pairs(load_pairs(args), args.val_fraction, args.max_pairs)
    ckpt = training.load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is not None:
        src_vocab, tgt_vocab, lowercase = Vocab(ckpt["src_vocab"]), Vocab(ckpt["tgt_vocab"]), ckpt["lowercase"]
        margs = ckpt["model_args"]
    else:
        lowercase = not args.keep_case
        src_vocab = Vocab.build((tokenize(e, lowercase) for e, _ in train_pairs), args.min_freq)
        tgt_vocab = Vocab.build((tokenize(f, lowercase) for _, f in train_pairs), args.min_freq)
        margs = model_args(args, src_vocab, tgt_vocab)
    max_tokens = margs["max_len"] - 2
    train_ex = encode_pairs(train_pairs, src_vocab, tgt_vocab, lowercase, max_tokens)
    val_ex = encode_pairs(val_pairs, src_vocab, tgt_vocab, lowercase, max_tokens)
    if not train_ex or not val_ex:
        raise DataError(f"{len(train_ex)} training and {len(val_ex)} validation pairs of at most "
                        f"{max_tokens} tokens: need at least one of each (more data or a larger --max-tokens)")

    model = Seq2Seq(**margs, bdia=config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
    start_epoch, step = 1, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        training.set_rng_state(ckpt["rng"])
    run_model = torch.compile(model) if args.compile else model
    log = training.JsonlLog(out / "log.jsonl", resume=args.resume)
    log.keep_only(lambda line: line["epoch"] < start_epoch)
    steps_per_epoch = len(length_batches(train_ex, args.batch_size))
    total_steps = args.epochs * steps_per_epoch
    mode = "plain" if config is None else f"bdia{'' if config.reversible else '-stored'}"
    print(f"{len(train_ex)} training / {len(val_ex)} validation pairs, vocab {len(src_vocab)} en / "
          f"{len(tgt_vocab)} fr, {training.count_params(model) / 1e6:.2f}M parameters, {mode}, {device}")

    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        t0, loss_sum = time.time(), 0.0
        batches = length_batches(train_ex, args.batch_size, torch.Generator().manual_seed(args.seed + epoch))
        for batch in tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", leave=False):
            lr = training.cosine_lr(step, total_steps, args.lr, args.warmup, args.min_lr) if args.cosine else args.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            src, tgt = collate(train_ex, batch, device)
            with training.autocast(device, args.amp):
                loss = loss_of(run_model, src, tgt)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, step = loss_sum + loss.item(), step + 1
        fields = dict(epoch=epoch, step=step, train_loss=loss_sum / len(batches),
                      val_loss=validation_loss(model, val_ex, args.batch_size, device, args.amp))
        if args.bleu_every and (epoch % args.bleu_every == 0 or epoch == args.epochs):
            fields["val_bleu"] = validation_bleu(model, val_ex, tgt_vocab, args.batch_size, device, args.amp,
                                                 args.bleu_samples)
        fields.update(lr=lr, seconds=round(time.time() - t0, 2), mode=mode,
                      peak_memory_mb=round(training.peak_memory_mb(device), 1))
        log.write(**fields)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()))
        training.save_checkpoint(ckpt_path, dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, step=step,
            rng=training.rng_state(), model_args=margs, bdia=bdia_dict(config), lowercase=lowercase,
            src_vocab=src_vocab.itos, tgt_vocab=tgt_vocab.itos,
        ))
    return model


def translate(args):
    """Print the beam-search (greedy for --beam 1) translation of --translate."""
    device = training.pick_device(args.device)
    ckpt = training.load_checkpoint(Path(args.checkpoint or Path(args.out_dir) / "ckpt.pt"), device)
    src_vocab, tgt_vocab = Vocab(ckpt["src_vocab"]), Vocab(ckpt["tgt_vocab"])
    config = BDIAConfig(**ckpt["bdia"]) if ckpt["bdia"] else None  # eq. (25) at inference
    model = Seq2Seq(**ckpt["model_args"], bdia=config).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    max_tokens = ckpt["model_args"]["max_len"] - 2
    tokens = tokenize(args.translate, ckpt["lowercase"])[:max_tokens]
    src = torch.tensor([src_vocab.encode(tokens) + [EOS_ID]], device=device)
    if args.beam == 1:
        ids = model.greedy(src, BOS_ID, EOS_ID, max_new=max_tokens + 1)[0].tolist()
    else:
        ids = model.beam_search(src, BOS_ID, EOS_ID, beam=args.beam, max_new=max_tokens + 1)
    print(detokenize(tgt_vocab.decode(ids)))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="pair file: English<TAB>French per line (eng-fra.txt), or a .csv (Kaggle eng_-french.csv)")
    g.add_argument("--dataset", choices=["eng-fra", "gettext-fr"], help="eng-fra: download the PyTorch tutorial's "
                   "eng-fra.txt to --data-dir; gettext-fr: the French gettext catalogues in --locale-dir")
    g.add_argument("--data-dir", default="data", help="where --dataset eng-fra is stored (default data)")
    g.add_argument("--locale-dir", default="/usr/share/locale/fr/LC_MESSAGES")
    g.add_argument("--max-pairs", type=int, default=0, help="use N pairs drawn with the split's fixed seed (0: all)")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--min-freq", type=int, default=1, help="rarer tokens become <unk>")
    g.add_argument("--max-tokens", type=int, default=40, help="drop pairs with a longer side")
    g.add_argument("--keep-case", action="store_true", help="do not lowercase")
    g = p.add_argument_group("model (defaults: the tutorial the paper used)")
    g.add_argument("--dim", type=int, default=192)
    g.add_argument("--heads", type=int, default=6)
    g.add_argument("--mlp-dim", type=int, default=192)
    g.add_argument("--enc-layers", type=int, default=6)
    g.add_argument("--dec-layers", type=int, default=6)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--tie", action="store_true", help="tie the output projection to the target embedding "
                   "(default: a separate Linear with bias, as the tutorial's generator)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=50, help="default 50, as the tutorial")
    g.add_argument("--batch-size", type=int, default=192, help="default 192, as the tutorial")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--cosine", action="store_true", help="warmup then cosine decay instead of a constant lr")
    g.add_argument("--warmup", type=int, default=0)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--bleu-every", type=int, default=1, help="BLEU every N epochs and at the end (0: never)")
    g.add_argument("--bleu-samples", type=int, default=1000, help="validation pairs decoded for BLEU")
    g = p.add_argument_group("translation")
    g.add_argument("--translate", metavar="TEXT", help="translate TEXT with the checkpoint and exit")
    g.add_argument("--checkpoint", help="default OUT_DIR/ckpt.pt")
    g.add_argument("--beam", type=int, default=4, help="beam size (1: greedy)")
    training.add_bdia_args(p)
    training.add_run_args(p, "out-translate")
    return p


def check_args(args, parser):
    if args.translate is not None:
        if args.beam < 1:
            parser.error("--beam must be at least 1")
        return
    if args.data and args.dataset:
        parser.error("give either --data PATH or --dataset NAME, not both")
    if not args.data and not args.dataset:
        parser.error("no data: give --data eng-fra.txt (or a .csv), --dataset eng-fra (download) or "
                     "--dataset gettext-fr (offline)")
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be between 0 and 1")
    for name in ("epochs", "batch_size", "max_tokens", "min_freq"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")


def main(argv=None):
    parser = build_parser()
    args = training.parse_args(parser, argv)
    check_args(args, parser)
    try:
        if args.translate is not None:
            return translate(args)
        return train(args, parser)
    except (DataError, FileNotFoundError, training.DownloadError, training.CheckpointError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
