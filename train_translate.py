"""
English -> French translation with an encoder-decoder transformer, plain or with BDIA in
both the encoder and the decoder (paper 5.3, Fig. 5: validation loss per epoch).

    python train_translate.py --data eng_-french.csv              # the Kaggle CSV the paper used
    python train_translate.py --data eng_-french.csv --bdia       # BDIA: gammas +-0.5, l = 9, reversible
    python train_translate.py --dataset eng-fra --bdia            # download the PyTorch tutorial's pairs
    python train_translate.py --dataset gettext-fr --bdia         # offline: this machine's French .mo files
    python train_translate.py --translate "Open the file"         # translate with OUT_DIR/ckpt.pt

A small run that finishes on a CPU in under a minute (timed on one quiet 2-core CPU; a busy
one takes longer; offline, this machine's French
gettext catalogues), its validation loss falling every epoch and its BLEU above 0 from epoch 3
or so (12.6 at epoch 8 where it was measured; the catalogues installed decide the pairs):

    python train_translate.py --dataset gettext-fr --max-pairs 6000 --max-tokens 12 --min-freq 2 --epochs 8 \\
        --lr 1e-3 --batch-size 64 --dim 64 --heads 4 --enc-layers 2 --dec-layers 2 --bleu-samples 300 --out-dir out/translate-small

Defaults are those of the tutorial the paper used (debuggercafe, "Language Translation using
PyTorch Transformer": width 192, 6 heads, MLP 192, dropout 0.1, Adam 1e-4, batch 192, an
output Linear with bias), with the paper's 6 + 6 blocks. Writes OUT_DIR/log.jsonl (one line
per epoch: train_loss, val_loss, val_bleu, ...) and OUT_DIR/ckpt.pt (atomic, after every
epoch; --resume continues exactly).
"""

import argparse
import math
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bdia import BDIAConfig
from models import Seq2Seq
from plumbing import data, runlib
from plumbing.metrics import corpus_bleu

SCRIPT = Path(__file__).name
UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<bos>", "<eos>"
SPECIALS = (UNK, PAD, BOS, EOS)  # ids 0, 1, 2, 3
UNK_ID, PAD_ID, BOS_ID, EOS_ID = range(4)

