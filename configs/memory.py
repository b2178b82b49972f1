"""Peak KV memory of the chunk cache vs paged and dense caches (paper Table 4 points).

Host-only (prefix tree bookkeeping; bytes at the Open-LLaMA-7B fp16 shape): seconds on any machine.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.experiment = "memory"
  config.model = "open_llama_7b"
  config.dtype = "float16"
  config.chunk_size = 64
  config.batch = 32
  config.n_c = 512
  config.seed = 0
  config.points = ((1024, 0), (1024, 1024), (2048, 0), (2048, 2048), (4096, 0), (4096, 4096))
  config.check_engine = True   # also run the real engine (tiny model) on a shrunk point
  config.summary_columns = ("point", "batch", "n_c", "chunk_kv_gb", "paged_kv_gb", "dense_kv_gb",
                            "saving_vs_paged", "engine_peak_chunks", "simulated_peak_chunks",
                            "match")
  return config
