"""Memory per process of training steps of a GPT on the CPU: one process, DDP or FSDP2 (--fsdp),
built as train_gpt.py builds them (plumbing/distributed.py's shard_model for --fsdp). Prints the bytes of parameters,
gradients and optimizer state this process holds, its RSS after setup and its peak RSS during
two steps (VmHWM reset after setup, Linux). Run from the repository root (measure.sh: every row).

    MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc_per_node=2 results/fsdp-memory-cpu/measure.py --bdia --fsdp
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from plumbing import distributed as plumbing_distributed
from bdia import BDIAConfig
from models import GPT
import train_gpt
from torch.distributed.tensor import DTensor

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # MiB
def local_bytes(tensors):
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors) / 2**20

p = argparse.ArgumentParser()
p.add_argument("--fsdp", action="store_true"); p.add_argument("--bdia", action="store_true")
p.add_argument("--n-layer", type=int, default=8); p.add_argument("--n-embd", type=int, default=512)
p.add_argument("--batch-size", type=int, default=8); p.add_argument("--block-size", type=int, default=64)
a = p.parse_args()
torch.set_num_threads(1)
dist = plumbing_distributed.distributed("cpu")
torch.manual_seed(1 + dist.rank)
model = GPT(65, block_size=a.block_size, n_layer=a.n_layer, n_head=8, n_embd=a.n_embd, bias=False,
            bdia=BDIAConfig() if a.bdia else None).train()
make = lambda m: train_gpt.configure_optimizer(m, argparse.Namespace(weight_decay=0.1, lr=1e-4))
optimizer = make(model)
if a.fsdp:
    optimizer = plumbing_distributed.shard_model(model, model.transformer.h, optimizer, make)
    train_model = model
elif dist.enabled:
    train_model = torch.nn.parallel.DistributedDataParallel(model)
else:
    train_model = model
def step():
    x = torch.randint(0, 65, (a.batch_size, a.block_size))
    train_model(x, x)[1].backward()
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
step()  # the optimizer state exists from here
setup = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
for _ in range(2):
    x = torch.randint(0, 65, (a.batch_size, a.block_size))
    train_model(x, x)[1].backward()
    grads = local_bytes([q.grad for q in model.parameters() if q.grad is not None])
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
peak = status("VmHWM")
params = local_bytes(model.parameters())
opt = local_bytes([v for s in optimizer.state.values() for v in s.values() if v.dim() > 0])
n = sum(q.numel() for q in model.parameters())  # of the whole model (a DTensor's numel is global)
mode = "FSDP2" if a.fsdp else "DDP" if dist.enabled else "one process"
print(f"rank {dist.rank}/{dist.world_size} {mode:11s} {'BDIA' if a.bdia else 'plain'}: {n/1e6:.1f}M params; "
      f"held: params {params:.0f} MiB, grads {grads:.0f} MiB, optimizer {opt:.0f} MiB; "
      f"RSS after setup {setup:.0f} MiB, peak RSS in a step {peak:.0f} MiB, rise {peak - setup:.0f} MiB", flush=True)
if dist.enabled:
    torch.distributed.barrier(); torch.distributed.destroy_process_group()
