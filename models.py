"""
The paper's models, each a standard pre-norm transformer whose block stack runs through
bdia.run_blocks, so one model trains plainly or with BDIA and is a standard model at
inference (its state_dict is the same in every mode).

Parameter names follow nanoGPT/GPT-2 (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj) so that pretrained checkpoints map onto them simply.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdia import run_blocks

# -----------------------------------------------------------------------------
# Building blocks shared by every model


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to `memory` when given.

    mask: a boolean mask broadcastable to (batch, heads, queries, keys), True = attend.
    dropout: after the output projection; attn_dropout: on the attention probabilities
    (None: the same as dropout, as in nanoGPT and nn.Transformer; the ViT uses 0).
    bias: in both projections; qkv_bias: in the query/key/value projection (None: bias).
    """

    def __init__(self, dim, heads, dropout=0.0, bias=True, causal=False, attn_dropout=None, qkv_bias=None):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads, self.causal = heads, causal
        self.attn_dropout = dropout if attn_dropout is None else attn_dropout
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias if qkv_bias is None else qkv_bias)  # query, key, value
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, memory=None, mask=None):
        if memory is None:
            q, k, v = self.c_attn(x).chunk(3, dim=-1)
        else:  # cross-attention: queries from x, keys and values from memory
            dim = x.shape[-1]
            w, b = self.c_attn.weight, self.c_attn.bias
            q = F.linear(x, w[:dim], None if b is None else b[:dim])
            k, v = F.linear(memory, w[dim:], None if b is None else b[dim:]).chunk(2, dim=-1)
        q, k, v = (self.split_heads(t) for t in (q, k, v))
        if self.causal and mask is not None:  # a padding mask does not switch causality off
            mask = mask & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).flatten(2)  # (batch, tokens, dim)
        return self.resid_dropout(self.c_proj(y))

    def split_heads(self, t):
        return t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)  # (batch, heads, tokens, head_dim)

    def forward_cached(self, x, cache):
        """Causal self-attention of new tokens x (batch, T, dim) to themselves and to the keys
        and values in `cache` (a dict, updated here): incremental decoding with a KV cache."""
        q, k, v = (self.split_heads(t) for t in self.c_attn(x).chunk(3, dim=-1))
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        past = k.shape[2] - q.shape[2]  # new token i sees the past and new tokens 0..i
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).flatten(2)))


class MLP(nn.Module):
    """Feed-forward network: Linear, GELU, dropout (hidden_dropout), Linear, dropout.
    The ViT drops out the hidden layer too (lucidrains' FeedForward); GPT does not (nanoGPT).
    gelu="tanh" is GPT-2's gelu_new."""

    def __init__(self, dim, hidden, dropout=0.0, gelu="none", hidden_dropout=0.0, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.hidden_dropout = nn.Dropout(hidden_dropout)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.gelu = gelu

    def forward(self, x):
        return self.dropout(self.c_proj(self.hidden_dropout(F.gelu(self.c_fc(x), approximate=self.gelu))))


class Block(nn.Module):
    """Pre-norm transformer block with the engine's contract: forward(x) = x + residual(x).

    residual(x) = f(x) + g(x + f(x)), eq. (4), f = attention, g = MLP. A decoder block
    (cross=True) adds cross-attention c to `memory`: f becomes a + c(x + a).
    Context (as run_blocks passes it): memory, self_mask, memory_mask.
    bias: biases in every Linear and LayerNorm (nanoGPT's flag). vit: lucidrains' ViT block,
    as the paper's ViT: no query/key/value bias, no dropout on attention probabilities,
    dropout on the MLP's hidden layer (otherwise nanoGPT's layout).
    """

    def __init__(self, dim, heads, mlp_dim, dropout=0.0, bias=True, causal=False, cross=False, gelu="none",
                 vit=False):
        super().__init__()
        attn_dropout, hidden_dropout, qkv_bias = (0.0, dropout, False) if vit else (None, 0.0, None)
        self.ln_1 = nn.LayerNorm(dim, bias=bias)
        self.attn = Attention(dim, heads, dropout, bias, causal, attn_dropout, qkv_bias)
        if cross:
            self.ln_cross = nn.LayerNorm(dim, bias=bias)
            self.cross_attn = Attention(dim, heads, dropout, bias)
        self.ln_2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = MLP(dim, mlp_dim, dropout, gelu, hidden_dropout, bias)

    def residual(self, x, memory=None, self_mask=None, memory_mask=None):
        f = self.attn(self.ln_1(x), mask=self_mask)
        if hasattr(self, "cross_attn"):
            f = f + self.cross_attn(self.ln_cross(x + f), memory, memory_mask)
        return f + self.mlp(self.ln_2(x + f))  # (4)

    def forward(self, x, *context):
        return x + self.residual(x, *context)


# -----------------------------------------------------------------------------
# ViT and RevViT (image classification, paper 5.2)


class PatchEmbedding(nn.Module):
    """Image (batch, C, H, W) -> tokens: linear patch embedding, a CLS token in front,
    learned positions and dropout (lucidrains' vit-pytorch, as in the paper's ViT)."""

    def __init__(self, image_size, patch, channels, dim, dropout):
        super().__init__()
        assert image_size % patch == 0, f"image size {image_size} must be divisible by the patch size {patch}"
        self.patch = patch
        self.proj = nn.Linear(channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, images):
        B, C, H, W = images.shape
        p = self.patch
        patches = images.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.proj(patches)], dim=1)
        return self.dropout(x + self.pos_embedding).float()  # float32 residual stream, also under autocast