# -----------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    p = runlib.ArgumentParser(prog=SCRIPT, description=__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="pair file: English<TAB>French per line (eng-fra.txt), or a .csv (Kaggle eng_-french.csv)")
    g.add_argument("--dataset", choices=["eng-fra", "gettext-fr"], help="eng-fra: download the PyTorch tutorial's "
                   "eng-fra.txt to --data-dir; gettext-fr: the French gettext catalogues in --locale-dir (offline)")
    g.add_argument("--data-dir", default="data", help="where --dataset eng-fra is stored")
    g.add_argument("--locale-dir", default="/usr/share/locale/fr/LC_MESSAGES", help="--dataset gettext-fr's catalogues")
    g.add_argument("--max-pairs", type=int, default=0, help="use N pairs drawn with the split's fixed seed (0: all)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of the pairs held out for validation")
    g.add_argument("--min-freq", type=int, default=1, help="rarer tokens become <unk>")
    g.add_argument("--max-tokens", type=int, default=40, help="drop pairs with a longer side")
    g.add_argument("--keep-case", action="store_true", help="do not lowercase")
    g = p.add_argument_group("model (defaults: the tutorial the paper used, with 6 + 6 blocks)")
    for name, default, meaning in (("--dim", 192, "width of the residual stream"),
                                   ("--heads", 6, "attention heads"),
                                   ("--mlp-dim", 192, "hidden width of the MLP"),
                                   ("--enc-layers", 6, "encoder blocks"),
                                   ("--dec-layers", 6, "decoder blocks")):
        g.add_argument(name, type=int, default=default, help=meaning)
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in the blocks")
    g.add_argument("--tie", action="store_true", help="tie the output projection to the target embedding "
                   "(otherwise a separate Linear with bias, as the tutorial's generator)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=50, help="the tutorial's 50")
    g.add_argument("--batch-size", type=int, default=192, help="the tutorial's 192")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (Adam)")
    g.add_argument("--cosine", action="store_true", help="warmup then cosine decay instead of a constant lr")
    g.add_argument("--warmup", type=int, default=0, help="warm-up steps (with --cosine)")
    g.add_argument("--min-lr", type=float, default=0.0, help="the cosine's floor (with --cosine)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: none, as the "
                   "tutorial)")
    g.add_argument("--bleu-every", type=int, default=1, help="BLEU every N epochs and at the end (0: never)")
    g.add_argument("--bleu-samples", type=int, default=1000, help="validation pairs decoded for BLEU")
    g = p.add_argument_group("translation")
    g.add_argument("--translate", metavar="TEXT", help="translate TEXT with the checkpoint and exit")
    g.add_argument("--checkpoint", help="the checkpoint --translate uses (default OUT_DIR/ckpt.pt)")
    g.add_argument("--beam", type=int, default=4, help="beam size (1: greedy)")
    g = p.add_argument_group("BDIA (bdia.py; what they train: bdia_config below)")
    g.add_argument("--bdia", action="store_true", help="train the encoder and the decoder with BDIA (otherwise the "
                   "plain model)")
    g.add_argument("--gammas", nargs="+", action=runlib.Numbers, default=(-0.5, 0.5), metavar="G",
                   help="the values gamma_k is drawn from, uniformly, per sentence and block k >= 1 of each stack")
    g.add_argument("--bits", type=runlib.parse_bits, default=9, help="l: the residual streams are rounded to multiples "
                   "of 2^-l (Q_l, eq. 17), or 'none'; gammas of +-2^-m keep m side bits per element and block")
    g.add_argument("--no-reversible", action="store_true", help="store the activations instead of rebuilding them "
                   "in the backward pass (eq. 24)")
    g.add_argument("--eval-gamma", type=float, default=0.0, help="the constant gamma at inference (0: the standard "
                   "transformer, eq. 25)")
    p.add_run_flags(out_dir="out/translate")
    args = p.parse(argv, at_least_1=("epochs", "batch_size", "max_tokens", "min_freq", "beam", "dim", "heads",
                                     "mlp_dim", "enc_layers", "dec_layers"),
                   at_least_0=("max_pairs", "warmup", "bleu_every", "bleu_samples", "min_lr", "grad_clip"),
                   positive=("lr",), fractions=("dropout",))
    args.bdia_config = p.checked_config(bdia_config, args)  # None without --bdia; what cannot work: one line, exit 2
    if args.translate is not None:
        return args
    if args.data and args.dataset:
        p.error("give either --data PATH or --dataset NAME, not both")
    if not args.data and not args.dataset:
        p.error("no data: give --data eng-fra.txt (or a .csv), --dataset eng-fra (download) or "
                "--dataset gettext-fr (offline)")
    if not 0 < args.val_fraction < 1:
        p.error("--val-fraction must be between 0 and 1")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    return args


# -----------------------------------------------------------------------------
# Data: word-level tokens, a vocabulary per language, length-bucketed padded batches


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
# Model


def bdia_config(args):
    """What the BDIA flags train: the BDIAConfig that Seq2Seq(bdia=...) hands to bdia.run_blocks with its
    encoder's blocks and, separately, its decoder's (None without --bdia: the plain model). --bdia
    --gammas -0.25 0.25 --bits 9, for instance, trains both stacks by eq. (21): every sentence draws,
    for each block k >= 1, gamma_k = -1/4 or +1/4, the residual streams are rounded to multiples of
    2^-9 (eqs. 17-19), and the backward pass rebuilds each block's input by eq. (24) (2 side bits per
    element and block). Evaluation and decoding run eq. (25) with gamma = --eval-gamma, 0: the
    standard transformer on the 2^-9 grid. args: the flags, or those a checkpoint holds."""
    if not args.bdia:
        return None
    return BDIAConfig(gammas=args.gammas, bits=args.bits, reversible=not args.no_reversible, eval_gamma=args.eval_gamma)


def compiled(model, args):
    """--compile: torch.compile(model), for sentences of every length (dynamic: compiled once, not again for
    each length). With reversible --bdia each block of both stacks is compiled on its own too
    (block.compile(), as torchtitan does; the state_dict keys stay): bdia.run_blocks keeps the reversible
    stacks out of the model's graph, because a block's forward and its recomputation in the backward pass
    must run the same compiled code for eq. (24) to be exact. Compiling takes minutes on a CPU."""
    if not args.compile:
        return model
    if args.bdia_config is not None and args.bdia_config.reversible:
        for block in [*model.encoder, *model.decoder]:
            block.compile(dynamic=True)
    return torch.compile(model, dynamic=True)


def learning_rate(step, total_steps, args):
    """--cosine: linear warm-up for --warmup steps, then cosine decay from --lr to --min-lr at the last
    step; otherwise --lr throughout (the tutorial's)."""
    if not args.cosine:
        return args.lr
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def model_args(args, src_vocab, tgt_vocab):
    return dict(src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), dim=args.dim, heads=args.heads,
                mlp_dim=args.mlp_dim, enc_layers=args.enc_layers, dec_layers=args.dec_layers,
                dropout=args.dropout, max_len=args.max_tokens + 2, pad_id=PAD_ID, tie=args.tie)


