"""
BDIA: exact bit-level reversible transformers that keep the standard architecture at inference
(Zhang, Lewis, Kleijn, ICML 2025). Equation numbers are the paper's. A block k maps the residual
stream x_k to x_k + h_k(x_k) (pre-norm: h_k(x) = f_k(x) + g_k(x + f_k(x)), (4)). BDIA training
draws, per sample and block k >= 1, a random gamma_k (e.g. +-1/2) and computes

    x_0     <- Q_l[x_0]                                                     (18)
    x_1      = x_0 + Q_l[h_0(x_0)]                                          (19)
    x_{k+1}  = gamma_k (x_{k-1} + s_{k-1} 2^-l)
               + Q_l[(1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)]            (21)

where Q_l rounds to multiples of 2^-l (17) and the side information s_{k-1} (20: 1 bit per element
for gamma = +-1/2; m bits for +-2^-m, this project's extension) makes the product exact (23), so
(24) rebuilds x_{k-1} from (x_k, x_{k+1}) bit for bit: training keeps x_{K-1}, x_K and s_0..s_{K-2}
(Prop. 4.4; the paper's Table 2 text counts s_0..s_3 for its 6 blocks, one fewer), not the
activations. At inference E[gamma] = 0 gives the standard transformer (25).
h_k is block.residual(x, ...) where a block has one, else block(x, ...) - x; so any block works:

    x = run_blocks(self.blocks, x, BDIAConfig())    # instead of: for b in self.blocks: x = b(x)
    model.model.layers = BDIAStack(model.model.layers, BDIAConfig())   # a model that loops over its own

This file imports only torch and the standard library: copy it into your project.
"""

import contextlib
import functools
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
    return x if bits is None else _RoundSTE.apply(x * 2.0**bits) / 2.0**bits  # powers of two: both exact

def side_info(x, bits, m):
    """s = (-n) mod 2^m for x = n 2^-l on the grid, so that n + s is a multiple of 2^m and, for |gamma| = 2^-m,
    gamma (x + s 2^-l) is on the grid with no rounding (Prop. 4.3). m = 1 (gamma +-1/2) is eq. (20), s = 1 where
    n is odd; m >= 2 is this project's extension. The low m bits of the integer -n (two's complement: n < 0 too):

        n       5  -3   4  |  5  -3   6        (l is bits, the grid's; m is side_bits(gammas),
        m       1   1   1  |  2   2   2         the side information's width)
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

def draw_gamma(gammas, x):
    """gamma_k of one block k >= 1, per sample x[i], uniformly from the tensor gammas, shaped to broadcast over x."""
    return gammas[torch.randint(len(gammas), (x.shape[0],), device=x.device)].view(-1, *[1] * (x.dim() - 1))

def bdia_block(k, x_prev, x, h, gamma, config, training=True):
    """x_{k+1} of block k by (19), (21) or (10), and the s_{k-1} (20) it used (None: gamma x_{k-1} rounded)."""
    if k == 0:
        return x + quantize(h, config.bits), None  # (19)
    m = side_bits(config.gammas)
    side = None if config.bits is None or m is None or not training else side_info(x_prev, config.bits, m)  # (20)
    return bdia_step(x_prev, x, h, gamma, config.bits, side), side  # (21)


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
    config None: the plain stack, x = block(x, *context, **kwargs). Training (the blocks' own mode): BDIA
    (18)-(21), or (10) when bits is None; reversible: the activations rebuilt by (24) in backward. Eval:
    (25) with gamma = config.eval_gamma. Context, positional (encoder memory, masks) and keyword (rotary
    embeddings), goes to every block; its tensors that require grad get their gradient summed over blocks."""
    blocks, training = blocks_and_mode(blocks)
    if config is None or not blocks:
        for block in blocks:
            x = split(block(x, *context, **kwargs))[0]
        return x
    if training and config.reversible and torch.is_grad_enabled() and torch.compiler.is_compiling():
        # Under torch.compile(model) the reversible stack runs eagerly: dynamo would compile the forward's h_k, not the
        # recomputation's (loss.backward() runs outside its graph), whose rounding then differs. block.compile() works.
        return torch.compiler.disable(run_blocks)(blocks, x, config, *context, **kwargs)
    chain = Chain(config, x, training, any(compiled(b) for b in blocks))
    for block in blocks:
        x = chain.step(block, block, context, kwargs)[0]
    if chain.tape is not None:
        chain.tape.check_range()  # one device sync per step
    return x

