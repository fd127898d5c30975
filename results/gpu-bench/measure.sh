#!/bin/bash
# Issue 37 item 8 in one device call (not yet run on a GPU): tests/test_cuda.py, then bench.py eager and
# compiled at the paper's ViT (width 512, depth 6 and 24, batch 128) and at a GPT-2 small block stack
# (depth 12, 1,024 tokens, batch 8); activation memory of the eager modes, each in a fresh process (the
# allocator's peak over forward and backward beyond parameters, gradients and AdamW state).
# Then results/gpu-bench/fusion.py: would fusing (21)/(24) as issue 37 allows pay at the paper's ViT?
# Output: $OUT (the device tool's folder) or results/gpu-bench. Run it as one device call with timeout_s 600:
# its parts' timeouts sum to 590 s; a part that runs out of time keeps the depths it finished in its JSON (its
# table prints at its end), the parts after it still run, and test_cuda.txt keeps each test's result as it comes. Extra arguments go to
# every bench.py call (a dry run on a CPU: bash results/gpu-bench/measure.sh --device cpu --dim 32 --heads 2
# --batch-size 2).
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-results/gpu-bench}
mkdir -p "$OUT"
VIT="--modes plain,checkpoint,bdia-rev,revvit --batch-size 128"
GPT="--family gpt --tokens 1024 --batch-size 8 --depths 12 --modes plain,checkpoint,bdia-rev"
{
  date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format="commit %h" 2>/dev/null || echo "commit: not known here (no .git): say which one was sent"
  if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    timeout 170 python -m pytest -v -rfE tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
    grep -E "passed|failed|error" "$OUT/test_cuda.txt" | tail -3
  fi
  timeout 100 python bench.py $VIT --depths 6 --compile --no-memory --json "$OUT/vit-6-time.json" "$@"
  timeout 60 python bench.py $VIT --depths 24 --compile --no-memory --json "$OUT/vit-24-time.json" "$@"
  timeout 90 python bench.py $GPT --compile --no-memory --json "$OUT/gpt-time.json" "$@"
  timeout 65 python bench.py $VIT --depths 6,24 --steps 3 --json "$OUT/vit-memory.json" "$@"
  timeout 45 python bench.py $GPT --steps 3 --json "$OUT/gpt-memory.json" "$@"
  [ $# -gt 0 ] || timeout 60 python results/gpu-bench/fusion.py  # not in a dry run; last: lost first if time is short
  date -u
} 2>&1 | tee "$OUT/output.txt"
