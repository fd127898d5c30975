"""BDIA under FSDP2 (torch.distributed.fsdp.fully_shard on each block and the root, or on
sub-modules, or on the root only): two CPU processes (gloo) give the loss and, gathered, the
gradients of one process on the whole batch, for the plain model, stored and reversible BDIA,
with gradient accumulation, with each block compiled before it is sharded (torchtitan's order)
and with an encoder's memory as the decoder blocks' context; and
plumbing/distributed.py's --fsdp checkpoints (the unsharded model's state, sharded and gathered back exactly).
One spawn runs every case; the tests compare its results with one process here."""

import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing import distributed  # noqa: E402
from bdia import BDIAConfig  # noqa: E402
from conftest import counting  # noqa: E402
from models import GPT, Seq2Seq  # noqa: E402


def config(mode, gammas=(-0.5,)):
    # One gamma (by default): every sample's gamma is then known whatever the batch split, so one
    # process and two see the same BDIA path (a real run would use (-0.5, 0.5)).
    if mode == "plain":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BDIAConfig(gammas=gammas, reversible=mode == "reversible")


# name: (model, BDIA mode, sharding, micro-steps per process)
CASES = {
    "gpt-plain": ("gpt", "plain", "blocks", 1),
    "gpt-stored": ("gpt", "stored", "blocks", 1),
    "gpt-reversible": ("gpt", "reversible", "blocks", 1),
    "gpt-reversible-sub-modules": ("gpt", "reversible", "sub-modules", 1),
    "gpt-reversible-prefetch": ("gpt", "reversible", "prefetch", 1),  # the next block gathered ahead
    "gpt-reversible-root-only": ("gpt", "reversible", "root", 1),
    "gpt-reversible-grad-accum": ("gpt", "reversible", "blocks", 2),
    "gpt-reversible-compiled": ("gpt", "reversible", "compiled", 1),  # each block compiled, then sharded
    "seq2seq-reversible": ("seq2seq", "reversible", "blocks", 1),
}


def build(kind, mode, dropout=0.0, gammas=(-0.5,)):
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(50, block_size=8, n_layer=3, n_head=2, n_embd=16, dropout=dropout, bdia=config(mode, gammas)).train()
    return Seq2Seq(40, 40, dim=16, heads=2, mlp_dim=16, enc_layers=2, dec_layers=2, dropout=0.0,
                   bdia=config(mode)).train()


def batch(kind):
    torch.manual_seed(1)
    if kind == "gpt":
        return torch.randint(0, 50, (8, 8)), torch.randint(0, 50, (8, 8))
    src, tgt = torch.randint(2, 40, (8, 7)), torch.randint(2, 40, (8, 6))
    src[:3, 5:] = 1  # padding: the memory mask is context too
    return src, tgt


def loss_of(kind, model, part):
    if kind == "gpt":
        return model(*part)[1]
    src, tgt = part
    logits = model(src, tgt[:, :-1])  # the decoder blocks get the memory as context (and its gradient)
    return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())


COMPILED_RUNS = []  # runs of the compiled blocks' graphs, in this process


def shard(model, kind, sharding):
    from torch.distributed.fsdp import fully_shard

    stacks = [model.transformer.h] if kind == "gpt" else [model.encoder, model.decoder]
    if sharding == "compiled":  # as torchtitan: AOTAutograd's one graph for forward and backward, run eagerly
        from torch._dynamo.backends.debugging import aot_eager

        backend = counting(aot_eager, COMPILED_RUNS)
    for block in (b for stack in stacks for b in stack):
        if sharding == "compiled":
            block.compile(backend=backend)
        if sharding in ("blocks", "prefetch", "compiled"):
            fully_shard(block)
        elif sharding == "sub-modules":
            fully_shard(block.attn)
            fully_shard(block.mlp)
    if sharding == "prefetch":  # each block gathers the next one's parameters before that one's forward
        for stack in stacks:
            for block, following in zip(stack, stack[1:]):
                block.set_modules_to_forward_prefetch([following])
    return fully_shard(model)


def train_step(kind, model, parts):
    """Gradient accumulation over the parts: FSDP reduce-scatters on the last one only."""
    total = 0.0
    for i, part in enumerate(parts):
        model.set_requires_gradient_sync(i == len(parts) - 1)
        loss = loss_of(kind, model, part) / len(parts)
        loss.backward()
        total += loss.detach()
    return total


