"""
BDIA: exact bit-level reversible transformers that keep the standard architecture
at inference (Zhang, Lewis, Kleijn, ICML 2025). Equation numbers are the paper's.

A pre-norm block k computes a residual h_k(x) = f_k(x) + g_k(x + f_k(x))     (4)
and a plain stack is x_{k+1} = x_k + h_k(x_k). BDIA training draws, per sample and
per block k >= 1, a random gamma_k (e.g. +-1/2) and computes

    x_0     <- Q_l[x_0]                                                     (18)
    x_1      = x_0 + Q_l[h_0(x_0)]                                          (19)
    x_{k+1}  = gamma_k (x_{k-1} + s_{k-1} 2^-l)
               + Q_l[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)]            (21)

where Q_l rounds to multiples of 2^-l (17) and the side information s_{k-1} (20)
makes the product with gamma_k exact. Then every x_{k-1} can be rebuilt exactly,
bit for bit, from (x_k, x_{k+1}) by (24), so training needs no stored activations:
the backward pass walks the blocks from the top and recomputes them one at a time.
At inference E[gamma] = 0 turns (21) back into a standard transformer (25).

Use it in your own transformer (blocks define `residual(x, *context)`):

    config = BDIAConfig(gammas=(-0.5, 0.5), bits=9, reversible=True)
    x = run_blocks(self.blocks, x, config)      # instead of: for b in blocks: x = b(x)

This file imports only torch and the standard library: copy it into your project.
"""

import math
import warnings
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# Quantization (17) and side information (20)


class _RoundSTE(torch.autograd.Function):
    """round() with the straight-through gradient (identity)."""

    @staticmethod
    def forward(ctx, y):
        return torch.round(y)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(y):
    return _RoundSTE.apply(y)


def quantize(x, bits):
    """Q_l[x] = round(x / 2^-l) 2^-l, eq. (17); identity when bits is None."""
    if bits is None:
        return x
    scale = 2.0**bits  # a power of two: the multiply and divide are exact
    return round_ste(x * scale) / scale


def mantissa_bits(dtype):
    """23 for float32, 52 for float64."""
    return round(-math.log2(torch.finfo(dtype).eps))


def exact_limit(dtype, bits):
    """|x| below which `dtype` holds every multiple of 2^-l exactly: 2^(mantissa - l)."""
    return 2.0 ** (mantissa_bits(dtype) - bits)


def side_info(x, bits, m):
    """s = (-x / 2^-l) mod 2^m, eq. (20) generalised to |gamma| = 2^-m.

    x is on the 2^-l grid, so x / 2^-l is an integer n; then n + s is a multiple of
    2^m and gamma (x + s 2^-l) is again on the grid with no rounding (Prop. 4.3).
    For m = 1, s is the parity of n, exactly eq. (20). An integer tensor holds -n exactly
    (|n| < 2^23 in float32, int32; < 2^52 in float64, int64) and its low m bits are s (two's
    complement): much cheaper than a float remainder.
    """
    integers = torch.int64 if x.dtype == torch.float64 else torch.int32
    return (x.detach() * -(2.0**bits)).to(integers) & (2**m - 1)  # a constant: no gradient


def pack_bits(s, m):
    """Pack the values 0 <= s < 2^m of an integer tensor into m bits each: m bit planes, 8 flags per byte."""
    n = s.numel()
    if n % 8:
        s = torch.cat([s.reshape(-1), s.new_zeros(8 - n % 8)])  # pad to a multiple of 8
    flags = s.reshape(1, -1, 8)
    if m > 1:
        flags = torch.cat([(flags >> j) & 1 for j in range(m)])
    return (flags << bit_shifts(s.device, flags.dtype)).sum(dim=-1, dtype=torch.uint8)  # (m, ceil(n / 8))


def unpack_bits(packed, m, shape, dtype=torch.uint8):
    """Inverse of pack_bits: the m-bit values as a tensor of `shape` (uint8 unless asked)."""
    flags = (packed.unsqueeze(-1) >> bit_shifts(packed.device)) & 1  # (m, ceil(n / 8), 8)
    s = flags[0]
    for j in range(1, m):
        s = s | (flags[j] << j)
    return s.reshape(-1)[: math.prod(shape)].view(shape).to(dtype)