def blocks_and_mode(blocks):
    """The blocks as a list, and their own mode (a slice of an nn.ModuleList is a new, training container)."""
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList, list, tuple)) or not all(
            isinstance(block, nn.Module) for block in blocks):
        raise TypeError("run_blocks: pass the blocks as an nn.ModuleList, nn.Sequential or list of nn.Modules")
    modes = {block.training for block in blocks}
    if len(modes) > 1:
        raise ValueError("BDIA: some blocks are in training mode, some in eval mode; call .train() or .eval() on all")
    return list(blocks), modes == {True}

class Chain:
    """x on its way through the blocks: k, x_{k-1}, x_k and the tape. run_blocks and LayerStep take its step."""

    def __init__(self, config, x, training, compiled=False):
        if training:
            check_stream(x, config.bits)
        self.config, self.training, self.k = config, training, 0
        self.gammas = torch.tensor(config.gammas, device=x.device, dtype=x.dtype)
        self.x_prev, self.x = None, quantize(x, config.bits)  # (18)
        reversible = training and config.reversible and torch.is_grad_enabled()
        self.tape = Tape(config, self.x, compiled) if reversible else None

    def step(self, block, call, args, kwargs):
        """x_{k+1} of block k, and its other outputs. call: `block`, or its own forward (a model's own loop)."""
        k, x_prev, x, config = self.k, self.x_prev, self.x, self.config
        gamma = None if k == 0 else draw_gamma(self.gammas, x) if self.training else config.eval_gamma
        if not self.training and config.eval_gamma == 0:
            x_next, rest = split(block_output(block, call, x, args, kwargs))
            # (25); at block 0 it rounds x_0 + h_0(x_0) where (19) adds x_0 to Q_l[h_0(x_0)]: the same on paper,
            # in float a few elements one grid step apart (x_0 + h_0 may round first; README, "What BDIA is")
            x_next = quantize(x_next, config.bits)
        elif self.tape is not None:
            arguments = Arguments(block, call, args, kwargs, k)
            params = [p for p in block.parameters() if p.requires_grad]
            x_next, *extras = ReversibleBlock.apply(self.tape, arguments, k, gamma, x_prev, x, *arguments.tensors,
                                                    *params)  # (19), (21)
            rest = with_tensors(arguments.rest, arguments.rest_spec, extras)  # the other outputs, as Function's
        else:
            h, rest = residual_of(block, call, x, args, kwargs)
            x_next = bdia_block(k, x_prev, x, h, gamma, config, self.training)[0]  # (19), (21), (10)
        self.k, self.x_prev, self.x = k + 1, x, x_next
        return x_next, rest

def split(y):
    """A block's output: the stream (a tuple's or list's first element) and the others (T5: the position bias)."""
    return (y[0], tuple(y[1:])) if isinstance(y, (tuple, list)) else (y, None)

def residual_of(block, call, x, args, kwargs):
    """h_k(x_k), in x's dtype (the block may run under autocast), and the block's other outputs: block.residual(x,
    ...) if it has it and is not compiled, else call(x, ...) - x, whose float error the recomputation repeats."""
    if call is block and hasattr(block, "residual") and not compiled(block):
        if fsdp_sharded(block) and "residual" not in vars(block):  # FSDP2 gathers parameters only around forward
            sys.modules["torch.distributed.fsdp"].register_fsdp_forward_method(block, "residual")
        h, rest = block.residual(x, *args, **kwargs), None
    else:
        out, rest = split(block_output(block, call, x, args, kwargs))
        h = out - x
    return (h if h.dtype == x.dtype else h.to(x.dtype)), rest

def block_output(block, call, x, args, kwargs):
    """call(x, *args, **kwargs); the LayerStep of a BDIAStack's layer lets the engine's own call go through."""
    step = vars(block).get("forward")
    with contextlib.ExitStack() as after:
        if isinstance(step, LayerStep):
            step.through = True
            after.callback(setattr, step, "through", False)
        return call(x, *args, **kwargs)

def compiled(block):
    """Whether block.compile() or torch.compile(block) compiled the block's call (residual() is not)."""
    dynamo = sys.modules.get("torch._dynamo")
    return getattr(block, "_compiled_call_impl", None) is not None or (
        dynamo is not None and isinstance(block, dynamo.eval_frame.OptimizedModule))

