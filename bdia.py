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

where Q_l rounds to multiples of 2^-l (17) and the side information s_{k-1} (20), m bits per
element for gamma = +-2^-m, makes the product exact (23), so that (24) rebuilds x_{k-1} from
(x_k, x_{k+1}) bit for bit: training keeps x_{K-1}, x_K and the side bits, not the activations.
At inference E[gamma] = 0 gives the standard transformer (25).

Any block works: h_k is block.residual(x, ...) if it has one, else block(x, ...) - x:

    config = BDIAConfig(gammas=(-0.5, 0.5), bits=9, reversible=True)
    x = run_blocks(self.blocks, x, config)      # instead of: for b in self.blocks: x = b(x)
    model.blocks = BDIAStack(model.blocks, config)   # a model that calls an nn.Sequential

This file imports only torch and the standard library: copy it into your project.
"""

import contextlib
import math
import sys
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

# -----------------------------------------------------------------------------
# Q_l, eq. (17), with the straight-through gradient, and the side information (20)

class _RoundSTE(torch.autograd.Function):
    forward = staticmethod(lambda ctx, y: torch.round(y))
    backward = staticmethod(lambda ctx, grad: grad)  # straight-through: Q_l's gradient is taken as the identity

def quantize(x, bits):
    """Q_l[x] = round(x / 2^-l) 2^-l, eq. (17); identity when bits is None."""
    if bits is None:
        return x
    return _RoundSTE.apply(x * 2.0**bits) / 2.0**bits  # powers of two: the multiply and divide are exact

def side_info(x, bits, m):
    """s = (-n) mod 2^m for x = n 2^-l on the grid: so n + s is a multiple of 2^m, and for |gamma| = 2^-m,
    gamma (x + s 2^-l) = +-(n + s) / 2^m 2^-l is on the grid, with no rounding (Prop. 4.3). m = 1 (gamma
    +-1/2) is eq. (20), s = 1 where n is odd; m >= 2 is this project's extension. The code takes the low
    m bits of the integer -n, whose two's complement makes it right for negative n too:

        n       5  -3   4  |  5  -3   6        (l is bits, the grid's; m is side_bits(gammas), the
        m       1   1   1  |  2   2   2         side information's width)
        s       1   1   0  |  3   3   2
        n + s   6  -2   4  |  8   0   8"""
    integers = torch.int64 if x.dtype == torch.float64 else torch.int32
    return (x.detach() * -(2.0**bits)).to(integers) & (2**m - 1)

def side_bits(gammas):
    """Side bits per element: m when every nonzero gamma is +-2^-m, m >= 1 (the largest m), else None."""
    ms = [-math.log2(abs(g)) for g in gammas if g != 0]
    return int(max(ms)) if ms and all(m == int(m) >= 1 for m in ms) else None

def pack_bits(s, m):
    """The values 0 <= s < 2^m of an integer tensor, m bits each, as m uint8 planes of ceil(n / 8) bytes:
    bit j of byte i of plane p is bit p of s[8i + j]. E.g. m = 1, s = 1 0 1 1 0 0 0 1: one byte, 0b10001101."""
    s = s.reshape(-1) if s.numel() % 8 == 0 else torch.cat([s.reshape(-1), s.new_zeros(-s.numel() % 8)])
    flags = s.view(1, -1, 8)
    if m > 1:
        flags = torch.cat([(flags >> j) & 1 for j in range(m)])
    places = torch.arange(8, dtype=flags.dtype, device=s.device)  # of 8 flags in a byte
    return (flags << places).sum(dim=-1, dtype=torch.uint8)

def unpack_bits(packed, m, shape, dtype=torch.uint8):
    """Inverse of pack_bits: the m-bit values as a tensor of `shape`."""
    flags = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    s = flags[0]
    for j in range(1, m):
        s |= flags[j] << j
    return s.reshape(-1)[: math.prod(shape)].view(shape).to(dtype)


# -----------------------------------------------------------------------------
# One step k >= 1: (21) and its inverse (24); without quantization (10) and (16)

def mixed_term(x, h, gamma, bits):
    """Q_l[(1 - gamma) x + (1 + gamma) h] of (21) and (24): one function for both, so both round the
    very same number, which makes (24) exact."""
    return quantize((1 - gamma) * x + (1 + gamma) * h, bits)

def bdia_step(x_prev, x, h, gamma, bits, side=None):
    """x_{k+1} by (21), or (10) when bits is None; side None: gamma x_{k-1} rounded (gammas not +-2^-m)."""
    if bits is None:
        return gamma * x_prev + (1 - gamma) * x + (1 + gamma) * h  # (10)
    if side is None:
        return quantize(gamma * x_prev, bits) + mixed_term(x, h, gamma, bits)
    return gamma * (x_prev + side * 2.0**-bits) + mixed_term(x, h, gamma, bits)  # (21), exact by (23)

def bdia_unstep(x_next, x, h, gamma, bits, side=None):
    """x_{k-1} by (24), exact; or by (16) when bits is None, whose float error doubles per block (Fig. 2)."""
    if bits is None:
        return (x_next - (1 - gamma) * x - (1 + gamma) * h) / gamma  # (16)
    return (x_next - mixed_term(x, h, gamma, bits)) / gamma - side * 2.0**-bits  # (24)

def draw_gammas(config, batch, depth, device, dtype):
    """gamma_k for every sample and block k = 1..K-1, uniformly from config.gammas: (batch, K-1)."""
    table = torch.tensor(config.gammas, device=device, dtype=dtype)
    return table[torch.randint(len(table), (batch, max(depth - 1, 0)), device=device)]

def gamma_of_block(gammas, k, x):
    """Block k's gamma_k, per sample: column k - 1 of the (batch, K-1) table, shaped to broadcast over x."""
    return gammas[:, k - 1].view(-1, *[1] * (x.dim() - 1))


# -----------------------------------------------------------------------------
# The stack: plain, BDIA training, BDIA inference

@dataclass(frozen=True)
class BDIAConfig:
    """gammas:     the values gamma_k is drawn from, uniformly, per sample and block k >= 1.
    bits:       l, the grid 2^-l of Q_l (17), not the side information's m bits; None: no Q_l (10)
    reversible: online back-propagation, the activations rebuilt by (24), not stored: needs bits
                and all gammas of one magnitude 2^-m, m >= 1.
    eval_gamma: the constant gamma at inference; 0 is the standard transformer (25)."""

    gammas: tuple = (-0.5, 0.5)
    bits: int = 9
    reversible: bool = True
    eval_gamma: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        check_config(self)

def run_blocks(blocks, x, config, *context, **kwargs):
    """Run blocks (an nn.ModuleList, nn.Sequential, BDIAStack, a slice, a list) on x, batch first; return x_K.
    config None: the plain stack, x = block(x, *context, **kwargs). Training (the blocks' own mode):
    BDIA (18)-(21), or (10) when bits is None; reversible: the activations rebuilt by (24) in backward.
    Eval: (25) with gamma = config.eval_gamma. Context, positional (encoder memory, masks) and keyword
    (rotary embeddings), goes to every block; its tensors that require grad (also nested in a tuple,
    list or dict) get their gradient summed over the blocks, in reversible training too."""
    blocks, training = blocks_and_mode(blocks)
    if config is None or not blocks:
        for block in blocks:
            x = output_of(block(x, *context, **kwargs))
        return x
    if not training:
        return bdia_inference(blocks, x, config, context, kwargs)
    check_stream(x, config.bits)
    gammas = draw_gammas(config, x.shape[0], len(blocks), x.device, x.dtype)  # per sample x[i]
    if config.reversible and torch.is_grad_enabled():
        # Under torch.compile(model) the stack runs eagerly: dynamo would compile the forward's blocks, not the
        # recomputation's (loss.backward() runs outside its graph), whose rounding then differs. block.compile() works.
        compiling = torch.compiler.is_compiling()
        stack = torch.compiler.disable(reversible_stack) if compiling else reversible_stack
        return stack(blocks, x, gammas, config, context, kwargs, compiling)
    x_prev, x = None, quantize(x, config.bits)  # (18)
    for k, block in enumerate(blocks):
        x_prev, x = x, bdia_block(block, k, x_prev, x, gammas, config, context, kwargs)[0]
    return x

def blocks_and_mode(blocks):
    """The blocks as a list, and their own mode (a slice of an nn.ModuleList is a new, training container)."""
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList, list, tuple)) or not all(
            isinstance(block, nn.Module) for block in blocks):
        raise TypeError("run_blocks: pass the blocks as an nn.ModuleList, nn.Sequential or list of nn.Modules")
    modes = {block.training for block in blocks}
    if len(modes) > 1:
        raise ValueError("run_blocks: some blocks are in training mode, some in eval mode; call .train() or .eval() "
                         "on the whole model")
    return list(blocks), modes == {True}

