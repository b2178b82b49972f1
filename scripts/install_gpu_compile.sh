#!/usr/bin/env bash
# Installs what pallas_kernels/deviceless.py needs to compile kernels for an H100 without a GPU:
# the CUDA PJRT plugin of the pinned jax, into a directory beside (not inside) the environment's
# site-packages, so that ordinary `import jax` never tries to start it. ptxas comes from the
# machine's CUDA toolkit (12.8 or newer).
# Usage: bash scripts/install_gpu_compile.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
dest="${CHUNKATTN_XLA_CUDA_PLUGIN:-$("$py" -c 'import sys; print(sys.prefix)')/xla-cuda-plugin}"
"$py" -m pip install -q --no-deps --upgrade --target "$dest" \
  jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2
echo "CUDA plugin for deviceless compiles: $dest"
command -v ptxas >/dev/null || ls /usr/local/cuda/bin/ptxas >/dev/null 2>&1 \
  || echo "warning: no ptxas found (PATH, /usr/local/cuda/bin): install a CUDA 12.8+ toolkit"