_BIT_SHIFTS = {}


def bit_shifts(device, dtype=torch.uint8):
    """The shifts 0..7 of the 8 flags in a byte, made once per device and integer type."""
    if (device, dtype) not in _BIT_SHIFTS:
        _BIT_SHIFTS[device, dtype] = torch.arange(8, dtype=dtype, device=device)
    return _BIT_SHIFTS[device, dtype]


def power_of_two_exponent(gamma):
    """m if |gamma| == 2^-m for an integer m >= 1, else None."""
    if gamma == 0:
        return None
    m = -math.log2(abs(gamma))
    return int(m) if m == int(m) and m >= 1 else None


def side_bits(gammas):
    """Bits of side information per element: m when every nonzero gamma is +-2^-m (the largest
    m among them), else None: then no side information is used (and none is needed, since
    only a +-2^-m product can be made exact, Prop. 4.3; training that is not reversible
    quantizes the first term of (21) instead)."""
    ms = [power_of_two_exponent(g) for g in gammas if g != 0]
    return max(ms) if ms and None not in ms else None


# -----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BDIAConfig:
    """How a stack of blocks is trained and evaluated with BDIA.

    gammas:     the values gamma_k is drawn from, uniformly, per sample and block k >= 1.
    bits:       l, the quantization precision 2^-l (17); None for no quantization (10).
    reversible: online back-propagation: activations are rebuilt by (24), not stored.
    eval_gamma: the constant gamma at inference; 0 is the standard transformer (25).
    fused:      reversible training with its element-wise arithmetic compiled by
                torch.compile: a handful of fused kernels per block instead of ~20.
    """

    gammas: tuple = (-0.5, 0.5)
    bits: int = 9
    reversible: bool = True
    eval_gamma: float = 0.0
    fused: bool = False

    def __post_init__(self):
        gammas = tuple(float(g) for g in self.gammas)
        object.__setattr__(self, "gammas", gammas)
        if not gammas:
            raise ValueError("BDIAConfig: gammas is empty; give at least one value, e.g. (-0.5, 0.5)")
        if self.bits is not None and not isinstance(self.bits, int):  # l may be negative (Table 4)
            raise ValueError(f"BDIAConfig: bits must be an integer (l in 2^-l) or None, got {self.bits!r}")
        if self.bits is not None and self.bits >= mantissa_bits(torch.float64):
            raise ValueError(
                f"BDIAConfig: bits={self.bits} leaves no room for |x| >= 1 in any float (float64 has 52 "
                f"mantissa bits, float32 23); the paper uses 9")
        if abs(sum(gammas) / len(gammas)) > 1e-12:
            warnings.warn(
                f"BDIAConfig: the mean of gammas {gammas} is not 0, but inference uses E[gamma] = 0 "
                f"(eq. 25); use a set symmetric around 0 such as (-0.5, 0.5)",
                stacklevel=3,
            )
        if self.reversible:
            self._check_reversible()
        elif self.fused:
            raise ValueError("BDIAConfig: fused=True compiles the reversible step; it needs reversible=True")

    def _check_reversible(self):
        fix = "or pass reversible=False to store activations instead"
        if self.bits is None:
            raise ValueError(
                "BDIAConfig: reversible=True needs quantization (bits=None given): without it the "
                f"inverse (16) doubles float error every block; set bits (the paper uses 9) {fix}"
            )
        if any(g == 0 for g in self.gammas):
            raise ValueError(
                f"BDIAConfig: reversible=True cannot use gamma 0 (gammas={self.gammas}): eq. (24) "
                f"divides by gamma_k; use gammas such as (-0.5, 0.5) {fix}"
            )
        if any(power_of_two_exponent(g) is None for g in self.gammas):
            raise ValueError(
                f"BDIAConfig: reversible=True needs every |gamma| = 2^-m with m >= 1 (gammas="
                f"{self.gammas}): only then is gamma (x + s 2^-l) exact (Prop. 4.3); use e.g. "
                f"(-0.5, 0.5) or (-0.25, 0.25) {fix}"
            )
        if max(power_of_two_exponent(g) for g in self.gammas) > 8:
            raise ValueError(
                f"BDIAConfig: |gamma| below 2^-8 (gammas={self.gammas}) would need more than 8 bits "
                f"of side information per element; use e.g. (-0.5, 0.5) {fix}"
            )
        if len({abs(g) for g in self.gammas}) > 1:
            raise ValueError(
                f"BDIAConfig: reversible=True needs all gammas of one magnitude 2^-m (gammas="
                f"{self.gammas}); use e.g. (-0.5, 0.5) or (-0.25, 0.25) {fix}"
            )


