"""
BDIA: exact bit-level reversible transformers that keep the standard architecture
at inference (Zhang, Lewis, Kleijn, ICML 2025). Equation numbers are the paper's.

A transformer block k maps the residual stream x_k to x_k + h_k(x_k); for a pre-norm
block h_k(x) = f_k(x) + g_k(x + f_k(x)) (4). BDIA training draws, per sample and per
block k >= 1, a random gamma_k (e.g. +-1/2) and computes

    x_0     <- Q_l[x_0]                                                     (18)
    x_1      = x_0 + Q_l[h_0(x_0)]                                          (19)
    x_{k+1}  = gamma_k (x_{k-1} + s_{k-1} 2^-l)
               + Q_l[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)]            (21)

where Q_l rounds to multiples of 2^-l (17) and the side information s_{k-1} (20) makes
the product with gamma_k exact (23). Every x_{k-1} can then be rebuilt bit for bit from
(x_k, x_{k+1}) by (24), so training keeps no activations: the backward pass walks the
blocks from the top and recomputes them one at a time. At inference E[gamma] = 0 turns
(21) back into the standard transformer (25).

Any block works: if it defines `residual(x, ...)` that is h_k, otherwise h_k(x) =
block(x, ...) - x. Use it in your own transformer:

    config = BDIAConfig(gammas=(-0.5, 0.5), bits=9, reversible=True)
    x = run_blocks(self.blocks, x, config)      # instead of: for b in self.blocks: x = b(x)
    model.blocks = BDIAStack(model.blocks, config)   # a model that calls an nn.Sequential

This file imports only torch and the standard library: copy it into your project.
"""

import contextlib
import math
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

# -----------------------------------------------------------------------------
# Q_l, eq. (17), with the straight-through gradient


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return torch.round(y)

    @staticmethod
    def backward(ctx, grad):
        return grad  # straight-through: Q_l's gradient is taken as the identity


def round_ste(y):
    return _RoundSTE.apply(y)


def quantize(x, bits):
    """Q_l[x] = round(x / 2^-l) 2^-l, eq. (17); identity when bits is None."""
    if bits is None:
        return x
    return round_ste(x * 2.0**bits) / 2.0**bits  # powers of two: the multiply and divide are exact


# -----------------------------------------------------------------------------
# Side information, eq. (20)


def side_info(x, bits, m):
    """s = (-x / 2^-l) mod 2^m, eq. (20) for |gamma| = 2^-m (for m = 1 the parity of x / 2^-l).

    x is on the 2^-l grid, so x / 2^-l is an integer n; n + s is then a multiple of 2^m and
    gamma (x + s 2^-l) lies on the grid again with no rounding (Prop. 4.3). The low m bits of
    -n in two's complement are s: an integer AND, much cheaper than a float remainder (int64
    for a float64 stream, whose |n| can pass 2^31)."""
    integers = torch.int64 if x.dtype == torch.float64 else torch.int32
    return (x.detach() * -(2.0**bits)).to(integers) & (2**m - 1)


def power_of_two_exponent(gamma):
    """m if |gamma| == 2^-m for an integer m >= 1, else None."""
    m = -math.log2(abs(gamma)) if gamma != 0 else 0.5
    return int(m) if m == int(m) and m >= 1 else None


def side_bits(gammas):
    """Bits of side information per element: m when every nonzero gamma is +-2^-m (the largest m),
    else None: then (21) rounds gamma x_{k-1} instead, since only a +-2^-m product can be made
    exact (Prop. 4.3), which training without reversibility does not need."""
    ms = [power_of_two_exponent(g) for g in gammas if g != 0]
    return max(ms) if ms and None not in ms else None


def pack_bits(s, m):
    """The values 0 <= s < 2^m of an integer tensor, m bits each: (m, ceil(n / 8)) uint8 bit planes."""
    n = s.numel()
    if n % 8:
        s = torch.cat([s.reshape(-1), s.new_zeros(8 - n % 8)])
    flags = s.reshape(1, -1, 8)
    if m > 1:
        flags = torch.cat([(flags >> j) & 1 for j in range(m)])
    return (flags << bit_shifts(s.device, flags.dtype)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed, m, shape, dtype=torch.uint8):
    """Inverse of pack_bits: the m-bit values as a tensor of `shape`."""
    flags = (packed.unsqueeze(-1) >> bit_shifts(packed.device)) & 1
    s = flags[0]
    for j in range(1, m):
        s = s | (flags[j] << j)
    return s.reshape(-1)[: math.prod(shape)].view(shape).to(dtype)


