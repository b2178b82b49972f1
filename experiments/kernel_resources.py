"""Compiles every decode (or prefill) kernel configuration for an H100 (sm_90a) and tabulates its
resources.

Uses XLA's deviceless compile (`pallas_kernels.deviceless`): registers and spills from ptxas,
shared memory and grid from XLA's launch plan, barriers per loop iteration, the MMA instruction and
the cp.async pipeline depth from the PTX. One row per kernel and configuration.
`config.kernel_family`: "decode" (default; `configs/kernel_resources.py`) or "prefill"
(`configs/prefill_resources.py`: each configuration compiles the call with shared-prefix items
and without, three kernels).
"""

from __future__ import annotations

import itertools

from pallas_kernels import deviceless

COLUMNS = ("kernel", "d", "c", "dtype", "g", "grid", "threads", "registers", "spill_bytes",
           "smem_bytes", "ctas_per_sm", "barriers_per_iteration", "mma", "tiles_in_flight",
           "max_tiles_in_flight", "gpu_kernels")


def specs(config) -> list[dict]:
  """One deviceless compile spec per (d, c, dtype, g) of the config."""
  if config.get("kernel_family", "decode") == "prefill":
    return prefill_specs(config)
  out = []
  for d, c, dtype, g in itertools.product(config.head_dims, config.chunk_sizes, config.dtypes,
                                          config.groups):
    kwargs = dict(d=d, c=c, dtype=dtype, g=g, h=config.h, rows=config.rows)
    if config.chunk_first_config:
      kwargs["chunk_first_config"] = dict(config.chunk_first_config)
    if config.sequence_first_config:
      kwargs["sequence_first_config"] = dict(config.sequence_first_config)
    out.append(dict(builder="pallas_kernels.deviceless:decode_call", kwargs=kwargs))
  return out


def prefill_specs(config) -> list[dict]:
  """Prefill: the call with `shared_items` shared-prefix items and without, per (d, c, dtype, g)."""
  out = []
  for d, c, dtype, g in itertools.product(config.head_dims, config.chunk_sizes, config.dtypes,
                                          config.groups):
    kwargs = dict(d=d, c=c, dtype=dtype, g=g, h=config.h, seqs=config.seqs, tokens=config.tokens,
                  items=config.shared_items, both=True)
    if config.get("prefill_config"):
      kwargs["config"] = dict(config.prefill_config)
    out.append(dict(builder="pallas_kernels.deviceless:prefill_call", kwargs=kwargs))
  return out


def rows_of(spec: dict, report: deviceless.CompileReport) -> list[dict]:
  kw = spec["kwargs"]
  rows = []
  for k in report.kernels:
    rows.append(dict(
        kernel=k.kernel, d=kw["d"], c=kw["c"], dtype=kw["dtype"], g=kw["g"],
        grid="x".join(map(str, k.grid)), threads=k.threads, registers=k.registers,
        spill_bytes=k.spill_bytes, smem_bytes=k.smem_bytes, ctas_per_sm=k.ctas_per_sm(),
        barriers_per_iteration=k.barriers_per_iteration, mma=k.mma,
        tiles_in_flight=min((lp.tiles_in_flight for lp in k.loops if lp.cp_async_groups),
                            default=None),
        max_tiles_in_flight=max((lp.tiles_in_flight for lp in k.loops), default=None),
        gpu_kernels=report.num_gpu_kernels))
  return rows


def run(config, progress) -> list[dict]:
  all_specs = specs(config)
  progress(0, len(all_specs), f"compiling {len(all_specs)} configurations for sm_90a")
  rows = []
  batch = 12  # one worker process (one jax start) per batch, progress between batches
  for start in range(0, len(all_specs), batch):
    chunk = all_specs[start:start + batch]
    for spec, report in zip(chunk, deviceless.compile_specs(chunk)):
      rows += rows_of(spec, report)
    progress(start + len(chunk), len(all_specs), "compiled")
  return rows
