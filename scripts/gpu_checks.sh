#!/usr/bin/env bash
# Prepared checks for a lent GPU machine (the `device` tool runs a command from the repository root):
#
#     bash scripts/gpu_checks.sh            # about 8 minutes on an H100/H200; results under $OUT (or ./gpu-out)
#
# 1. the cost benchmark in bf16 on CUDA (training step and inference: TOAST vs LoRA vs the frozen model);
# 2. a QLoRA-style run of SmolLM2-135M (4-bit NF4 base, TOAST with rank-8 feedback) with its peak CUDA memory;
# 3. the FSDP2 tests (CPU/gloo processes; a single GPU cannot hold two FSDP ranks, so multi-GPU FSDP stays untested).
# Each step has its own time limit and a failing step does not stop the others. Written on a machine without a GPU:
# its CUDA paths have not run yet.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"

step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $?"
  tail -n 12 "$OUT/$name.log"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1

step cost_bf16 240 python benchmarks/cost.py --device cuda --dtype bf16 --quick --no-docs --output "$OUT/cost_cuda_bf16.json"

step qlora 180 python - "$OUT/qlora" <<'EOF'
import runpy
import sys

import torch

output_dir = sys.argv[1]
sys.argv = ["train_causal_lm.py", "--load-in-4bit", "--feedback-rank", "8", "--max-steps", "20", "--output-dir", output_dir]
torch.cuda.reset_peak_memory_stats()
runpy.run_path("examples/train_causal_lm.py", run_name="__main__")
print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
EOF

step fsdp 180 python -m pytest -q -p no:cacheprovider tests/test_fsdp.py
