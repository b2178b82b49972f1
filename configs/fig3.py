"""Figure 3: decode throughput vs n_c, b=32, shared prompt n_s (h=32, d=128, c=64, fp16).

  python -m experiments.run --config configs/fig3.py
"""

import ml_collections

from configs import table3


def get_config():
  config = table3.get_config()
  config.experiment = "fig3"
  del config["grid"]
  config.n_s_values = (1024, 2048, 4096)
  config.n_c_values = (64, 512, 1024, 2048)
  config.samples = 5         # sampled decode steps per point (integrated linearly)
  config.impls = ("ours", "ours_mosaic", "paged", "xla_two_phase", "naive")
  config.iters = 10
  config.cpu = ml_collections.ConfigDict(dict(
      batch=4, h=4, h_kv=2, d=64, chunk_size=16, dtype="float32", n_s_values=(128,),
      n_c_values=(16, 64), samples=2, iters=3, warmup=1, device_calls=2, floor_bytes=2 ** 26,
      policy=ml_collections.ConfigDict(dict(threshold=1))))
  config.summary_columns = ("n_s", "n_c", "impl", "tokens_per_s", "floor_tokens_per_s", "cum_us",
                            "max_abs_err", "note")
  return config
