"""
Fine-tuning pretrained GPT-2 on the E2E NLG Challenge, plainly, with BDIA, with LoRA, or
with LoRA and BDIA (paper 5.1, Table 1; Appendix E, Table 6).

    python finetune_e2e.py --init-from gpt2-medium --out-dir out/e2e-ft                # FT
    python finetune_e2e.py --init-from gpt2-medium --bdia --out-dir out/e2e-ft-bdia   # FT-BDIA
    python finetune_e2e.py --lora-rank 4 --lora-alpha 32 --out-dir out/e2e-lora       # LoRA
    python finetune_e2e.py --lora-rank 32 --lora-alpha 1024 --bdia --gammas -0.5 0 0.5 \\
        --bits none --no-reversible --out-dir out/e2e-lora-bdia                         # LoRA+BDIA
    python finetune_e2e.py --table out/e2e-ft out/e2e-ft-bdia out/e2e-lora             # Table 1
    torchrun --nproc_per_node=2 finetune_e2e.py --init-from gpt2-large --bdia --fsdp   # sharded (FSDP2)

A small run meant to finish on a CPU in under a minute once GPT-2 small (about 550 MB) and the
E2E CSVs are downloaded (not timed: the machine this was written on is offline; the tests run
the same steps on a tiny local GPT-2):

    python finetune_e2e.py --init-from gpt2 --lora-rank 4 --train-limit 64 --valid-limit 16 --test-limit 4 \\
        --epochs 1 --lr 1e-3 --warmup-steps 0 --eval-interval 4 --beam 2 --out-dir out/e2e-small

Each example is `context <eos> completion <eos>` (GPT-2 BPE), the loss (label smoothing
0.1) on the completion only. After training, beam search (beam 10, length penalty 0.8,
no-repeat-ngram 4, at most 64 tokens, KV cache) decodes each distinct test context and
metrics.py scores it against all its references: OUT_DIR/predictions.txt and
OUT_DIR/references.txt (in the format of the E2E challenge's measure_scores.py, which adds
METEOR), OUT_DIR/e2e_scores.json and a table in Table 1's layout. OUT_DIR/log.jsonl gets a
line every --eval-interval steps and per epoch; OUT_DIR/ckpt.pt (the trainable weights,
optimizer, RNG) is written atomically after each epoch; --resume continues from there.
--export DIR writes the fine-tuned model (LoRA merged) as a standard Hugging Face GPT-2
checkpoint.

With --fsdp under torchrun, N processes train as one with N times --batch-size, each keeping
1/N of the parameters, gradients and optimizer state (FSDP2); the checkpoint is the unsharded
model's (it resumes with or without --fsdp); after training rank 0 alone exports and decodes.
"""

import gc
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import gpt2
from bdia import BDIAConfig
from plumbing import data, gpt2_files, metrics, runlib
from plumbing.distributed import Dist, distributed, shard_model, unsharded_states

SCRIPT = Path(__file__).name
SINGLE = Dist(0, 1, 0, False)  # one process, no torchrun
PAD_ID = 0  # padding follows each example's end: the scored positions of a causal model never see it