def output_of(y):
    """A block's output: the residual stream, the first element if it returns a tuple or list."""
    return y[0] if isinstance(y, (tuple, list)) else y

def residual_of(block, x, context, kwargs):
    """h_k(x_k): block.residual(x, ...) if the block has it, else block(x, ...) - x (whose float error
    the recomputation repeats bit for bit), in x's dtype (the block may run under autocast). A compiled
    block (block.compile(), torch.compile(block)) is called as compiled: block(x, ...) - x."""
    if hasattr(block, "residual") and not compiled(block):
        if fsdp_sharded(block) and "residual" not in vars(block):  # FSDP2 gathers parameters only around forward
            sys.modules["torch.distributed.fsdp"].register_fsdp_forward_method(block, "residual")
        h = block.residual(x, *context, **kwargs)
    else:
        h = output_of(block(x, *context, **kwargs)) - x
    return h if h.dtype == x.dtype else h.to(x.dtype)

def compiled(block):
    """Whether block.compile() or torch.compile(block) compiled the block's call (residual() is not)."""
    dynamo = sys.modules.get("torch._dynamo")
    return getattr(block, "_compiled_call_impl", None) is not None or (
        dynamo is not None and isinstance(block, dynamo.eval_frame.OptimizedModule))

def fsdp_sharded(module):
    """Whether FSDP2's fully_shard wraps the module (torch.distributed.fsdp is looked at only if loaded)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)

def bdia_block(block, k, x_prev, x, gammas, config, context, kwargs, h=None):
    """Block k of BDIA training: x_{k+1} by (19), (21) or (10), and the s_{k-1} (20) it used (or None);
    h: h_k(x_k) if computed already."""
    h = residual_of(block, x, context, kwargs) if h is None else h
    if k == 0:
        return x + quantize(h, config.bits), None  # (19)
    m = side_bits(config.gammas)
    side = None if config.bits is None or m is None else side_info(x_prev, config.bits, m)  # (20)
    return bdia_step(x_prev, x, h, gamma_of_block(gammas, k, x), config.bits, side), side  # (21)

def bdia_inference(blocks, x, config, context, kwargs):
    """(25), x_{k+1} = Q_l[block(x_k)], when eval_gamma is 0: with bits None the plain stack bit for bit.
    A constant eval_gamma (Fig. 1) runs (10), or (21) without side information (it serves only (24))."""
    gamma, bits = config.eval_gamma, config.bits
    x_prev, x = None, quantize(x, bits)  # (18)
    for k, block in enumerate(blocks):
        if gamma == 0:
            x_prev, x = x, quantize(output_of(block(x, *context, **kwargs)), bits)  # (25)
        elif k == 0:
            x_prev, x = x, x + quantize(residual_of(block, x, context, kwargs), bits)  # (19)
        else:
            x_prev, x = x, bdia_step(x_prev, x, residual_of(block, x, context, kwargs), gamma, bits)  # (10)/(21)
    return x

class BDIAStack(nn.Sequential):
    """The same blocks as an nn.Sequential, whose forward is run_blocks, with the same state_dict
    keys: `model.blocks = BDIAStack(model.blocks, BDIAConfig())` turns a model that calls one
    Sequential into a BDIA one; pretrained weights load as they are. config None: the plain stack."""

    def __init__(self, blocks, config=None):
        if isinstance(blocks, nn.Module):
            blocks = OrderedDict(blocks.named_children())
        super().__init__(blocks) if isinstance(blocks, dict) else super().__init__(*blocks)  # a dict: a slice
        self.config = config

    def forward(self, x, *context, **kwargs):
        return run_blocks(self, x, self.config, *context, **kwargs)

    def __getitem__(self, index):  # a slice is a BDIAStack of the same config
        item = super().__getitem__(index)
        if isinstance(item, BDIAStack):
            item.config = self.config
        return item


# -----------------------------------------------------------------------------
# Online back-propagation: one autograd Function per block, inputs x_{k-1}, x_k, the context and the
# block's parameters, keeps only the packed side bits. Each backward, from the top, rebuilds x_{k-1} by (24)
# for the one below: parameter gradients arrive block by block (DDP's hooks fire as for a plain model).

def reversible_stack(blocks, x, gammas, config, context, kwargs, compiling=False):
    """BDIA training (18)-(21) whose backward rebuilds the activations by (24)."""
    x_prev, x = None, quantize(x, config.bits)  # (18)
    tape = Tape(x, gammas, config, context, kwargs, compiling or any(compiled(b) for b in blocks))
    for k, block in enumerate(blocks):
        params = [p for p in block.parameters() if p.requires_grad]
        x_prev, x = x, ReversibleBlock.apply(tape, block, k, x_prev, x, *tape.tensors, *params)
    check_magnitudes(tape.magnitudes, x, config.bits)
    tape.rebuilt = {len(blocks): x.detach(), len(blocks) - 1: x_prev.detach()}  # the top pair
    return x

class Tape:
    """What one reversible stack shares: config, gammas, context, the rebuilt x_k, |x_k|, the checks of (24)."""

    def __init__(self, x0, gammas, config, context, kwargs, compiled):
        self.config, self.gammas, self.m, self.compiled = config, gammas, side_bits(config.gammas), compiled
        self.leaves, self.spec = tree_flatten((context, kwargs))  # context tensors, also nested ones
        self.tensors = [t for t in self.leaves if torch.is_tensor(t)]
        self.fingerprint = fingerprint(x0 + 0.0)  # + 0.0: -0.0 and 0.0, one number, one pattern ((24) may give either)
        self.magnitudes = [torch.aminmax(x0.detach())]  # NaN stays NaN
        self.rebuilt, self.checks, self.lowest = {}, [], None

    def take(self, k):
        """x_{k+1} and x_k for block k's backward; x_{k+1} is needed no more (nor x_0 by block 0)."""
        if k + 1 not in self.rebuilt:
            raise BDIAError("BDIA: this reversible graph was already back-propagated (retain_graph=True)")
        return self.rebuilt.pop(k + 1), self.rebuilt.pop(k) if k == 0 else self.rebuilt[k]

    def rebuild(self, k, x):
        """x_k, rebuilt by (24) for block k's backward; x_0 is checked against the forward's."""
        self.rebuilt[k] = x
        if k == 0:
            self.checks.append(("x_0", self.fingerprint, fingerprint(x + 0.0)))

    def context(self, tensors=None):
        """(context, kwargs) as given, or with these tensors in the places of its tensors."""
        tensors = iter(self.tensors if tensors is None else tensors)
        return tree_unflatten([next(tensors) if torch.is_tensor(t) else t for t in self.leaves], self.spec)

