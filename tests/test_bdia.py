"""Tests of the BDIA engine (bdia.py): exactness to the bit, gradients, memory, errors."""

import contextlib
import os
import sys
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bdia  # noqa: E402
import plot  # noqa: E402
from bdia import BDIAConfig, run_blocks  # noqa: E402

torch.set_num_threads(1)  # CI has 2 cores; small tensors are fastest single-threaded


class Block(nn.Module):
    """A tiny pre-norm block: attention f (optionally over a context) and an MLP g.
    It records the x of every call, so a test sees what backward rebuilt."""

    def __init__(self, dim=8, dropout=0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.dropout = dropout
        self.calls = []

    def residual(self, x, memory=None, scale=1.0):
        self.calls.append(x.detach().clone())
        y = self.ln1(x)
        k, v = self.kv(y if memory is None else memory).chunk(2, dim=-1)
        f = F.scaled_dot_product_attention(self.q(y), k, v, dropout_p=self.dropout if self.training else 0.0)
        return scale * (f + self.mlp(self.ln2(x + f)))  # (4)

    def forward(self, x, memory=None, scale=1.0):
        return x + self.residual(x, memory, scale)


def make_stack(depth, dim=8, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(Block(dim, dropout) for _ in range(depth))


def clear_calls(blocks):
    for b in blocks:
        b.calls.clear()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_and_backward(blocks, x, config, seed, *context):
    """One training step's forward and backward; returns output, and grads of x, context, params."""
    for p in blocks.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = run_blocks(blocks, x, config, *context)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    leaves = [t for t in (x, *context) if torch.is_tensor(t) and t.requires_grad]
    trainable = [p for p in blocks.parameters() if p.requires_grad]
    return out.detach(), [t.grad.clone() for t in leaves], [p.grad.clone() for p in trainable]


# ----------------------------------------------------------------------------- eq. 17, 20, Prop. 4.3, 4.4


def grid(shape, bits, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return bdia.quantize(scale * torch.randn(shape, generator=g), bits)


def test_quantize_rounds_to_grid_with_straight_through_gradient():
    x = torch.tensor([0.3, -1.2, 5.001, 2.0**-10], requires_grad=True)
    q = bdia.quantize(x, 9)
    assert torch.equal(q * 512, torch.round(q * 512))
    assert (q - x).abs().max() <= 2**-10
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
    assert bdia.quantize(x, None) is x


@pytest.mark.parametrize("m", [1, 2, 3])
def test_prop_4_3_gamma_product_needs_no_rounding(m):
    bits = 9
    x = grid((1000,), bits)
    s = bdia.side_info(x, bits, m)
    assert s.min() >= 0 and s.max() < 2**m and torch.equal(s, s.round())
    if m == 1:  # eq. (20): the parity of x / 2^-l
        assert torch.equal(s, torch.remainder(x * 2**bits, 2))
    for gamma in (2.0**-m, -(2.0**-m)):
        product = gamma * (x + s * 2.0**-bits)
        assert torch.equal(bdia.quantize(product, bits), product)  # (23)
        exact = gamma * (x.double() + s.double() * 2.0**-bits)
        assert torch.equal(product.double(), exact)


def test_side_information_of_a_float64_stream_beyond_int32():
    """|x| 2^l above 2^31: the integers of (20) need int64 there (an int32 cast saturates)."""
    bits, gamma = 40, -0.5
    x_prev = bdia.quantize(torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1000, bits)
    assert (x_prev * 2.0**bits).abs().max() > 2**31
    s = bdia.side_info(x_prev, bits, 1)
    assert torch.equal(s.double(), torch.remainder(-x_prev * 2.0**bits, 2))  # (20)
    x, h = bdia.quantize(torch.randn(1000, dtype=torch.float64) * 1000, bits), torch.randn(1000, dtype=torch.float64)
    x_next = bdia.bdia_step(x_prev, x, h, gamma, bits, s)
    assert torch.equal(bdia.quantize(x_next, bits), x_next)  # Lemma 4.2
    assert torch.equal(bdia.bdia_unstep(x_next, x, h, gamma, bits, s), x_prev)  # (24)


@pytest.mark.parametrize("gamma", [0.5, -0.5, 0.25, -0.125])
@pytest.mark.parametrize("bits", [9, 0, -2])
def test_prop_4_4_eq_24_inverts_eq_21_exactly(gamma, bits):
    m = bdia.side_bits((gamma,))
    x_prev, x, h = grid((500,), bits, seed=1), grid((500,), bits, seed=2), torch.randn(500, generator=torch.Generator().manual_seed(3))
    s = bdia.side_info(x_prev, bits, m)
    x_next = bdia.bdia_step(x_prev, x, h, gamma, bits, s)
    assert torch.equal(bdia.quantize(x_next, bits), x_next)  # Lemma 4.2
    assert torch.equal(bdia.bdia_unstep(x_next, x, h, gamma, bits, s), x_prev)  # (24)


def test_eq_16_without_quantization_is_only_approximately_inverse():
    """(16) undoes (10) only to float rounding, never bit for bit, and over a stack its error
    doubles block by block downwards (1 / gamma = 2; paper Fig. 2 and 6), where (24) is exact."""
    x_prev, x, h = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)).unbind(0)
    x_next = bdia.bdia_step(x_prev, x, h, 0.5, None)
    back = bdia.bdia_unstep(x_next, x, h, 0.5, None)
    assert torch.allclose(back, x_prev, atol=1e-5) and not torch.equal(back, x_prev)
    depth = 12
    errors = plot.reconstruction_errors(depth=depth, dim=32, heads=4, batch=2, seq=8)
    eq16 = errors["eq16"]  # max |rebuilt x_k - x_k|, k = 0..K
    assert eq16[depth] == eq16[depth - 1] == 0.0  # the top pair is given
    assert all(e > 0 for e in eq16[: depth - 1])
    assert eq16[0] > 100 * eq16[depth - 3]  # grows by ~2 per block over 9 blocks
    assert all(e == 0.0 for e in errors["eq24"])


def test_eq_20_and_21_by_hand_for_gammas_of_a_quarter():
    """m = 2 (gammas +-1/4): s = (-x / 2^-l) mod 4, from Python's integers, negative x included; and a
    stack run with those gammas keeps every x_k on the 2^-l grid (side information of 1 bit would not)."""
    bits = 5
    x = grid((400,), bits)
    n = [int(v) for v in (x * 2**bits).tolist()]
    assert min(n) < 0 < max(n)
    assert bdia.side_info(x, bits, 2).tolist() == [(-v) % 4 for v in n]  # (20), m = 2
    assert bdia.side_bits((-0.25, 0.25)) == 2
    blocks = make_stack(5).train()
    torch.manual_seed(0)
    out = run_blocks(blocks, torch.randn(4, 3, 8), BDIAConfig(gammas=(-0.25, 0.25), bits=bits, reversible=False))
    for x_k in [b.calls[-1] for b in blocks] + [out]:  # x_0 .. x_K
        assert torch.equal(x_k * 2**bits, torch.round(x_k * 2**bits))  # Lemma 4.2


def test_identical_samples_in_a_batch_draw_their_own_gammas():
    """gamma_k is drawn per sample: 64 copies of one sample leave a 3-block stack in 4 ways (2 gammas
    for each of blocks 1 and 2); one gamma per batch would leave them equal."""
    blocks = make_stack(3).train()
    torch.manual_seed(0)
    out = run_blocks(blocks, torch.randn(1, 3, 8).expand(64, 3, 8), BDIAConfig(reversible=False))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 4


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 8, 13, 1000])
def test_side_information_is_packed_to_m_bits_per_element(m, n):
    s = torch.randint(0, 2**m, (n,), dtype=torch.int32)  # as side_info makes them
    packed = bdia.pack_bits(s, m)
    assert packed.dtype == torch.uint8 and packed.numel() == m * ((n + 7) // 8)
    assert torch.equal(bdia.unpack_bits(packed, m, (n,), torch.int32), s)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=None), "needs bits"),
        (dict(gammas=(-0.5, 0.0, 0.5)), r"all gammas \+-2\^-m"),
        (dict(gammas=(-0.6, 0.6)), r"all gammas \+-2\^-m"),
        (dict(gammas=(-1.0, 1.0)), r"all gammas \+-2\^-m"),
        (dict(gammas=(-0.5, -0.25, 0.25, 0.5)), "one m from 1 to 8"),
        (dict(gammas=(-(2.0**-9), 2.0**-9)), "one m from 1 to 8"),
        (dict(gammas=()), "empty"),
        (dict(bits=1.5), "must be an integer"),
    ],
)
def test_config_rejects_what_cannot_be_exactly_reversible(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        BDIAConfig(**kwargs)
    assert "reversible=False" in str(err.value) or "bits" in str(err.value) or "gammas" in str(err.value)


def test_config_allows_those_settings_without_reversibility_and_warns_on_nonzero_mean():
    BDIAConfig(gammas=(-0.5, 0.0, 0.5), bits=None, reversible=False)
    BDIAConfig(gammas=(-0.6, 0.6), reversible=False)
    BDIAConfig(gammas=(0.0,), bits=5, reversible=False)  # a quantized plain ViT (Table 4)
    with pytest.warns(UserWarning, match="mean"):
        BDIAConfig(gammas=(0.5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BDIAConfig(gammas=[-0.25, 0.25])


def test_half_precision_residual_stream_is_a_value_error():
    blocks = make_stack(2).train()
    with pytest.raises(bdia.PrecisionError, match="float32 or float64"):
        run_blocks(blocks, torch.randn(2, 3, 8, dtype=torch.bfloat16), BDIAConfig())


# ----------------------------------------------------------------------------- bit-exact reconstruction


@pytest.mark.parametrize(
    "depth, gammas, dropout, with_context, x_grad",
    [
        (1, (-0.5, 0.5), 0.0, False, True),
        (2, (-0.5, 0.5), 0.1, False, True),
        (3, (-0.25, 0.25), 0.0, True, True),
        (7, (-0.5, 0.5), 0.1, True, False),
        (12, (-0.25, 0.25), 0.1, False, False),
        (48, (-0.5, 0.5), 0.1, True, True),
    ],
)
def test_reversible_backward_rebuilds_every_activation_bit_for_bit(depth, gammas, dropout, with_context, x_grad):
    blocks = make_stack(depth, dropout=dropout).train()
    x = torch.randn(4, 3, 8, requires_grad=x_grad)
    context = (torch.randn(4, 5, 8, requires_grad=True),) if with_context else ()
    config = BDIAConfig(gammas=gammas)
    out = run_blocks(blocks, x, config, *context)
    forward_inputs = [b.calls[0] for b in blocks]
    out.square().sum().backward()
    for k, b in enumerate(blocks):
        assert len(b.calls) == 2, f"block {k} was recomputed {len(b.calls) - 1} times"
        assert torch.equal(b.calls[1], forward_inputs[k]), f"x_{k} was not rebuilt exactly"
    if with_context:
        assert context[0].grad is not None and context[0].grad.abs().sum() > 0
    assert (x.grad is not None) == x_grad


@pytest.mark.parametrize("depth", [1, 2, 3, 7])
@pytest.mark.parametrize("gammas", [(-0.5, 0.5), (-0.25, 0.25)])
@pytest.mark.parametrize("bits", [9, 0, -2])  # Table 4's levels
def test_reversible_and_stored_modes_agree(depth, gammas, bits):
    blocks = make_stack(depth, dropout=0.1).train()
    x = torch.randn(4, 3, 8, requires_grad=True)
    memory = torch.randn(4, 5, 8, requires_grad=True)
    results = []
    for reversible in (True, False):
        x.grad = memory.grad = None
        config = BDIAConfig(gammas=gammas, bits=bits, reversible=reversible)
        results.append(run_and_backward(blocks, x, config, 123, memory))
    (out_r, leaves_r, params_r), (out_s, leaves_s, params_s) = results
    assert torch.equal(out_r, out_s)
    for a, b in zip(leaves_r + params_r, leaves_s + params_s):
        assert rel_err(a, b) < 1e-5


def test_reversible_mode_leaves_the_global_rng_as_stored_mode_does():
    blocks = make_stack(3, dropout=0.1).train()
    after = []
    for reversible in (True, False):
        torch.manual_seed(7)
        run_blocks(blocks, torch.randn(2, 3, 8, requires_grad=True), BDIAConfig(reversible=reversible)).sum().backward()
        after.append(torch.rand(5))
    assert torch.equal(*after)


def test_non_tensor_context_and_frozen_parameters():
    blocks = make_stack(4).train()
    for b in blocks:
        b.q.weight.requires_grad_(False)  # like a LoRA base weight
    x = torch.randn(2, 3, 8)  # like frozen embeddings: no grad
    grads = []
    for reversible in (True, False):
        _, _, params = run_and_backward(blocks, x, BDIAConfig(reversible=reversible), 5, None, 0.5)
        grads.append(params)
        assert all(b.q.weight.grad is None for b in blocks)
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-5


def test_float64_stream_and_no_quantization_in_stored_mode():
    blocks = make_stack(5).double().train()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    out_r, *_ = run_and_backward(blocks, x, BDIAConfig(), 1)
    out_s, *_ = run_and_backward(blocks, x, BDIAConfig(reversible=False), 1)
    assert torch.equal(out_r, out_s)
    out_10, _, params = run_and_backward(blocks, x, BDIAConfig(gammas=(-0.5, 0.0, 0.5), bits=None, reversible=False), 1)
    assert torch.isfinite(out_10).all() and all(torch.isfinite(p).all() for p in params)


def test_under_cpu_autocast_reversible_matches_stored():
    blocks = make_stack(4).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    results = []
    for reversible in (True, False):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run_and_backward(blocks, x, BDIAConfig(reversible=reversible), 3))
    (out_r, leaves_r, params_r), (out_s, leaves_s, params_s) = results
    assert out_r.dtype == torch.float32 and torch.equal(out_r, out_s)
    for a, b in zip(leaves_r + params_r, leaves_s + params_s):
        assert rel_err(a, b) < 1e-5


# ----------------------------------------------------------------------------- blocks this project did not write
#
# None of these defines residual(): the engine runs them through forward, h = block(x) - x.
# Their random draws are of kinds no name or module type gives away: F.dropout with its rate
# in `p`, SDPA's dropout_p, stochastic depth by torch.rand. A recomputation that drew other
# numbers would pass the output check and give wrong gradients, so the gradients are compared
# with stored-activation training, block 0's too (no x_0 check covers block 0).


class FunctionalDropoutBlock(nn.Module):
    """An MLP block whose dropout is functional, its rate in an attribute named p."""

    def __init__(self, dim=8, p=0.3):
        super().__init__()
        self.ln, self.fc1, self.fc2, self.p = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), p

    def forward(self, x):
        return x + self.fc2(F.dropout(F.gelu(self.fc1(self.ln(x))), self.p, self.training))


class SDPADropoutBlock(nn.Module):
    """Self-attention whose only dropout is SDPA's dropout_p=self.p; returns (x, weights) like a
    Hugging Face block (the engine takes the first element)."""

    def __init__(self, dim=8, p=0.3):
        super().__init__()
        self.ln, self.qkv, self.proj, self.p = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), p

    def forward(self, x):
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return x + self.proj(y), None