# -----------------------------------------------------------------------------
# Training loop


def loss_of(model, src, tgt):
    """Teacher forcing: predict tgt[1:] from tgt[:-1]; padding is not scored."""
    logits = model(src, tgt[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten(), ignore_index=PAD_ID)


def train_epoch(model, optimizer, examples, args, epoch, step, total_steps, device, signals, stop_within, within=None):
    """One epoch over length-bucketed batches drawn with the (seed, epoch) generator.
    Returns (mean training loss, the last learning rate, the step count after it). Where a
    batch begins after a signal, stop_within(the point) saves the run and stops it; `within`
    (such a point) continues the epoch from there."""
    model.train()  # dropout on; with --bdia both stacks draw their gammas
    loss_sum, lr, first = 0.0, args.lr, 0
    if within is not None:  # a run stopped within this epoch: its place and its sum so far
        loss_sum, lr, first = within["loss_sum"], within["lr"], within["step"]
    # length-bucketed batches waste little on padding; their order comes from (seed, epoch)
    batches = length_batches(examples, args.batch_size, runlib.step_generator(args.seed, epoch))
    for i, batch in enumerate(tqdm(batches[first:], desc=f"epoch {epoch}/{args.epochs}", leave=False), first):
        if signals.received(device):
            stop_within(dict(epoch=epoch, step=i, steps=len(batches), batch=args.batch_size, loss_sum=loss_sum, lr=lr),
                        step)
        lr = learning_rate(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        src, tgt = collate(examples, batch, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            loss = loss_of(model, src, tgt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # BDIA: the encoder memory's gradient is summed over all decoder blocks
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        loss_sum, step = loss_sum + loss.item(), step + 1
    return loss_sum / len(batches), lr, step


# -----------------------------------------------------------------------------
# Evaluation and decoding (model.eval(): a BDIA model is the plain transformer here, eq. 25)


@torch.no_grad()
def validation_loss(model, examples, batch_size, device, amp):
    model.eval()
    total = tokens = 0
    for batch in length_batches(examples, batch_size):
        src, tgt = collate(examples, batch, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
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
    for batch in tqdm(length_batches(examples, batch_size), desc="BLEU: greedy decoding", leave=False):
        src, tgt = collate(examples, batch, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out = greedy(model, src, max_new=min(tgt.shape[1] + 10, model.pos.shape[0] - 1))
        hyps += [words(tgt_vocab.decode(row)) for row in out.tolist()]
        refs += [words(tgt_vocab.decode(row)) for row in tgt.tolist()]
    return corpus_bleu(hyps, refs)


@torch.no_grad()
def greedy(model, src, max_new=64):
    """Greedy decoding, encoder run once: (batch, <= max_new) ids, eos and after set to pad."""
    memory, mask = model.encode(src)
    out = torch.full((src.shape[0], 1), BOS_ID, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_new):
        next_id = model.decode(out, memory, mask)[:, -1].argmax(-1)
        next_id = next_id.masked_fill(done, PAD_ID)
        out = torch.cat([out, next_id[:, None]], dim=1)
        done |= next_id == EOS_ID
        if done.all():
            break
    return out[:, 1:].masked_fill(out[:, 1:] == EOS_ID, PAD_ID)


@torch.no_grad()
def beam_search(model, src, beam=4, max_new=64, length_penalty=1.0):
    """Beam search for one source sentence src (1, S), encoder run once. Returns the ids
    (without <bos>/<eos>) of the hypothesis with the best log-probability / length^penalty."""
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0 (got {length_penalty}): the early stop assumes that "
                         "a longer hypothesis cannot score better")
    memory, mask = model.encode(src)
    seqs = torch.full((1, 1), BOS_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(1, device=src.device)
    finished = []  # (normalised score, ids)
    for step in range(1, max_new + 1):
        n = seqs.shape[0]
        logp = model.decode(seqs, memory.expand(n, -1, -1), mask.expand(n, -1, -1, -1))[:, -1].log_softmax(-1)
        total = (scores[:, None] + logp).flatten()
        top, idx = total.topk(min(2 * beam, total.numel()))
        rows, ids = idx // logp.shape[1], idx % logp.shape[1]
        keep = []
        for score, row, tok in zip(top.tolist(), rows.tolist(), ids.tolist()):
            if tok == EOS_ID:
                finished.append((score / step**length_penalty, seqs[row, 1:].tolist()))
            elif len(keep) < beam:
                keep.append((score, row, tok))
        # An open hypothesis's sum only falls, so max_new**penalty bounds its final score.
        bound = max((s for s, _, _ in keep), default=float("-inf")) / max_new**length_penalty
        if not keep or (len(finished) >= beam and max(f[0] for f in finished) >= bound):
            break
        seqs = torch.cat([seqs[[r for _, r, _ in keep]], torch.tensor([[t] for _, _, t in keep], device=src.device)], 1)
        scores = torch.tensor([s for s, _, _ in keep], device=src.device)
    if not finished:  # nothing ended within max_new tokens: take the best open hypothesis
        finished = [(scores[0].item() / max_new**length_penalty, seqs[0, 1:].tolist())]
    return max(finished, key=lambda f: f[0])[1]


def translate(args):
    """Print the beam-search (greedy for --beam 1) translation of --translate."""
    device = torch.device(args.device)
    path = Path(args.checkpoint or Path(args.out_dir) / "ckpt.pt")
    ckpt = runlib.read_checkpoint(path, SCRIPT)
    src_vocab, tgt_vocab = Vocab(ckpt["src_vocab"]), Vocab(ckpt["tgt_vocab"])
    model = Seq2Seq(**ckpt["model_args"], bdia=bdia_config(argparse.Namespace(**ckpt["args"]))).to(device).eval()
    model.load_state_dict(ckpt["model"])
    max_tokens = ckpt["model_args"]["max_len"] - 2
    tokens = tokenize(args.translate, ckpt["lowercase"])[:max_tokens]
    src = torch.tensor([src_vocab.encode(tokens) + [EOS_ID]], device=device)
    if args.beam == 1:
        ids = greedy(model, src, max_new=max_tokens + 1)[0].tolist()
    else:
        ids = beam_search(model, src, beam=args.beam, max_new=max_tokens + 1)
    print(detokenize(tgt_vocab.decode(ids)) or "(the model translates this as nothing: it ends at once)")


# -----------------------------------------------------------------------------
# main: flags (with --resume the checkpoint's), data, model, the epochs (each logged and checkpointed)


def main(argv=None):
    args = None
    try:
        args = parse_args(argv)
        if args.translate is not None:
            return translate(args)
        with runlib.folder_lock(args.out_dir):  # one run per folder
            runlib.refuse_to_replace(args)  # without --resume or --overwrite, never over another run
            return train(args)
    except runlib.ERRORS as e:  # data, checkpoint, divergence, precision, out of memory, a failed write
        runlib.exit_with(e, SCRIPT)
    except (runlib.Stopped, KeyboardInterrupt) as e:  # Ctrl-C, SIGTERM
        runlib.exit_stopped(e, SCRIPT, args and args.out_dir)


def train(args):
    device, out = torch.device(args.device), Path(args.out_dir)
    ckpt = runlib.read_checkpoint(out / "ckpt.pt", SCRIPT) if args.resume else None  # before the data: fail fast
    torch.manual_seed(args.seed)
    print(f"reading the pairs of {args.data or args.dataset} ...", flush=True)
    pairs = data.load_pairs(args.data, args.dataset, args.data_dir, args.locale_dir)
    train_pairs, val_pairs = data.split_pairs(pairs, args.val_fraction, args.max_pairs)
    if ckpt is not None:  # the vocabularies of the run it continues
        src_vocab, tgt_vocab, lowercase = Vocab(ckpt["src_vocab"]), Vocab(ckpt["tgt_vocab"]), ckpt["lowercase"]
    else:
        lowercase = not args.keep_case
        src_vocab = Vocab.build((tokenize(e, lowercase) for e, _ in train_pairs), args.min_freq)
        tgt_vocab = Vocab.build((tokenize(f, lowercase) for _, f in train_pairs), args.min_freq)
    margs = model_args(args, src_vocab, tgt_vocab)
    train_ex = encode_pairs(train_pairs, src_vocab, tgt_vocab, lowercase, args.max_tokens)
    val_ex = encode_pairs(val_pairs, src_vocab, tgt_vocab, lowercase, args.max_tokens)
    if not train_ex or not val_ex:
        raise data.DataError(f"{len(train_ex)} training and {len(val_ex)} validation pairs of at most "
                             f"{args.max_tokens} tokens: need at least one of each (more data or a larger --max-tokens)")

    model = Seq2Seq(**margs, bdia=args.bdia_config).to(device)  # BDIA in both the encoder and the decoder
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)  # the tutorial's
    start_epoch, step = 1, 0
    if ckpt is not None:
        print(f"resuming {out / 'ckpt.pt'}, saved after {runlib.position(ckpt)}")
        runlib.restore(ckpt, model, optimizer)
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
    within = runlib.point_within(ckpt, args.batch_size)  # stopped by a signal within start_epoch
    train_model = compiled(model, args)
    log = runlib.JsonlLog(out / "log.jsonl", resume=args.resume, keep=lambda line: line["epoch"] < start_epoch)
    total_steps = args.epochs * len(length_batches(train_ex, args.batch_size))
    mode = "plain" if args.bdia_config is None else f"bdia{'' if args.bdia_config.reversible else '-stored'}"
    print(f"{len(train_ex)} training / {len(val_ex)} validation pairs, vocab {len(src_vocab)} en / "
          f"{len(tgt_vocab)} fr, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {mode}, {device}"
          + (f", epochs {start_epoch}..{args.epochs}" if start_epoch <= args.epochs else ""))
    if start_epoch > args.epochs:
        print(runlib.finished(out, start_epoch - 1, args.epochs, "epoch", "--epochs"))

    def save(epoch, step, within=None):  # the vocabularies travel with the weights: --translate and --resume need them
        runlib.save_checkpoint(out / "ckpt.pt", args, model=model.state_dict(), optimizer=optimizer.state_dict(),
                               epoch=epoch, step=step, within=within, model_args=margs, lowercase=lowercase,
                               src_vocab=src_vocab.itos, tgt_vocab=tgt_vocab.itos)

    def stop_within(point, step):  # a signal came: save this point of the epoch, and stop
        save(point["epoch"] - 1, step, point)
        signals.stop(runlib.position(dict(within=point)))

    with runlib.Signals() as signals:  # Ctrl-C, SIGTERM: the step ends, the run is saved there, it stops
        for epoch in range(start_epoch, args.epochs + 1):
            t0 = time.time()
            with runlib.at(f"epoch {epoch}", out):  # an error names this epoch and the intact checkpoint before it
                train_loss, lr, step = train_epoch(train_model, optimizer, train_ex, args, epoch, step, total_steps, device,
                                                   signals, stop_within, within if epoch == start_epoch else None)
                runlib.check_loss(train_loss)  # NaN: stop before a diverged state is logged or saved
                fields = dict(epoch=epoch, step=step, train_loss=train_loss,
                              val_loss=validation_loss(model, val_ex, args.batch_size, device, args.amp))
                if args.bleu_every and (epoch % args.bleu_every == 0 or epoch == args.epochs):
                    fields["val_bleu"] = validation_bleu(model, val_ex, tgt_vocab, args.batch_size, device, args.amp,
                                                         args.bleu_samples)
            fields.update(lr=lr, seconds=round(time.time() - t0, 2), mode=mode,
                          peak_memory_mb=round(runlib.peak_memory_mb(device), 1), device=device.type)
            log.write(**fields)  # Fig. 5 plots these: train and validation loss per epoch
            bleu = f", val BLEU {fields['val_bleu']:.2f}" if "val_bleu" in fields else ""
            print(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {fields['val_loss']:.4f}{bleu}, "
                  f"{fields['seconds']:.1f} s")
            save(epoch, step)
    return model


if __name__ == "__main__":
    main()
