#!/usr/bin/env bash
# One prepared GPU run (on a lent H100/H200, from the repo root, carry .whl): installs nothing from
# the network, checks correctness first, then times the paper's benchmarks, and writes everything
# under $OUT (results.tar.gz with every run's results.json/csv/plots, and summary.txt).
#   device run:  bash scripts/device_check.sh           (carry: .whl; made by scripts/device_wheels.sh)
# Each step has its own time limit so one slow step cannot eat the whole lease; the summary lists
# what ran, what timed out and what failed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_common.sh

# 1. Correctness on the GPU: the real (compiled) kernels against dense attention: Triton decode,
#    Triton prefill (with and without the shared-prefix pass), Mosaic decode on a Hopper.
step gpu_tests 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_prefill.py \
  tests/test_mosaic_decode.py -p no:cacheprovider
# 2. Kernel benchmarks (outputs checked against the reference before timing).
step table3 150 python3 -m experiments.run --config configs/table3.py --workdir runs/table3
step prefill 70 python3 -m experiments.run --config configs/prefill.py --workdir runs/prefill
step fig3 60 python3 -m experiments.run --config configs/fig3.py --workdir runs/fig3 \
  --config.n_s_values='(2048, 4096)' --config.n_c_values='(512, 2048)'
step fig4 45 python3 -m experiments.run --config configs/fig4.py --workdir runs/fig4
# 3. End to end (7B shape, random bf16 weights), if time is left in the lease.
step serving 90 python3 -m experiments.run --config configs/serving.py:gpu --workdir runs/serving \
  --config.parts='("decode", "ttft")'

tar czf "$OUT/results.tar.gz" runs
cat "$summary"
