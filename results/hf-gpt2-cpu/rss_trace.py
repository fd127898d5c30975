"""Where in one training step's forward and backward bench.py's CPU memory peak lies, for the hf-gpt2 family
(batch 2 x 256 tokens, GPT-2's vocabulary): RSS sampled every 2 ms over the forward and backward after a warm-up
step, as bench.measure_memory measures them, with the times at which the last layer norm's forward, the LM head's
backward and layer 0's backward end. Run from the repository root's copy (it imports bench):
    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=2 python results/hf-gpt2-cpu/rss_trace.py MODE DEPTH
MODE plain or checkpoint: the hook on layer 0 wraps its output, which BDIAStack refuses (bdia-rev fails clearly)."""

import os
import sys
import threading
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

import bench  # noqa: E402

mode, depth = sys.argv[1], int(sys.argv[2])
args = types.SimpleNamespace(family="hf-gpt2", dim=None, heads=None, mlp_dim=None, tokens=256, batch_size=2,
                             vocab_size=None, dropout=0.0, amp=False, device="cpu")
shared = {}
step, forward_backward = bench.make_step(args, mode, depth, torch.device("cpu"), shared)
model = shared["model"]
step()  # warm-up


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


marks, samples, done = {}, [], threading.Event()


def mark(name):
    def hook(*_):  # returns None: the output and gradients stay as they are
        marks.setdefault(name, time.perf_counter())
    return hook


model.transformer.ln_f.register_forward_hook(mark("forward: last layer norm"))
model.lm_head.register_full_backward_hook(mark("backward: LM head done"))
model.transformer.h[0].register_full_backward_hook(mark("backward: layer 0 done"))


def sample():
    while not done.is_set():
        samples.append((time.perf_counter(), rss_mb()))
        time.sleep(0.002)


base = rss_mb()
sampler = threading.Thread(target=sample, daemon=True)  # a failed step does not leave it running
sampler.start()
t0 = time.perf_counter()
forward_backward()
t1 = time.perf_counter()
done.set()
sampler.join()
at, peak = max(samples, key=lambda s: s[1])
print(f"{mode} depth {depth}: peak rise {peak - base:.0f} MB at {at - t0:.2f} s of {t1 - t0:.2f} s")
for name, t in sorted(marks.items(), key=lambda kv: kv[1]):
    before = [r for s, r in samples if s <= t]
    print(f"  {name:26s} at {t - t0:6.2f} s, highest rise up to then {max(before, default=base) - base:6.0f} MB")