class DropPathBlock(nn.Module):
    """timm's stochastic depth: per sample, the residual branch is dropped with drop_prob."""

    def __init__(self, dim=8, drop_prob=0.5):
        super().__init__()
        self.ln, self.fc, self.drop_prob = nn.LayerNorm(dim), nn.Linear(dim, dim), drop_prob

    def drop_path(self, y):
        if not self.training:
            return y
        keep = (torch.rand(y.shape[0], *([1] * (y.dim() - 1))) >= self.drop_prob).to(y.dtype)
        return y * keep / (1 - self.drop_prob)

    def forward(self, x):
        return x + self.drop_path(self.fc(torch.tanh(self.ln(x))))


class KeywordBlock(nn.Module):
    """Context by keyword, as a Llama layer takes its rotary embeddings: a (cos, sin) pair
    and a scale, and a positional memory; with functional dropout."""

    def __init__(self, dim=8, p=0.2):
        super().__init__()
        self.ln, self.fc, self.mem, self.p = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, dim), p

    def forward(self, x, memory, *, position_embeddings, scale=1.0):
        cos, sin = position_embeddings
        y = self.fc(self.ln(x)) * cos + torch.tanh(x) * sin + self.mem(memory).mean(dim=1, keepdim=True)
        return (x + scale * F.dropout(y, self.p, self.training),)


