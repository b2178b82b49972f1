"""Figure 3 of the paper: decode throughput vs completion length n_c.

b rows share an n_s-token prompt, then each decodes n_c distinct tokens. Only the attention call is
timed (device time per call, `table3.time_device_per_call`): at a sampled step t the cache holds n_s + t tokens per row (t private); the cumulative
attention time over steps 0..n_c-1 is the trapezoid integral of the sampled per-step times, and the
throughput is b * n_c / cumulative time. Also the point function of fig4.
"""

from __future__ import annotations

import numpy as np

from experiments import common, table3


def sample_steps(n_c: int, samples: int) -> list[int]:
  if n_c <= 1:
    return [0]
  return sorted({int(round(x)) for x in np.linspace(0, n_c - 1, max(2, samples))})


def throughput_points(cfg, *, b: int, n_s: int, n_c: int, bandwidth: float, seed: int = 0
                      ) -> list[dict]:
  """One row per implementation: cumulative attention time and tokens/s for n_c decode steps."""
  steps = sample_steps(n_c, cfg.samples)
  per_impl: dict[str, list] = {}
  for t in steps:
    wl = table3.make_workload(cfg, b=b, n_s=n_s, n_priv=max(t, 1), seed=seed + t)
    for row in table3.time_point(cfg, wl, bandwidth):
      per_impl.setdefault(row["impl"], []).append(row)
  out = []
  for impl, rows in per_impl.items():
    us = [r["device_us"] for r in rows]  # device time per call (host dispatch amortised)
    floor = [r["floor_us"] for r in rows]
    row = dict(b=b, n_s=n_s, n_c=n_c, impl=impl, steps_sampled=len(steps), note=rows[0]["note"],
               max_abs_err=None, cum_us=None, tokens_per_s=None, floor_tokens_per_s=None)
    cum_floor = _integrate(steps, floor, n_c)
    row["floor_tokens_per_s"] = b * n_c / cum_floor * 1e6
    if all(u is not None for u in us):
      row["cum_us"] = _integrate(steps, us, n_c)
      row["tokens_per_s"] = b * n_c / row["cum_us"] * 1e6
      row["max_abs_err"] = max(r["max_abs_err"] for r in rows)
      row["us_last_step"] = us[-1]
    out.append(row)
  return out


def _integrate(steps, values, n_c) -> float:
  """Sum over steps 0..n_c-1 of a per-step time known at `steps` (linear interpolation)."""
  return float(np.interp(np.arange(n_c), steps, values).sum())


def run(config, progress):
  cfg = table3.effective(config)
  bandwidth = table3.measure_bandwidth(cfg.floor_bytes, cfg.iters)
  rows = []
  grid = [(n_s, n_c) for n_s in cfg.n_s_values for n_c in cfg.n_c_values]
  for i, (n_s, n_c) in enumerate(grid):
    progress(i + 1, len(grid), f"b={cfg.batch} n_s={n_s} n_c={n_c}")
    rows += throughput_points(cfg, b=cfg.batch, n_s=n_s, n_c=n_c, bandwidth=bandwidth, seed=i)
  return rows


def plot(rows, workdir, x="n_c", group="n_s", title="decode throughput vs n_c") -> list[str]:
  paths = []
  for gval in sorted({r[group] for r in rows}):
    fig, ax = common.subplots(figsize=(6, 4))
    sub = [r for r in rows if r[group] == gval]
    for impl in dict.fromkeys(r["impl"] for r in sub):
      pts = [(r[x], r["tokens_per_s"]) for r in sub if r["impl"] == impl and r["tokens_per_s"]]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    floor = sorted({(r[x], r["floor_tokens_per_s"]) for r in sub})
    ax.plot(*zip(*floor), linestyle="--", color="gray", label="bandwidth floor")
    ax.set_xlabel(x)
    ax.set_ylabel("tokens / s (attention only)")
    ax.set_title(f"{title}, {group}={gval}")
    ax.legend()
    paths.append(common.save_figure(fig, workdir, f"{x}_{group}{gval}.png", dpi=100))
  return paths