_BIT_SHIFTS = {}


def bit_shifts(device, dtype=torch.uint8):
    """0..7, the places of 8 flags in a byte, made once per device and integer type."""
    if (device, dtype) not in _BIT_SHIFTS:
        _BIT_SHIFTS[device, dtype] = torch.arange(8, dtype=dtype, device=device)
    return _BIT_SHIFTS[device, dtype]


# -----------------------------------------------------------------------------
# One step: (19), (21) and its inverse (24); without quantization (10) and (16)


class Gamma(NamedTuple):
    """gamma_k with the factors that (21) and (24) multiply by. Made once per stack for all
    blocks, (batch, K-1) each, by `Gamma.of`; `block(k, x)` is block k's, shaped to broadcast
    over x. Computing them once saves ~10 small kernels per block and step."""

    gamma: torch.Tensor  # gamma_k
    minus: torch.Tensor  # 1 - gamma_k
    plus: torch.Tensor  # 1 + gamma_k
    minus_l: torch.Tensor  # (1 - gamma_k) 2^l: with Q_l's division by 2^-l folded in (exact)
    plus_l: torch.Tensor  # (1 + gamma_k) 2^l

    @staticmethod
    def of(gamma, bits):
        """From a number, a per-sample tensor or a (batch, K-1) table."""
        gamma = torch.as_tensor(gamma)
        scale = 1.0 if bits is None else 2.0**bits
        return Gamma(gamma, 1 - gamma, 1 + gamma, (1 - gamma) * scale, (1 + gamma) * scale)

    def block(self, k, x):
        shape = (-1, *([1] * (x.dim() - 1)))
        return Gamma(*(t[:, k - 1].view(shape) for t in self))


def first_step(x0, h0, bits):
    """x_1 = x_0 + Q_l[h_0(x_0)], eq. (19)."""
    return x0 + quantize(h0, bits)


def mixed_term(x, h, g):
    """Q_l[(1 - gamma) x + (1 + gamma) h] / 2^-l: the rounded term of (21) and (24), as the
    integer count of 2^-l steps (the steps are multiplied back exactly where it is added).

    The forward (21) and the rebuild (24) both call this one function, so both round the very
    same number: that is what makes (24) exact."""
    return round_ste(torch.addcmul(x * g.minus_l, h, g.plus_l))


def bdia_step(x_prev, x, h, g, bits, side=None):
    """x_{k+1} from (x_{k-1}, x_k, h_k(x_k)) and gamma_k (a Gamma, a number or a per-sample
    tensor): eq. (21), or (10) when bits is None. side None: gamma x_{k-1} is rounded instead
    (gammas that are not +-2^-m, where no side information can make it exact)."""
    g = g if isinstance(g, Gamma) else Gamma.of(g, bits)
    if bits is None:
        return g.gamma * x_prev + g.minus * x + g.plus * h  # (10)
    if side is None:
        first = quantize(g.gamma * x_prev, bits)
    else:
        first = g.gamma * x_prev.add(side, alpha=2.0**-bits)  # gamma (x_{k-1} + s 2^-l): exact (23)
    return first.add(mixed_term(x, h, g), alpha=2.0**-bits)  # (21)


def bdia_unstep(x_next, x, h, g, bits, side=None):
    """x_{k-1} from (x_k, x_{k+1}, h_k(x_k)): eq. (24), exact; or (16) when bits is None, which is
    not: its float error doubles every block (paper Fig. 2)."""
    g = g if isinstance(g, Gamma) else Gamma.of(g, bits)
    if bits is None:
        return x_next / g.gamma - g.minus / g.gamma * x - g.plus / g.gamma * h  # (16)
    x_prev = x_next.sub(mixed_term(x, h, g), alpha=2.0**-bits) / g.gamma  # dividing by 2^-m is exact
    return x_prev.sub(side, alpha=2.0**-bits)  # (24)


def draw_gammas(config, batch, depth, device, dtype):
    """gamma_k for every sample and block k = 1..K-1, uniformly from config.gammas: (batch, K-1)."""
    table = torch.tensor(config.gammas, device=device, dtype=dtype)
    return table[torch.randint(len(table), (batch, max(depth - 1, 0)), device=device)]


