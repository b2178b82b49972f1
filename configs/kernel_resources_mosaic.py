"""Resources of every Mosaic GPU decode kernel configuration compiled for an H100 (sm_90a).

  python -m experiments.run --config configs/kernel_resources_mosaic.py
Like configs/kernel_resources.py (same toolchain, same Table 3 shapes) for `impl="mosaic"`:
16-bit dtypes only (fp32 products would run at TF32 on the tensor cores), groups up to 8.
"""

import ml_collections

from configs import kernel_resources


def get_config():
  config = kernel_resources.get_config()
  config.experiment = "kernel_resources"
  config.impl = "mosaic"
  config.dtypes = ("float16", "bfloat16")
  config.mosaic_config = ml_collections.ConfigDict()  # MosaicConfig overrides, e.g. num_stages=3
  config.summary_columns = ("kernel", "d", "c", "dtype", "g", "grid", "threads", "registers",
                            "spill_bytes", "smem_bytes", "ctas_per_sm", "mbarriers",
                            "tma_per_iteration", "gpu_kernels")
  return config
