"""
GPT-2 as this project's GPT (models.py), for fine-tuning (finetune_e2e.py): a pretrained model
in and out, LoRA, and decoding with a KV cache and beam search. GPT-2's files (safetensors, the
Hugging Face layout, hub downloads) and its byte-level BPE tokenizer are plumbing, in
plumbing/gpt2_files.py. No dependency beyond torch.

    model = from_pretrained("gpt2-medium", bdia=BDIAConfig())   # a local folder/file, or the hub when online
    tok = gpt2_files.load_tokenizer("gpt2-medium")               # byte-level BPE (plumbing/gpt2_files.py)
    add_lora(model, rank=4, alpha=32)                             # adapters on query and value
    ids, scores = beam_search(model.eval(), contexts, tok.eos_id)
    save_pretrained(model, "export/")                             # model.safetensors + config.json (HF layout)

Sections: from_pretrained / save_pretrained; LoRA; KV-cache decoding and beam search.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdia import run_blocks
from models import GPT
from plumbing.data import DataError
from plumbing.gpt2_files import DEFAULT_CACHE, from_hf_state_dict, load_gpt2, save_gpt2


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
