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


def quantize(x, bits):
    """Q_l[x] = round(x / 2^-l) 2^-l, eq. (17); identity when bits is None."""
    if bits is None:
        return x
    scale = 2.0**bits  # a power of two: the multiply and divide are exact
    return _RoundSTE.apply(x * scale) / scale


def side_info(x, bits, m):
    """s = (-x / 2^-l) mod 2^m, eq. (20) generalised to |gamma| = 2^-m.

    x is on the 2^-l grid, so x / 2^-l is an integer n; then n + s is a multiple of
    2^m and gamma (x + s 2^-l) is again on the grid with no rounding (Prop. 4.3).
    For m = 1, s is the parity of n, exactly eq. (20). Returned as float, like x.
    """
    return torch.remainder(-x.detach() * 2.0**bits, 2.0**m)  # a constant: no gradient


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(s, m):
    """Pack integer values 0 <= s < 2^m into m bits each: m bit planes, 8 flags per byte."""
    n = s.numel()
    s = s.reshape(-1).to(torch.uint8)
    s = torch.cat([s, s.new_zeros((-n) % 8)])  # pad to a multiple of 8
    shifts = _SHIFTS.to(s.device)
    planes = [((s >> j) & 1).view(-1, 8) << shifts for j in range(m)]
    return torch.stack(planes).sum(dim=-1, dtype=torch.uint8)  # (m, ceil(n / 8))


def unpack_bits(packed, m, shape, dtype):
    """Inverse of pack_bits: the m-bit values as a tensor of `shape` and `dtype`."""
    shifts = _SHIFTS.to(packed.device)
    flags = (packed.unsqueeze(-1) >> shifts) & 1  # (m, ceil(n / 8), 8)
    s = sum(flags[j].reshape(-1).to(dtype) * 2**j for j in range(m))
    return s[: math.prod(shape)].view(shape)


def power_of_two_exponent(gamma):
    """m if |gamma| == 2^-m for an integer m >= 1, else None."""
    if gamma == 0:
        return None
    m = -math.log2(abs(gamma))
    return int(m) if m == int(m) and m >= 1 else None


def side_bits(gammas):
    """Bits of side information per element: the largest m among gammas = +-2^-m (1 if none)."""
    ms = [power_of_two_exponent(g) for g in gammas]
    return max([m for m in ms if m is not None], default=1)


# -----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BDIAConfig:
    """How a stack of blocks is trained and evaluated with BDIA.

    gammas:     the values gamma_k is drawn from, uniformly, per sample and block k >= 1.
    bits:       l, the quantization precision 2^-l (17); None for no quantization (10).
    reversible: online back-propagation: activations are rebuilt by (24), not stored.
    eval_gamma: the constant gamma at inference; 0 is the standard transformer (25).
    """

    gammas: tuple = (-0.5, 0.5)
    bits: int = 9
    reversible: bool = True
    eval_gamma: float = 0.0

    def __post_init__(self):
        gammas = tuple(float(g) for g in self.gammas)
        object.__setattr__(self, "gammas", gammas)
        if not gammas:
            raise ValueError("BDIAConfig: gammas is empty; give at least one value, e.g. (-0.5, 0.5)")
        if self.bits is not None and not isinstance(self.bits, int):  # l may be negative (Table 4)
            raise ValueError(f"BDIAConfig: bits must be an integer (l in 2^-l) or None, got {self.bits!r}")
        if abs(sum(gammas) / len(gammas)) > 1e-12:
            warnings.warn(
                f"BDIAConfig: the mean of gammas {gammas} is not 0, but inference uses E[gamma] = 0 "
                f"(eq. 25); use a set symmetric around 0 such as (-0.5, 0.5)",
                stacklevel=3,
            )
        if self.reversible:
            self._check_reversible()

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
        if len({abs(g) for g in self.gammas}) > 1:
            raise ValueError(
                f"BDIAConfig: reversible=True needs all gammas of one magnitude 2^-m (gammas="
                f"{self.gammas}); use e.g. (-0.5, 0.5) or (-0.25, 0.25) {fix}"
            )


# -----------------------------------------------------------------------------
# One BDIA step forward (21)/(10) and backward (24)/(16)


def first_step(x0, h0, bits):
    """x_1 = x_0 + Q_l[h_0(x_0)], eqs. (19) and (6)."""
    return x0 + quantize(h0, bits)


def mixed_term(x, h, gamma, bits):
    """Q_l[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)], the second term of (21)."""
    return quantize((1 - gamma) * x + (1 + gamma) * h, bits)


