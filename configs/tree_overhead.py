"""Host overhead of the prefix tree (issue: targets plan rebuild <= 2 ms at b = 256, amortised
step <= 100 us at b = 32, on the development CPU)."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.experiment = "tree_overhead"
  config.batches = (32, 256)
  config.n_s = 4096        # shared prefix tokens
  config.n_priv = 512      # private prompt tokens per request
  config.chunk_size = 64
  config.steps = 512       # decode steps for the amortised overhead
  config.plan_iters = 20
  config.plan_target_us = 2000.0
  config.step_target_us = 100.0
  config.summary_columns = ("batch", "op", "us", "target_us")
  return config
