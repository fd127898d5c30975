"""README's "BDIA in your own model": its three recipes for code you write (the one-line conversion
before them is tests/test_one_line.py's), run as written there (the first, a
complete script, is run from the README itself), on blocks this project did not write. Each recipe must (a) at inference with gamma 0 and bits None be
the plain model bit for bit, and (b) train reversibly: the same loss, bit for bit, as
stored-activation BDIA under the same seed, and every gradient (block 0's included) within
1e-5. Hugging Face's GPT2Block and LlamaDecoderLayer are built from small configs (no
network) and skipped where transformers is not installed."""

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bdia  # noqa: E402
from bdia import BDIAConfig, BDIAStack, run_blocks  # noqa: E402

torch.set_num_threads(1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_trains_reversibly_as_stored(model, loss_of, set_config):
    """One step in each mode under the same seed: equal losses, gradients within 1e-5."""
    results = []
    for reversible in (True, False):
        set_config(BDIAConfig(reversible=reversible))
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = loss_of(model)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_r, grads_r), (loss_s, grads_s) = results
    assert torch.equal(loss_r, loss_s)
    assert grads_r.keys() == grads_s.keys() and len(grads_r) == sum(1 for p in model.parameters() if p.requires_grad)
    for name in grads_s:
        assert rel_err(grads_r[name], grads_s[name]) < 1e-5, f"the gradient of {name} differs"


# ----------------------------------------------------------------------------- recipe 1: your own blocks


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_recipes():
    """The Python code blocks of the README's section "BDIA in your own model"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## BDIA in your own model")[1].split("\n## ")[0]
    return [block.split("```")[0] for block in section.split("```python")[1:]]


def run_recipe_1():
    """Recipe 1 exactly as the README has it: it trains three steps and prints their losses."""
    namespace = {"__name__": "readme_recipe_1"}
    exec(compile(readme_recipes()[1], "README.md recipe 1", "exec"), namespace)
    return namespace


def test_recipe_1_runs_as_written_and_prints_its_losses(capsys):
    torch.manual_seed(0)
    run_recipe_1()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 1", "step 2"]
    losses = [float(line.split("loss ")[1]) for line in lines]
    assert all(0 < loss < 10 for loss in losses) and losses[2] < losses[0]


@pytest.mark.parametrize("depth", [1, 2, 8])
def test_recipe_1_your_own_blocks(depth, capsys):
    MyTransformer = run_recipe_1()["MyTransformer"]  # noqa: N806: the README's class
    torch.manual_seed(0)
    model, x, y = MyTransformer(16, depth), torch.randn(4, 6, 3), torch.arange(4)
    plain = model.eval()(x)
    model.bdia = BDIAConfig(bits=None, reversible=False)
    assert torch.equal(model(x), plain)
    model.train()
    assert_trains_reversibly_as_stored(model, lambda m: F.cross_entropy(m(x), y), lambda c: setattr(model, "bdia", c))


# ----------------------------------------------------------------------------- recipe 2: BDIAStack


class TimmStyleViT(nn.Module):
    """A model that calls its blocks as one nn.Sequential, as timm's and torchvision's do;
    timm's Block layout with stochastic depth (DropPath) and dropout."""

    def __init__(self, dim=16, depth=4, drop_path=0.2):
        super().__init__()
        self.patch_embed, self.norm, self.head = nn.Linear(12, dim), nn.LayerNorm(dim), nn.Linear(dim, 10)
        self.blocks = nn.Sequential(*(TimmBlock(dim, drop_path) for _ in range(depth)))

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.patch_embed(x))).mean(dim=1))


class TimmBlock(nn.Module):
    def __init__(self, dim, drop_path):
        super().__init__()
        self.norm1, self.norm2, self.drop_prob = nn.LayerNorm(dim), nn.LayerNorm(dim), drop_path
        self.attn = nn.MultiheadAttention(dim, 2, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))

    def drop_path(self, y):
        if not self.training or self.drop_prob == 0:
            return y
        keep = y.new_empty(y.shape[0], 1, 1).bernoulli_(1 - self.drop_prob)
        return y * keep / (1 - self.drop_prob)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.drop_path(self.attn(y, y, y, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm2(x)))


def test_recipe_2_a_model_that_calls_an_nn_sequential_of_blocks():
    torch.manual_seed(0)
    model, x, y = TimmStyleViT().eval(), torch.randn(4, 5, 12), torch.arange(4)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(x)

    model.blocks = BDIAStack(model.blocks, BDIAConfig())  # the same blocks; state_dict keys unchanged
    model.load_state_dict(pretrained)  # pretrained weights load as they are

    model.blocks.config = BDIAConfig(bits=None, reversible=False)
    assert torch.equal(model(x), plain)
    model.train()
    assert_trains_reversibly_as_stored(model, lambda m: F.cross_entropy(m(x), y),
                                       lambda c: setattr(model.blocks, "config", c))


# ----------------------------------------------------------------------------- recipe 3: Hugging Face


