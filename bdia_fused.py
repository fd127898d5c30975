"""
BDIA's reversible step with its element-wise arithmetic compiled by torch.compile: a few
fused kernels per block and step instead of ~25 (what it is for is GPU time; the scripts'
--compile uses it). The engine is bdia.py; this file only hands it other arithmetic:

    config = bdia_fused.fuse(BDIAConfig())    # then run_blocks(blocks, x, config) as before

Exactness does not depend on the compiler: the mixed term Q_l[(1 - gamma) x + (1 + gamma) h]
is one compiled function that the forward (21) and the rebuild (24) both call (two separate
compilations of it could round differently, a fused multiply-add in one and not in the
other, and the rebuild would drift), and every other operation of (21) and (24) is exact.
The compiled mixed term may round a few elements otherwise than bdia.py's eager one, so a
fused run's outputs and gradients are close to, not bitwise equal to, an eager run's.

bdia.py never imports this file: the compiled functions reach the engine through the config.
"""

import dataclasses

import torch

import bdia


def grid_mixed(x, h, g):
    """bdia.mixed_term without autograd (the reversible step runs it under no_grad)."""
    return torch.round(torch.addcmul(x * g.minus_l, h, g.plus_l))


def grid_step(x_prev, mixed, g, bits, m):
    """(20), (21), the packed side bits and |x_{k+1}| in one compiled function."""
    side = bdia.side_info(x_prev, bits, m)
    x_next = g.gamma * (x_prev + side * 2.0**-bits) + mixed * 2.0**-bits
    return x_next, bdia.pack_bits(side, m), bdia.max_abs(x_next)


def grid_unstep(x_next, mixed, g, packed, bits, m):
    """(24): every operation here is exact, whatever the compiler makes of it."""
    side = bdia.unpack_bits(packed, m, x_next.shape, x_next.dtype)
    return (x_next - mixed * 2.0**-bits) / g.gamma - side * 2.0**-bits


def grad_h(g_next, g):
    return g_next * g.plus


def grad_inputs(g_x, g_next, g):
    return g_x + g_next * g.minus, g_next * g.gamma


_COMPILED = {}


def compiled(fn):
    """fn compiled by torch.compile, once, at its first call (importing this file compiles nothing)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=None)
    return _COMPILED[fn]


def fused_step(x_prev, x, h, g, bits, m):
    return compiled(grid_step)(x_prev, compiled(grid_mixed)(x, h, g), g, bits, m)


def fused_rebuild(x_next, x, h, g, bits, m, packed):
    return compiled(grid_unstep)(x_next, compiled(grid_mixed)(x, h, g), g, packed, bits, m)


def fused_grad_h(g_next, g):
    return compiled(grad_h)(g_next, g)


def fused_grad_inputs(g_x, g_next, g):
    return compiled(grad_inputs)(g_x, g_next, g)


FUSED = bdia.Arithmetic(fused_step, fused_rebuild, fused_grad_h, fused_grad_inputs)


def fuse(config):
    """A copy of config whose reversible step's element-wise arithmetic runs torch.compile'd."""
    if not config.reversible:
        raise ValueError("bdia_fused.fuse compiles the reversible step: it needs a config with reversible=True")
    return dataclasses.replace(config, arithmetic=FUSED)