# -----------------------------------------------------------------------------
# One BDIA step forward (21)/(10) and backward (24)/(16)


Factors = namedtuple("Factors", "gamma minus plus minus_l plus_l")


def step_factors(gammas, bits):
    """What each step multiplies by, per sample and block, computed once per stack: gamma_k,
    1 - gamma_k, 1 + gamma_k, and the last two times 2^l (they put the mixed term of (21) on
    the integer grid). gammas: (batch, K-1)."""
    scale = 1.0 if bits is None else 2.0**bits
    minus, plus = 1 - gammas, 1 + gammas
    return Factors(gammas, minus, plus, minus * scale, plus * scale)


def as_factors(gamma, bits):
    """gamma_k as Factors: as it is when it already is (a stack's, computed once per step),
    else from a number or a per-sample tensor."""
    return gamma if isinstance(gamma, Factors) else step_factors(torch.as_tensor(gamma), bits)


def factors_of(factors, k, x):
    """Block k's factors (k >= 1), shaped to broadcast over x: (batch, 1, ..., 1)."""
    shape = (-1, *([1] * (x.dim() - 1)))
    return Factors(*(f[:, k - 1].view(shape) for f in factors))


def first_step(x0, h0, bits):
    """x_1 = x_0 + Q_l[h_0(x_0)], eqs. (19) and (6)."""
    if bits is None:
        return x0 + h0
    return x0.add(round_ste(h0 * 2.0**bits), alpha=2.0**-bits)


def mixed_term(x, h, f):
    """Q_l[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)], the second term of (21), in units of 2^-l
    (an integer-valued tensor). The forward (21) and the rebuild (24) both call this function,
    so both round the very same number: that is what makes (24) exact."""
    return round_ste((x * f.minus_l).addcmul_(h, f.plus_l))  # one temporary, not two


def bdia_step(x_prev, x, h, gamma, bits, side=None):
    """x_{k+1} from (x_{k-1}, x_k, h_k(x_k)): eq. (21), or eq. (10) when bits is None. gamma:
    gamma_k (a number, a per-sample tensor, or the block's Factors). side None: (21) without
    the side term (gammas that are not +-2^-m)."""
    f = as_factors(gamma, bits)
    if bits is None:
        return f.gamma * x_prev + f.minus * x + f.plus * h  # (10)
    if side is None:  # Q_l keeps gamma x_{k-1} on the grid (Lemma 4.2), e.g. for gamma = +-0.6
        first = quantize(f.gamma * x_prev, bits)
    else:  # x_{k-1} + s 2^-l is a multiple of 2^(m-l): the product with gamma is exact (23)
        first = f.gamma * x_prev.add(side, alpha=2.0**-bits)
    return first.add(mixed_term(x, h, f), alpha=2.0**-bits)  # (21)


def bdia_unstep(x_next, x, h, gamma, bits, side=None):
    """x_{k-1} from (x_k, x_{k+1}, h_k(x_k)): eq. (24), exact; or eq. (16) when bits is None."""
    f = as_factors(gamma, bits)
    if bits is None:
        return x_next / f.gamma - f.minus / f.gamma * x - f.plus / f.gamma * h  # (16)
    x_prev = x_next.sub(mixed_term(x, h, f), alpha=2.0**-bits)  # a new tensor: the rest works in place
    return x_prev.div_(f.gamma).sub_(side, alpha=2.0**-bits)  # (24); dividing by 2^-m is exact


