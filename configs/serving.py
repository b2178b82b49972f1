"""End-to-end serving (paper Figure 5 / Table 4 shape): two-phase vs paged plan vs dense cache.

Default: a tiny random model that runs on the CPU in about a minute. `--config=configs/serving.py:gpu`
selects the paper's setting: Open-LLaMA-7B shape, random bf16 weights, 32 requests sharing a
2048-token system prompt, c = 64.
"""

import ml_collections


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  config.experiment = "serving"
  config.parts = ("decode", "ttft", "poisson")
  config.model = "tiny"         # a chunkattn_jax.llama.CONFIGS name (random weights)
  config.dtype = "float32"
  config.impl = "xla"           # decode attention implementation
  config.sharing_policy = "threshold"  # two-phase plan: "threshold" (share if > 1 row) or "cost_model"
  config.seed = 0
  config.max_context = 512
  config.vocab_limit = 97       # prompt token ids are drawn below this
  config.chunk_size = 16
  config.n_chunks = 512
  config.max_batch = 32
  config.batch = 32             # decode part: requests sharing the system prompt
  config.n_s = 128              # shared system-prompt tokens
  config.n_q = 8                # own tokens per request
  config.n_steps = 8            # timed decode steps
  config.warmup_steps = 2
  config.n_c = 8                # poisson part: generated tokens per request
  config.num_requests = 12
  config.rates = (4.0, 16.0, 64.0)
  config.summary_columns = ("part", "variant", "rate", "step_ms", "tokens_per_s", "ttft_ms",
                            "cached_tokens", "norm_latency_ms_per_token", "peak_kv_mb",
                            "tokens_match")
  if arg == "gpu":
    config.model = "open_llama_7b"
    config.dtype = "bfloat16"
    config.impl = "pallas"
    config.sharing_policy = "cost_model"
    config.max_context = 4096
    config.vocab_limit = 32000
    config.chunk_size = 64
    config.n_chunks = 1024      # 1024 x 33.5 MB = 34 GB of KV at the 7B shape
    config.n_s = 2048
    config.n_q = 32
    config.n_steps = 32
    config.n_c = 512
    config.num_requests = 64
    config.rates = (0.5, 1.0, 2.0, 3.0)
  elif arg not in (None, ""):
    raise ValueError(f"unknown serving config variant {arg!r} (expected 'gpu')")
  return config
