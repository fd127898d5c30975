"""
torchrun for the scripts that run under it (train_gpt.py, finetune_e2e.py): join the process
group (DDP), and --fsdp: FSDP2's fully_shard on each block and the root, with checkpoints that are
those of the unsharded model (a run resumes with or without --fsdp, on any number of processes).
"""

import os
from collections import namedtuple

import torch
import torch.distributed

Dist = namedtuple("Dist", "rank world_size local_rank enabled")


def distributed(device=None):
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a single
    process when not launched by torchrun. `device`: a torch.device or --device value."""
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, False)
    cuda = torch.cuda.is_available() if device in (None, "auto") else torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, True)


# -----------------------------------------------------------------------------
# --fsdp: FSDP2 sharding, and checkpoints that are those of the unsharded model


def shard_model(model, blocks, optimizer, make_optimizer):
    """--fsdp: rank 0's weights on every process (as DDP broadcasts them), then FSDP2's
    fully_shard on each block and on the root, in place: each of N processes keeps 1/N of every
    parameter, gradient and optimizer state, and a block's parameters are gathered whole only
    for its forward and its backward (there BDIA's recomputation). Returns make_optimizer(model)
    over the shards, holding `optimizer`'s state (a resumed run's) sharded likewise.

    Parameters, their gathers and the gradients' reduce-scatters stay float32: --amp autocasts
    the blocks as without --fsdp. (FSDP2's MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    would also cast each block's input, BDIA's residual stream, to bfloat16.)"""
    from torch.distributed.fsdp import fully_shard

    full_state = optimizer.state_dict()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, 0)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    sharded = make_optimizer(model)
    params = [p for group in sharded.param_groups for p in group["params"]]  # the order state_dict numbers them
    state = {i: {k: shard_like(v, params[i]) for k, v in s.items()} for i, s in full_state["state"].items()}
    sharded.load_state_dict({**full_state, "state": state})
    return sharded


def shard_like(tensor, param):
    """This process's shard of a whole optimizer tensor (exp_avg, ...) of a sharded parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or tensor.shape != param.shape:
        return tensor  # a step counter
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def unsharded_states(model, optimizer, keep, names=None):
    """(model.state_dict(), optimizer.state_dict()) as the unsharded model and its optimizer
    have them, on the CPU, so that a checkpoint resumes with or without --fsdp and on any number
    of processes; names: only these weights (a LoRA run's adapters); optimizer None: no optimizer
    state. Every process must call this (the gathers are collective); those without `keep` (all
    but rank 0) get None. A tensor of two names (tied weights) stays one."""
    from torch.distributed.tensor import DTensor

    gathered = {}

    def whole(t):
        if id(t) not in gathered:
            full = t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()
            gathered[id(t)] = full.cpu() if keep else None
        return gathered[id(t)]

    with torch.no_grad():
        weights = {n: whole(t) for n, t in model.state_dict(keep_vars=True).items() if names is None or n in names}
        opt = optimizer.state_dict() if optimizer is not None else None
        if opt is not None:
            opt = {**opt, "state": {i: {k: whole(v) for k, v in s.items()} for i, s in opt["state"].items()}}
    return (weights, opt) if keep else (None, None)