# -----------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    p = runlib.ArgumentParser(prog=SCRIPT, description=__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--init-from", default="gpt2-medium",
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (hub) or a folder/file with model.safetensors "
                        "or pytorch_model.bin and config.json")
    g.add_argument("--tokenizer", default=None, help="folder with encoder.json+vocab.bpe or vocab.json+merges.txt "
                                                     "(None: that of --init-from)")
    g.add_argument("--cache-dir", default=gpt2_files.DEFAULT_CACHE, help="where hub downloads are kept")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the blocks")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=32, help="LoRA scale alpha (the update is alpha/rank B A)")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the adapters' input")
    g.add_argument("--lora-mlp", action="store_true", help="adapters on the MLP too (otherwise query and value only)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/e2e", help="E2E CSVs (downloaded when missing) or the LoRA repo's *.txt")
    g.add_argument("--train-file", help="instead of --data-dir's training file")
    g.add_argument("--valid-file", help="instead of --data-dir's validation file")
    g.add_argument("--test-file", help="instead of --data-dir's test file")
    g.add_argument("--max-seq-len", type=int, default=512, help="tokens per example at most")
    g.add_argument("--train-limit", type=int, default=0, help="use the first N training examples (0: all)")
    g.add_argument("--valid-limit", type=int, default=0, help="use the first N validation examples (0: all)")
    g.add_argument("--test-limit", type=int, default=0, help="decode the first N distinct test contexts (0: all)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="the LoRA repository's 5")
    g.add_argument("--batch-size", type=int, default=8, help="examples per step")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW, linear schedule)")
    g.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.01, help="on the 2-D weights only")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="of the training loss")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: none)")
    g.add_argument("--eval-interval", type=int, default=2000,
                   help="validation loss every N steps, as the LoRA repository (0: once per epoch)")
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int, default=10, help="beam size")
    g.add_argument("--length-penalty", type=float, default=0.8, help="score / length^penalty")
    g.add_argument("--no-repeat-ngram", type=int, default=4, help="ban repeating n-grams of this length (0: none)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens per output at most")
    g.add_argument("--decode-batch", type=int, default=10, help="contexts per beam-search batch")
    g.add_argument("--no-test", action="store_true", help="skip decoding and scoring")
    p.add_argument("--export", metavar="DIR", help="write the fine-tuned model (LoRA merged) as an HF GPT-2 checkpoint")
    p.add_argument("--table", nargs="+", metavar="OUT_DIR", help="print Table 1 from these runs' e2e_scores.json and exit")
    g = p.add_argument_group("BDIA (bdia.py; what they train: bdia_config below)")
    g.add_argument("--bdia", action="store_true", help="fine-tune GPT-2 with BDIA: FT-BDIA, or LoRA+BDIA with "
                   "--lora-rank (otherwise FT or LoRA)")
    g.add_argument("--gammas", nargs="+", action=runlib.Numbers, default=(-0.5, 0.5), metavar="G",
                   help="the values gamma_k is drawn from, uniformly, per example and block k >= 1")
    g.add_argument("--bits", type=runlib.parse_bits, default=9, help="l: the residual stream is rounded to multiples of "
                   "2^-l (Q_l, eq. 17), or 'none'; gammas of +-2^-m keep m side bits per element and block")
    g.add_argument("--no-reversible", action="store_true", help="store the activations instead of rebuilding them "
                   "in the backward pass (eq. 24)")
    g.add_argument("--eval-gamma", type=float, default=0.0, help="the constant gamma at inference (0: the standard "
                   "GPT-2, eq. 25)")
    p.add_run_flags(out_dir="out/e2e", fsdp=True)
    args = p.parse(argv, at_least_1=("epochs", "batch_size", "beam", "max_new_tokens", "decode_batch", "max_seq_len"),
                   at_least_0=("lora_rank", "warmup_steps", "train_limit", "valid_limit", "test_limit",
                               "no_repeat_ngram", "length_penalty", "eval_interval", "weight_decay", "grad_clip"),
                   positive=("lr",), fractions=("dropout", "lora_dropout", "label_smoothing"))
    args.bdia_config = p.checked_config(bdia_config, args)  # None without --bdia; what cannot work: one line, exit 2
    if "RANK" in os.environ and not args.fsdp and not args.table:  # else every process would run the whole job
        p.error("under torchrun finetune_e2e.py trains with --fsdp only: add --fsdp, or run it without torchrun")
    return args


# -----------------------------------------------------------------------------
# Data: `context <eos> completion <eos>` token ids, the loss on the completion only


def load_examples(args, tok, block_size):
    """{split: pairs} of the data files, and the encoded training and validation examples."""
    splits = {k: data.read_e2e_pairs(v) for k, v in
              data.e2e_files(args.data_dir, args.train_file, args.valid_file, args.test_file).items()}

    def encode(pairs, limit):
        examples = [encode_example(tok, c, r, min(args.max_seq_len, block_size)) for c, r in (pairs[:limit] if limit else pairs)]
        scored = [(ids, n_ctx) for ids, n_ctx in examples if n_ctx < len(ids)]  # some completion token left
        if len(scored) < len(examples):
            print(f"dropped {len(examples) - len(scored)} examples whose context fills --max-seq-len {args.max_seq_len}")
        return scored

    train, valid = encode(splits["train"], args.train_limit), encode(splits["valid"], args.valid_limit)
    if not train or not valid:
        raise data.DataError(f"{len(train)} training and {len(valid)} validation examples leave a completion "
                             f"token within --max-seq-len {args.max_seq_len}: need at least one of each")
    return splits, train, valid


