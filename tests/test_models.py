"""Tests of the shared building blocks in models.py."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import Attention  # noqa: E402


def test_causal_attention_stays_causal_with_a_padding_mask():
    torch.manual_seed(0)
    attn = Attention(8, 2, causal=True).eval()
    x = torch.randn(1, 5, 8)
    keep_all = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    changed = x.clone()
    changed[:, 3:] += 1.0  # later tokens must not change earlier outputs
    assert torch.allclose(attn(x, mask=keep_all)[:, :3], attn(changed, mask=keep_all)[:, :3])
    assert torch.allclose(attn(x, mask=keep_all), attn(x))