# -----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BDIAConfig:
    """How a stack of blocks is trained and evaluated with BDIA.

    gammas:     the values gamma_k is drawn from, uniformly, per sample and block k >= 1.
    bits:       l, the quantization precision 2^-l (17); None for no quantization (10).
    reversible: online back-propagation: activations are rebuilt by (24), not stored.
                Needs bits and all gammas of one magnitude 2^-m, m >= 1.
    eval_gamma: the constant gamma at inference; 0 is the standard transformer (25).
    arithmetic: the element-wise arithmetic of a reversible step (an Arithmetic); None is
                this file's eager code. bdia_fused.fuse(config) sets torch.compile'd code.
    """

    gammas: tuple = (-0.5, 0.5)
    bits: int = 9
    reversible: bool = True
    eval_gamma: float = 0.0
    arithmetic: object = None

    def __post_init__(self):
        object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        check_config(self)


# -----------------------------------------------------------------------------
# The stack: plain, BDIA training, BDIA inference


def run_blocks(blocks, x, config, *context, **kwargs):
    """Run a stack of blocks on x and return x_K.

    config None: the plain stack, x = block(x, *context, **kwargs).
    training (blocks.training): BDIA, eqs. (18)-(21), or (19) and (10) when bits is None; with
        config.reversible (and grad enabled) the activations are rebuilt by (24) in backward.
    eval: eq. (25) with gamma = config.eval_gamma (0 is the standard transformer).

    Positional context tensors (encoder memory, masks) and keyword arguments (rotary
    embeddings, masks, flags) go to every block as they are. Tensors among them that require
    grad, positional or keyword (also inside a tuple, list or dict), get their gradient summed
    over the blocks, in reversible training too.
    """
    if config is None or len(blocks) == 0:
        for block in blocks:
            x = output_of(block(x, *context, **kwargs))
        return x
    if not blocks.training:
        return bdia_inference(blocks, x, config, context, kwargs)
    check_stream(x, config.bits)
    gammas = Gamma.of(draw_gammas(config, x.shape[0], len(blocks), x.device, x.dtype), config.bits)
    if config.reversible and torch.is_grad_enabled():
        return reversible_stack(blocks, x, gammas, config, context, kwargs)
    x_prev, x = None, quantize(x, config.bits)  # (18)
    for k, block in enumerate(blocks):
        x_prev, x = x, bdia_block(block, k, x_prev, x, gammas, config, context, kwargs)[0]
    return x


def output_of(y):
    """A block's output: the residual stream, the first element if it returns a tuple or list."""
    return y[0] if isinstance(y, (tuple, list)) else y


def residual_of(block, x, context, kwargs):
    """h_k(x_k): block.residual(x, ...) if the block defines it, else block(x, ...) - x.

    The subtraction costs nothing at the 2^-l grid: its float error is at most about one unit
    in the last place of |x|, below 2^-l wherever the range guard lets x be, and the
    recomputation repeats the same call on the same bits, so (24) stays exact. The result is
    cast back to x's dtype (the block may run under autocast)."""
    if hasattr(block, "residual"):
        register_residual_with_fsdp(block)
        h = block.residual(x, *context, **kwargs)
    else:
        h = output_of(block(x, *context, **kwargs)) - x
    return h if h.dtype == x.dtype else h.to(x.dtype)


