"""Tests of the shared building blocks in models.py."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import GPT, Attention, RevViT, Seq2Seq, ViT  # noqa: E402


def test_causal_attention_stays_causal_with_a_padding_mask():
    torch.manual_seed(0)
    attn = Attention(8, 2, causal=True).eval()
    x = torch.randn(1, 5, 8)
    keep_all = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    changed = x.clone()
    changed[:, 3:] += 1.0  # later tokens must not change earlier outputs
    assert torch.allclose(attn(x, mask=keep_all)[:, :3], attn(changed, mask=keep_all)[:, :3])
    assert torch.allclose(attn(x, mask=keep_all), attn(x))


def called_modules(model, x):
    """Names of the Linear and Dropout modules of model, in the order a forward pass calls them."""
    order, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Dropout)):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: order.append((name, m))))
    model(x)
    for h in hooks:
        h.remove()
    return order


def test_vit_and_revvit_drop_out_as_the_reference_vit():
    """lucidrains' ViT (kentaroy47's models/vit.py): dropout after the embedding, after the attention
    output projection, after the MLP's GELU and after its second Linear; none on attention probabilities."""
    for model, prefix in ((ViT(dim=16, depth=2, heads=2, mlp_dim=32, dropout=0.1), "blocks.0."),
                          (RevViT(dim=16, depth=2, heads=2, mlp_dim=32, dropout=0.1), "blocks.0.")):
        order = called_modules(model.train(), torch.randn(2, 3, 32, 32))
        names = [n[len(prefix):] for n, _ in order if n.startswith(prefix)]
        assert names == ["attn.c_attn", "attn.c_proj", "attn.resid_dropout",
                         "mlp.c_fc", "mlp.hidden_dropout", "mlp.c_proj", "mlp.dropout"]
        assert order[1][0] == "embedding.dropout"  # after adding positions, before the blocks
        dropouts = [m for _, m in order if isinstance(m, torch.nn.Dropout)]
        assert len(dropouts) == 1 + 3 * 2 and all(m.p == 0.1 for m in dropouts)
        assert all(b.attn.attn_dropout == 0.0 for b in model.blocks)


def test_gpt_and_translation_keep_nanogpt_dropout():
    """GPT and the translation model are unchanged: attention-probability dropout, no hidden dropout."""
    gpt = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    block = gpt.transformer.h[0]
    assert block.attn.attn_dropout == 0.1 and block.mlp.hidden_dropout.p == 0.0
    seq = Seq2Seq(11, 13, dim=16, heads=2, mlp_dim=16, enc_layers=1, dec_layers=1, dropout=0.1)
    assert seq.decoder[0].cross_attn.attn_dropout == 0.1 and seq.encoder[0].mlp.hidden_dropout.p == 0.0


def test_gpt_bias_flag_is_nanogpts():
    """bias=False: no bias in any Linear or LayerNorm (nanoGPT's train.py default); True: all have one."""
    for bias in (False, True):
        gpt = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=bias)
        layers = [m for m in gpt.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m is not gpt.lm_head]
        assert all((m.bias is not None) == bias for m in layers)
    vit = ViT(dim=16, depth=1, heads=2, mlp_dim=32)
    assert vit.blocks[0].attn.c_attn.bias is None and vit.blocks[0].attn.c_proj.bias is not None  # lucidrains' ViT


def test_translation_output_projection_is_the_tutorials_untied_linear_unless_tied():
    seq = Seq2Seq(11, 13, dim=16, heads=2, mlp_dim=16, enc_layers=1, dec_layers=1)
    assert seq.head.bias is not None and seq.head.weight is not seq.tgt_emb.weight
    tied = Seq2Seq(11, 13, dim=16, heads=2, mlp_dim=16, enc_layers=1, dec_layers=1, tie=True)
    assert tied.head.bias is None and tied.head.weight is tied.tgt_emb.weight