OTHER_BLOCKS = {"functional dropout p": FunctionalDropoutBlock, "SDPA dropout_p, tuple output": SDPADropoutBlock,
                "stochastic depth": DropPathBlock}


def other_stack(kind, depth, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(OTHER_BLOCKS[kind]() for _ in range(depth)).train()


def assert_reversible_matches_stored(blocks, x, leaves=(), context=lambda: ((), {})):
    """Same seed: reversible and stored-activation BDIA give the same output bit for bit and
    gradients within 1e-5 for x, the leaves the context is made of (positional and keyword) and
    every parameter, block 0's included, each compared on its own. context() makes the blocks'
    (positional, keyword) context afresh for each run."""
    results = []
    for reversible in (True, False):
        for t in [x, *leaves, *blocks.parameters()]:
            t.grad = None
        args, kwargs = context()
        torch.manual_seed(11)
        out = run_blocks(blocks, x, BDIAConfig(reversible=reversible), *args, **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        named = {f"input {i}": t.grad.clone() for i, t in enumerate([x, *leaves])}
        named |= {name: p.grad.clone() for name, p in blocks.named_parameters()}
        results.append((out.detach(), named))
    (out_r, grads_r), (out_s, grads_s) = results
    assert torch.equal(out_r, out_s)
    assert grads_r.keys() == grads_s.keys() and any(name.startswith("0.") for name in grads_r)
    for name in grads_s:
        assert rel_err(grads_r[name], grads_s[name]) < 1e-5, f"the gradient of {name} differs"
    return out_r


@pytest.mark.parametrize("depth", [1, 2, 8])
@pytest.mark.parametrize("kind", list(OTHER_BLOCKS))
def test_any_block_with_unseen_random_draws_trains_reversibly_as_stored(kind, depth):
    blocks = other_stack(kind, depth)
    x = torch.randn(6, 5, 8, requires_grad=True)
    assert_reversible_matches_stored(blocks, x)


@pytest.mark.parametrize("depth", [1, 2, 8])
def test_keyword_context_reaches_every_block_and_gets_its_gradient(depth):
    torch.manual_seed(0)
    blocks = nn.ModuleList(KeywordBlock() for _ in range(depth)).train()
    x = torch.randn(4, 5, 8, requires_grad=True)
    memory = torch.randn(4, 3, 8, requires_grad=True)
    angles = torch.randn(5, 8, requires_grad=True)  # a learned position table: its gradient sums over blocks
    rotary = lambda: ((memory,), dict(position_embeddings=(angles.cos(), angles.sin()), scale=0.5))  # noqa: E731
    out = assert_reversible_matches_stored(blocks, x, (memory, angles), rotary)
    assert angles.grad is not None and angles.grad.abs().sum() > 0 and memory.grad.abs().sum() > 0
    frozen = lambda: ((memory,), dict(position_embeddings=(torch.ones(5, 8), torch.zeros(5, 8))))  # noqa: E731
    assert_reversible_matches_stored(blocks, x, (memory,), frozen)  # keyword tensors without grad pass as they are
    assert out.shape == x.shape


def test_a_block_that_draws_is_replayed_and_one_that_does_not_keeps_no_rng_state():
    """The RNG state is kept only where the block's call changed it (memory does not grow with
    depth for blocks without randomness), and the caller's RNG is left as stored mode leaves it."""
    kept = {}
    for p in (0.0, 0.3):
        torch.manual_seed(0)
        blocks = nn.ModuleList(FunctionalDropoutBlock(p=p) for _ in range(3)).train()
        out = run_blocks(blocks, torch.randn(2, 4, 8, requires_grad=True), BDIAConfig())
        node, states = out.grad_fn, []
        while node is not None:  # from the top block down, along x_k's producers
            states.append(node.rng)
            node = node.next_functions[2][0] if node.k > 0 else None  # its tensor inputs: gamma_k, x_{k-1}, x_k, ...
        kept[p] = states
        out.sum().backward()
    assert len(kept[0.0]) == len(kept[0.3]) == 3
    assert all(s is None for s in kept[0.0]) and all(s is not None for s in kept[0.3])
    after = []
    for reversible in (True, False):
        torch.manual_seed(7)
        run_blocks(other_stack("stochastic depth", 3), torch.randn(2, 3, 8, requires_grad=True),
                   BDIAConfig(reversible=reversible)).sum().backward()
        after.append(torch.rand(5))
    assert torch.equal(*after)


@pytest.mark.parametrize("kind", list(OTHER_BLOCKS))
def test_inference_of_any_block_is_its_plain_stack_bit_for_bit(kind):
    blocks = other_stack(kind, 5).eval()
    x = torch.randn(3, 4, 8)
    plain = x
    for b in blocks:
        plain = b(plain)[0] if isinstance(b(plain), tuple) else b(plain)
    assert torch.equal(run_blocks(blocks, x, BDIAConfig(bits=None, reversible=False)), plain)
    assert torch.equal(run_blocks(blocks, x, None), plain)
    quantized = run_blocks(blocks, x, BDIAConfig())  # (25): on the grid, within a step per block
    assert torch.equal(bdia.quantize(quantized, 9), quantized) and (quantized - plain).abs().max() <= 6 * 2.0**-9


# ----------------------------------------------------------------------------- BDIAStack


class SequentialModel(nn.Module):
    """A timm/torchvision-style model: it calls its blocks as one nn.Sequential."""

    def __init__(self, dim=8, depth=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, dim)
        self.blocks = nn.Sequential(*(FunctionalDropoutBlock(dim, p=0.2) for _ in range(depth)))
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(dim=1))


def test_bdia_stack_keeps_the_state_dict_and_is_the_plain_stack_at_inference():
    model = SequentialModel().eval()
    x = torch.randn(4, 5, 3)
    keys, plain_out = list(model.state_dict()), model(x)
    model.blocks = bdia.BDIAStack(model.blocks, BDIAConfig(bits=None, reversible=False))
    assert list(model.state_dict()) == keys and isinstance(model.blocks, nn.Sequential)
    assert torch.equal(model(x), plain_out)  # eval at gamma 0 with bits None: the plain stack bit for bit
    model.blocks.config = None
    assert torch.equal(model(x), plain_out)
    assert isinstance(model.blocks[1:], bdia.BDIAStack) and len(model.blocks[1:]) == 3
    model.blocks.config = BDIAConfig(bits=None, reversible=False)
    tail = model.blocks[1:]  # a slice keeps the stack's config, and runs in its blocks' eval mode
    assert tail.config is model.blocks.config
    assert torch.equal(tail(model.blocks[0](model.embed(x))), plain_stack(model.blocks[1:], model.blocks[0](model.embed(x))))
    pretrained = SequentialModel(seed=1).state_dict()
    model.load_state_dict(pretrained)  # pretrained weights load as they are
    assert torch.equal(model(x), SequentialModel(seed=1).eval()(x))


def test_bdia_stack_trains_reversibly():
    model = SequentialModel(depth=6).train()
    model.blocks = bdia.BDIAStack(model.blocks, BDIAConfig())
    x, y = torch.randn(8, 5, 3), torch.arange(8) % 2
    grads = []
    for config in (BDIAConfig(), BDIAConfig(reversible=False)):
        model.blocks.config = config
        model.zero_grad()
        torch.manual_seed(3)
        F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[1]:
        assert rel_err(grads[0][name], grads[1][name]) < 1e-5, name
    model.blocks.config = BDIAConfig()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- inference


def plain_stack(blocks, x, *context):
    for b in blocks:
        x = b(x, *context)
    return x


def test_inference_without_quantization_is_the_plain_stack_bit_for_bit():
    blocks = make_stack(6, dropout=0.1).eval()
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    for config in (None, BDIAConfig(bits=None, reversible=False)):
        assert torch.equal(run_blocks(blocks, x, config, memory), plain_stack(blocks, x, memory))


def test_inference_with_quantization_stays_within_a_step_per_block():
    depth, bits = 6, 9
    blocks = make_stack(depth).eval()
    x = torch.randn(2, 3, 8)
    out = run_blocks(blocks, x, BDIAConfig(bits=bits), None, 0.1)  # small residuals
    assert torch.equal(bdia.quantize(out, bits), out)
    assert (out - plain_stack(blocks, x, None, 0.1)).abs().max() <= (depth + 1) * 2.0**-bits


def test_inference_with_constant_eval_gamma_follows_eq_10():
    blocks = make_stack(4).eval()
    x = torch.randn(2, 3, 8)
    out = run_blocks(blocks, x, BDIAConfig(bits=None, reversible=False, eval_gamma=0.3), None)
    x_prev, x_k = x, blocks[0](x)
    for b in list(blocks)[1:]:
        x_prev, x_k = x_k, 0.3 * x_prev + 0.7 * x_k + 1.3 * b.residual(x_k)
    assert torch.allclose(out, x_k, atol=1e-6)


def test_inference_with_constant_eval_gamma_and_bits_is_eq_21_without_side_information():
    """Fig. 1's constant gamma at inference: (21) with s = 0; side information only serves (24)."""
    bits = 9
    blocks = make_stack(4).eval()
    x = torch.randn(2, 3, 8)
    out = run_blocks(blocks, x, BDIAConfig(bits=bits, eval_gamma=0.5), None)
    q = lambda y: bdia.quantize(y, bits)  # noqa: E731
    x_prev = q(x)
    x_k = x_prev + q(blocks[0].residual(x_prev))  # (19)
    for b in list(blocks)[1:]:
        x_prev, x_k = x_k, q(0.5 * x_prev) + q(0.5 * x_k + 1.5 * b.residual(x_k))
    assert torch.equal(out, x_k)


def test_side_information_only_for_gammas_that_are_powers_of_two():
    """Stored-activation training with gammas such as +-0.6 quantizes gamma x_{k-1} and adds no
    side term; +-2^-m sets (with or without 0) keep it."""
    assert bdia.side_bits((-0.6, 0.6)) is None and bdia.side_bits((-0.5, 0.6)) is None
    assert bdia.side_bits((-0.5, 0.0, 0.5)) == 1 and bdia.side_bits((-0.25, 0.5)) == 2
    bits, block = 9, make_stack(1)[0].train()
    x_prev, x = grid((2, 3, 8), bits, seed=1), grid((2, 3, 8), bits, seed=2)
    gammas = torch.tensor([[0.6], [-0.6]])
    config = BDIAConfig(gammas=(-0.6, 0.6), bits=bits, reversible=False)
    x_next, side = bdia.bdia_block(1, x_prev, x, block.residual(x), gammas.view(2, 1, 1), config)
    g = gammas.view(2, 1, 1)
    expected = bdia.quantize(g * x_prev, bits) + bdia.quantize((1 - g) * x + (1 + g) * block.residual(x), bits)
    assert side is None and torch.equal(x_next, expected)


def test_a_bdia_trained_state_dict_loads_into_the_plain_model_and_runs_as_bdia_inference():
    """Trained with BDIA (a reversible step that changes the weights), loaded strictly into a
    genuinely plain model, an nn.Sequential that knows nothing of BDIA: it computes what BDIA
    inference computes, bit for bit without quantization, within a grid step per block with it."""
    trained = make_stack(3).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    run_blocks(trained, torch.randn(2, 3, 8, requires_grad=True), BDIAConfig()).square().sum().backward()
    optimizer.step()
    plain = nn.Sequential(*(Block() for _ in range(3)))  # other weights until loaded
    plain.load_state_dict(trained.state_dict())  # strict: the same keys
    trained.eval(), plain.eval()
    x = torch.randn(2, 3, 8)
    assert torch.equal(plain(x), run_blocks(trained, x, BDIAConfig(bits=None, reversible=False)))
    quantized = run_blocks(trained, x, BDIAConfig())
    assert not torch.equal(quantized, plain(x)) and (quantized - plain(x)).abs().max() <= 4 * 2.0**-9


# ----------------------------------------------------------------------------- memory


class Saved:
    def __init__(self, t):
        self.t = t


def bytes_saved_for_backward(blocks, x, config):
    """Bytes of distinct storages that autograd keeps for backward when one forward ends (what a
    graph saved and dropped within the forward, as a reversible block's own graph, is gone)."""
    saved = []

    def pack(t):
        s = Saved(t.detach())  # t itself: an op that saves its output (SDPA) would make a cycle through C++
        saved.append(weakref.ref(s))
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.t):
        out = run_blocks(blocks, x, config)
    alive = [s() for s in saved if s() is not None]
    storages = {s.t.untyped_storage().data_ptr(): s.t.untyped_storage().nbytes() for s in alive}
    out.sum().backward()
    return sum(storages.values())