def register_residual_with_fsdp(block):
    """FSDP2: fully_shard gathers a module's parameters only around its forward, so a sharded
    block's residual is registered once as a forward method too (else it runs on the shards).
    A no-op for any other block (torch.distributed.fsdp is looked at only if the user loaded it)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(block, fsdp.FSDPModule) and "residual" not in vars(block):
        fsdp.register_fsdp_forward_method(block, "residual")  # sets the wrapped method on the instance


def bdia_block(block, k, x_prev, x, gammas, config, context, kwargs):
    """Block k of BDIA training: x_{k+1} by (19) for k = 0, else by (21) (or (10)).
    Returns x_{k+1} and the side information s_{k-1} (20) it used (None if none)."""
    h = residual_of(block, x, context, kwargs)
    if k == 0:
        return first_step(x, h, config.bits), None  # (19)
    m = side_bits(config.gammas)
    side = None if config.bits is None or m is None else side_info(x_prev, config.bits, m)  # (20)
    return bdia_step(x_prev, x, h, gammas.block(k, x), config.bits, side), side  # (21)


def bdia_inference(blocks, x, config, context, kwargs):
    """Eq. (25), x_{k+1} = Q_l[block(x_k)], when eval_gamma is 0: each block called through its
    forward, so with bits None this is the plain stack bit for bit (for k = 0, (25) is (19):
    x_0 is on the grid). A constant eval_gamma (paper Fig. 1) runs (10), or with bits (21)
    without side information, which only serves the inverse (24)."""
    gamma, bits = config.eval_gamma, config.bits
    x_prev, x = None, quantize(x, bits)  # (18)
    for k, block in enumerate(blocks):
        if gamma == 0:
            x_prev, x = x, quantize(output_of(block(x, *context, **kwargs)), bits)  # (25)
        elif k == 0:
            x_prev, x = x, first_step(x, residual_of(block, x, context, kwargs), bits)  # (19)
        else:
            x_prev, x = x, bdia_step(x_prev, x, residual_of(block, x, context, kwargs), gamma, bits)  # (10)/(21)
    return x


class BDIAStack(nn.Sequential):
    """The same blocks as an nn.Sequential, whose forward is run_blocks: state_dict keys do
    not change, so `model.blocks = BDIAStack(model.blocks, BDIAConfig())` turns a model that
    calls its blocks as one Sequential into a BDIA one, and its pretrained weights load as
    they are. config None: the plain stack."""

    def __init__(self, blocks, config=None):
        if isinstance(blocks, dict):
            super().__init__(blocks)  # what nn.Sequential's slicing passes
        elif isinstance(blocks, nn.Module):
            super().__init__(OrderedDict(blocks.named_children()))
        else:
            super().__init__(*blocks)
        self.config = config
        if isinstance(blocks, nn.Module):
            self.training = blocks.training  # as the model it joins

    def forward(self, x, *context, **kwargs):
        return run_blocks(self, x, self.config, *context, **kwargs)

    def __getitem__(self, index):  # a slice is a BDIAStack of the same config and mode
        item = super().__getitem__(index)
        if isinstance(item, BDIAStack):
            item.config, item.training = self.config, self.training
        return item

    def extra_repr(self):
        return f"config={self.config}"


# -----------------------------------------------------------------------------
# Online back-propagation
#
# Each block is one autograd Function, ReversibleBlock: inputs (x_{k-1}, x_k), the context
# tensors and the block's trainable parameters; output x_{k+1}. Its forward keeps no
# activation, only the packed side bits s_{k-1} (and the RNG state if the block drew random
# numbers). Autograd runs the blocks' backwards from the top down; block k's backward takes
# (x_k, x_{k+1}) from the stack's Tape, recomputes h_k(x_k), rebuilds x_{k-1} by (24) for
# block k-1, and returns the gradients of its inputs. Parameter gradients thus arrive block
# by block (DDP's hooks fire as for a plain model), context gradients are summed by autograd.


class Arithmetic(NamedTuple):
    """The element-wise arithmetic of a reversible step k >= 1; `EAGER` is this file's,
    bdia_fused.fuse(config) puts a torch.compile'd one into the config."""

    step: Callable  # (x_prev, x, h, g, bits, m) -> x_{k+1}, packed s_{k-1}, max|x_{k+1}|: (20), (21)
    rebuild: Callable  # (x_next, x, h, g, bits, m, packed) -> x_{k-1}: (24)
    grad_h: Callable  # (g_next, g) -> dL/dh_k = (1 + gamma_k) dL/dx_{k+1}  (Q_l straight-through)
    grad_inputs: Callable  # (g_x, g_next, g) -> dL/dx_k, dL/dx_{k-1}, g_x: dL/dh_k dh_k/dx_k


def eager_step(x_prev, x, h, g, bits, m):
    side = side_info(x_prev, bits, m)  # (20)
    x_next = bdia_step(x_prev, x, h, g, bits, side)  # (21)
    return x_next, pack_bits(side, m), max_abs(x_next)


def eager_rebuild(x_next, x, h, g, bits, m, packed):
    return bdia_unstep(x_next, x, h, g, bits, unpack_bits(packed, m, x.shape))  # (24)


def eager_grad_inputs(g_x, g_next, g):
    """dL/dx_k = (1 - gamma) dL/dx_{k+1} + dL/dh dh/dx, and dL/dx_{k-1} = gamma dL/dx_{k+1} (21)."""
    return g_x.addcmul_(g_next, g.minus), g_next * g.gamma


EAGER = Arithmetic(eager_step, eager_rebuild, lambda g_next, g: g_next * g.plus, eager_grad_inputs)


