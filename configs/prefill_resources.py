"""Resources of every prefill kernel configuration compiled for an H100 (sm_90a), no GPU needed.

  python -m experiments.run --config configs/prefill_resources.py

Needs the deviceless toolchain (scripts/install_gpu_compile.sh and a CUDA toolkit's ptxas; see
pallas_kernels/deviceless.py). Each (d, c, dtype, g) compiles one program holding the prefill call
with shared-prefix items (the shared pass `prefill_shared_*` and the main kernel with the merge,
`prefill_merge_*`) and without (`prefill_*`): one row per kernel. Shapes: 2 sequences of 1024 new
tokens, h = 32.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.experiment = "kernel_resources"
  config.kernel_family = "prefill"
  config.head_dims = (64, 128, 256)
  config.chunk_sizes = (16, 32, 64, 128)
  config.dtypes = ("float16", "bfloat16", "float32")
  config.groups = (1, 4, 8)
  config.h = 32
  config.seqs = 2
  config.tokens = 1024
  config.shared_items = 2
  config.prefill_config = ml_collections.ConfigDict()  # PrefillConfig overrides, e.g. block_n=32
  config.summary_columns = ("kernel", "d", "c", "dtype", "g", "grid", "registers", "spill_bytes",
                            "smem_bytes", "ctas_per_sm", "barriers_per_iteration", "mma",
                            "max_tiles_in_flight", "gpu_kernels")
  return config
