"""Prefill attention: time and temporary memory vs prompt length, cold and with a cached prefix.

  python -m experiments.run --config configs/prefill.py
One layer's attention at the 7B shape (h = h_kv = 32, d = 128, c = 64, bf16). On a CPU the `cpu`
overrides apply (tiny shapes, fp32; GPU-only implementations skipped).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.experiment = "prefill"
  config.h = 32
  config.h_kv = 32
  config.d = 128
  config.chunk_size = 64
  config.dtype = "bfloat16"
  # (prompt tokens T, cached tokens, sequences S): cold prompts 512..8192; a 2048-token cached
  # prefix under a short and a long suffix (and the same prompts cold); 8 prompts sharing a
  # cached 2048-token system prompt with 32 new tokens each (the shared-prefix pass's case).
  config.points = ((512, 0, 1), (1024, 0, 1), (2048, 0, 1), (4096, 0, 1), (8192, 0, 1),
                   (2304, 0, 1), (2304, 2048, 1), (4096, 2048, 1), (2080, 2048, 8))
  config.impls = ("ours", "ours_shared", "xla", "materialising", "cudnn", "naive")
  # Skip an implementation at a point where its temporary memory would exceed this (the
  # materialising paths at 8192 tokens).
  config.max_temp_gib = 24.0
  config.iters = 20
  config.warmup = 2
  # Temporary memory of one cold prompt per implementation, compiled (not run) at the 7B shape on
  # whatever backend runs the experiment (the CPU too).
  config.memory_points = (512, 1024, 2048, 4096, 8192)
  config.memory_shape = ml_collections.ConfigDict(dict(h=32, h_kv=32, d=128, chunk_size=64,
                                                       dtype="bfloat16"))
  # The shared-prefix byte/FLOP count (host only, any machine, always at the 7B shape): S x new
  # tokens x g under a cached prefix.
  config.count_shape = ml_collections.ConfigDict(dict(h=32, d=128, chunk_size=64, itemsize=2))
  config.count_seqs = (4, 8, 32)
  config.count_new_tokens = (1, 16, 64, 256)
  config.count_groups = (1, 4)
  config.count_cached = 2048
  config.shrink_on_cpu = True
  config.cpu = ml_collections.ConfigDict(dict(
      h=4, h_kv=2, d=64, chunk_size=16, dtype="float32",
      points=((128, 0, 1), (256, 0, 1), (512, 0, 1), (288, 256, 1), (272, 256, 4)),
      iters=3, warmup=1, max_temp_gib=1.0))
  config.summary_columns = ("T", "cached_tokens", "S", "impl", "us", "tokens_per_s", "temp_mib",
                            "max_abs_err", "note")
  return config