class ViT(nn.Module):
    """The paper's ViT for 32x32 images: patch embedding, pre-norm blocks, LayerNorm + Linear
    head on the CLS token. The blocks run through run_blocks with the config `self.bdia`
    (None: the plain ViT), so a BDIA-trained ViT is a plain ViT at inference."""

    def __init__(self, num_classes=10, image_size=32, patch=4, channels=3, dim=512, depth=6, heads=8,
                 mlp_dim=512, dropout=0.1, emb_dropout=0.1, bdia=None):
        super().__init__()
        self.bdia = bdia
        self.embedding = PatchEmbedding(image_size, patch, channels, dim, emb_dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout, vit=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images):
        x = run_blocks(self.blocks, self.embedding(images), self.bdia)
        return self.head(self.norm(x[:, 0]))


class RevBlock(nn.Module):
    """A two-stream reversible block (Mangalam et al. 2023): Y1 = X1 + F(X2), Y2 = X2 + G(Y1),
    with F pre-norm attention and G pre-norm MLP, dropped out as the ViT's."""

    def __init__(self, dim, heads, mlp_dim, dropout):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout, attn_dropout=0.0, qkv_bias=False)
        self.ln_2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_dim, dropout, hidden_dropout=dropout)

    def F(self, x):
        return self.attn(self.ln_1(x))

    def G(self, x):
        return self.mlp(self.ln_2(x))

    def forward(self, x1, x2):
        y1 = x1 + self.F(x2)
        return y1, x2 + self.G(y1)