def draw_gammas(config, batch, depth, device, dtype):
    """gamma_k for every sample and block k = 1..K-1: a (batch, K-1) tensor."""
    table = torch.tensor(config.gammas, device=device, dtype=dtype)
    return table[torch.randint(len(table), (batch, max(depth - 1, 0)), device=device)]


# -----------------------------------------------------------------------------
# The stack: plain, BDIA training, BDIA inference


def run_blocks(blocks, x, config, *context):
    """Run a stack of blocks on x and return x_K.

    config None: the plain stack, x = block(x, *context).
    training (blocks.training): BDIA, eqs. (18)-(21), or (6) and (10) when bits is None;
        with config.reversible the activations are rebuilt by (24) during backward.
    eval: eq. (25) with gamma = config.eval_gamma (0 is the standard transformer),
        quantized when bits is set. Context tensors are passed to every block.
    """
    if config is None or len(blocks) == 0:
        for block in blocks:
            x = block(x, *context)
        return x
    if not blocks.training:
        return bdia_inference(blocks, x, config, *context)
    if config.bits is not None and x.dtype not in (torch.float32, torch.float64):
        raise PrecisionError(
            f"BDIA with bits={config.bits} needs a float32 or float64 residual stream, got {x.dtype}: "
            "a 2^-l grid does not fit in 16-bit floats. Keep x in float32 and run the blocks "
            "under torch.autocast instead"
        )
    if config.bits is not None and exact_limit(x.dtype, config.bits) <= 1:
        raise PrecisionError(
            f"BDIA with bits={config.bits}: {x.dtype} holds the 2^-{config.bits} grid exactly only for |x| < "
            f"{exact_limit(x.dtype, config.bits):g}, and a normalised residual stream exceeds that; use "
            f"bits <= {mantissa_bits(x.dtype) - 3} (the paper uses 9) or a float64 stream"
        )
    factors = step_factors(draw_gammas(config, x.shape[0], len(blocks), x.device, x.dtype), config.bits)
    if config.reversible and torch.is_grad_enabled():
        return reversible_stack(blocks, x, factors, config, context)
    x_prev, x = None, quantize(x, config.bits)  # (18)
    for k, block in enumerate(blocks):
        x_prev, x = x, bdia_block(block, k, x_prev, x, factors, config, context)[0]
    return x


def residual_of(block, x, context):
    """h_k(x_k), cast back to the residual stream's dtype (it may run under autocast)."""
    h = block.residual(x, *context)
    return h if h.dtype == x.dtype else h.to(x.dtype)


def bdia_block(block, k, x_prev, x, factors, config, context):
    """One block of BDIA training: x_{k+1} by (19) for k = 0, else by (21) (or (10)).
    Returns x_{k+1} and the side information s_{k-1} (20) it used (None if none)."""
    h = residual_of(block, x, context)
    if k == 0:
        return first_step(x, h, config.bits), None  # (19)
    m = side_bits(config.gammas)
    side = None if config.bits is None or m is None else side_info(x_prev, config.bits, m)  # (20)
    return bdia_step(x_prev, x, h, factors_of(factors, k, x), config.bits, side), side  # (21)


def bdia_inference(blocks, x, config, *context):
    """Eq. (25) when eval_gamma is 0. A constant eval_gamma (paper Fig. 1) runs (10), or with
    bits (21) without the side term: side information only serves the exact inverse (24),
    which inference never takes."""
    gamma, bits = config.eval_gamma, config.bits
    x_prev, x = None, quantize(x, bits)  # (18)
    for k, block in enumerate(blocks):
        h = residual_of(block, x, context)
        if k == 0:
            x_prev, x = x, first_step(x, h, bits)  # (19)
        elif gamma == 0:
            x_prev, x = x, quantize(x + h, bits)  # (25)
        else:
            x_prev, x = x, bdia_step(x_prev, x, h, gamma, bits)  # (10), or (21) without s
    return x