def test_reversible_memory_grows_with_depth_only_by_the_packed_side_bits():
    x = torch.randn(4, 16, 32, requires_grad=True)
    kept = {}
    for depth in (4, 16):
        blocks = make_stack(depth, dim=32).train()
        kept[depth] = {rev: bytes_saved_for_backward(blocks, x, BDIAConfig(reversible=rev)) for rev in (True, False)}
    side_bytes_per_block = x.numel() // 8  # 1 bit per element for gammas +-1/2
    assert kept[16][True] - kept[4][True] == 12 * side_bytes_per_block
    # Besides the top pair (x_{K-1}, x_K) and the gammas, which the Tape holds, autograd keeps
    # nothing but the side bits of blocks 1..K-1:
    assert kept[4][True] == 3 * side_bytes_per_block
    assert kept[4][True] < 0.2 * kept[4][False]
    assert kept[16][False] > 3 * kept[4][False]  # stored activations grow with depth


# ----------------------------------------------------------------------------- guards


def test_guard_names_the_block_where_float32_loses_the_grid():
    blocks = make_stack(3).train()
    x = torch.randn(2, 3, 8)
    x[0, 0, 0] = 2.0**14  # 2^(23 - 9)
    with pytest.raises(bdia.PrecisionError, match=r"input of the stack \(x_0\).*fewer bits"):
        run_blocks(blocks, x, BDIAConfig(bits=9))
    run_blocks(blocks, x, BDIAConfig(bits=6)).sum().backward()  # fine with fewer bits
    blocks[1] = Loud()
    with pytest.raises(bdia.PrecisionError, match=r"output of block 1 \(x_2\)"):
        run_blocks(blocks, torch.randn(2, 3, 8), BDIAConfig(bits=9))


