"""Resources of every decode kernel configuration compiled for an H100 (sm_90a), no GPU needed.

  python -m experiments.run --config configs/kernel_resources.py

Needs the deviceless toolchain (scripts/install_gpu_compile.sh and a CUDA toolkit's ptxas; see
pallas_kernels/deviceless.py). Rows: one per kernel per (d, c, dtype, g), plus `gpu_kernels`, the
launches of one whole decode call. The shapes are Table 3's (b = 32 rows, h = 32).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.experiment = "kernel_resources"
  config.head_dims = (64, 128, 256)
  config.chunk_sizes = (16, 32, 64, 128)
  config.dtypes = ("float16", "bfloat16", "float32")
  config.groups = (1, 2, 4, 8)
  config.h = 32
  config.rows = 32
  config.chunk_first_config = ml_collections.ConfigDict()  # knob overrides, e.g. block_n=32
  config.sequence_first_config = ml_collections.ConfigDict()
  config.summary_columns = ("kernel", "d", "c", "dtype", "g", "grid", "registers", "spill_bytes",
                            "smem_bytes", "ctas_per_sm", "barriers_per_iteration", "mma",
                            "tiles_in_flight", "gpu_kernels")
  return config
