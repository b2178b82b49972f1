"""Table 3: decode attention latency vs shared prefix (b=32, h=32, d=128, c=64, fp16).

  python -m experiments.run --config configs/table3.py
On a CPU the `cpu` overrides apply (tiny shapes, GPU-only implementations skipped).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.experiment = "table3"
  config.batch = 32
  config.h = 32
  config.h_kv = 32
  config.d = 128
  config.chunk_size = 64
  config.dtype = "float16"
  config.grid = ((1024, 0), (1024, 512), (1024, 768), (1024, 1024),
                 (2048, 0), (2048, 1024), (2048, 1536), (2048, 2048),
                 (4096, 0), (4096, 2048), (4096, 3072), (4096, 4096))
  config.impls = ("ours", "ours_mosaic", "paged", "xla_two_phase", "naive", "cudnn", "jax_paged")
  config.iters = 30
  config.warmup = 2
  config.floor_bytes = 2 ** 31   # read-bandwidth reduction size
  config.policy = ml_collections.ConfigDict()  # CostModelPolicy overrides (e.g. threshold)
  # Kernel knob overrides (pallas_kernels.ChunkFirstConfig / SequenceFirstConfig fields), e.g.
  # --config.chunk_first_config.block_n=64; empty = the per-shape defaults.
  config.chunk_first_config = ml_collections.ConfigDict()
  config.sequence_first_config = ml_collections.ConfigDict()
  # pallas_kernels.MosaicConfig overrides for "ours_mosaic" (Hopper), e.g.
  # --config.mosaic_config.num_stages=3
  config.mosaic_config = ml_collections.ConfigDict()
  config.device_calls = 20  # calls per jitted program for `device_us`
  config.shrink_on_cpu = True
  config.cpu = ml_collections.ConfigDict(dict(
      batch=4, h=4, h_kv=2, d=64, chunk_size=16, dtype="float32",
      grid=((128, 0), (128, 64), (128, 128), (256, 128)), iters=5, warmup=1, device_calls=2,
      floor_bytes=2 ** 26,
      # The cost model's constants are GPU ones; on CPU use the paper's rule (share if > 1 row).
      policy=ml_collections.ConfigDict(dict(threshold=1))))
  config.summary_columns = ("n_p", "n_s", "impl", "us", "device_us", "floor_us", "floor_ratio",
                            "shared_items", "max_abs_err", "note")
  return config