def reversible_stack(blocks, x, gammas, config, context, kwargs):
    """BDIA training (18)-(21) whose backward rebuilds the activations by (24)."""
    x_prev, x = None, quantize(x, config.bits)  # (18)
    tape = Tape(x, config, context, kwargs)
    for k, block in enumerate(blocks):
        params = [p for p in block.parameters() if p.requires_grad]
        x_next = ReversibleBlock.apply(tape, block, k, gammas, x_prev, x, *tape.tensors, *params)
        x_prev, x = x, x_next
    check_magnitudes(tape.magnitudes, x, config.bits)
    tape.rebuilt = {len(blocks): x.detach(), len(blocks) - 1: x_prev.detach()}  # the top pair
    tape.magnitudes = None
    return x


class Tape:
    """What the blocks of one reversible forward share: the config, the context, the
    activations rebuilt so far (at first the top pair (x_{K-1}, x_K)), a fingerprint of x_0
    and |x_k| for the range guard."""

    def __init__(self, x0, config, context, kwargs):
        self.config = config
        self.arithmetic = config.arithmetic or EAGER
        self.m = side_bits(config.gammas)
        self.leaves, self.spec = tree_flatten((context, kwargs))  # context tensors, also nested ones
        self.tensors = [t for t in self.leaves if torch.is_tensor(t)]
        self.fingerprint = fingerprint(x0, config.bits)
        self.magnitudes = [max_abs(x0)]
        self.rebuilt = {}

    def context(self, tensors=None):
        """(context, kwargs) as given, or with these tensors in the places of its tensors."""
        if tensors is None:
            return tree_unflatten(self.leaves, self.spec)
        tensors = iter(tensors)
        return tree_unflatten([next(tensors) if torch.is_tensor(t) else t for t in self.leaves], self.spec)

    def take(self, k):
        """(x_{k+1}, x_k) for the backward of block k; x_{k+1} is not needed after it."""
        if k + 1 not in self.rebuilt:
            raise BDIAError("BDIA: this reversible graph was already back-propagated; it cannot be back-"
                            "propagated twice (retain_graph=True is not supported with reversible=True)")
        return self.rebuilt.pop(k + 1), self.rebuilt[k]


class ReversibleBlock(torch.autograd.Function):
    """Block k of a reversible stack: (x_{k-1}, x_k) -> x_{k+1}, no activations kept.
    Inputs: tape, block, k, gammas, x_prev, x, *context tensors, *trainable parameters."""

    @staticmethod
    def forward(ctx, tape, block, k, gammas, x_prev, x, *tensors_and_params):
        context, kwargs = tape.context()
        rng = generator_states(x.device)  # random draws are replayed by observation, never by guess
        if k == 0:
            x_next, packed = first_step(x, residual_of(block, x, context, kwargs), tape.config.bits), None  # (19)
            tape.magnitudes.append(max_abs(x_next))
        else:
            h = residual_of(block, x, context, kwargs)
            x_next, packed, size = tape.arithmetic.step(x_prev, x, h, gammas.block(k, x), tape.config.bits, tape.m)
            tape.magnitudes.append(size)
        ctx.rng = rng if generators_changed(rng, x.device) else None  # kept only where the block drew
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        ctx.tape, ctx.block, ctx.k = tape, block, k
        ctx.n_params = len(tensors_and_params) - len(tape.tensors)  # FSDP2: see recomputed_grads
        ctx.save_for_backward(packed, *gammas, *tensors_and_params[: len(tape.tensors)])
        return x_next

    @staticmethod
    def backward(ctx, g_next):
        return block_backward(ctx, g_next)