def bdia_step(x_prev, x, h, gamma, bits, side=None):
    """x_{k+1} from (x_{k-1}, x_k, h_k(x_k)): eq. (21), or eq. (10) when bits is None."""
    if bits is None:
        return gamma * x_prev + (1 - gamma) * x + (1 + gamma) * h  # (10)
    # Q_l on the first term is a no-op when |gamma| = 2^-m (Prop. 4.3); it keeps
    # other gammas (non-reversible training, e.g. +-0.6) on the grid (Lemma 4.2).
    first = quantize(gamma * (x_prev + side * 2.0**-bits), bits)
    return first + mixed_term(x, h, gamma, bits)  # (21)


def bdia_unstep(x_next, x, h, gamma, bits, side=None):
    """x_{k-1} from (x_k, x_{k+1}, h_k(x_k)): eq. (24), exact; or eq. (16) when bits is None."""
    if bits is None:
        return x_next / gamma - (1 - gamma) / gamma * x - (1 + gamma) / gamma * h  # (16)
    return (x_next - mixed_term(x, h, gamma, bits)) / gamma - side * 2.0**-bits  # (24)


def per_sample(gamma, x):
    """View a (batch,) tensor of gammas so that it broadcasts over x's other dimensions."""
    return gamma.view(-1, *([1] * (x.dim() - 1)))


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
        raise ValueError(
            f"BDIA with bits={config.bits} needs a float32 or float64 residual stream, got {x.dtype}: "
            "a 2^-l grid does not fit in 16-bit floats. Keep x in float32 and run the blocks "
            "under torch.autocast instead"
        )
    gammas = draw_gammas(config, x.shape[0], len(blocks), x.device, x.dtype)
    if not config.reversible or not torch.is_grad_enabled():
        return bdia_stack(blocks, x, gammas, config, context)[1]
    params = [p for p in blocks.parameters() if p.requires_grad]
    return ReversibleBDIA.apply(blocks, config, gammas, len(context), x, *context, *params)


def residual_of(block, x, context):
    """h_k(x_k), cast back to the residual stream's dtype (it may run under autocast)."""
    return block.residual(x, *context).to(x.dtype)


def bdia_inference(blocks, x, config, *context):
    """Eq. (25) when eval_gamma is 0 (or (10)/(21) with the constant eval_gamma, paper Fig. 1)."""
    gamma, bits = config.eval_gamma, config.bits
    m = side_bits((gamma,))
    x_prev, x = None, quantize(x, bits)  # (18)
    for k, block in enumerate(blocks):
        h = residual_of(block, x, context)
        if k == 0:
            x_prev, x = x, first_step(x, h, bits)  # (19)
        elif gamma == 0:
            x_prev, x = x, quantize(x + h, bits)  # (25)
        else:
            side = side_info(x_prev, bits, m) if bits is not None else None
            x_prev, x = x, bdia_step(x_prev, x, h, gamma, bits, side)
    return x


def bdia_stack(blocks, x, gammas, config, context, tape=None):
    """BDIA training forward, eqs. (18)-(21) (or (6), (10)): returns (x_{K-1}, x_K).

    Stored-activation mode runs it with autograd recording; the reversible mode runs it
    under no_grad and passes a `tape` that keeps only what the backward pass needs.
    """
    bits, m = config.bits, side_bits(config.gammas)
    x_prev, x = None, quantize(x, bits)  # (18)
    for k, block in enumerate(blocks):
        if tape is not None:
            tape.before_block(x)
        h = residual_of(block, x, context)
        if k == 0:
            x_prev, x = x, first_step(x, h, bits)  # (19)
        else:
            side = side_info(x_prev, bits, m) if bits is not None else None  # (20)
            if tape is not None:
                tape.keep_side(side, m)
            gamma = per_sample(gammas[:, k - 1], x)
            x_prev, x = x, bdia_step(x_prev, x, h, gamma, bits, side)  # (21)
        if tape is not None:
            tape.after_block(block)
    if tape is not None:
        tape.watch(x)  # the guard also checks the top, x_K
    return x_prev, x


# -----------------------------------------------------------------------------
# Online back-propagation


