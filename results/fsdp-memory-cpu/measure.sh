#!/bin/bash
# Every row of output.txt: plain GPT and reversible BDIA-GPT (8 x 512, 25.2M parameters, batch 8 x 64
# tokens per process), on one process, FSDP2 at world size 1, DDP on 2 processes, FSDP2 on 2.
cd "$(dirname "$0")/../.."
export MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
TR="python -m torch.distributed.run --standalone"
S=results/fsdp-memory-cpu/measure.py
date -u; lscpu | grep "Model name"; python -c "import torch; print('torch', torch.__version__)"
for bdia in "" "--bdia"; do
  python $S $bdia 2>&1 | grep "^rank"
  $TR --nproc_per_node=1 $S $bdia --fsdp 2>&1 | grep "^rank"
  $TR --nproc_per_node=2 $S $bdia 2>&1 | grep "^rank"
  $TR --nproc_per_node=2 $S $bdia --fsdp 2>&1 | grep "^rank"
done
