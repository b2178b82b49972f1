"""Compiles every decode (or prefill) kernel configuration for an H100 (sm_90a) and tabulates its
resources.

Uses XLA's deviceless compile (`pallas_kernels.deviceless`): registers and spills from ptxas,
shared memory and grid from XLA's launch plan (Mosaic kernels: from Mosaic's own dumps), barriers
per loop iteration, the MMA instruction, the cp.async pipeline depth and the TMA copies per
iteration from the PTX. One row per kernel and configuration. `config.impl` picks the decode
kernels: "pallas" (Triton, the default) or "mosaic" (`configs/kernel_resources_mosaic.py`).
`config.kernel_family`: "decode" (default; `configs/kernel_resources.py`) or "prefill"
(`configs/prefill_resources.py`: each configuration compiles the call with shared-prefix items
and without, three kernels).
"""

from __future__ import annotations

import itertools

from pallas_kernels import deviceless

COLUMNS = ("kernel", "d", "c", "dtype", "g", "grid", "threads", "registers", "spill_bytes",
           "smem_bytes", "ctas_per_sm", "barriers_per_iteration", "mma", "tiles_in_flight",
           "max_tiles_in_flight", "tma_per_iteration", "mbarriers", "gpu_kernels")


def specs(config) -> list[dict]:
  """One deviceless compile spec per (d, c, dtype, g) of the config."""
  if config.get("kernel_family", "decode") == "prefill":
    return prefill_specs(config)
  out = []
  for d, c, dtype, g in itertools.product(config.head_dims, config.chunk_sizes, config.dtypes,
                                          config.groups):
    kwargs = dict(d=d, c=c, dtype=dtype, g=g, h=config.h, rows=config.rows)
    if config.get("impl", "pallas") != "pallas":
      kwargs["impl"] = config.impl
    if config.get("mosaic_config"):
      kwargs["mosaic_config"] = dict(config.mosaic_config)
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
        tma_per_iteration=max((lp.tma_copies for lp in k.loops), default=0),
        mbarriers=k.mbarriers, gpu_kernels=report.num_gpu_kernels))
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


def _span(values) -> str:
  lo, hi = min(values), max(values)
  return f"{lo}" if lo == hi else f"{lo}-{hi}"


def markdown_table(rows: list[dict]) -> str:
  """One line per (d, dtype, g): each kernel's figures over the chunk sizes (ranges where they
  differ). The table docs/kernels.md shows."""
  head = ("| d | dtype | g | kernel | registers | spills | smem KB | CTAs/SM | barriers/iter | "
          "MMA | tiles in flight |\n|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  keys = dict.fromkeys((r["d"], r["dtype"], r["g"]) for r in rows)
  for d, dtype, g in keys:
    sub = [r for r in rows if (r["d"], r["dtype"], r["g"]) == (d, dtype, g)]
    for family in ("chunk_first", "sequence_first"):
      ks = [r for r in sub if r["kernel"].startswith(family)]
      if not ks:
        continue
      path = {"_cuda": " (CUDA cores)", "_mma": " (tensor cores)"}
      name = family + next((v for k, v in path.items() if ks[0]["kernel"].endswith(k)), "")
      flight = {r["tiles_in_flight"] for r in ks}
      lines.append(
          f"| {d} | {dtype} | {g} | {name} | {_span([r['registers'] for r in ks])} | "
          f"{_span([r['spill_bytes'] for r in ks])} | "
          f"{_span([round(r['smem_bytes'] / 1024) for r in ks])} | "
          f"{_span([r['ctas_per_sm'] for r in ks])} | "
          f"{_span([r['barriers_per_iteration'] for r in ks])} | "
          f"{'/'.join(sorted({r['mma'] for r in ks}))} | "
          f"{'2 (registers)' if flight == {None} else _span([f for f in flight if f is not None])} |")
  return "\n".join(lines)


def summary(rows, config) -> str:
  del config
  worst = max(rows, key=lambda r: r["registers"])
  return (f"{len(rows)} kernels; spills: {sum(r['spill_bytes'] for r in rows)} bytes in all; "
          f"most registers: {worst['registers']} ({worst['kernel']}, d={worst['d']}, "
          f"{worst['dtype']}); kernels per call: {sorted({r['gpu_kernels'] for r in rows})}")