# -----------------------------------------------------------------------------
# Online back-propagation
#
# Each block is one autograd Function, ReversibleBlock, whose inputs are (x_{k-1}, x_k),
# the context and the block's trainable parameters, and whose output is x_{k+1}. Its
# forward stores no activation; only the packed side bits s_{k-1}. Autograd runs the
# blocks' backwards from the top down; block k's backward takes (x_k, x_{k+1}) from the
# shared Tape, recomputes h_k(x_k) with grad, rebuilds x_{k-1} by (24) for block k-1, and
# returns the gradients of its own inputs. So parameter gradients arrive block by block
# (DDP's hooks fire as they do for a plain model) and context gradients are summed over
# blocks by autograd itself.


class Tape:
    """What the blocks of one reversible forward share: the activations rebuilt so far
    (at first only the top pair (x_{K-1}, x_K)), a fingerprint of x_0, and |x_k| for the
    float32 exactness guard."""

    def __init__(self, x0, config):
        self.config = config
        self.cuda_device = x0.device if x0.device.type == "cuda" else None
        self.fingerprint = fingerprint(x0, config.bits)
        self.magnitudes = [max_abs(x0)]
        self.rebuilt = {}

    def rng_state(self):
        cuda = self.cuda_device and torch.cuda.get_rng_state(self.cuda_device)
        return torch.get_rng_state(), cuda

    def rng_state_if_drawn(self, before):
        """The RNG states from `before` a block, or None if the block drew no random numbers
        (then memory does not grow with depth beyond the side bits)."""
        after = self.rng_state()
        cuda_changed = self.cuda_device is not None and not torch.equal(before[1], after[1])
        return before if cuda_changed or not torch.equal(before[0], after[0]) else None

    def restore_rng(self, state):
        torch.set_rng_state(state[0])
        if self.cuda_device is not None:
            torch.cuda.set_rng_state(state[1], self.cuda_device)

    def check_x0(self, x0):
        """The rebuilt x_0 must be the forward's, bit for bit, or every gradient below is wrong."""
        if not torch.equal(fingerprint(x0, self.config.bits), self.fingerprint):
            raise ReconstructionError(
                "BDIA: the reversible backward did not rebuild x_0 bit for bit. A block is not "
                "deterministic between forward and recomputation (a non-deterministic kernel, an "
                "attention backend that differs with and without grad, or RNG use outside the "
                "block's own call); make the blocks deterministic or use reversible=False"
            )

    def take(self, k):
        """(x_{k+1}, x_k) for the backward of block k; x_{k+1} is not needed after it."""
        if k + 1 not in self.rebuilt:
            raise BDIAError(
                "BDIA: this reversible graph was already back-propagated; it cannot be "
                "back-propagated twice (retain_graph=True is not supported with reversible=True)"
            )
        return self.rebuilt.pop(k + 1), self.rebuilt[k]


def max_abs(x):
    return x.detach().abs().amax()  # NaN stays NaN (and is 30x faster than an infinity-norm on a CPU)


def fingerprint(x, bits):
    """Integer checksums of x on the 2^-l grid: any single-element change alters them."""
    n = torch.round(x.detach() * 2.0**bits).to(torch.int64)
    return torch.stack([n.sum(), (n * n).sum()])


DIVERGED = 2.0**20  # no sensible l needs |x| this large in a normalised stream


def check_magnitudes(magnitudes, x, bits):
    """Raise if some x_k left the range where x.dtype holds the 2^-l grid exactly (Lemma 4.2
    needs every x_k on the grid). A NaN, an infinity or |x| beyond 2^20 is training that
    diverged, not a bits setting: the message says which."""
    limit = exact_limit(x.dtype, bits)
    magnitudes = torch.stack(magnitudes)
    if bool((magnitudes < limit).all()):  # one device sync per step; NaN fails too
        return
    k = int((~(magnitudes < limit)).nonzero()[0])
    where = "the input of the stack (x_0)" if k == 0 else f"the output of block {k - 1} (x_{k})"
    size = magnitudes[k].item()
    if not math.isfinite(size) or size > DIVERGED:
        raise DivergedError(
            f"BDIA: |x| reached {size:.4g} at {where}: training diverged. Lower the learning rate or "
            f"clip gradients, and resume from the last checkpoint")
    raise PrecisionError(
        f"BDIA: |x| reached {size:.4g} at {where}, but {x.dtype} holds the 2^-{bits} grid exactly only "
        f"below 2^{math.log2(limit):.0f} = {limit:g}; the reversible backward would return wrong "
        f"gradients. Use fewer bits (at most bits={math.floor(mantissa_bits(x.dtype) - math.log2(size)) - 1} "
        f"for this |x|), normalise the stack's input, or keep the residual stream in float64"
    )


