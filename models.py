"""
The paper's four architectures, each a standard pre-norm transformer whose block stack runs
through bdia.run_blocks (one line in each forward), so one model trains plainly or with
BDIA and is a standard model at inference (its state_dict is the same in every mode):

    ViT      image classification (paper 5.2), and RevViT, the reversible baseline
    Seq2Seq  English-French translation (5.3), BDIA in the encoder and the decoder
    GPT      language modelling (Appendix F) and GPT-2 fine-tuning (5.1; gpt2.py loads it)

Parameter names follow nanoGPT/GPT-2 (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj) so that pretrained checkpoints map onto them simply. Decoding and LoRA live beside
the scripts that use them (train_translate.py, gpt2.py); GPT-2's files in plumbing/gpt2_files.py.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdia import BDIAConfig, generator_states, replayed_generators, run_blocks


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


class MLP(nn.Module):
    """Feed-forward network: Linear, GELU, dropout (hidden_dropout), Linear, dropout.
    The ViT drops out the hidden layer too (lucidrains' FeedForward); GPT does not (nanoGPT).
    gelu: "exact" (erf, as nn.GELU) or "tanh" (its tanh approximation: GPT-2's gelu_new)."""

    def __init__(self, dim, hidden, dropout=0.0, gelu="exact", hidden_dropout=0.0, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.hidden_dropout = nn.Dropout(hidden_dropout)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.approximate = {"exact": "none", "tanh": "tanh"}[gelu]  # F.gelu's name for each

    def forward(self, x):
        return self.dropout(self.c_proj(self.hidden_dropout(F.gelu(self.c_fc(x), approximate=self.approximate))))


class Block(nn.Module):
    """Pre-norm transformer block with the engine's contract: forward(x) = x + residual(x).

    residual(x) = f(x) + g(x + f(x)), eq. (4), f = attention, g = MLP. A decoder block
    (cross=True) adds cross-attention c to `memory`: f becomes a + c(x + a).
    Context (as run_blocks passes it): memory, self_mask, memory_mask.
    bias: biases in every Linear and LayerNorm (nanoGPT's flag). layout: "gpt" (nanoGPT's
    block) or "vit" (lucidrains' ViT block, as the paper's ViT: no query/key/value bias, no
    dropout on attention probabilities, dropout on the MLP's hidden layer).
    """

    def __init__(self, dim, heads, mlp_dim, dropout=0.0, bias=True, causal=False, cross=False, gelu="exact",
                 layout="gpt"):
        super().__init__()
        if layout not in ("gpt", "vit"):
            raise ValueError(f"Block: layout must be 'gpt' or 'vit', got {layout!r}")
        attn_dropout, hidden_dropout, qkv_bias = (0.0, dropout, False) if layout == "vit" else (None, 0.0, None)
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
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout, layout="vit") for _ in range(depth))
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
    outputs = {}  # block index -> its output pair; backward rebuilds each block's from the next one's
    for k, block in enumerate(blocks):
        params = [p for p in block.parameters() if p.requires_grad]
        x1, x2 = ReversibleRevBlock.apply(outputs, block, k, x1, x2, *params)
    outputs[len(blocks) - 1] = (x1.detach(), x2.detach())
    return x1, x2


class ReversibleRevBlock(torch.autograd.Function):
    """One RevViT block without stored activations. Backward rebuilds the inputs from the
    outputs, X2 = Y2 - G(Y1), X1 = Y1 - F(X2), replaying F's and G's dropout masks from the
    RNG states saved in forward (the global RNG is restored afterwards, never re-seeded)."""

    @staticmethod
    def forward(ctx, outputs, block, k, x1, x2, *params):
        ctx.outputs, ctx.block, ctx.k = outputs, block, k
        ctx.rng_f = generator_states(x1.device)  # F's and G's dropout masks, replayed in backward
        y1 = x1 + block.F(x2)
        ctx.rng_g = generator_states(x1.device)
        y2 = x2 + block.G(y1)
        ctx.autocast = torch.is_autocast_enabled(x1.device.type), torch.get_autocast_dtype(x1.device.type)
        return y1, y2

    @staticmethod
    def backward(ctx, g_y1, g_y2):
        block, params = ctx.block, [p for p in ctx.block.parameters() if p.requires_grad]
        y1, y2 = ctx.outputs.pop(ctx.k)
        device = y1.device
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
            y1 = y1.detach().requires_grad_()
            with replayed_generators(ctx.rng_g, device):
                g_out = block.G(y1).to(y1.dtype)
            x2 = (y2 - g_out.detach()).requires_grad_()
            with replayed_generators(ctx.rng_f, device):
                f_out = block.F(x2).to(y1.dtype)
        g_grads = torch.autograd.grad(g_out, [y1, *params], g_y2, allow_unused=True)
        g_x1 = g_y1 + g_grads[0]  # dL/dY1 in full: dL/dX1 (Y1 = X1 + F(X2))
        f_grads = torch.autograd.grad(f_out, [x2, *params], g_x1, allow_unused=True)
        g_x2 = g_y2 + f_grads[0]
        if ctx.k > 0:
            ctx.outputs[ctx.k - 1] = ((y1 - f_out).detach(), x2.detach())  # X1 = Y1 - F(X2)
        param_grads = [add_grads(a, b) for a, b in zip(g_grads[1:], f_grads[1:])]
        return (None, None, None, g_x1, g_x2, *param_grads)


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
                 gelu="exact"):
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


# -----------------------------------------------------------------------------
# Another integrator at inference (paper Fig. 1)


@contextlib.contextmanager
def constant_gamma(model, gamma):
    """Within: `model` (one of these, its config in `model.bdia`) infers with one constant gamma
    in every block, as in the paper's Fig. 1: eq. (10), or (21) without side information where
    it was trained with bits. After: its own config again."""
    trained = model.bdia
    bits = trained.bits if trained else None
    # gammas: training's draws, which inference does not read (any valid pair will do)
    model.bdia = BDIAConfig(gammas=(-0.5, 0.5), bits=bits, reversible=False, eval_gamma=gamma)
    try:
        yield model
    finally:
        model.bdia = trained
