"""Helpers shared by the experiment modules: environment header, timing, tables, progress."""

from __future__ import annotations

import datetime
import platform
import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


def environment() -> dict:
  """Where a result was measured: versions, device, date."""
  dev = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
      "python": platform.python_version(),
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "host": platform.node(),
      "cpu": platform.processor() or platform.machine(),
  }


def time_host(fn: Callable[[], object], *, iters: int, warmup: int = 1) -> float:
  """Mean wall time of a host-side call in microseconds."""
  for _ in range(warmup):
    fn()
  t0 = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters * 1e6


def time_device(fn: Callable[[], object], *, iters: int = 30, warmup: int = 2) -> float:
  """Median time of back-to-back device calls in microseconds (each call blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times) * 1e6)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A fixed-width text table of `columns` (missing values shown as '-')."""
  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
  out = [line, "-" * len(line)]
  out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(out)


class Progress:
  """Prints `[i/n] message (elapsed)` lines to stderr; experiments call it once per grid point."""

  def __init__(self, stream=None):
    self.stream = stream or sys.stderr
    self.t0 = time.perf_counter()

  def __call__(self, i: int, n: int, msg: str = "") -> None:
    elapsed = time.perf_counter() - self.t0
    print(f"[{i}/{n}] {msg} ({elapsed:.1f}s)", file=self.stream, flush=True)


def subplots(**kwargs):
  """matplotlib's `plt.subplots` on the file-only Agg backend (no display needed)."""
  import matplotlib  # noqa: PLC0415 (plots are optional; keep matplotlib off the import path)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt.subplots(**kwargs)


def save_figure(fig, workdir: str, name: str, dpi: int = 120) -> str:
  """Saves `fig` as `<workdir>/<name>` (tight layout), closes it and returns the path."""
  import os  # noqa: PLC0415

  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig.tight_layout()
  path = os.path.join(workdir, name)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path