class ReversibleBlock(torch.autograd.Function):
    """Block k of a reversible stack: (tape, block, k, x_{k-1}, x_k, *context, *parameters) -> x_{k+1}."""

    @staticmethod
    def forward(ctx, tape, block, k, x_prev, x, *tensors_and_params):
        ctx.tape, ctx.block, ctx.k = tape, block, k
        ctx.context_needs_grad = ctx.needs_input_grad[5 : 5 + len(tape.tensors)]
        ctx.n_params = len(tensors_and_params) - len(tape.tensors)  # FSDP2: its shards get no gradient here
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        if tape.lowest is None and any(ctx.needs_input_grad):
            tape.lowest = k  # the last block whose backward runs: it checks the recomputation
        rng = generator_states(x.device)  # the block's random draws are replayed by observation
        h = residual_with_graph(ctx, x)[0]
        drew = any(a is not None and not torch.equal(a, b) for a, b in zip(rng, generator_states(x.device)))
        ctx.rng = rng if drew else None  # kept only where the block drew
        ctx.h_fingerprint = fingerprint(h)
        x_next, side = bdia_block(block, k, x_prev, x, tape.gammas, tape.config, (), {}, h.detach())  # (19), (21)
        tape.magnitudes.append(torch.aminmax(x_next.detach()))
        ctx.save_for_backward(None if side is None else pack_bits(side, tape.m))  # m bits per element
        return x_next

    @staticmethod
    def backward(ctx, grad_next):
        """The chain rule of (21), Q_l's gradient taken as the identity (straight-through):

            dL/dh_k     = (1 + gamma_k) dL/dx_{k+1}
            dL/dx_k     = (1 - gamma_k) dL/dx_{k+1} + dL/dh_k dh_k/dx_k
            dL/dx_{k-1} = gamma_k dL/dx_{k+1}

        and of (19), x_1 = x_0 + Q_l[h_0(x_0)]: dL/dh_0 = dL/dx_1, dL/dx_0 = dL/dx_1 + dL/dh_0 dh_0/dx_0.
        Autograd adds the dL/dx_k of blocks k and k+1 (both read x_k) before block k-1's backward.
        Blocks go from the top, so x_{k+1} and x_k are known (the top pair, or rebuilt by block k+1);
        block k rebuilds x_{k-1} by (24) and frees x_{k+1}: three x_k alive, whatever the depth."""
        tape, k = ctx.tape, ctx.k
        x_next, x = tape.take(k)  # x_{k+1}, x_k
        h, leaves = recompute(ctx, x)  # h_k(x_k) as in the forward, now with its graph
        if k > 0:
            gamma = gamma_of_block(tape.gammas, k, x)
            side = unpack_bits(ctx.saved_tensors[0], tape.m, x.shape, x.dtype)  # s_{k-1}
            tape.rebuild(k - 1, bdia_unstep(x_next, x, h.detach(), gamma, tape.config.bits, side))  # (24)
        if k == tape.lowest:
            check_recomputation(tape)  # after the stack's last backward
        if k == 0:
            grad_x, grad_rest = vector_jacobian(ctx, h, leaves, grad_next)  # (19): dL/dh_0 dh_0/dx_0, ...
            return None, None, None, None, grad_next + grad_x, *grad_rest  # (19): dL/dx_0
        grad_h = (1 + gamma) * grad_next  # (21): dL/dh_k
        grad_x, grad_rest = vector_jacobian(ctx, h, leaves, grad_h)  # dL/dh_k dh_k/dx_k; context's, parameters'
        return None, None, None, gamma * grad_next, (1 - gamma) * grad_next + grad_x, *grad_rest  # (21)