def test_range_error_suggests_the_largest_l_that_holds_and_divergence_says_so():
    blocks = make_stack(2).train()
    x = torch.randn(2, 3, 8)
    x[0, 0, 0] = 7.0 * 2.0**10  # float32 with l = 9 holds |x| < 2^14; this |x| needs l <= floor(23 - 12.8) - 1 = 9 - 1
    x[0, 0, 1] = 2.0**14
    with pytest.raises(bdia.PrecisionError, match=r"at most bits=8 for this \|x\|"):
        run_blocks(blocks, x, BDIAConfig(bits=9))
    for bad in (float("nan"), float("inf"), 2.0**21):
        x[0, 0, 0] = bad
        with pytest.raises(bdia.DivergedError, match="training diverged. Lower the learning rate"):
            run_blocks(blocks, x, BDIAConfig(bits=9))


def test_bits_that_no_stream_can_hold_are_refused_up_front():
    with pytest.raises(ValueError, match="bits must be an integer below 52"):
        BDIAConfig(bits=52)
    with pytest.raises(bdia.PrecisionError, match="use bits <= 20"):
        run_blocks(make_stack(2).train(), torch.randn(2, 3, 8), BDIAConfig(bits=23))
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)  # float64 holds l = 30 below 2^22
    run_blocks(make_stack(2).double().train(), x, BDIAConfig(bits=30)).sum().backward()


