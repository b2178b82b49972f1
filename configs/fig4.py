"""Figure 4: decode throughput vs batch, n_s=2048, n_c=64 (h=32, d=128, c=64, fp16).

  python -m experiments.run --config configs/fig4.py
"""

import ml_collections

from configs import fig3


def get_config():
  config = fig3.get_config()
  config.experiment = "fig4"
  del config["n_s_values"]
  del config["n_c_values"]
  config.n_s = 2048
  config.n_c = 64
  config.batches = (8, 16, 32, 64, 96)
  config.samples = 3
  config.cpu = ml_collections.ConfigDict(dict(
      h=4, h_kv=2, d=64, chunk_size=16, dtype="float32", n_s=128, n_c=16, batches=(2, 4, 8),
      samples=2, iters=3, warmup=1, device_calls=2, floor_bytes=2 ** 26,
      policy=ml_collections.ConfigDict(dict(threshold=1))))
  config.summary_columns = ("b", "n_s", "n_c", "impl", "tokens_per_s", "floor_tokens_per_s",
                            "cum_us", "max_abs_err", "note")
  return config