class BDIAError(RuntimeError):
    """Base of the engine's runtime errors: scripts catch these by type."""


class DivergedError(BDIAError):
    """The residual stream blew up (NaN, infinity or |x| > 2^20): the training diverged."""


class PrecisionError(BDIAError):
    """The residual stream left the range where its dtype holds the 2^-l grid exactly (or
    cannot hold it at all: a 16-bit stream, too many bits): (24) would be inexact."""


class ReconstructionError(BDIAError):
    """The reversible backward did not rebuild x_0 bit for bit: the gradients would be wrong."""


def reversible_stack(blocks, x, factors, config, context):
    """BDIA training (18)-(21) whose backward rebuilds the activations by (24)."""
    x_prev, x = None, quantize(x, config.bits)  # (18)
    tape = Tape(x, config)
    for k, block in enumerate(blocks):
        params = [p for p in block.parameters() if p.requires_grad]
        x_next = ReversibleBlock.apply(tape, block, k, factors, x_prev, x, len(context), *context, *params)
        x_prev, x = x, x_next
    check_magnitudes(tape.magnitudes, x, config.bits)
    tape.rebuilt = {len(blocks): x.detach(), len(blocks) - 1: x_prev.detach()}
    tape.magnitudes = None
    return x


class ReversibleBlock(torch.autograd.Function):
    """Block k of a reversible BDIA stack: (x_{k-1}, x_k) -> x_{k+1}, no activations kept.

    Its inputs, in this order: tape, block, k, factors, x_prev, x, n_context, *context, *params.
    The parameters are inputs so that their gradients come out of this backward, block by
    block, as in a plain model (DDP's hooks fire; frozen inputs work)."""

    @staticmethod
    def forward(ctx, tape, block, k, factors, x_prev, x, n_context, *context_and_params):
        context = context_and_params[:n_context]
        rng_before = tape.rng_state() if may_draw_random(block) else None
        x_next, packed, size = packed_step(block, k, x_prev, x, factors, tape.config, context)
        tape.magnitudes.append(size)
        ctx.tape, ctx.block, ctx.k = tape, block, k
        ctx.rng = rng_before and tape.rng_state_if_drawn(rng_before)  # only blocks with dropout keep one
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        # Everything a block keeps goes through save_for_backward (the tests count it with
        # saved-tensor hooks), but the RNG states of blocks with dropout.
        ctx.other_context = [None if torch.is_tensor(c) else c for c in context]
        ctx.save_for_backward(packed, *factors, *[c if torch.is_tensor(c) else None for c in context])
        return x_next

    @staticmethod
    def backward(ctx, g_next):
        k, config = ctx.k, ctx.tape.config
        x_next, x = ctx.tape.take(k)  # x_{k+1}, x_k: rebuilt by the block above (or the top pair)
        packed, factors = ctx.saved_tensors[0], Factors(*ctx.saved_tensors[1 : 1 + N_FACTORS])
        context = context_leaves(ctx)
        x_leaf, h = recompute_residual(ctx, x, context)  # h_k(x_k), with its graph
        f = factors_of(factors, k, x) if k > 0 else None
        if k > 0:  # x_{k-1} for the backward of block k - 1, exactly: eq. (24)
            ctx.tape.rebuilt[k - 1] = rebuild(x_next, x, h.detach(), f, config, packed)
            if k == 1:
                ctx.tape.check_x0(ctx.tape.rebuilt[0])
        else:
            ctx.tape.rebuilt.pop(0)
        del x_next  # the rebuild is done: x_{k+1} is not needed again (nor the side bits)
        grads = gradients_through_step(ctx, h, x_leaf, context, f, g_next)
        return (None, None, None, None, grads.x_prev, grads.x, None, *grads.context, *grads.params)