def llama_logits(model, input_ids, config):  # config None: the model's own computation
    m = model.model
    x = m.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=x.device)[None]
    rotary = m.rotary_emb(x, position_ids)  # (cos, sin): computed once, passed to every layer
    x = run_blocks(m.layers, x, config, position_embeddings=rotary, position_ids=position_ids)
    return model.lm_head(m.norm(x))


def gpt2_logits(model, input_ids, config):
    t = model.transformer
    x = t.drop(t.wte(input_ids) + t.wpe(torch.arange(input_ids.shape[1], device=input_ids.device)))
    x = run_blocks(t.h, x, config)
    return model.lm_head(t.ln_f(x))


def small_hf_model(name, depth):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "llama":  # attention dropout on, so that its random draws must be replayed
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=depth,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                          attention_dropout=0.1, bos_token_id=0, eos_token_id=1,
                                          attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(config), llama_logits
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=depth, n_head=4,
                                     bos_token_id=0, eos_token_id=1, attn_implementation="sdpa")  # dropouts 0.1
    return transformers.GPT2LMHeadModel(config), gpt2_logits


@pytest.mark.parametrize("depth", [1, 2, 8])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_recipe_3_a_hugging_face_model_whose_forward_loops_over_its_layers(name, depth):
    model, logits = small_hf_model(name, depth)
    ids = torch.randint(50, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    assert torch.equal(logits(model, ids, None), model(ids).logits)  # the recipe is the model's own loop
    assert torch.equal(logits(model, ids, BDIAConfig(bits=None, reversible=False)), model(ids).logits)
    model.train()
    config = {}
    loss = lambda m: F.cross_entropy(logits(m, ids, config["bdia"]).flatten(0, 1), ids.flatten())  # noqa: E731
    assert_trains_reversibly_as_stored(model, loss, lambda c: config.update(bdia=c))


def t5_encode(model, input_ids, config):
    e = model.encoder
    x = e.dropout(e.embed_tokens(input_ids))
    n = input_ids.shape[1]
    bias = e.block[0].layer[0].SelfAttention.compute_bias(n, n, device=x.device)  # what layer 0 returns to the next
    x = run_blocks(e.block, x, config, position_bias=bias)  # computed once, passed to every layer as context
    return e.dropout(e.final_layer_norm(x))


@pytest.mark.parametrize("depth", [1, 3])
def test_a_block_that_hands_state_to_the_next_through_its_outputs_gets_it_as_context(depth):
    """T5's layer 0 returns the relative position bias and T5Stack passes it on; run_blocks keeps a
    block's first output only, so the bias is computed once and passed as context: the encoder bit for
    bit at inference, and reversible training as stored (the bias's table gets its gradient)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=depth, num_heads=4,
                                   dropout_rate=0.1, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, attn_implementation="sdpa")
    model = transformers.T5EncoderModel(config)
    ids = torch.randint(50, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    assert torch.equal(t5_encode(model, ids, None), model(ids).last_hidden_state)
    assert torch.equal(t5_encode(model, ids, BDIAConfig(bits=None, reversible=False)), model(ids).last_hidden_state)
    model.train()
    bdia = {}
    loss = lambda m: t5_encode(m, ids, bdia["config"]).square().mean()  # noqa: E731
    assert_trains_reversibly_as_stored(model, loss, lambda c: bdia.update(config=c))


class CheckpointedBlock(nn.Module):
    """A block that checkpoints its own MLP, as Hugging Face's gradient_checkpointing_enable() does."""

    def __init__(self, dim, use_reentrant):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.use_reentrant = use_reentrant

    def mlp(self, x):
        return self.fc2(F.dropout(F.gelu(self.fc1(self.ln(x))), 0.1, self.training))

    def forward(self, x):
        return x + torch.utils.checkpoint.checkpoint(self.mlp, x, use_reentrant=self.use_reentrant)


def test_a_block_that_checkpoints_itself_trains_reversibly_or_is_told_use_reentrant_false():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), BDIAStack([CheckpointedBlock(16, False) for _ in range(3)]))
    x = torch.randn(4, 5, 3)
    assert_trains_reversibly_as_stored(model, lambda m: m(x).square().mean(), lambda c: setattr(model[1], "config", c))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), BDIAStack([CheckpointedBlock(16, True) for _ in range(3)], BDIAConfig()))
    out = model(x).square().mean()
    with pytest.raises(bdia.BDIAError, match=r"block 2 \(CheckpointedBlock\) runs torch.utils.checkpoint with "
                       r"use_reentrant=True.*pass use_reentrant=False"):
        out.backward()


def test_the_readme_recipes_are_the_code_these_tests_run():
    """Recipe 1 runs from the README itself; each code line of recipes 2 and 3 (imports aside)
    is a line of this file, comments included, up to spacing: an edit to a recipe that is not
    made here fails."""
    with open(os.path.abspath(__file__)) as f:
        here = {" ".join(line.split()) for line in f}
    recipes = readme_recipes()
    assert len(recipes) == 4  # the one-line conversion, then recipes 1 to 3
    lines = [" ".join(line.split()) for recipe in recipes[2:] for line in recipe.splitlines()]
    missing = [line for line in lines if line and not line.startswith(("from ", "import ")) and line not in here]
    assert not missing, f"README recipe lines not run by these tests: {missing}"