class Tape:
    """What the reversible forward keeps for backward, besides the top pair (x_{K-1}, x_K):
    the side information packed to m bits per element, the RNG state of each block that
    drew random numbers (dropout), and |x_k| per block for the float32 exactness guard."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.sides, self.cpu_states, self.cuda_states, self.magnitudes = [], [], [], []

    def rng_state(self):
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None

    def watch(self, x):
        self.magnitudes.append(x.abs().amax())

    def before_block(self, x):
        self.watch(x)
        self.state = self.rng_state()

    def keep_side(self, side, m):
        self.sides.append(pack_bits(side, m))

    def after_block(self, block):
        # Keep a block's RNG state only if it drew random numbers, so that with no
        # dropout the memory kept does not grow with depth beyond the side bits.
        cpu_after, cuda_after = self.rng_state()
        cpu_before, cuda_before = self.state
        self.cpu_states.append(None if torch.equal(cpu_before, cpu_after) else cpu_before)
        changed = self.cuda and not torch.equal(cuda_before, cuda_after)
        self.cuda_states.append(cuda_before if changed else None)

    def restore_rng(self, k):
        if self.cpu_states[k] is not None:
            torch.set_rng_state(self.cpu_states[k])
        if self.cuda_states[k] is not None:
            torch.cuda.set_rng_state(self.cuda_states[k], self.device)


def fingerprint(x, bits):
    """Integer checksums of x on the 2^-l grid: any single-element change alters them."""
    n = torch.round(x * 2.0**bits).to(torch.int64)
    return torch.stack([n.sum(), (n * n).sum()])


def check_magnitudes(magnitudes, x, bits):
    """Raise if some x_k left the range where x.dtype holds the 2^-l grid exactly."""
    mantissa_bits = -math.log2(torch.finfo(x.dtype).eps)  # 23 for float32, 52 for float64
    limit = 2.0 ** (mantissa_bits - bits)  # 2^(23 - l) in float32
    magnitudes = torch.stack(magnitudes)
    if bool((magnitudes < limit).all()):  # one device sync per step; NaN fails too
        return
    k = int((~(magnitudes < limit)).nonzero()[0])
    where = "the input of the stack (x_0)" if k == 0 else f"the output of block {k - 1} (x_{k})"
    raise RuntimeError(
        f"BDIA: |x| reached {magnitudes[k].item():.4g} at {where}, but {x.dtype} holds the 2^-{bits} "
        f"grid exactly only below 2^{math.log2(limit):.0f} = {limit:g}; the reversible backward "
        f"would return wrong gradients. Use fewer bits (e.g. bits={max(bits - 3, 0)}), normalise "
        f"the stack's input, or keep the residual stream in float64"
    )


class ReversibleBDIA(torch.autograd.Function):
    """BDIA training with online back-propagation: no activations are stored.

    Inputs: the blocks, config, gammas, the number of context arguments, x, the context
    and the trainable parameters (inputs, so that DDP hooks fire and frozen inputs work).
    """

    @staticmethod
    def forward(ctx, blocks, config, gammas, n_context, x, *context_and_params):
        context = context_and_params[:n_context]
        tape = Tape(x.device)
        x_prev, x_top = bdia_stack(blocks, x, gammas, config, context, tape)
        check_magnitudes(tape.magnitudes, x, config.bits)
        ctx.blocks, ctx.config, ctx.n_context, ctx.tape = blocks, config, n_context, tape
        ctx.autocast = (
            torch.is_autocast_enabled(x.device.type),
            torch.get_autocast_dtype(x.device.type),
        )
        # Everything held for backward but the RNG states of blocks with dropout goes
        # through save_for_backward (and so through saved-tensor hooks, which the tests count).
        tensor_context = [c if torch.is_tensor(c) else None for c in context]
        ctx.other_context = [None if torch.is_tensor(c) else c for c in context]
        ctx.save_for_backward(
            x_prev, x_top, gammas, fingerprint(quantize(x, config.bits), config.bits),
            *tape.sides, *tensor_context,
        )
        tape.sides = tape.magnitudes = None
        return x_top

    @staticmethod
    def backward(ctx, grad_top):
        blocks, config, tape = ctx.blocks, ctx.config, ctx.tape
        x_prev, x_top, gammas, print0, *rest = ctx.saved_tensors
        sides, tensor_context = rest[: len(blocks) - 1], rest[len(blocks) - 1 :]
        context = [t if t is not None else c for t, c in zip(tensor_context, ctx.other_context)]
        context = [c.detach().requires_grad_() if torch.is_tensor(c) and c.requires_grad else c for c in context]
        params = [p for p in blocks.parameters() if p.requires_grad]
        grads = Grads(params, context)
        bits, m = config.bits, side_bits(config.gammas)
        enabled, dtype = ctx.autocast
        device = x_top.device

        # Walk down: (x_k, x_{k+1}) -> x_{k-1}. g_next = dL/dx_{k+1} is complete; g_cur =
        # dL/dx_k so far holds only what reached it through gamma_{k+1} in (21).
        x_next, x = x_top, x_prev
        g_next, g_cur = grad_top, torch.zeros_like(grad_top)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for k in range(len(blocks) - 1, -1, -1):
                tape.restore_rng(k)
                x_leaf = x.detach().requires_grad_()
                with torch.autocast(device.type, dtype=dtype, enabled=enabled):
                    h = residual_of(blocks[k], x_leaf, context)
                if k == 0:  # x_1 = x_0 + Q[h_0(x_0)]: dx_1/dx_0 = I + dh_0/dx_0 (STE)
                    g_x = grads.block_vjp(blocks[k], h, x_leaf, g_next)
                    g_x0 = g_cur + g_next + g_x
                    x_prev = x
                    break
                gamma = per_sample(gammas[:, k - 1], x)
                g_x = grads.block_vjp(blocks[k], h, x_leaf, (1 + gamma) * g_next)
                side = unpack_bits(sides[k - 1], m, x.shape, x.dtype)
                x_prev = bdia_unstep(x_next, x, h.detach(), gamma, bits, side)  # (24)
                x_next, x = x, x_prev
                g_next, g_cur = g_cur + (1 - gamma) * g_next + g_x, gamma * g_next

        if not torch.equal(fingerprint(x_prev, bits), print0):
            raise RuntimeError(
                "BDIA: the reversible backward did not rebuild x_0 bit for bit. A block is not "
                "deterministic between forward and recomputation (a non-deterministic kernel, an "
                "attention backend that differs with and without grad, or RNG use outside the "
                "block's own call); make the blocks deterministic or use reversible=False"
            )
        x_grad = g_x0 if ctx.needs_input_grad[4] else None
        return (None, None, None, None, x_grad, *grads.context_grads, *grads.param_grads)


class Grads:
    """Gradient accumulators for the trainable parameters and the context tensors."""

    def __init__(self, params, context):
        self.params = params
        self.index = {id(p): i for i, p in enumerate(params)}
        self.param_grads = [None] * len(params)
        self.context = context
        self.context_grads = [None] * len(context)

    def block_vjp(self, block, h, x_leaf, grad_h):
        """Back-propagate grad_h through one recomputed block; return dL/dx_k via h_k."""
        own = [p for p in block.parameters() if p.requires_grad]
        ctx_in = [c for c in self.context if torch.is_tensor(c) and c.requires_grad]
        inputs = [x_leaf, *own, *ctx_in]
        got = torch.autograd.grad(h, inputs, grad_h, allow_unused=True)
        for p, g in zip(own, got[1 : 1 + len(own)]):
            self._add(self.param_grads, self.index[id(p)], g)
        ctx_ids = {id(c): i for i, c in enumerate(self.context)}
        for c, g in zip(ctx_in, got[1 + len(own) :]):
            self._add(self.context_grads, ctx_ids[id(c)], g)
        return got[0] if got[0] is not None else torch.zeros_like(x_leaf)

    @staticmethod
    def _add(slots, i, g):
        if g is not None:
            slots[i] = g if slots[i] is None else slots[i] + g


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
        m = side_bits((0.5,))
        xs, sides = [quantize(x0, b)], [None]
        for k, block in enumerate(blocks):  # forward, keeping every x_k for comparison
            h = block.residual(xs[k])
            if k == 0:
                xs.append(first_step(xs[0], h, b))
                continue
            sides.append(side_info(xs[k - 1], b, m) if b is not None else None)
            xs.append(bdia_step(xs[k - 1], xs[k], h, per_sample(gammas[:, k - 1], h), b, sides[k]))
        rebuilt = {depth: xs[depth], depth - 1: xs[depth - 1]}
        for k in range(depth - 1, 0, -1):  # backward, from the top pair only
            gamma = per_sample(gammas[:, k - 1], xs[k])
            h = blocks[k].residual(rebuilt[k])
            rebuilt[k - 1] = bdia_unstep(rebuilt[k + 1], rebuilt[k], h, gamma, b, sides[k])
        errors[name] = [(rebuilt[k] - xs[k]).abs().max().item() for k in range(depth + 1)]
    return errors


if __name__ == "__main__":
    errors = reconstruction_errors()
    print("Reconstruction error max|rebuilt x_k - x_k| of a 12-block GPT-like BDIA stack,")
    print("gammas +-0.5, width 256, float32 (paper Fig. 2 and 6)")
    print(f"{'x_k':>5} {'eq. (16), no quantization':>28} {'eq. (24), l = 9':>18}")
    for k in range(len(errors["eq16"]) - 1, -1, -1):
        print(f"{k:>5} {errors['eq16'][k]:>28.3e} {errors['eq24'][k]:>18.3e}")