N_FACTORS = len(Factors._fields)


def packed_step(block, k, x_prev, x, factors, config, context):
    """Block k's step in a reversible stack: x_{k+1}, the side bits it used, packed, and |x_{k+1}|."""
    if config.fused and k > 0:
        return fused_step(block, k, x_prev, x, factors, config, context)
    x_next, side = bdia_block(block, k, x_prev, x, factors, config, context)
    packed = None if side is None else pack_bits(side, side_bits(config.gammas))
    return x_next, packed, max_abs(x_next)


def rebuild(x_next, x, h, f, config, packed):
    """x_{k-1} by (24), from (x_k, x_{k+1}), h_k(x_k) and the packed side bits."""
    if config.fused:
        return fused_unstep(x_next, x, h, f, config, packed)
    side = unpack_bits(packed, side_bits(config.gammas), x.shape)
    return bdia_unstep(x_next, x, h, f, config.bits, side)


def context_leaves(ctx):
    """The block's context for the recomputation: tensors that need a gradient become leaves."""
    tensors = ctx.saved_tensors[1 + N_FACTORS:]
    return [c if t is None else t.detach().requires_grad_(t.requires_grad) for t, c in zip(tensors, ctx.other_context)]


def recompute_residual(ctx, x, context):
    """h_k(x_k) again, with grad, replaying the forward's dropout masks (from the saved RNG
    state; the caller's RNG is left as it was) and its autocast setting."""
    x_leaf = x.detach().requires_grad_()
    devices = [] if ctx.tape.cuda_device is None else [ctx.tape.cuda_device]
    enabled, dtype = ctx.autocast
    with torch.random.fork_rng(devices, enabled=ctx.rng is not None), torch.enable_grad():
        if ctx.rng is not None:
            ctx.tape.restore_rng(ctx.rng)
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            h = residual_of(ctx.block, x_leaf, context)
    return x_leaf, h


Grads = namedtuple("Grads", "x_prev x context params")  # what block k's backward returns


def gradients_through_step(ctx, h, x_leaf, context, f, g_next):
    """dL/d(inputs) of x_{k+1} = gamma x_{k-1} + Q[(1 - gamma) x_k + (1 + gamma) h_k(x_k)] (21),
    Q straight-through: dx_{k+1}/dx_{k-1} = gamma, dx_{k+1}/dx_k = (1 - gamma) + (1 + gamma) dh/dx.
    For k = 0 (19), f is None: gamma = 0."""
    params = [p for p in ctx.block.parameters() if p.requires_grad]
    leaves = [c for c in context if torch.is_tensor(c) and c.requires_grad]
    g_h = g_next if f is None else compiled(scale, ctx.tape.config.fused)(g_next, f.plus)
    grads = torch.autograd.grad(h, [x_leaf, *params, *leaves], g_h, allow_unused=True)  # frees the graph
    g_x, g_params, g_leaves = grads[0], grads[1 : 1 + len(params)], grads[1 + len(params) :]
    if f is None:
        g_x, g_prev = g_next if g_x is None else g_x.add_(g_next), None
    else:
        g_x, g_prev = compiled(combine, ctx.tape.config.fused)(g_x if g_x is not None else torch.zeros_like(g_next),
                                                               g_next, f.minus, f.gamma)
    g_prev = g_prev if ctx.needs_input_grad[4] else None
    by_leaf = dict(zip(map(id, leaves), g_leaves))
    return Grads(g_prev, g_x, [by_leaf.get(id(c)) for c in context], g_params)


def scale(g, factor):
    return g * factor


def combine(g_x, g_next, minus, gamma):
    """dL/dx_k = (1 - gamma) dL/dx_{k+1} + dL/dh dh/dx, and dL/dx_{k-1} = gamma dL/dx_{k+1}."""
    return g_x.addcmul_(g_next, minus), g_next * gamma