def recompute(ctx, x):
    """h_k(x_k) again, with the forward's random draws: its graph is checked once per block, and its
    fingerprint against the forward's (read by check_recomputation)."""
    with replayed_generators(ctx.rng, x.device):
        h, x_leaf, context_leaves = residual_with_graph(ctx, x)
    params = [p for p in ctx.block.parameters() if p.requires_grad]  # FSDP2: the unsharded ones, now
    check_graph(ctx.block, ctx.k, h, [x_leaf, *params, *context_leaves])
    ctx.tape.checks.append((f"h_{ctx.k}", ctx.h_fingerprint, fingerprint(h)))
    return h, (x_leaf, params, context_leaves)

def vector_jacobian(ctx, h, leaves, grad_h):
    """dL/dh_k dh_k/dx_k, and the gradients of the context's tensors and the block's parameters, in the
    order of forward's inputs. Under FSDP2 backward(), not grad(): it reduce-scatters .grad to the shards."""
    x_leaf, params, context_leaves = leaves
    if any(fsdp_sharded(m) for m in ctx.block.modules()):
        torch.autograd.backward(h, grad_h, inputs=[x_leaf, *params, *context_leaves])
        grad_x, grad_params, grads = x_leaf.grad, [None] * ctx.n_params, iter([t.grad for t in context_leaves])
    else:
        grad_x, *grads = torch.autograd.grad(h, [x_leaf, *params, *context_leaves], grad_h, allow_unused=True)
        grad_params, grads = grads[: len(params)], iter(grads[len(params) :])
    grad_context = [next(grads) if need else None for need in ctx.context_needs_grad]
    return torch.zeros_like(grad_h) if grad_x is None else grad_x, (*grad_context, *grad_params)