def fsdp_sharded(module):
    """Whether FSDP2's fully_shard wraps the module (torch.distributed.fsdp is looked at only if loaded)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)

class BDIAStack(nn.Sequential):
    """The same blocks, keys and modules, as an nn.Sequential whose forward is run_blocks and whose blocks each
    get a LayerStep: `model.blocks = BDIAStack(model.blocks, BDIAConfig())` converts a model that calls them as
    one module, or loops over them itself (`model.model.layers`, Hugging Face). config None: the plain stack."""

    def __init__(self, blocks, config=None):
        if isinstance(blocks, nn.Module):
            blocks = OrderedDict(blocks.named_children())
        super().__init__(blocks) if isinstance(blocks, dict) else super().__init__(*blocks)
        self.config, self.chain = config, None
        for i, block in enumerate(self):
            block.forward = LayerStep(self, i, block)  # the layer is the same module: keys, attributes, class

    def forward(self, x, *context, **kwargs):
        return run_blocks(self, x, self.config, *context, **kwargs)

    def __getitem__(self, index):  # a slice: the same layers, still their stack's, as a BDIAStack of its config
        if not isinstance(index, slice):
            return super().__getitem__(index)
        part = nn.Sequential(OrderedDict(list(self._modules.items())[index]))
        part.__class__, part.config, part.chain = BDIAStack, self.config, None
        return part

class LayerStep:
    """The forward a BDIAStack gives a layer, for a model whose own loop calls it (`for layer in self.layers[: n]:
    hidden = layer(hidden, mask_of_this_layer, ...)`): one step of the pass its first layer starts, the layer's
    hooks around it, its own forward inside. Called by the engine itself, it is the layer's own forward."""

    def __init__(self, stack, index, layer):
        self.stack, self.index, self.layer, self.through = stack, index, layer, False

    def __call__(self, *args, **kwargs):
        forward = functools.partial(type(self.layer).forward, self.layer)
        if self.through or self.stack.config is None:
            return forward(*args, **kwargs)
        step = torch.compiler.disable(self.step) if torch.compiler.is_compiling() else self.step  # run eagerly
        return step(forward, args, kwargs)

    def step(self, forward, args, kwargs):  # x_{k+1} in the place of x_k + h_k(x_k) in the layer's output
        layer, stack, name = self.layer, self.stack, f"layer {self.index} ({type(self.layer).__name__})"
        if not args or not torch.is_tensor(args[0]):
            raise BDIAError(f"BDIA: {name} got no hidden state as its first positional argument: pass it so, or "
                            "write the loop yourself with run_blocks")
        if compiled(layer) or fsdp_sharded(layer):  # the loop runs its own forward: uncompiled, unsharded
            raise BDIAError(f"BDIA: {name} is compiled or sharded; run the stack as one module (run_blocks) for that")
        chain, x = stack.chain, args[0]
        if chain is None or chain.output() is not x:  # not the previous layer's output: a new pass starts
            if self.index != 0 and (layer.training or stack.config.eval_gamma != 0):  # (25) needs no chain
                raise BDIAError(f"BDIA: {name} got a hidden state that is not the previous layer's output (changed "
                                "between layers, or a start mid-stack): run the layers with run_blocks instead")
            chain = Chain(stack.config, x, blocks_and_mode(stack)[1])  # the mode of all the stack's layers
        elif chain.training != layer.training:
            raise ValueError(f"BDIA: {name} is in another mode than the layers before it; call .train() or .eval()")
        x_next, rest = chain.step(layer, forward, args[1:], kwargs)
        chain.output, stack.chain = weakref.ref(x_next), chain
        return x_next if rest is None else (x_next, *rest)


# -----------------------------------------------------------------------------
# Online back-propagation: one autograd Function per block (inputs x_{k-1}, x_k, its tensor arguments, parameters)
# keeps the packed side bits; each backward, from the top, rebuilds x_{k-1} by (24) for the block below.