def block_backward(ctx, g_next):
    """Block k's backward, in the paper's order: take (x_k, x_{k+1}); recompute h_k(x_k) with
    the forward's random draws and autocast; rebuild x_{k-1} by (24) for the block below;
    back-propagate through (19) or (21) with torch.autograd.grad; pass the gradients down."""
    tape, block, k, bits = ctx.tape, ctx.block, ctx.k, ctx.tape.config.bits
    packed, *saved = ctx.saved_tensors
    gammas, tensors = Gamma(*saved[: len(Gamma._fields)]), saved[len(Gamma._fields) :]
    # needs_input_grad follows forward's inputs: tape, block, k, gammas, x_prev, x, *tensors, *params
    prev_needs_grad, needs_grad = ctx.needs_input_grad[4], ctx.needs_input_grad[6 : 6 + len(tensors)]
    x_next, x = tape.take(k)  # rebuilt by block k+1's backward (or the top pair)

    x_leaf = x.detach().requires_grad_()
    leaves = [t.detach().requires_grad_() if need else t for t, need in zip(tensors, needs_grad)]
    context, kwargs = tape.context(leaves)
    with replayed_generators(ctx.rng, x.device), torch.enable_grad():
        with torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            h = residual_of(block, x_leaf, context, kwargs)  # h_k(x_k) again, now with its graph

    gamma_k = gammas.block(k, x) if k > 0 else None  # gamma_k and its factors (a Gamma)
    if k > 0:
        tape.rebuilt[k - 1] = tape.arithmetic.rebuild(x_next, x, h.detach(), gamma_k, bits, tape.m, packed)  # (24)
        if k == 1:
            check_x0(tape.rebuilt[0], tape)
    else:
        tape.rebuilt.pop(0)
    del x_next

    grad_leaves = [t for t, need in zip(leaves, needs_grad) if need]
    g_h = g_next if k == 0 else tape.arithmetic.grad_h(g_next, gamma_k)
    g_x, g_params, g_leaves = recomputed_grads(h, g_h, x_leaf, block, grad_leaves, ctx.n_params)
    g_leaves = iter(g_leaves)
    g_x = torch.zeros_like(g_next) if g_x is None else g_x
    if k == 0:  # (19): x_1 = x_0 + Q_l[h_0(x_0)]
        g_x, g_prev = g_x + g_next, None  # not in place: g_x may be g_h = g_next itself
    else:  # (21)
        g_x, g_prev = tape.arithmetic.grad_inputs(g_x, g_next, gamma_k)
    g_tensors = [next(g_leaves) if need else None for need in needs_grad]
    return None, None, None, None, g_prev if prev_needs_grad else None, g_x, *g_tensors, *g_params


def recomputed_grads(h, g_h, x_leaf, block, leaves, n_params):
    """dL/dx_k, dL/dparams and dL/dleaves of the recomputed h_k(x_k), given g_h = dL/dh_k.

    The parameter gradients are returned, for the Function to pass on. But where FSDP2 shards
    the block or its sub-modules (fully_shard), its hooks gather the parameters around the
    recomputation, which thus runs on FSDP's unsharded copies, and reduce-scatter those copies'
    .grad right after it: the gradients then go into that .grad here (autograd.backward), and
    the Function returns none for the n_params parameters it was given (FSDP's shards)."""
    params = [p for p in block.parameters() if p.requires_grad]  # as the recomputation saw them
    if not fsdp_shards_within(block):
        grads = torch.autograd.grad(h, [x_leaf, *params, *leaves], g_h, allow_unused=True)
        return grads[0], grads[1 : 1 + len(params)], grads[1 + len(params) :]
    torch.autograd.backward(h, g_h, inputs=[x_leaf, *params, *leaves])  # FSDP2: into the unsharded copies
    return x_leaf.grad, [None] * n_params, [t.grad for t in leaves]


def fsdp_shards_within(block):
    """True if FSDP2's fully_shard wraps the block or one of its sub-modules (then FSDP gathers
    and reduce-scatters inside the block's recomputation). torch.distributed.fsdp is looked at
    only if the user loaded it: this file needs no torch.distributed."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in block.modules())


def generator_states(device):
    """The CPU generator's state, and that of x's CUDA device (what a block's draws change)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def generators_changed(before, device):
    after = generator_states(device)
    return not torch.equal(before[0], after[0]) or (after[1] is not None and not torch.equal(before[1], after[1]))


@contextlib.contextmanager
def replayed_generators(state, device):
    """Within: the generators as they were before the block's forward (state None: as they
    are). After: the caller's generators as they were, untouched by the replay."""
    with torch.random.fork_rng([device] if device.type == "cuda" else [], enabled=state is not None):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)
        yield


# -----------------------------------------------------------------------------
# Safety checks: the configuration, the range of the stream, the rebuilt x_0


class BDIAError(RuntimeError):
    """Base of the engine's runtime errors: scripts catch these by type."""


class DivergedError(BDIAError):
    """The residual stream blew up (NaN, infinity or |x| > 2^20): the training diverged."""


class PrecisionError(BDIAError):
    """The residual stream left the range where its dtype holds the 2^-l grid exactly (or
    cannot hold it at all: a 16-bit stream, too many bits): (24) would be inexact."""


class ReconstructionError(BDIAError):
    """The reversible backward did not rebuild x_0 bit for bit: the gradients would be wrong."""