def may_draw_random(block):
    """Whether a block in training mode can draw random numbers: it has dropout (a Dropout
    module, or a float attribute named *dropout* above 0). Other blocks keep no RNG state:
    nothing to replay. (A block that draws otherwise fails the x_0 check, loudly.)"""
    for module in block.modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if any("dropout" in name and isinstance(v, float) and v > 0 for name, v in vars(module).items()):
            return True
    return False


# -----------------------------------------------------------------------------
# The fused path (BDIAConfig(fused=True)): a reversible step's element-wise arithmetic as a
# few torch.compile'd kernels. The mixed term is its own compiled function, called by the
# forward (21) and by the rebuild (24) alike: two different compilations of it could round
# differently (a fused multiply-add in one and not the other), and the rebuild would drift.


_COMPILED = {}


def compiled(fn, fused=True):
    """fn compiled once by torch.compile when fused, else fn itself (eager)."""
    if not fused:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=None)
    return _COMPILED[fn]


def grid_mixed(x, h, minus_l, plus_l):
    return torch.round((x * minus_l).addcmul_(h, plus_l))  # mixed_term without autograd


def grid_step(x_prev, mixed, gamma, bits, m):
    """(20), (21), the packed side bits and |x_{k+1}| in one compiled function."""
    side = side_info(x_prev, bits, m)
    x_next = (gamma * (x_prev + side * 2.0**-bits)) + mixed * 2.0**-bits
    return x_next, pack_bits(side, m), max_abs(x_next)


def grid_unstep(x_next, mixed, gamma, packed, bits, m):
    """(24): every operation here is exact, whatever the compiler makes of it."""
    side = unpack_bits(packed, m, x_next.shape, x_next.dtype)
    return (x_next - mixed * 2.0**-bits) / gamma - side * 2.0**-bits


def fused_step(block, k, x_prev, x, factors, config, context):
    """Block k >= 1 of a fused reversible stack: (x_{k+1}, packed s_{k-1}, |x_{k+1}|)."""
    h = residual_of(block, x, context)
    f = factors_of(factors, k, x)
    mixed = compiled(grid_mixed)(x, h, f.minus_l, f.plus_l)
    return compiled(grid_step)(x_prev, mixed, f.gamma, config.bits, side_bits(config.gammas))


def fused_unstep(x_next, x, h, f, config, packed):
    mixed = compiled(grid_mixed)(x, h, f.minus_l, f.plus_l)
    return compiled(grid_unstep)(x_next, mixed, f.gamma, packed, config.bits, side_bits(config.gammas))


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
        config, factors = BDIAConfig(bits=b, reversible=False), step_factors(gammas, b)
        xs, sides = [quantize(x0, b)], []  # sides[k]: the s_{k-1} block k used
        for k, block in enumerate(blocks):  # forward, keeping every x_k for comparison
            x_next, side = bdia_block(block, k, xs[k - 1] if k else None, xs[k], factors, config, ())
            xs.append(x_next)
            sides.append(side)
        rebuilt = {depth: xs[depth], depth - 1: xs[depth - 1]}
        for k in range(depth - 1, 0, -1):  # backward, from the top pair only
            h = blocks[k].residual(rebuilt[k])
            f = factors_of(factors, k, xs[k])
            rebuilt[k - 1] = bdia_unstep(rebuilt[k + 1], rebuilt[k], h, f, b, sides[k])  # (24) or (16)
        errors[name] = [(rebuilt[k] - xs[k]).abs().max().item() for k in range(depth + 1)]
    return errors


if __name__ == "__main__":
    errors = reconstruction_errors()
    print("Reconstruction error max|rebuilt x_k - x_k| of a 12-block GPT-like BDIA stack,")
    print("gammas +-0.5, width 256, float32 (paper Fig. 2 and 6)")
    print(f"{'x_k':>5} {'eq. (16), no quantization':>28} {'eq. (24), l = 9':>18}")
    for k in range(len(errors["eq16"]) - 1, -1, -1):
        print(f"{k:>5} {errors['eq16'][k]:>28.3e} {errors['eq24'][k]:>18.3e}")
