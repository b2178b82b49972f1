"""Figure 4 of the paper: decode throughput vs batch size (n_s shared tokens, n_c decode steps).

Same measurement as fig3 (attention only, cumulative over sampled steps), swept over the batch.
"""

from __future__ import annotations

from experiments import fig3, table3


def run(config, progress):
  cfg = table3.effective(config)
  bandwidth = table3.measure_bandwidth(cfg.floor_bytes, cfg.iters)
  rows = []
  for i, b in enumerate(cfg.batches):
    progress(i + 1, len(cfg.batches), f"b={b} n_s={cfg.n_s} n_c={cfg.n_c}")
    rows += fig3.throughput_points(cfg, b=b, n_s=cfg.n_s, n_c=cfg.n_c, bandwidth=bandwidth,
                                   seed=i)
  return rows


def plot(rows, workdir):
  return fig3.plot(rows, workdir, x="b", group="n_s", title="decode throughput vs batch")
