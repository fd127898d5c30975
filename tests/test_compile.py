"""Reversible BDIA under torch.compile: blocks compiled on their own run compiled in the forward and in
the backward's recomputation (one graph both times, so (24) stays exact), and a compiled model runs the
engine's reversible stack outside its graph. A cold compile costs 10-30 s on CI: few compiles here."""

import json
import os
import sys

import pytest
import torch
import torch.nn as nn
from torch._inductor.compile_fx import compile_fx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bdia  # noqa: E402
import models  # noqa: E402
import train_vit  # noqa: E402
from bdia import BDIAConfig, run_blocks  # noqa: E402
from conftest import counting  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles anew: dynamo keeps at most 8 compiled versions of a function (Block.forward,
    over all tests), and past that runs it uncompiled, which would skew the counts of compiled runs."""
    torch._dynamo.reset()


def counting_inductor():
    """Inductor, recording which of its compiled graphs ran (in `runs`) and what it compiled (`compiles`)."""
    runs, compiles = [], []

    def compile_noted(graph, example_inputs):
        compiles.append(graph)
        return compile_fx(graph, example_inputs)

    return counting(compile_noted, runs), runs, compiles


def vit_blocks(dropout):
    """Three of the project's blocks (they define residual()), in training mode."""
    torch.manual_seed(0)
    return nn.ModuleList(models.Block(16, 2, 32, dropout, layout="vit") for _ in range(3)).train()


def step(blocks, x, config, seed):
    for p in blocks.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = run_blocks(blocks, x, config)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [p.grad.clone() for p in blocks.parameters()]


@pytest.mark.parametrize("dropout, batches, tokens", [(0.0, [4, 4], 5), (0.1, [16, 16, 8], 17)])
def test_blocks_compiled_on_their_own_run_compiled_both_ways_and_exactly(dropout, batches, tokens):
    """block.compile() on blocks that define residual(): each reversible step runs each block's compiled
    graph twice, the same graph in the forward and in the recomputation (a training graph both times:
    an inference graph in the forward could fuse, and round, otherwise), stored BDIA once; reversible = stored with the same compiled
    blocks (output bit for bit, gradients to float error), without dropout and with it, and with a last
    batch of another size (compiled again). The engine's checks (every recomputed h_k equal to the
    forward's, x_0 rebuilt) pass on every step. The second case has the shapes of the train_vit.py run
    below, whose compiled blocks then come from inductor's cache."""
    backend, runs, compiles = counting_inductor()
    blocks = vit_blocks(dropout)
    for block in blocks:
        block.compile(backend=backend)
    reversible, stored = BDIAConfig(), BDIAConfig(reversible=False)
    for seed, batch in enumerate(batches):
        x = torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        runs.clear()  # x requires grad, as the stream past an embedding: stored BDIA runs the very graphs too
        out, grads = step(blocks, x, reversible, seed)
        assert len(runs) == 2 * len(blocks)  # forward and recomputation, both compiled,
        assert runs[: len(blocks)] == runs[len(blocks) :][::-1]  # block k by the same graph both times
        reversible_runs = runs[: len(blocks)]
        runs.clear()
        out_stored, grads_stored = step(blocks, x, stored, seed)
        assert runs == reversible_runs  # the same graphs: equal outputs on any CPU
        assert torch.equal(out, out_stored)
        for g, g_stored in zip(grads, grads_stored):
            assert ((g - g_stored).norm() / g_stored.norm()).item() < 1e-5
    assert compiles  # inductor compiled them