def residual_with_graph(ctx, x):
    """h_k(x_k) with its graph, x_k and the context's tensors that need grad as leaves, under the forward's
    autocast: the one computation the forward runs for (21) and the backward for (24) and the gradients, so
    a compiled block runs one graph both times (with grad off, an inference graph might round otherwise)."""
    x_leaf = x.detach().requires_grad_()
    leaves = [t.detach().requires_grad_() if need else t for t, need in zip(ctx.tape.tensors, ctx.context_needs_grad)]
    with torch.enable_grad(), torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
        h = residual_of(ctx.block, x_leaf, *ctx.tape.context(leaves))
    return h, x_leaf, [t for t, need in zip(leaves, ctx.context_needs_grad) if need]

_CHECKED = weakref.WeakSet()  # blocks whose graph was looked at once

def check_graph(block, k, h, inputs):
    """At a block's first backward, refuse a tensor that requires grad, that h_k's graph reaches and that is
    not among the Function's inputs (a parameter kept outside the block: it would get no gradient), and
    reentrant activation checkpointing (it cannot run under torch.autograd.grad)."""
    if block in _CHECKED:
        return
    checkpoint = sys.modules.get("torch.utils.checkpoint")
    reentrant = checkpoint and checkpoint.CheckpointFunction._backward_cls  # the graph node it leaves
    own, seen, nodes = {id(t) for t in inputs}, set(), [h.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node) is reentrant:
            raise BDIAError(f"BDIA: block {k} ({type(block).__name__}) runs torch.utils.checkpoint with use_reentrant="
                            "True, which reversible training cannot back-propagate; pass use_reentrant=False (Hugging "
                            "Face: gradient_checkpointing_kwargs={'use_reentrant': False}), or drop it")
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf tensor that gets .grad
        if leaf is not None and id(leaf) not in own:
            raise BDIAError(f"BDIA: block {k} ({type(block).__name__}) reads a tensor of shape {tuple(leaf.shape)} "
                            "that requires grad but is neither its parameter nor context: reversible=True would "
                            "give it no gradient; pass it as context or make it a parameter of the block")
        nodes.extend(next_node for next_node, _ in node.next_functions)
    _CHECKED.add(block)