class Tape:
    """What the blocks of one reversible pass share: config, the rebuilt x_k, |x_k|, the checks of (24)."""

    def __init__(self, config, x0, compiled):
        self.config, self.dtype, self.m, self.compiled = config, x0.dtype, side_bits(config.gammas), compiled
        self.magnitudes = [torch.aminmax(x0.detach())]  # NaN stays NaN
        self.rebuilt, self.checks, self.lowest, self.target = {}, [], None, None

    def take(self, k):
        """x_{k+1} and x_k for block k's backward; x_{k+1} is needed no more (nor x_0 by block 0)."""
        self.check_range()
        if k + 1 not in self.rebuilt:
            raise BDIAError(f"BDIA: block {k}'s backward has no x_{k + 1}: this reversible graph was back-propagated "
                            "already (retain_graph=True), or the loss does not use the last block's output")
        return self.rebuilt.pop(k + 1), self.rebuilt.pop(k) if k == 0 else self.rebuilt[k]

    def rebuild(self, k, x):
        """x_k, rebuilt by (24) for block k's backward; the lowest rebuilt x_k is checked against the forward's."""
        self.rebuilt[k] = x
        if k == self.target[0]:
            self.checks.append((f"x_{k}", self.target[1], fingerprint(x + 0.0)))

    def check_range(self):  # once: after the forward (run_blocks), or at the top block's backward
        if self.magnitudes:
            check_magnitudes(self.magnitudes, self.dtype, self.config.bits)
            self.magnitudes = []

class Arguments:
    """Block k's other arguments (masks, rotary embeddings, a position bias), their tensors its Function's inputs.
    HF KV caches become None (as under HF's checkpointing): the recomputation must not see what the forward wrote."""

    def __init__(self, block, call, args, kwargs, k):
        if getattr(block, "gradient_checkpointing", False):  # Hugging Face's gradient_checkpointing_enable()
            raise BDIAError(f"BDIA: layer {k} is gradient-checkpointed, which reversible BDIA makes redundant: call "
                            "model.gradient_checkpointing_disable(), or use reversible=False")
        self.block, self.call, (self.leaves, self.spec) = block, call, tree_flatten((args, kwargs))
        cache = getattr(sys.modules.get("transformers.cache_utils"), "Cache", ())  # Hugging Face's, if loaded
        if any(isinstance(t, cache) and t.get_seq_length() > 0 for t in self.leaves):
            raise BDIAError(f"BDIA: layer {k} got a KV cache that holds tokens already, which reversible training "
                            "cannot recompute with; pass no cache (use_cache=False), or use reversible=False")
        if any(isinstance(t, cache) for t in self.leaves):
            warnings.warn("BDIA: reversible training runs the layers without their KV cache; pass use_cache=False "
                          "to the model in training", stacklevel=6)
        self.leaves = [None if isinstance(t, cache) else t for t in self.leaves]
        self.tensors = [t for t in self.leaves if torch.is_tensor(t)]

    def residual(self, x, tensors):
        """h_k(x_k) and the tensors of the block's other outputs, these tensors in the arguments' places."""
        h, rest = residual_of(self.block, self.call, x, *with_tensors(self.leaves, self.spec, tensors))
        rest, self.rest_spec = tree_flatten(rest)
        self.rest = [t.detach() if torch.is_tensor(t) else t for t in rest]  # without their graph
        return h, [t for t in rest if torch.is_tensor(t)]

def with_tensors(leaves, spec, tensors):
    """The tree of these leaves, with these tensors in the places of theirs."""
    tensors = iter(tensors)
    return tree_unflatten([next(tensors) if torch.is_tensor(t) else t for t in leaves], spec)