def test_train_vit_compiles_reversible_bdia(tmp_path, cifar_dir):
    """python train_vit.py --bdia --compile trains (the engine checks every step's recomputation) as the
    uncompiled run does, up to the random draws (compiled dropout and gammas draw otherwise), and saves
    the plain model's names."""
    tiny = ["--dim", "16", "--heads", "2", "--mlp-dim", "32", "--depth", "3", "--patch", "8", "--batch-size", "16",
            "--device", "cpu", "--eval-batch-size", "64", "--epochs", "1", "--limit-train", "72", "--bdia",
            "--data-dir", str(cifar_dir)]  # 72 images: batches of 16, 16, 16, 16 and 8
    logs = {}
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        train_vit.main([*tiny, "--out-dir", str(tmp_path / name), *flags])
        logs[name] = json.loads((tmp_path / name / "log.jsonl").read_text())
    for key in ("train_loss", "val_loss"):
        assert logs["compiled"][key] == pytest.approx(logs["eager"][key], rel=0.02)
    saved = [torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"] for name in ("eager", "compiled")]
    assert saved[0].keys() == saved[1].keys()


def test_blocks_wrapped_by_torch_compile_run_compiled_both_ways():
    """blocks[k] = torch.compile(blocks[k]) (an OptimizedModule, whose residual() would be the eager
    one): the engine calls the compiled block in the forward and in the recomputation."""
    runs = []
    backend = counting(lambda graph, example_inputs: graph.forward, runs)  # the graph as captured
    blocks = nn.ModuleList(torch.compile(block, backend=backend) for block in vit_blocks(0.1))
    x = torch.randn(4, 5, 16)
    out, grads = step(blocks, x, BDIAConfig(), 0)
    assert len(runs) == 2 * len(blocks)
    out_stored, grads_stored = step(blocks, x, BDIAConfig(reversible=False), 0)
    assert len(runs) == 3 * len(blocks) and torch.equal(out, out_stored)
    for g, g_stored in zip(grads, grads_stored):
        assert ((g - g_stored).norm() / g_stored.norm()).item() < 1e-5


class Net(nn.Module):
    """An embedding, the project's blocks through run_blocks, a head: what torch.compile(model) sees."""

    def __init__(self, config):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(4, 16), nn.Linear(16, 3)
        self.blocks = nn.ModuleList(models.Block(16, 2, 32, 0.1, layout="vit") for _ in range(3))
        self.config = config

    def forward(self, x):
        return self.head(run_blocks(self.blocks, self.embed(x), self.config))


def test_a_compiled_model_keeps_the_reversible_stack_out_of_its_graph():
    """torch.compile(model): dynamo compiles around run_blocks, none of the blocks' work (with a graph
    break in ReversibleBlock, it compiled the forward's blocks, for inference, while backward recomputed
    them eagerly: x_0 rebuilt otherwise, after a dozen steps or at once with dropout); the reversible
    model trains as the uncompiled one does."""
    graphs = []

    def recording(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    model, eager = Net(BDIAConfig()).train(), Net(BDIAConfig()).train()
    compiled = torch.compile(model, backend=recording)
    for seed in range(3):
        losses = []
        for net in (compiled, eager):
            torch.manual_seed(seed)
            loss = net(torch.randn(4, 5, 4)).square().mean()
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == losses[1]
    ops = {str(node.target) for graph in graphs for node in graph.graph.nodes}
    assert graphs and not any("layer_norm" in op or "dropout" in op for op in ops), ops
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad)


class Drifting(models.Block):
    """A block whose h moves one ulp on every other call: compiled, it is not deterministic."""

    drift = True

    def forward(self, x, *context):
        h = self.residual(x, *context)
        if self.drift:
            h = torch.nextafter(h, torch.full_like(h, float("inf")))
        self.drift = not self.drift
        return x + h


def test_a_compiled_block_that_recomputes_otherwise_is_caught_at_the_first_step_and_compile_named():
    torch.manual_seed(0)
    blocks = nn.ModuleList([models.Block(16, 2, 32), Drifting(16, 2, 32), models.Block(16, 2, 32)]).train()
    for block in blocks:
        block.compile(backend="eager")
    out = run_blocks(blocks, torch.randn(2, 5, 16), BDIAConfig())
    with pytest.raises(bdia.ReconstructionError, match=r"recomputed h_1 \(block 1\) .* under torch.compile"):
        out.sum().backward()