def check_recomputation(tape):
    """After the stack's last backward, one read of every check: each recomputed h_k was the forward's
    bit for bit, and (24) rebuilt x_0. The first that failed (from the top) is the cause."""
    checks, tape.checks = tape.checks, []
    failed = torch.stack([before for _, before, _ in checks]) != torch.stack([again for _, _, again in checks])
    if not bool(failed.any()):
        return
    what = checks[int(failed.nonzero()[0])][0]
    where = "rebuilt x_0" if what == "x_0" else f"recomputed {what} (block {what[2:]})"
    why = ("under torch.compile: try without compile, or use reversible=False" if tape.compiled else
           "a block is not deterministic; make it so or use reversible=False")
    raise ReconstructionError(f"BDIA: the reversible backward {where} otherwise than the forward, {why}")

def generator_states(device):
    """The CPU generator's state, and that of x's CUDA device (what a block's draws change)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

@contextlib.contextmanager
def replayed_generators(state, device):
    """Within: the generators as before the block's forward (state None: as they are); after: as before."""
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
    """The stream left the range where its dtype holds the 2^-l grid exactly: (24) would be inexact."""

class ReconstructionError(BDIAError):
    """The reversible backward recomputed an h_k, or rebuilt x_0, otherwise: the gradients would be wrong."""

