"""Quickstart: 16 requests sharing a 512-token system prompt, on the CPU in about a minute."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.experiment = "quickstart"
  config.batch = 16
  config.n_p = 640          # tokens per request
  config.n_s = 512          # shared system-prompt tokens
  config.chunk_size = 64
  config.h = 8
  config.h_kv = 2           # GQA 4:1
  config.d = 64
  config.dtype = "float32"
  config.impls = ("xla",)   # two-phase implementations to run besides the reference
  config.tolerance = 1e-4
  # Engine part (0 requests skips it): a tiny random Llama serving requests that share a prompt.
  config.engine_requests = 4
  config.engine_system_prompt = 48
  config.engine_new_tokens = 8
  config.summary_columns = ("part", "plan", "impl", "batch", "n_p", "n_s", "shared_items",
                            "max_abs_err", "us", "cached_prompt_tokens", "tokens_match")
  return config
