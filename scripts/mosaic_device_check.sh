#!/usr/bin/env bash
# One prepared GPU run for the Mosaic GPU kernels (impl="mosaic"), on a lent H100/H200, from the
# repo root: the compiled kernels against dense attention (pytest -m gpu), then Table 3 timing of
# ours_mosaic beside the Triton kernels, the paged baseline and cuDNN, then one ring-depth variant.
# Carry .whl (ml_collections, made by scripts/device_wheels.sh).
# Writes logs and results under $OUT; the summary (last lines) lists each step's exit code.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -f pallas_kernels/mosaic_decode.py ]; then
  echo "this checkout has no pallas_kernels/mosaic_decode.py:"; git log -1 --oneline; exit 3
fi
LOG_DIR=${OUT:-/tmp/device_out} TAIL=${TAIL:-25}
source scripts/device_common.sh

step gpu_tests "${GPU_TESTS_S:-200}" python3 -m pytest -q -m gpu tests/test_mosaic_decode.py \
  -p no:cacheprovider -x
TAIL=60 step table3 "${TABLE3_S:-260}" python3 -m experiments.run --config configs/table3.py \
  --workdir runs/table3 --config.impls='("ours", "ours_mosaic", "paged", "cudnn")' \
  --config.iters=10 --config.device_calls=10
if [ -n "${VARIANT:-}" ]; then
  TAIL=20 step variant "${VARIANT_S:-90}" python3 -m experiments.run --config configs/table3.py \
    --workdir runs/variant --config.impls='("ours_mosaic",)' --config.iters=10 \
    --config.device_calls=10 --config.grid='((1024, 1024), (4096, 0), (4096, 4096))' $VARIANT
fi
cp runs/table3/results.csv "$OUT/table3.csv" 2>/dev/null
cat "$summary"