class ReversibleBlock(torch.autograd.Function):
    """Block k: (tape, arguments, k, gamma_k, x_{k-1}, x_k, *tensors, *parameters) -> x_{k+1}, *other outputs."""

    @staticmethod
    def forward(ctx, tape, arguments, k, gamma, x_prev, x, *tensors_and_params):
        ctx.tape, ctx.arguments, ctx.k, ctx.gamma = tape, arguments, k, gamma
        ctx.context_needs_grad = ctx.needs_input_grad[6 : 6 + len(arguments.tensors)]
        ctx.n_params = len(tensors_and_params) - len(arguments.tensors)  # FSDP2: its shards get no gradient here
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        if tape.lowest is None and any(ctx.needs_input_grad):  # the last backward checks h_k and the lowest x_k
            tape.lowest, tape.target = k, (max(k - 1, 0), fingerprint((x if k == 0 else x_prev) + 0.0))
        rng = generator_states(x.device)  # the block's random draws are replayed by observation
        h, extras = residual_with_graph(ctx, x)[:2]
        drew = any(a is not None and not torch.equal(a, b) for a, b in zip(rng, generator_states(x.device)))
        ctx.rng = rng if drew else None  # kept only where the block drew
        ctx.h_fingerprint = fingerprint(h)
        x_next, side = bdia_block(k, x_prev, x, h.detach(), gamma, tape.config)  # (19), (21)
        tape.magnitudes.append(torch.aminmax(x_next.detach()))
        tape.rebuilt = {k + 1: x_next.detach(), k: x.detach()}  # the top pair so far
        ctx.save_for_backward(None if side is None else pack_bits(side, tape.m))  # m bits per element
        detached = [t.detach() for t in extras]  # their graph, too, is not kept
        ctx.mark_non_differentiable(*[t for t, e in zip(detached, extras) if not e.requires_grad])
        return (x_next, *detached)

    @staticmethod
    def backward(ctx, grad_next, *grad_extras):
        """The chain rule of (21), Q_l's gradient taken as the identity (straight-through):

            dL/dh_k     = (1 + gamma_k) dL/dx_{k+1}
            dL/dx_k     = (1 - gamma_k) dL/dx_{k+1} + dL/dh_k dh_k/dx_k
            dL/dx_{k-1} = gamma_k dL/dx_{k+1}

        and of (19), x_1 = x_0 + Q_l[h_0(x_0)]: dL/dh_0 = dL/dx_1, dL/dx_0 = dL/dx_1 + dL/dh_0 dh_0/dx_0.
        Autograd adds the dL/dx_k of blocks k and k+1 (both read x_k) before block k-1's backward.
        Blocks go from the top, so x_{k+1} and x_k are known (the top pair, or rebuilt by block k+1);
        block k rebuilds x_{k-1} by (24) and frees x_{k+1}: three x_k alive, whatever the depth."""
        tape, k, gamma = ctx.tape, ctx.k, ctx.gamma
        x_next, x = tape.take(k)  # x_{k+1}, x_k
        h, extras, leaves = recompute(ctx, x)  # h_k(x_k) as in the forward, now with its graph
        if k > 0:
            side = unpack_bits(ctx.saved_tensors[0], tape.m, x.shape, x.dtype)  # s_{k-1}
            tape.rebuild(k - 1, bdia_unstep(x_next, x, h.detach(), gamma, tape.config.bits, side))  # (24)
        if k == tape.lowest:
            check_recomputation(tape)  # after the pass's last backward
        grad_h = grad_next if k == 0 else (1 + gamma) * grad_next  # (19): dL/dh_0; (21): dL/dh_k
        grad_x, grad_rest = vector_jacobian(ctx, [h, *extras], [grad_h, *grad_extras], leaves)  # dL/dh_k dh_k/dx_k, ...
        if k == 0:
            return None, None, None, None, None, grad_next + grad_x, *grad_rest  # (19): dL/dx_0
        return None, None, None, None, gamma * grad_next, (1 - gamma) * grad_next + grad_x, *grad_rest  # (21)

def recompute(ctx, x):
    """h_k(x_k) again with the forward's random draws; its graph checked once per block, its fingerprint queued."""
    with replayed_generators(ctx.rng, x.device):
        h, extras, x_leaf, context_leaves = residual_with_graph(ctx, x)
    params = [p for p in ctx.arguments.block.parameters() if p.requires_grad]  # FSDP2: the unsharded ones, now
    check_graph(ctx.arguments.block, ctx.k, [h, *extras], [x_leaf, *params, *context_leaves])
    ctx.tape.checks.append((f"h_{ctx.k}", ctx.h_fingerprint, fingerprint(h)))
    return h, extras, (x_leaf, params, context_leaves)

