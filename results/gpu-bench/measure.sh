#!/bin/bash
# Issue 37 item 8 in one device call (not yet run on a GPU; the timeouts bound it to 9 minutes): tests/test_cuda.py, then
# bench.py eager and compiled at the paper's ViT (width 512, depth 6 and 24, batch 128) and at a GPT-2
# small block stack (depth 12, 1,024 tokens, batch 8); activation memory of the eager modes, each in a
# fresh process (the allocator's peak over forward and backward beyond parameters, gradients, AdamW state).
# Output: $OUT (the device tool's folder) or results/gpu-bench. Extra arguments go to every bench.py call
# (a dry run on a CPU: bash results/gpu-bench/measure.sh --device cpu --dim 32 --heads 2 --batch-size 2). Run it as
# one device call with timeout_s 600; a part that runs out of time is cut, the parts after it still run.
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/gpu-bench}
exec > >(tee "$OUT/output.txt") 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; git log -1 --format=%h
VIT="--modes plain,checkpoint,bdia-rev,revvit --depths 6,24 --batch-size 128"
GPT="--family gpt --tokens 1024 --batch-size 8 --depths 12 --modes plain,checkpoint,bdia-rev"
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  timeout 150 python -m pytest -q tests/test_cuda.py 2>&1 | tail -15
fi
timeout 150 python bench.py $VIT --compile --no-memory --json "$OUT/vit-time.json" "$@"
timeout 110 python bench.py $GPT --compile --no-memory --json "$OUT/gpt-time.json" "$@"
timeout 70 python bench.py $VIT --steps 3 --json "$OUT/vit-memory.json" "$@"
timeout 50 python bench.py $GPT --steps 3 --json "$OUT/gpt-memory.json" "$@"
date -u