def check_config(c):
    """A configuration that cannot work is a ValueError that says why (BDIAConfig calls this)."""
    fix, ms = "or pass reversible=False to store activations instead", [power_of_two_exponent(g) for g in c.gammas]
    if not c.gammas:
        raise ValueError("BDIAConfig: gammas is empty; give at least one value, e.g. (-0.5, 0.5)")
    if c.bits is not None and not isinstance(c.bits, int):  # l may be negative (Table 4)
        raise ValueError(f"BDIAConfig: bits must be an integer (l in 2^-l) or None, got {c.bits!r}")
    if c.bits is not None and c.bits >= mantissa_bits(torch.float64):
        raise ValueError(f"BDIAConfig: bits={c.bits} leaves no room for |x| >= 1 in any float (float64 has 52 "
                         "mantissa bits, float32 23); the paper uses 9")
    if abs(sum(c.gammas) / len(c.gammas)) > 1e-12:
        warnings.warn(f"BDIAConfig: the mean of gammas {c.gammas} is not 0, but inference uses E[gamma] = 0 "
                      "(eq. 25); use a set symmetric around 0 such as (-0.5, 0.5)", stacklevel=4)
    if not c.reversible and c.arithmetic is not None:
        raise ValueError("BDIAConfig: arithmetic (bdia_fused.fuse) is that of the reversible step; it needs "
                         "reversible=True")
    if not c.reversible:
        return
    if c.bits is None:
        raise ValueError("BDIAConfig: reversible=True needs quantization (bits=None given): without it the inverse "
                         f"(16) doubles float error every block; set bits (the paper uses 9) {fix}")
    if 0.0 in c.gammas:
        raise ValueError(f"BDIAConfig: reversible=True cannot use gamma 0 (gammas={c.gammas}): eq. (24) divides "
                         f"by gamma_k; use gammas such as (-0.5, 0.5) {fix}")
    if None in ms:
        raise ValueError(f"BDIAConfig: reversible=True needs every |gamma| = 2^-m with m >= 1 (gammas={c.gammas}): "
                         f"only then is gamma (x + s 2^-l) exact (Prop. 4.3); use e.g. (-0.5, 0.5) {fix}")
    if max(ms) > 8:
        raise ValueError(f"BDIAConfig: |gamma| below 2^-8 (gammas={c.gammas}) would need more than 8 bits of side "
                         f"information per element; use e.g. (-0.5, 0.5) {fix}")
    if len(set(ms)) > 1:
        raise ValueError(f"BDIAConfig: reversible=True needs all gammas of one magnitude 2^-m (gammas={c.gammas}); "
                         f"use e.g. (-0.5, 0.5) or (-0.25, 0.25) {fix}")


def mantissa_bits(dtype):
    """23 for float32, 52 for float64."""
    return round(-math.log2(torch.finfo(dtype).eps))


def exact_limit(dtype, bits):
    """|x| below which `dtype` holds every multiple of 2^-l exactly: 2^(mantissa - l)."""
    return 2.0 ** (mantissa_bits(dtype) - bits)


def check_stream(x, bits):
    """The residual stream's dtype must hold the 2^-l grid (Lemma 4.2): float32 or float64."""
    if bits is None:
        return
    if x.dtype not in (torch.float32, torch.float64):
        raise PrecisionError(f"BDIA with bits={bits} needs a float32 or float64 residual stream, got {x.dtype}: "
                             "a 2^-l grid does not fit in 16-bit floats. Keep x in float32 and run the blocks "
                             "under torch.autocast instead")
    if exact_limit(x.dtype, bits) <= 1:
        raise PrecisionError(f"BDIA with bits={bits}: {x.dtype} holds the 2^-{bits} grid exactly only for |x| < "
                             f"{exact_limit(x.dtype, bits):g}, and a normalised residual stream exceeds that; use "
                             f"bits <= {mantissa_bits(x.dtype) - 3} (the paper uses 9) or a float64 stream")


def max_abs(x):
    return x.detach().abs().amax()  # NaN stays NaN (and 30x faster than an infinity norm on a CPU)


DIVERGED = 2.0**20  # no sensible l needs |x| this large in a normalised stream