class RevViT(nn.Module):
    """RevViT, the paper's reversible baseline: the embedding duplicated into two streams,
    reversible blocks, the streams concatenated before the head. Trained with its own online
    back-propagation (ReversibleRevBlock) unless reversible=False."""

    def __init__(self, num_classes=10, image_size=32, patch=4, channels=3, dim=512, depth=6, heads=8,
                 mlp_dim=512, dropout=0.1, emb_dropout=0.1, reversible=True):
        super().__init__()
        self.reversible = reversible
        self.embedding = PatchEmbedding(image_size, patch, channels, dim, emb_dropout)
        self.blocks = nn.ModuleList(RevBlock(dim, heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, images):
        x = self.embedding(images)
        x1, x2 = run_rev_blocks(self.blocks, x, x, self.reversible and self.training and torch.is_grad_enabled())
        return self.head(self.norm(torch.cat([x1, x2], dim=-1)[:, 0]))


def run_rev_blocks(blocks, x1, x2, reversible):
    """The two-stream stack; with `reversible`, activations are rebuilt in backward."""
    if not reversible:
        for block in blocks:
            x1, x2 = block(x1, x2)
        return x1, x2
    tops = {}  # block index -> its output pair, as rebuilt during backward
    for k, block in enumerate(blocks):
        params = [p for p in block.parameters() if p.requires_grad]
        x1, x2 = ReversibleRevBlock.apply(tops, block, k, x1, x2, *params)
    tops[len(blocks) - 1] = (x1.detach(), x2.detach())
    return x1, x2


class ReversibleRevBlock(torch.autograd.Function):
    """One RevViT block without stored activations. Backward rebuilds the inputs from the
    outputs, X2 = Y2 - G(Y1), X1 = Y1 - F(X2), replaying F's and G's dropout masks from the
    RNG states saved in forward (the global RNG is restored afterwards, never re-seeded)."""

    @staticmethod
    def forward(ctx, tops, block, k, x1, x2, *params):
        ctx.tops, ctx.block, ctx.k = tops, block, k
        ctx.rng_f = rng_state(x1.device)
        y1 = x1 + block.F(x2)
        ctx.rng_g = rng_state(x1.device)
        y2 = x2 + block.G(y1)
        ctx.autocast = torch.is_autocast_enabled(x1.device.type), torch.get_autocast_dtype(x1.device.type)
        return y1, y2

    @staticmethod
    def backward(ctx, g_y1, g_y2):
        block, params = ctx.block, [p for p in ctx.block.parameters() if p.requires_grad]
        y1, y2 = ctx.tops.pop(ctx.k)
        device = y1.device
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng([device] if device.type == "cuda" else []), torch.enable_grad(), \
                torch.autocast(device.type, dtype=dtype, enabled=enabled):
            y1 = y1.detach().requires_grad_()
            set_rng_state(ctx.rng_g, device)
            g_out = block.G(y1).to(y1.dtype)
            set_rng_state(ctx.rng_f, device)
            x2 = (y2 - g_out.detach()).requires_grad_()
            f_out = block.F(x2).to(y1.dtype)
        g_grads = torch.autograd.grad(g_out, [y1, *params], g_y2, allow_unused=True)
        g_x1 = g_y1 + g_grads[0]  # dL/dY1 in full: dL/dX1 (Y1 = X1 + F(X2))
        f_grads = torch.autograd.grad(f_out, [x2, *params], g_x1, allow_unused=True)
        g_x2 = g_y2 + f_grads[0]
        if ctx.k > 0:
            ctx.tops[ctx.k - 1] = ((y1 - f_out).detach(), x2.detach())  # X1 = Y1 - F(X2)
        param_grads = [add_grads(a, b) for a, b in zip(g_grads[1:], f_grads[1:])]
        return (None, None, None, g_x1, g_x2, *param_grads)


def rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def add_grads(a, b):
    if a is None or b is None:
        return b if a is None else a
    return a + b



# -----------------------------------------------------------------------------
# Encoder-decoder translation transformer (paper 5.3)


class Seq2Seq(nn.Module):
    """Pre-norm encoder-decoder transformer for translation (paper 5.3, Fig. 5).

    Tokens are embedded, scaled by sqrt(dim) and added to sinusoidal positions. The encoder
    blocks (self-attention, MLP) get the source padding mask as context; the decoder blocks
    (causal self-attention, cross-attention to the encoder output, MLP) get the encoder
    memory and its mask. Both stacks run through run_blocks with the config `self.bdia`
    (None: the plain model), so with reversible BDIA the memory's gradient is summed over
    all decoder blocks and flows back into the encoder. Final LayerNorms; the output
    projection is a Linear with bias (the tutorial's generator), or tied to the target
    embedding without bias when tie=True.
    """

    def __init__(self, src_vocab, tgt_vocab, dim=192, heads=6, mlp_dim=192, enc_layers=6, dec_layers=6,
                 dropout=0.1, max_len=256, pad_id=1, tie=False, bdia=None):
        super().__init__()
        self.dim, self.pad_id, self.bdia = dim, pad_id, bdia
        self.src_emb = nn.Embedding(src_vocab, dim)
        self.tgt_emb = nn.Embedding(tgt_vocab, dim)
        for emb in (self.src_emb, self.tgt_emb):  # x sqrt(dim) in embed() makes the entries ~ N(0, 1)
            nn.init.normal_(emb.weight, std=dim**-0.5)
        self.register_buffer("pos", sinusoidal_positions(max_len, dim), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(Block(dim, heads, mlp_dim, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(
            Block(dim, heads, mlp_dim, dropout, causal=True, cross=True) for _ in range(dec_layers)
        )
        self.ln_enc, self.ln_dec = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.head = nn.Linear(dim, tgt_vocab, bias=not tie)
        if tie:
            self.head.weight = self.tgt_emb.weight

    def embed(self, emb, tokens):
        if tokens.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than max_len={self.pos.shape[0]}")
        return self.drop(emb(tokens) * self.dim**0.5 + self.pos[: tokens.shape[1]])

    def encode(self, src):
        """src (batch, S) token ids -> (memory (batch, S, dim), memory_mask (batch, 1, 1, S))."""
        mask = (src != self.pad_id)[:, None, None, :]  # True = attend: padding is never a key
        x = run_blocks(self.encoder, self.embed(self.src_emb, src), self.bdia, None, mask)
        return self.ln_enc(x), mask

    def decode(self, tgt, memory, memory_mask):
        """tgt (batch, T) ids (starting with <bos>) -> logits (batch, T, tgt_vocab).
        Causal self-attention needs no target padding mask: padding only follows real
        tokens, so no real position ever attends to it (and the loss ignores pad targets)."""
        y = run_blocks(self.decoder, self.embed(self.tgt_emb, tgt), self.bdia, memory, None, memory_mask)
        return self.head(self.ln_dec(y))

    def forward(self, src, tgt):
        return self.decode(tgt, *self.encode(src))

    @torch.no_grad()
    def greedy(self, src, bos_id, eos_id, max_new=64):
        """Greedy decoding, encoder run once: (batch, <= max_new) ids, eos and after set to pad."""
        memory, mask = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_new):
            next_id = self.decode(out, memory, mask)[:, -1].argmax(-1)
            next_id = next_id.masked_fill(done, self.pad_id)
            out = torch.cat([out, next_id[:, None]], dim=1)
            done |= next_id == eos_id
            if done.all():
                break
        return out[:, 1:].masked_fill(out[:, 1:] == eos_id, self.pad_id)

    @torch.no_grad()
    def beam_search(self, src, bos_id, eos_id, beam=4, max_new=64, length_penalty=1.0):
        """Beam search for one source sentence src (1, S), encoder run once. Returns the ids
        (without <bos>/<eos>) of the hypothesis with the best log-probability / length^penalty."""
        if length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0 (got {length_penalty}): the early stop assumes that "
                             "a longer hypothesis cannot score better")
        memory, mask = self.encode(src)
        seqs = torch.full((1, 1), bos_id, dtype=torch.long, device=src.device)
        scores = torch.zeros(1, device=src.device)
        finished = []  # (normalised score, ids)
        for step in range(1, max_new + 1):
            n = seqs.shape[0]
            logp = self.decode(seqs, memory.expand(n, -1, -1), mask.expand(n, -1, -1, -1))[:, -1].log_softmax(-1)
            total = (scores[:, None] + logp).flatten()
            top, idx = total.topk(min(2 * beam, total.numel()))
            rows, ids = idx // logp.shape[1], idx % logp.shape[1]
            keep = []
            for score, row, tok in zip(top.tolist(), rows.tolist(), ids.tolist()):
                if tok == eos_id:
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


def sinusoidal_positions(length, dim):
    """The fixed positional encoding of Vaswani et al.: sin on even, cos on odd features."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    pe = torch.zeros(length, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq[: dim // 2])
    return pe


# -----------------------------------------------------------------------------
# GPT (paper 5.1 and Appendix F)


class GPT(nn.Module):
    """nanoGPT's architecture: token and position embeddings, pre-norm causal blocks, final
    LayerNorm, LM head tied to the token embedding, GPT-2 initialisation. The blocks run
    through run_blocks with `self.bdia`, so a BDIA-trained GPT is a plain GPT at inference.
    Parameter names follow GPT-2's (transformer.wte/wpe/h.N/ln_f)."""

    def __init__(self, vocab_size, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True, bdia=None,
                 gelu="none"):
        super().__init__()
        self.block_size, self.bdia = block_size, bdia
        self.model_args = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                               n_embd=n_embd, bias=bias, gelu=gelu)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList(Block(n_embd, n_head, 4 * n_embd, dropout, bias, causal=True, gelu=gelu) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd, bias=bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """idx (batch, T) token ids -> logits (batch, T, vocab), and the loss when targets are given."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos)).float()
        x = run_blocks(self.transformer.h, x, self.bdia)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample continuations of idx (batch, T): temperature, optional top-k; gamma 0 at inference."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size:])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return idx

    # Pretrained GPT-2 weights in and out (the Hugging Face layout; gpt2_files.py)

    @classmethod
    def from_pretrained(cls, name_or_path, cache_dir=None, **kwargs):
        """GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) from a local folder or weights file
        (model.safetensors or pytorch_model.bin with config.json), or from the hub when online.
        kwargs (dropout, bdia) go to GPT(...). Missing or unexpected weights are an error listing them."""
        import gpt2_files

        hf, model_args = gpt2_files.load_gpt2(name_or_path, cache_dir or gpt2_files.DEFAULT_CACHE)
        model = cls(**model_args, **kwargs)
        state = gpt2_files.from_hf_state_dict(hf)
        expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
        if missing or unexpected or wrong:
            raise gpt2_files.GPT2FileError(
                f"{name_or_path} does not fit GPT{model_args}: missing {missing or 'none'}; unexpected "
                f"{unexpected or 'none'}; wrong shape {[(k, tuple(state[k].shape)) for k in wrong] or 'none'}")
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
        model.load_state_dict(state)
        return model

    def merged_state_dict(self):
        """The state dict of the plain GPT: LoRA updates folded into the weights, adapters left out."""
        state = {k: v for k, v in self.state_dict().items() if ".lora_" not in k}
        for name, module in self.named_modules():
            if isinstance(module, LoRALinear):
                state[f"{name}.weight"] = module.merged_weight()
        return state

    def save_pretrained(self, directory):
        """Export as a standard Hugging Face GPT-2 checkpoint: model.safetensors + config.json."""
        import gpt2_files

        if not self.model_args["bias"]:
            raise ValueError("a GPT-2 checkpoint has biases in every linear layer: this GPT was built with bias=False")
        return gpt2_files.save_gpt2(self.merged_state_dict(), self.model_args, directory)

    # Decoding with a KV cache

    def new_cache(self):
        """An empty KV cache: one dict per block, filled by forward_cached."""
        return [{} for _ in self.transformer.h]

    def forward_cached(self, idx, cache):
        """Logits (batch, T, vocab) of the new tokens idx (batch, T) that follow the tokens
        whose keys and values `cache` holds (it is extended). Eval mode: the blocks run through
        run_blocks as in forward, so BDIA models decode with eq. (25)."""
        assert not self.training, "forward_cached is for decoding: call model.eval() first"
        past = cache[0]["k"].shape[2] if "k" in cache[0] else 0
        if past + idx.shape[1] > self.block_size:
            raise ValueError(f"{past + idx.shape[1]} tokens exceed block_size {self.block_size}")
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos)).float()
        blocks = nn.ModuleList(CachedBlock(b, c) for b, c in zip(self.transformer.h, cache)).train(False)
        return self.lm_head(self.transformer.ln_f(run_blocks(blocks, x, self.bdia)))

    @torch.no_grad()
    def beam_search(self, contexts, eos_id, beam=10, max_new=64, length_penalty=0.8, no_repeat_ngram=4, use_cache=True):
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
        if length + max_new > self.block_size:
            raise ValueError(f"context {length} + max_new {max_new} tokens exceed block_size {self.block_size}")
        device, rows = contexts.device, torch.arange(batch, device=contexts.device)[:, None] * beam
        scores = torch.full((batch, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live hypothesis per example at first
        out = torch.zeros((batch * beam, 0), dtype=torch.long, device=device)
        best = [(float("-inf"), []) for _ in range(batch)]
        cache = self.new_cache() if use_cache else None
        logits = (self.forward_cached(contexts, cache) if use_cache else self(contexts)[0])[:, -1]
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
                logits = self.forward_cached(tokens.view(-1, 1), cache)[:, -1]
            else:
                logits = self(torch.cat([contexts.repeat_interleave(beam, 0), out], dim=1))[0][:, -1]
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
        f = b.attn.forward_cached(b.ln_1(x), self.cache)
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
