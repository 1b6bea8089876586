#!/usr/bin/env bash
# The CUDA check of dinodet2 (README, "CUDA"): AMP fp16 / bf16 training of the improved COCO-sized
# config (random-init dinov2-base size, 1024 px, batch 2), LoRA-merged inference and the efficiency
# switches: s/iter, peak memory, finite losses. Run it on any CUDA machine, from the repository root:
#     bash benchmarks/gpu_check.sh [--iters 10] [KEY VALUE ...]
# Exits non-zero if a row fails or a loss is not finite. JSON in output/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec "$PYTHON" benchmarks/gpu_check.py "$@"