def check_config(c):
    """A configuration that cannot work is a ValueError that says why (BDIAConfig calls this)."""
    if not c.gammas:
        raise ValueError("BDIAConfig: gammas is empty; give e.g. (-0.5, 0.5)")
    if c.bits is not None and (not isinstance(c.bits, int) or c.bits >= mantissa_bits(torch.float64)):
        raise ValueError(f"BDIAConfig: bits must be an integer below 52 or None (the paper uses 9), got {c.bits!r}")
    if abs(sum(c.gammas) / len(c.gammas)) > 1e-12:
        warnings.warn(f"BDIAConfig: the mean of gammas {c.gammas} is not 0, but inference uses E[gamma] = 0 (25)",
                      stacklevel=4)
    if c.reversible and c.bits is None:
        raise ValueError("BDIAConfig: reversible=True needs bits, as (16) is inexact; set bits=9 or reversible=False")
    if c.reversible and (len({abs(g) for g in c.gammas}) > 1 or not 1 <= (side_bits(c.gammas) or 0) <= 8):
        raise ValueError(f"BDIAConfig: reversible=True needs all gammas +-2^-m, one m from 1 to 8 (Prop. 4.3; not 0, "
                         f"as (24) divides by gamma), got gammas={c.gammas}; or reversible=False")

def mantissa_bits(dtype):
    return round(-math.log2(torch.finfo(dtype).eps))  # 23 for float32, 52 for float64

def exact_limit(dtype, bits):
    """|x| below which `dtype` holds every multiple of 2^-l exactly: 2^(mantissa - l)."""
    return 2.0 ** (mantissa_bits(dtype) - bits)

def check_stream(x, bits):
    """The residual stream's dtype must hold the 2^-l grid (Lemma 4.2): float32 or float64."""
    if bits is not None and x.dtype not in (torch.float32, torch.float64):
        raise PrecisionError(f"BDIA with bits={bits} needs a float32 or float64 residual stream, got {x.dtype}; "
                             "keep x in float32 and run the blocks under torch.autocast")
    if bits is not None and exact_limit(x.dtype, bits) <= 1:
        raise PrecisionError(f"BDIA: {x.dtype} holds the 2^-{bits} grid only for |x| < "
                             f"{exact_limit(x.dtype, bits):g}; use bits <= {mantissa_bits(x.dtype) - 3}")

def check_magnitudes(magnitudes, x, bits):
    """An x_k beyond the range where x.dtype holds the grid (Lemma 4.2): DivergedError, else PrecisionError."""
    lows, highs = zip(*magnitudes)  # torch.aminmax of each x_k
    limit, magnitudes = exact_limit(x.dtype, bits), torch.maximum(-torch.stack(lows), torch.stack(highs))
    if bool((magnitudes < limit).all()):  # one device sync per step; NaN fails too
        return
    k = int((~(magnitudes < limit)).nonzero()[0])
    size = magnitudes[k].item()
    where = "the input of the stack (x_0)" if k == 0 else f"the output of block {k - 1} (x_{k})"
    if not math.isfinite(size) or size > 2.0**20:  # no sensible l needs |x| this large in a normalised stream
        raise DivergedError(f"BDIA: |x| reached {size:.4g} at {where}: training diverged. Lower the learning "
                            "rate or clip gradients, and resume from the last checkpoint")
    fewer = math.floor(mantissa_bits(x.dtype) - math.log2(size)) - 1
    raise PrecisionError(f"BDIA: |x| reached {size:.4g} at {where}, but {x.dtype} holds the 2^-{bits} grid only "
                         f"below {limit:g}; use fewer bits (at most bits={fewer} for this |x|) or normalise the input")

def fingerprint(x):
    """The sum of x's bit patterns modulo 2^32 (float64: 2^64), in any order: one element's change alters it."""
    bits = x.detach().view(torch.int64 if x.dtype == torch.float64 else torch.int32)
    return bits.sum(dtype=bits.dtype)