def check_magnitudes(magnitudes, x, bits):
    """Raise if some x_k left the range where x.dtype holds the 2^-l grid exactly (Lemma 4.2
    needs every x_k on the grid): DivergedError for a NaN, an infinity or |x| beyond 2^20
    (training that diverged, not a bits setting), else PrecisionError."""
    limit = exact_limit(x.dtype, bits)
    magnitudes = torch.stack(magnitudes)
    if bool((magnitudes < limit).all()):  # one device sync per step; NaN fails too
        return
    k = int((~(magnitudes < limit)).nonzero()[0])
    where = "the input of the stack (x_0)" if k == 0 else f"the output of block {k - 1} (x_{k})"
    size = magnitudes[k].item()
    if not math.isfinite(size) or size > DIVERGED:
        raise DivergedError(f"BDIA: |x| reached {size:.4g} at {where}: training diverged. Lower the learning "
                            "rate or clip gradients, and resume from the last checkpoint")
    raise PrecisionError(
        f"BDIA: |x| reached {size:.4g} at {where}, but {x.dtype} holds the 2^-{bits} grid exactly only below "
        f"2^{math.log2(limit):.0f} = {limit:g}; the reversible backward would return wrong gradients. Use fewer "
        f"bits (at most bits={math.floor(mantissa_bits(x.dtype) - math.log2(size)) - 1} for this |x|), normalise "
        "the stack's input, or keep the residual stream in float64")


def fingerprint(x, bits):
    """Integer checksums of x on the 2^-l grid: any single-element change alters them."""
    n = torch.round(x.detach() * 2.0**bits).to(torch.int64)
    return torch.stack([n.sum(), (n * n).sum()])


def check_x0(x0, tape):
    """The rebuilt x_0 must be the forward's, bit for bit, or every gradient below is wrong."""
    if not torch.equal(fingerprint(x0, tape.config.bits), tape.fingerprint):
        raise ReconstructionError(
            "BDIA: the reversible backward did not rebuild x_0 bit for bit. A block is not deterministic between "
            "forward and recomputation (a non-deterministic kernel, an attention backend that differs with and "
            "without grad, or state that changes between calls); make the blocks deterministic or use "
            "reversible=False")


# -----------------------------------------------------------------------------
# Demo: reconstruction error of (16) vs (24), the paper's Fig. 2 and 6


class _DemoBlock(nn.Module):
    """A small GPT-like pre-norm block: causal self-attention and a GELU MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def residual(self, x):
        f = self.attention(self.ln1(x))  # (4): h(x) = f(x) + g(x + f(x))
        return f + self.mlp(self.ln2(x + f))

    def forward(self, x):
        return x + self.residual(x)


@torch.no_grad()
def reconstruction_errors(depth=12, dim=256, heads=8, batch=4, seq=64, bits=9, seed=0):
    """Per block k, max |rebuilt x_k - x_k| when reversing a BDIA stack with gammas +-1/2
    by (16) (no quantization, float32) and by (24) (bits quantization, side information)."""
    torch.manual_seed(seed)
    blocks = nn.ModuleList(_DemoBlock(dim, heads) for _ in range(depth))
    x0 = torch.randn(batch, seq, dim)
    gammas = draw_gammas(BDIAConfig(), batch, depth, x0.device, x0.dtype)
    errors = {}
    for name, b in (("eq16", None), ("eq24", bits)):
        config, g = BDIAConfig(bits=b, reversible=False), Gamma.of(gammas, b)
        xs, sides = [quantize(x0, b)], []  # sides[k]: the s_{k-1} block k used
        for k, block in enumerate(blocks):  # forward, keeping every x_k for comparison
            x_next, side = bdia_block(block, k, xs[k - 1] if k else None, xs[k], g, config, (), {})
            xs.append(x_next)
            sides.append(side)
        rebuilt = {depth: xs[depth], depth - 1: xs[depth - 1]}
        for k in range(depth - 1, 0, -1):  # backward, from the top pair only
            h = blocks[k].residual(rebuilt[k])
            rebuilt[k - 1] = bdia_unstep(rebuilt[k + 1], rebuilt[k], h, g.block(k, xs[k]), b, sides[k])  # (24)/(16)
        errors[name] = [(rebuilt[k] - xs[k]).abs().max().item() for k in range(depth + 1)]
    return errors


if __name__ == "__main__":
    errors = reconstruction_errors()
    print("Reconstruction error max|rebuilt x_k - x_k| of a 12-block GPT-like BDIA stack,")
    print("gammas +-0.5, width 256, float32 (paper Fig. 2 and 6)")
    print(f"{'x_k':>5} {'eq. (16), no quantization':>28} {'eq. (24), l = 9':>18}")
    for k in range(len(errors["eq16"]) - 1, -1, -1):
        print(f"{k:>5} {errors['eq16'][k]:>28.3e} {errors['eq24'][k]:>18.3e}")