def encode_example(tok, context, completion, max_len):
    """ids of `context <eos> completion <eos>` cut to max_len + 1, and how many are context."""
    ctx = tok.encode(context) + [tok.eos_id]
    ids = ctx + tok.encode(" " + completion) + [tok.eos_id]
    return ids[: max_len + 1], len(ctx)


def batches(examples, batch_size, generator=None):
    """Index lists of batch_size examples: shuffled with generator, in order without."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else list(range(len(examples)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples, batch, device):
    """x (inputs) and y (next tokens; -1 on the context, so only the completion is scored)."""
    T = max(len(examples[i][0]) for i in batch) - 1
    x = torch.full((len(batch), T), PAD_ID, dtype=torch.long)
    y = torch.full((len(batch), T), -1, dtype=torch.long)
    for row, i in enumerate(batch):
        ids, n_ctx = examples[i]
        x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[row, n_ctx - 1: len(ids) - 1] = torch.tensor(ids[n_ctx:])
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Model and optimizer


def bdia_config(args):
    """What the BDIA flags train: the BDIAConfig that gpt2.from_pretrained(bdia=...) gives the GPT, whose
    forward hands it to bdia.run_blocks with its blocks (None without --bdia: plain fine-tuning).
    --bdia --gammas -0.25 0.25 --bits 9, for instance, fine-tunes GPT-2's blocks by eq. (21): every
    example draws, for each block k >= 1, gamma_k = -1/4 or +1/4, the residual stream is rounded to
    multiples of 2^-9 (eqs. 17-19), and the backward pass rebuilds each block's input by eq. (24) (2
    side bits per element and block), LoRA or not. Validation and decoding run eq. (25) with gamma =
    --eval-gamma, 0: the standard GPT-2 on the 2^-9 grid; --export writes the plain GPT-2."""
    if not args.bdia:
        return None
    return BDIAConfig(gammas=args.gammas, bits=args.bits, reversible=not args.no_reversible, eval_gamma=args.eval_gamma)


def compiled(model, args):
    """--compile: torch.compile(model). With reversible --bdia each block is compiled on its own too
    (block.compile(), as torchtitan does, before --fsdp shards them; the state_dict keys stay):
    bdia.run_blocks keeps the reversible stack out of the model's graph, because a block's forward and its
    recomputation in the backward pass must run the same compiled code for eq. (24) to be exact.
    Compiling takes minutes on a CPU."""
    if not args.compile:
        return model
    if args.bdia_config is not None and args.bdia_config.reversible:
        for block in model.transformer.h:
            block.compile()
    return torch.compile(model)


def build_model(args, device):
    """GPT-2 from --init-from, with LoRA adapters when --lora-rank > 0 (base frozen)."""
    try:
        model = gpt2.from_pretrained(args.init_from, cache_dir=args.cache_dir, dropout=args.dropout, bdia=args.bdia_config)
    except (ValueError, KeyError) as e:  # a config.json that is not JSON (a ValueError) or lacks n_layer, ...
        raise data.DataError(f"cannot load --init-from {args.init_from}: its config.json or weights are not "
                             f"GPT-2's ({type(e).__name__}: {e})") from e
    if args.lora_rank:
        gpt2.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, mlp=args.lora_mlp)
    return model.to(device)


def frozen_weights_sha256(model):
    """SHA-256 of the weights that are not trained (with LoRA: the base model's; None when every
    weight trains). A LoRA checkpoint holds only the adapters, so --resume compares this to tell
    whether --init-from is still the base they were trained on (it may move, not change)."""
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    digest = hashlib.sha256()
    for name, p in frozen:
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def check_base_model(ckpt, frozen_sha256, args, out):
    """Refuse to continue adapters on weights other than those they were trained on."""
    if frozen_sha256 is None or ckpt.get("frozen_sha256") == frozen_sha256:
        return
    why = ("it was written before checkpoints kept the base model's SHA-256" if "frozen_sha256" not in ckpt
           else "the frozen weights differ")
    raise runlib.CheckpointError(f"cannot tell that the run in {out} was trained on the base model --init-from "
                                 f"{args.init_from} ({why}): resume with that run's base model, or start a new run "
                                 "in another --out-dir")


def configure_optimizer(model, args):
    """AdamW (betas 0.9, 0.999, eps 1e-6) over the trainable parameters: weight decay on the 2-D weights
    (matmuls, embeddings, adapters) only, none on biases and LayerNorm gains (as the LoRA repository)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-6)