class Loud(Block):
    def residual(self, x, memory=None, scale=1.0):
        return super().residual(x, memory, scale) + 1e5


class Flaky(Block):
    """Not deterministic: the recomputation differs from the forward."""

    def residual(self, x, memory=None, scale=1.0):
        return super().residual(x, memory, scale) + 2.0**-9 * len(self.calls)


def test_reconstruction_check_catches_a_non_deterministic_block():
    """The recomputed h_k is compared with the forward's: the block is named at the first step."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(), Flaky(), Block()]).train()
    out = run_blocks(blocks, torch.randn(2, 3, 8, requires_grad=True), BDIAConfig())
    with pytest.raises(bdia.ReconstructionError, match=r"recomputed h_1 \(block 1\) otherwise than the forward, a "
                       "block is not deterministic"):
        out.sum().backward()


class Tiny(Block):
    """Not deterministic below what Q_l rounds away: the recomputation's h_k is one float32 step up."""

    def residual(self, x, memory=None, scale=1.0):
        h = super().residual(x, memory, scale)
        return h if len(self.calls) == 1 else torch.nextafter(h, torch.tensor(float("inf")))


def test_a_recomputed_h_k_that_q_l_would_hide_is_caught_at_the_first_step():
    """A last-bit difference in h_k mostly rounds away in Q_l, so x_0 is rebuilt (as under a compiled
    forward and an eager recomputation, for 14 steps); comparing h_k itself catches it at once."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(), Tiny(), Block()]).train()
    out = run_blocks(blocks, torch.randn(2, 3, 8, requires_grad=True), BDIAConfig())
    with pytest.raises(bdia.ReconstructionError, match=r"recomputed h_1 \(block 1\)"):
        out.sum().backward()


def test_fingerprint_catches_a_single_element_difference():
    """One element of a million moved by one step of the grid: the fingerprint changes, where a float sum
    (of bit patterns or of values) would round the step away."""
    x = 3.0 + grid((64, 128, 128), 9)
    y = x.clone()
    y[1, 2, 3] += 2.0**-9
    assert torch.equal(x.sum(), y.sum())  # why a float sum would not do
    assert not torch.equal(bdia.fingerprint(x), bdia.fingerprint(y))


# ----------------------------------------------------------------------------- demo (paper Fig. 2 and 6)


def test_reconstruction_demo_shows_eq_16_drifting_and_eq_24_exact():
    errors = plot.reconstruction_errors(depth=12, dim=32, heads=4, batch=2, seq=8)
    assert all(e == 0.0 for e in errors["eq24"])
    assert errors["eq16"][12] == 0.0 and errors["eq16"][0] > 0.0
    assert errors["eq16"][0] > errors["eq16"][9]


def test_back_propagating_a_reversible_graph_twice_is_refused():
    blocks = make_stack(3).train()
    out = run_blocks(blocks, torch.randn(2, 3, 8, requires_grad=True), BDIAConfig())
    out.sum().backward(retain_graph=True)
    with pytest.raises(bdia.BDIAError, match="back-propagated already"):
        out.sum().backward()



# ----------------------------------------------------------------------------- the paths a user takes
#
# Each of these was once silently wrong or an error: a slice of an eval stack trained (its new
# container is in training mode), a parameter kept outside the block got no gradient in
# reversible mode, a Python list of blocks had no `.training`.


def test_the_gamma_of_each_block_is_its_own_eq_19_and_21_by_hand():
    """A known gamma table (the engine's own draw, repeated with the same seed) through the stack,
    against (19) and (21) computed block by block: block k uses gamma_k, not gamma_{k-1} or one
    gamma for all."""
    depth, bits = 5, 9
    blocks = make_stack(depth).train()
    x = torch.randn(6, 3, 8)
    torch.manual_seed(4)
    gammas = [None] + [bdia.draw_gamma(torch.tensor(BDIAConfig().gammas), x) for _ in range(1, depth)]  # drawn block by block
    assert len({tuple(g.flatten().tolist()) for g in gammas[1:]}) > 1  # the blocks' gammas differ
    q = lambda y: bdia.quantize(y, bits)  # noqa: E731
    xs = [q(x)]  # (18)
    xs.append(xs[0] + q(blocks[0].residual(xs[0])))  # (19)
    for k in range(1, depth):
        gamma = gammas[k]
        s = torch.remainder(-xs[k - 1] * 2**bits, 2)  # (20), the parity
        xs.append(gamma * (xs[k - 1] + s * 2.0**-bits) + q((1 - gamma) * xs[k] + (1 + gamma) * blocks[k].residual(xs[k])))
    for reversible in (True, False):
        torch.manual_seed(4)
        with torch.no_grad() if not reversible else contextlib.nullcontext():
            assert torch.equal(run_blocks(blocks, x.requires_grad_(reversible), BDIAConfig(reversible=reversible)), xs[-1])


def test_a_slice_of_an_eval_stack_is_the_plain_slice_bit_for_bit():
    """nn.ModuleList's slice is a new container in training mode: the mode is the blocks'."""
    blocks = make_stack(4, dropout=0.1).eval()
    x = torch.randn(2, 3, 8)
    assert blocks[:2].training  # what the container says
    for part in (blocks[:2], blocks[2:], list(blocks)[1:3]):
        assert torch.equal(run_blocks(part, x, BDIAConfig(bits=None, reversible=False)), plain_stack(part, x))
        stack = bdia.BDIAStack(part, BDIAConfig(bits=None, reversible=False))
        assert torch.equal(stack(x), plain_stack(part, x))
    head, tail = blocks[:2], blocks[2:]  # a mid-stack activation reused, two stacks
    config = BDIAConfig(bits=None, reversible=False)
    assert torch.equal(run_blocks(tail, run_blocks(head, x, config), config), plain_stack(blocks, x))


def test_blocks_in_different_modes_and_a_stack_of_non_modules_are_refused():
    blocks = make_stack(3).train()
    blocks[1].eval()
    with pytest.raises(ValueError, match="some blocks are in training mode, some in eval mode"):
        run_blocks(blocks, torch.randn(2, 3, 8), BDIAConfig())
    with pytest.raises(TypeError, match="list of nn.Modules"):
        run_blocks([torch.tanh, torch.tanh], torch.randn(2, 3, 8), BDIAConfig())
    with pytest.raises(TypeError, match="list of nn.Modules"):
        run_blocks(make_stack(1)[0], torch.randn(2, 3, 8), BDIAConfig())  # one block, not a stack


@pytest.mark.parametrize("reversible", [True, False])
def test_a_python_list_of_blocks_trains_as_its_module_list(reversible):
    blocks = make_stack(3, dropout=0.1).train()
    x = torch.randn(4, 3, 8, requires_grad=True)
    config = BDIAConfig(reversible=reversible)
    out_m, leaves_m, params_m = run_and_backward(blocks, x, config, 9)
    x.grad = None
    for p in blocks.parameters():
        p.grad = None
    torch.manual_seed(9)
    out_l = run_blocks(list(blocks), x, config)
    (out_l * torch.linspace(-1, 1, out_l.numel()).view_as(out_l)).sum().backward()
    leaves_l, params_l = [x.grad], [p.grad for p in blocks.parameters()]
    assert torch.equal(out_m, out_l)
    for a, b in zip(leaves_m + params_m, leaves_l + params_l):
        assert torch.equal(a, b)


class ScaledBlock(nn.Module):
    """A block whose output is scaled by a per-layer value that the model keeps (nanochat's
    per-layer lambdas): `scales` is not among the block's parameters."""

    def __init__(self, block, scales, i):
        super().__init__()
        self.block, self.i = block, i
        self.scales = [scales]  # a list: not registered as this module's parameter

    def forward(self, x):
        return x + self.scales[0][self.i] * self.block.residual(x)


class OwnScaleBlock(nn.Module):
    """The fix: the per-layer wrapper registers the model's parameter as its own too."""

    def __init__(self, block, scales, i):
        super().__init__()
        self.block, self.scales, self.i = block, scales, i

    def forward(self, x):
        return x + self.scales[self.i] * self.block.residual(x)


def test_a_parameter_the_block_reads_but_does_not_own_is_refused_in_reversible_mode():
    torch.manual_seed(0)
    scales = nn.Parameter(torch.linspace(0.5, 1.5, 3))
    blocks = nn.ModuleList(ScaledBlock(b, scales, i) for i, b in enumerate(make_stack(3))).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    run_blocks(blocks, x, BDIAConfig(reversible=False)).sum().backward()
    assert scales.grad is not None and scales.grad.abs().sum() > 0  # stored mode: a gradient
    out = run_blocks(blocks, x, BDIAConfig())
    with pytest.raises(bdia.BDIAError, match=r"block 2 \(ScaledBlock\) reads a tensor of shape \(3,\).*as context"):
        out.sum().backward()
    with pytest.raises(bdia.BDIAError, match="reads a tensor"):  # a closure over a non-leaf: its graph is outside
        z = torch.randn(8, requires_grad=True) * 2
        closure = nn.ModuleList(FunctionalDropoutBlock(p=0.0) for _ in range(2)).train()
        closure[1].ln.register_forward_hook(lambda module, args, y: y + z)
        run_blocks(closure, x, BDIAConfig()).sum().backward()


def test_a_parameter_registered_in_each_layers_wrapper_gets_its_stored_gradient():
    torch.manual_seed(0)
    scales = nn.Parameter(torch.linspace(0.5, 1.5, 3))
    blocks = nn.ModuleList(OwnScaleBlock(b, scales, i) for i, b in enumerate(make_stack(3, dropout=0.1))).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    grads = []
    for reversible in (True, False):
        scales.grad = None
        run_and_backward(blocks, x, BDIAConfig(reversible=reversible), 2)
        grads.append(scales.grad.clone())
    assert grads[1].abs().sum() > 0 and rel_err(grads[0], grads[1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_in_the_forward_and_backward_outside_it_as_the_scripts_do(dtype):
    """The recomputation must replay the forward's autocast, dtype included (bfloat16 is also CPU
    autocast's default, float16 is not), which backward() outside the autocast block does not have:
    reversible = stored to 1e-5."""
    blocks = make_stack(4, dropout=0.1).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    results = []
    for reversible in (True, False):
        for t in [x, *blocks.parameters()]:
            t.grad = None
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=dtype):
            out = run_blocks(blocks, x, BDIAConfig(reversible=reversible))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # outside autocast
        results.append((out.detach(), [t.grad.clone() for t in [x, *blocks.parameters()]]))
    (out_r, grads_r), (out_s, grads_s) = results
    assert out_r.dtype == torch.float32 and torch.equal(out_r, out_s)
    for a, b in zip(grads_r, grads_s):
        assert rel_err(a, b) < 1e-5
