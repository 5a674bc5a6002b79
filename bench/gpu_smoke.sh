#!/usr/bin/env bash
# GPU smoke (≤ 5 minutes): train each landed task a few steps on CUDA, export, run onnxruntime's CUDA
# provider, print one table. On the lent GPU machine, packages it lacks travel as wheels in .whl/ and a
# small slice of the shared data/weights in .gpu/ (see the README's "GPU checks" section).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export VISION_PEFT_DATA=${VISION_PEFT_DATA:-$(pwd)/.gpu/data}
export VISION_PEFT_WEIGHTS=${VISION_PEFT_WEIGHTS:-$(pwd)/.gpu/weights}
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout ${GPU_SMOKE_TIMEOUT:-280} python3 bench/gpu_smoke.py
