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

from bdia import run_blocks  # noqa: F401  (used by the models below)

# -----------------------------------------------------------------------------
# Building blocks shared by every model


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to `memory` when given.

    mask: a boolean mask broadcastable to (batch, heads, queries, keys), True = attend.
    """

    def __init__(self, dim, heads, dropout=0.0, bias=True, causal=False):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias)  # query, key, value projections
        self.c_proj = nn.Linear(dim, dim)
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
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).flatten(2)  # (batch, tokens, dim)
        return self.resid_dropout(self.c_proj(y))

    def split_heads(self, t):
        return t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)  # (batch, heads, tokens, head_dim)


class MLP(nn.Module):
    """Feed-forward network: Linear, GELU, Linear, dropout."""

    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block with the engine's contract: forward(x) = x + residual(x).

    residual(x) = f(x) + g(x + f(x)), eq. (4), f = attention, g = MLP. A decoder block
    (cross=True) adds cross-attention c to `memory`: f becomes a + c(x + a).
    Context (as run_blocks passes it): memory, self_mask, memory_mask.
    """

    def __init__(self, dim, heads, mlp_dim, dropout=0.0, bias=True, causal=False, cross=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, bias, causal)
        if cross:
            self.ln_cross = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, dropout, bias)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def residual(self, x, memory=None, self_mask=None, memory_mask=None):
        f = self.attn(self.ln_1(x), mask=self_mask)
        if hasattr(self, "cross_attn"):
            f = f + self.cross_attn(self.ln_cross(x + f), memory, memory_mask)
        return f + self.mlp(self.ln_2(x + f))  # (4)

    def forward(self, x, *context):
        return x + self.residual(x, *context)


# -----------------------------------------------------------------------------
# ViT and RevViT (image classification, paper 5.2)


# -----------------------------------------------------------------------------
# Encoder-decoder translation transformer (paper 5.3)


# -----------------------------------------------------------------------------
# GPT (paper 5.1 and Appendix F)