def vector_jacobian(ctx, outputs, grads, leaves):
    """dL/dh_k dh_k/dx_k (with the block's other outputs' share), and the gradients of its tensor arguments and
    parameters, in the order of forward's inputs. Under FSDP2 backward(), not grad(): it reduce-scatters .grad."""
    x_leaf, params, context_leaves = leaves
    outputs, grads = zip(*[(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad])
    if any(fsdp_sharded(m) for m in ctx.arguments.block.modules()):
        torch.autograd.backward(outputs, grads, inputs=[x_leaf, *params, *context_leaves])
        grad_x, grad_params, grads = x_leaf.grad, [None] * ctx.n_params, iter([t.grad for t in context_leaves])
    else:
        grad_x, *grads = torch.autograd.grad(outputs, [x_leaf, *params, *context_leaves], grads, allow_unused=True)
        grad_params, grads = grads[: len(params)], iter(grads[len(params) :])
    grad_context = [next(grads) if need else None for need in ctx.context_needs_grad]
    return torch.zeros_like(x_leaf) if grad_x is None else grad_x, (*grad_context, *grad_params)

def residual_with_graph(ctx, x):
    """h_k(x_k) and the other outputs, with their graph from leaves x_k and the tensors that need grad, under the
    forward's autocast: the one computation of (21), (24) and the gradients (a compiled block: one graph)."""
    x_leaf, needs = x.detach().requires_grad_(), ctx.context_needs_grad
    leaves = [t.detach().requires_grad_() if need else t for t, need in zip(ctx.arguments.tensors, needs)]
    with torch.enable_grad(), torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
        h, extras = ctx.arguments.residual(x_leaf, leaves)
    return h, extras, x_leaf, [t for t, need in zip(leaves, needs) if need]

_CHECKED = weakref.WeakSet()  # blocks whose graph was looked at once

def check_graph(block, k, outputs, inputs):
    """At a block's first backward, refuse a tensor that requires grad, that h_k's graph reaches and that is not an
    input (a parameter kept outside the block: no gradient), and reentrant checkpointing (no autograd.grad)."""
    if block in _CHECKED:
        return
    checkpoint = sys.modules.get("torch.utils.checkpoint")
    reentrant = checkpoint and checkpoint.CheckpointFunction._backward_cls  # the graph node it leaves
    own, seen, nodes = {id(t) for t in inputs}, set(), [out.grad_fn for out in outputs]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node) is reentrant:
            raise BDIAError(f"BDIA: block {k} ({type(block).__name__}) runs torch.utils.checkpoint with "
                            "use_reentrant=True, which reversible BDIA cannot back-propagate; pass use_reentrant=False")
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf tensor that gets .grad
        if leaf is not None and id(leaf) not in own:
            raise BDIAError(f"BDIA: block {k} ({type(block).__name__}) reads a tensor of shape {tuple(leaf.shape)} "
                            "that requires grad but is neither its parameter nor context: reversible=True would give "
                            "it no gradient; pass it as context or make it a parameter of the block")
        nodes.extend(next_node for next_node, _ in node.next_functions)
    _CHECKED.add(block)

def check_recomputation(tape):
    """After the pass's last backward, one read of every check: each recomputed h_k was the forward's bit for bit,
    and (24) rebuilt the lowest x_k (x_0 unless lower blocks need no gradient). The first that failed is the cause."""
    checks, tape.checks = tape.checks, []
    failed = torch.stack([before for _, before, _ in checks]) != torch.stack([again for _, _, again in checks])
    if not bool(failed.any()):
        return
    what = checks[int(failed.nonzero()[0])][0]
    where = f"rebuilt {what}" if what[0] == "x" else f"recomputed {what} (block {what[2:]})"
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

def check_magnitudes(magnitudes, dtype, bits):
    """An x_k beyond the range where dtype holds the grid (Lemma 4.2): DivergedError, else PrecisionError."""
    lows, highs = zip(*magnitudes)  # torch.aminmax of each x_k
    limit, magnitudes = exact_limit(dtype, bits), torch.maximum(-torch.stack(lows), torch.stack(highs))
    if bool((magnitudes < limit).all()):  # one device sync per step; NaN fails too
        return
    k = int((~(magnitudes < limit)).nonzero()[0])
    size = magnitudes[k].item()
    where = "the input of the stack (x_0)" if k == 0 else f"the output of block {k - 1} (x_{k})"
    if not math.isfinite(size) or size > 2.0**20:  # no sensible l needs |x| this large in a normalised stream
        raise DivergedError(f"BDIA: |x| reached {size:.4g} at {where}: training diverged. Lower the learning "
                            "rate or clip gradients, and resume from the last checkpoint")
    fewer = math.floor(mantissa_bits(dtype) - math.log2(size)) - 1
    raise PrecisionError(f"BDIA: |x| reached {size:.4g} at {where}, but {dtype} holds the 2^-{bits} grid only "
                         f"below {limit:g}; use fewer bits (at most bits={fewer} for this |x|) or normalise the input")

def fingerprint(x):
    """The sum of x's bit patterns modulo 2^32 (float64: 2^64), in any order: one element's change alters it."""
    bits = x.detach().view(torch.int64 if x.dtype == torch.float64 else torch.int32)
    return bits.sum(dtype=bits.dtype)