def learning_rate(step, total_steps, args):
    """Linear warm-up for --warmup-steps steps, then linear decay to 0 at the last step (the LoRA repository's)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - args.warmup_steps))


def trainable_state(model):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def mode_name(args):
    return ("LoRA" if args.lora_rank else "FT") + (("+BDIA" if args.lora_rank else "-BDIA") if args.bdia else "")


# -----------------------------------------------------------------------------
# Training loop


def loss_on(model, x, y, label_smoothing, reduction="mean"):
    logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, label_smoothing=label_smoothing,
                           reduction=reduction)


def completion_tokens(examples, batch):
    return sum(len(examples[i][0]) - examples[i][1] for i in batch)


def share(examples, batch, dist, device):
    """--fsdp: this process's part of a global batch (x, y) and the weight of its summed loss
    (N / the global batch's completion tokens), so that FSDP's average over the N processes is
    the gradient of the global batch's mean loss. A process whose part is empty (the epoch's
    last batch) runs the first example with weight 0: every process must run each forward."""
    part = batch[dist.rank * len(batch) // dist.world_size: (dist.rank + 1) * len(batch) // dist.world_size]
    weight = dist.world_size / completion_tokens(examples, batch)
    return (*collate(examples, part or batch[:1], device), weight if part else 0.0)


def train_epoch(model, train_model, optimizer, examples, args, epoch, log, evaluate_now, signals, stop_within,
                within=None, dist=SINGLE):
    """One epoch, batches drawn with the (seed, epoch) generator; the learning rate follows the
    LoRA repository's linear schedule over all steps. Every --eval-interval steps a point of
    the validation curve is logged (Fig. 3, 8); returns (loss since the last point, lr, seconds, tokens).
    Under --fsdp a step's batch is N times --batch-size, each process training on its part.
    Where a step begins after a signal, stop_within(the point) saves the run and stops it;
    `within` (such a point) continues the epoch from there."""
    global_batch = args.batch_size * dist.world_size
    steps_per_epoch = math.ceil(len(examples) / global_batch)
    total_steps, t0, tokens, since, first, lr = steps_per_epoch * args.epochs, time.perf_counter(), 0, [], 0, args.lr
    if within is not None:  # a run stopped within this epoch: its place and its sums so far
        t0, tokens, since, first, lr = t0 - within["seconds"], within["tokens"], within["since"], within["step"], within["lr"]
    epoch_batches = batches(examples, global_batch, runlib.step_generator(args.seed, epoch))
    bar = tqdm(epoch_batches[first:], desc=f"epoch {epoch}/{args.epochs}", dynamic_ncols=True, disable=dist.rank != 0,
               initial=first, total=len(epoch_batches))
    device = model.transformer.wte.weight.device
    model.train()
    for i, batch in enumerate(bar, first):
        if signals.received(device):
            stop_within(dict(epoch=epoch, step=i, steps=len(epoch_batches), batch=global_batch, since=since, lr=lr,
                             tokens=tokens, seconds=time.perf_counter() - t0))
        step = (epoch - 1) * steps_per_epoch + i
        lr = learning_rate(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, weight = share(examples, batch, dist, device) if dist.enabled else (*collate(examples, batch, device), None)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
            if weight is None:
                loss = loss_on(train_model, x, y, args.label_smoothing)
            else:  # --fsdp: this part's share of the global batch's mean loss, times N
                loss = loss_on(train_model, x, y, args.label_smoothing, reduction="sum") * weight
        loss.backward()  # with LoRA the stack's input needs no grad: the reversible backward still runs
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if weight is None:
            since.append(loss.item())
            tokens += x.numel()
        else:  # the global batch's mean loss and its tokens, over the processes
            totals = torch.stack([loss.detach() / dist.world_size, torch.tensor(x.numel() * float(weight > 0), device=device)])
            torch.distributed.all_reduce(totals)
            since.append(totals[0].item())
            tokens += int(totals[1].item())
        bar.set_postfix(loss=f"{since[-1]:.4f}", lr=f"{lr:.2e}")
        if args.eval_interval and (step + 1) % args.eval_interval == 0 and i + 1 < len(epoch_batches):
            # a point within the epoch; `epoch` is fractional, so a resumed run drops it with its epoch
            runlib.check_loss(sum(since) / len(since))  # NaN: stop before it is logged
            val_loss = evaluate_now()
            if log is not None:
                log.write(epoch=(step + 1) / steps_per_epoch, step=step + 1, train_loss=sum(since) / len(since),
                          val_loss=val_loss, lr=lr, mode=mode_name(args), device=x.device.type)
            since = []
    return sum(since) / len(since), lr, time.perf_counter() - t0, tokens


@torch.no_grad()
def validation_loss(model, examples, args, dist=SINGLE):
    """Mean cross-entropy per completion token (no label smoothing; gamma 0: the plain model).
    Under --fsdp each process scores its part of each N times --batch-size examples."""
    model.eval()
    total = tokens = 0
    device = model.transformer.wte.weight.device
    for batch in tqdm(batches(examples, args.batch_size * dist.world_size), desc="validation loss", leave=False,
                      dynamic_ncols=True, disable=dist.rank != 0):
        if dist.enabled:
            x, y, weight = share(examples, batch, dist, device)
            with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
                total += loss_on(model, x, y, 0.0, reduction="sum") * float(weight > 0)
            tokens += completion_tokens(examples, batch)
            continue
        x, y = collate(examples, batch, device)
        n = int((y != -1).sum())
        with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
            total += loss_on(model, x, y, 0.0).item() * n
        tokens += n
    if dist.enabled:  # the parts' sums, over all processes
        total = total.detach().clone()
        torch.distributed.all_reduce(total)
        total = total.item()
    model.train()
    return total / max(tokens, 1)


# -----------------------------------------------------------------------------
# Evaluation: beam search (eq. 25 at inference) and the E2E metrics


@torch.no_grad()
def decode(model, tok, contexts, args, device):
    """Beam search for every context; contexts of one token length share a batch."""
    model.eval()
    encoded = [tok.encode(c) + [tok.eos_id] for c in contexts]
    by_length = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    groups = [g[j:j + args.decode_batch] for g in by_length.values() for j in range(0, len(g), args.decode_batch)]
    longest = max(by_length)
    if longest + args.max_new_tokens > model.block_size:
        raise data.DataError(f"a test context of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the "
                        f"model's {model.block_size} positions")
    hypotheses = [None] * len(contexts)
    for group in tqdm(groups, desc="beam search", dynamic_ncols=True):
        idx = torch.tensor([encoded[i] for i in group], device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            outs, _ = gpt2.beam_search(model, idx, tok.eos_id, args.beam, args.max_new_tokens, args.length_penalty,
                                       args.no_repeat_ngram)
        for i, ids in zip(group, outs):
            hypotheses[i] = tok.decode(ids).strip()
    return hypotheses


def evaluate(args, model, tok, test_pairs, device):
    """Decode the distinct test contexts, score them, write predictions and e2e_scores.json."""
    out = Path(args.out_dir)
    grouped = data.group_references(test_pairs)
    if args.test_limit:
        grouped = grouped[: args.test_limit]
    contexts, references = [c for c, _ in grouped], [r for _, r in grouped]
    t0 = time.perf_counter()
    hypotheses = decode(model, tok, contexts, args, device)
    seconds = time.perf_counter() - t0
    scores = metrics.e2e_scores(hypotheses, references)
    # The E2E challenge's measure_scores.py format: one output per MR; the references of each MR
    # on consecutive lines, an empty line between MRs (both files in the same MR order)
    write_text(out / "predictions.txt", "".join(h + "\n" for h in hypotheses))
    write_text(out / "references.txt", "\n".join("".join(r + "\n" for r in refs) for refs in references))
    result = dict(mode=mode_name(args), scores=scores, contexts=len(contexts), references=sum(map(len, references)),
                  decode_seconds=seconds, beam=args.beam, length_penalty=args.length_penalty,
                  no_repeat_ngram=args.no_repeat_ngram, max_new_tokens=args.max_new_tokens,
                  init_from=str(args.init_from), note="METEOR not computed (needs Java and WordNet)")
    write_text(out / "e2e_scores.json", json.dumps(result, indent=2))
    print(format_table([result]))
    return result


def write_text(path, text):
    """UTF-8 text, atomically (a full disk is an OSError that names the file)."""
    data.atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def format_table(results):
    """Table 1's layout: BLEU and ROUGE-L in percent, NIST and CIDEr as they are, METEOR '-'."""
    lines = [f"{'Method':<12} {'BLEU':>6} {'NIST':>6} {'MET':>6} {'ROUGE-L':>8} {'CIDEr':>6}"]
    for r in results:
        s = r["scores"]
        lines.append(f"{r['mode']:<12} {s['BLEU']:>6.1f} {s['NIST']:>6.2f} {'-':>6} {s['ROUGE-L']:>8.1f} {s['CIDEr']:>6.2f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# main: build, resume, the epochs (each logged and checkpointed), export, decode and score


def main(argv=None):
    args = None
    try:
        args = parse_args(argv)
        if args.table:
            return print_table(args.table)
        with runlib.folder_lock(args.out_dir):  # one run per folder
            runlib.refuse_to_replace(args)  # without --resume or --overwrite, never over another run
            train(args)
    except runlib.ERRORS as e:  # data, checkpoint, divergence, precision, out of memory, a failed write
        runlib.exit_with(e, SCRIPT)
    except (runlib.Stopped, KeyboardInterrupt) as e:  # Ctrl-C, SIGTERM
        runlib.exit_stopped(e, SCRIPT, args and args.out_dir)


def print_table(folders):
    results = []
    for folder in folders:
        path = Path(folder) / "e2e_scores.json"
        if not path.is_file():
            raise data.DataError(f"no {path}: run finetune_e2e.py with --out-dir {folder} first")
        try:
            results.append(json.loads(path.read_text()))
            format_table(results[-1:])  # has what evaluate() writes: mode and scores
        except (ValueError, KeyError, TypeError) as e:  # not JSON, or not what evaluate() writes
            raise data.DataError(f"{path} is not an e2e_scores.json of finetune_e2e.py ({type(e).__name__}: {e})") from e
    print(format_table(results))


def train(args):
    dist = distributed(args.device) if args.fsdp else SINGLE
    device = torch.device("cuda", dist.local_rank) if dist.enabled and args.device == "cuda" else torch.device(args.device)
    out, main_process = Path(args.out_dir), dist.rank == 0
    ckpt = runlib.read_checkpoint(out / "ckpt.pt", SCRIPT) if args.resume else None  # before the data: fail fast
    torch.manual_seed(args.seed + dist.rank)  # --fsdp: rank 0's adapters are broadcast; dropout and gammas differ
    if Path(args.init_from).is_dir() and (missing := gpt2_files.missing_files(args.init_from, tokenizer=not args.tokenizer)):
        raise data.DataError(f"--init-from {args.init_from} lacks {gpt2_files.and_list(missing)}: put {'it' if len(missing) == 1 else 'them'} "
                             "there" + (" (--tokenizer DIR may give the tokenizer's)" if not args.tokenizer else ""))
    try:
        tok = gpt2_files.load_tokenizer(args.tokenizer or args.init_from, args.cache_dir)
    except ValueError as e:  # a vocabulary that is not JSON, or not UTF-8
        raise data.DataError(f"cannot read the tokenizer of {args.tokenizer or args.init_from} ({e})") from e
    if tok.eos_id is None:
        raise data.DataError("the tokenizer's vocabulary has no <|endoftext|> token")
    model = build_model(args, device)  # BDIA enters here: gpt2.from_pretrained(..., bdia=args.bdia_config)
    frozen_sha256 = frozen_weights_sha256(model)
    if ckpt is not None:  # before the data is read
        check_base_model(ckpt, frozen_sha256, args, out)
    if tok.vocab_size > model.model_args["vocab_size"]:
        raise data.DataError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.model_args['vocab_size']}")
    splits, train_ex, valid_ex = load_examples(args, tok, model.block_size)
    optimizer = configure_optimizer(model, args)
    start_epoch = 1
    if ckpt is not None:  # only the trainable weights are in the checkpoint (the adapters, with LoRA)
        if main_process:
            print(f"resuming {out / 'ckpt.pt'}, saved after {runlib.position(ckpt)}")
        runlib.restore(ckpt, model, optimizer, rank=dist.rank)
        start_epoch = ckpt["epoch"] + 1
    within = runlib.point_within(ckpt, args.batch_size * dist.world_size)  # stopped by a signal within start_epoch
    if args.fsdp:  # loaded whole; now each process keeps its shards
        optimizer = shard_model(model, model.transformer.h, optimizer, lambda m: configure_optimizer(m, args))
    train_model = compiled(model, args)
    # points within an epoch have a fractional epoch: those after the checkpoint's point are dropped
    done = (start_epoch - 1) * within["steps"] + within["step"] if within else 0  # steps before a point within

    def keep(line):
        return line["epoch"] <= start_epoch - 1 or (within is not None and line["step"] <= done)

    log = runlib.JsonlLog(out / "log.jsonl", resume=args.resume, keep=keep) if main_process else None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if main_process:
        print(f"{mode_name(args)}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({n_train / 1e6:.3f}M trained), {len(train_ex)} training examples, {dist.world_size} process(es) on "
              f"{device}" + (f", epochs {start_epoch}..{args.epochs}" if start_epoch <= args.epochs else ""))
        if start_epoch > args.epochs:
            print(runlib.finished(out, start_epoch - 1, args.epochs, "epoch", "--epochs"))

    trained = {n for n, p in model.named_parameters() if p.requires_grad}

    def save(epoch, within=None):  # the trained weights: every process gives its shards and RNG; rank 0 writes
        if args.fsdp:
            weights, optimizer_state = unsharded_states(model, optimizer, keep=main_process, names=trained)
            rngs = [None] * dist.world_size  # every process's RNG goes into the one checkpoint
            torch.distributed.all_gather_object(rngs, runlib.random_states())
        else:
            weights, optimizer_state, rngs = trainable_state(model), optimizer.state_dict(), runlib.random_states()
        if main_process:
            runlib.save_checkpoint(out / "ckpt.pt", args, model=weights, optimizer=optimizer_state, rng=rngs,
                                   epoch=epoch, within=within, frozen_sha256=frozen_sha256)

    def stop_within(point):  # a signal came: save this point of the epoch, and stop
        save(point["epoch"] - 1, point)
        signals.stop(runlib.position(dict(within=point)))

    with runlib.Signals() as signals:  # Ctrl-C, SIGTERM: the step ends, the run is saved there, it stops
        for epoch in range(start_epoch, args.epochs + 1):
            with runlib.at(f"epoch {epoch}", out):  # an error names this epoch and the intact checkpoint before it
                train_loss, lr, seconds, tokens = train_epoch(
                    model, train_model, optimizer, train_ex, args, epoch, log, lambda: validation_loss(model, valid_ex, args, dist),
                    signals, stop_within, within if epoch == start_epoch else None, dist)
                runlib.check_loss(train_loss)  # NaN: stop before a diverged state is logged or saved
                val_loss = validation_loss(model, valid_ex, args, dist)
            if main_process:
                steps = math.ceil(len(train_ex) / (args.batch_size * dist.world_size))
                log.write(epoch=epoch, step=epoch * steps, train_loss=train_loss, val_loss=val_loss, lr=lr, seconds=seconds,
                          tokens_per_s=tokens / seconds, mode=mode_name(args), peak_memory_mb=runlib.peak_memory_mb(device),
                          device=device.type)
                print(f"epoch {epoch}: train loss {train_loss:.4f} (label smoothing {args.label_smoothing}), "
                      f"val loss {val_loss:.4f}, {seconds:.1f} s")
            save(epoch)
    if args.fsdp:
        model = unsharded_model(model, args, device, main_process, needed=bool(args.export or not args.no_test))
        if model is None:
            return
    if args.export:
        gpt2.save_pretrained(model, args.export)
        print(f"exported to {args.export} (model.safetensors + config.json, Hugging Face GPT-2 layout)")
    if not args.no_test:
        evaluate(args, model, tok, splits["test"], device)


def unsharded_model(model, args, device, main_process, needed):
    """--fsdp after training: the whole model on rank 0, as a plain GPT-2 to export and decode
    (beam search runs a varying number of forwards, which sharded processes cannot share); the
    process group ends here, so that no process waits on rank 0's decoding. None elsewhere."""
    weights = unsharded_states(model, None, keep=main_process)[0] if needed else None
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if not main_process or not needed:
        return None
    plain = build_model(args, device)
    plain.load_state_dict(weights)
    return plain


if __name__ == "__main__":
    main()
    gc.collect()  # --fsdp: the sharded model lives in reference cycles; freed now, not as Python exits (seen: SIGABRT)