def gathered(model):
    return [p.grad.full_tensor() for p in model.parameters()]


def checkpoint_round_trip(rank):
    """A restored run's state (the same on every process) through distributed.shard_model and back
    through distributed.unsharded_states: (state before, state after), on rank 0."""
    model = build("gpt", "reversible")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    loss_of("gpt", model, batch("gpt")).backward()
    optimizer.step()  # exp_avg, exp_avg_sq and step in the state
    before = {k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict()
    if rank == 1:
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.add_(1.0)  # shard_model broadcasts rank 0's weights
    optimizer = distributed.shard_model(model, model.transformer.h, optimizer, lambda m: torch.optim.AdamW(m.parameters()))
    return before, distributed.unsharded_states(model, optimizer, keep=rank == 0)


def worker(rank, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for name, (kind, mode, sharding, micro_steps) in CASES.items():
        model = shard(build(kind, mode), kind, sharding)
        mine = [t.chunk(2)[rank] for t in batch(kind)]  # this process's half of the global batch
        loss = train_step(kind, model, list(zip(*(t.chunk(micro_steps) for t in mine))))
        dist.all_reduce(loss)
        results[name] = (loss / 2, gathered(model))
        results[f"{name}-compiled-runs"] = len(COMPILED_RUNS)
        COMPILED_RUNS.clear()
        torch.optim.AdamW(model.parameters()).step()  # the step runs on the shards and their gradients
    # Random gammas (+-1/2) and dropout, as a real run: reversible equals stored under FSDP too
    # (x_0 rebuilt bit for bit, or the backward raises), on each process's own half.
    for mode in ("reversible", "stored"):
        model = shard(build("gpt", mode, dropout=0.1, gammas=(-0.5, 0.5)), "gpt", "blocks")
        torch.manual_seed(2 + rank)
        loss = train_step("gpt", model, [[t.chunk(2)[rank] for t in batch("gpt")]])
        results[f"random-{mode}"] = (loss, gathered(model))
    results["checkpoint"] = checkpoint_round_trip(rank)
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()  # gloo aborts a process that tears down while its peer's last messages are in flight
    dist.destroy_process_group()
    os._exit(0)  # as in test_bdia_ddp.py: gloo's threads may abort the interpreter's finalization


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(str(folder / "init"), str(folder / "results.pt")), nprocs=2)
    return torch.load(folder / "results.pt", weights_only=True)


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", CASES)
def test_fsdp_matches_one_process_on_the_global_batch(fsdp_results, name):
    kind, mode, _, _ = CASES[name]
    model = build(kind, mode)
    loss = loss_of(kind, model, batch(kind))
    loss.backward()
    fsdp_loss, fsdp_grads = fsdp_results[name]
    assert abs(fsdp_loss.item() - loss.item()) < 1e-5
    # compiled blocks ran compiled in the forward and in the recomputation, 3 blocks each
    assert fsdp_results[f"{name}-compiled-runs"] == (2 * 3 if CASES[name][2] == "compiled" else 0)
    single = [p.grad for p in model.parameters()]
    assert len(fsdp_grads) == len(single) and all(g is not None for g in single)
    for a, b in zip(fsdp_grads, single):
        assert relative(a, b) < 1e-5


def test_reversible_equals_stored_under_fsdp_with_random_gammas_and_dropout(fsdp_results):
    (loss_r, grads_r), (loss_s, grads_s) = fsdp_results["random-reversible"], fsdp_results["random-stored"]
    assert torch.equal(loss_r, loss_s)  # the same forward, bit for bit
    for a, b in zip(grads_r, grads_s):
        assert relative(a, b) < 1e-5


def test_a_checkpoint_is_sharded_and_gathered_back_bit_for_bit(fsdp_results):
    (weights, optimizer), (weights_after, optimizer_after) = fsdp_results["checkpoint"]
    assert weights.keys() == weights_after.keys() and all(torch.equal(weights[k], weights_after[k]) for k in weights)
    assert optimizer["param_groups"] == optimizer_after["param_groups"]  # lr 0.1 too: the restored run's
    assert optimizer["state"].keys() == optimizer_after["state"].keys()
    for i, state in optimizer["state"].items():
        assert state.keys() == optimizer_after["state"][i].keys()
        assert all(torch.equal(v, optimizer_after["state"][i][k]) for k, v in state.items())
