"""Table 3 of the paper: decode self-attention kernel latency vs shared-prefix length.

b rows of n_p cached tokens each, the first n_s shared by all rows (one query per row). Every
implementation's output is checked against the fp32 reference before it is timed; the floor is the
unique K/V bytes (the shared prefix once, plus each private part) over a read bandwidth measured in
the same run with a reduction over `floor_bytes` bytes. Also the shared workload kit of fig3/fig4.

Two times per implementation: `us`, the median wall time of back-to-back blocked calls (what a
caller dispatching one call at a time sees: host dispatch included), and `device_us`, the median
wall time of one jitted program that runs `device_calls` calls on distinct queries, divided by
`device_calls` (host dispatch amortised away: the device's time per call, launches included).
`floor_ratio` = `floor_us / device_us`.

Implementations (`config.impls`):
  ours           Pallas two-phase kernels, cost-model plan                       (GPU only)
  ours_mosaic    the Mosaic GPU kernels (impl="mosaic"), cost-model plan      (Hopper GPU only)
  paged          the same kernels on a plan without shared items (threshold >= b) (GPU only)
  xla_two_phase  the two phases in plain XLA (gathers + einsums), cost-model plan
  naive          einsum-softmax-einsum over K/V materialised per sequence
  cudnn          jax.nn.dot_product_attention(implementation="cudnn") over the same (GPU only)
  jax_paged      jax.experimental.pallas.ops.gpu.paged_attention, page 16, shared prefix pages,
                 best of a small k_splits sweep (deprecated module; GPU only)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn_jax.attention import decode_attention
from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.plan import bucket, build_plan
from chunkattn_jax.prefix_tree import PrefixTree
from chunkattn_jax.reference_attention import reference_decode_attention
from chunkattn_jax.sharing_policy import CostModelPolicy
from experiments import common
from pallas_kernels import ChunkFirstConfig, MosaicConfig, SequenceFirstConfig

GPU_ONLY = ("ours", "paged", "cudnn", "jax_paged")
HOPPER_ONLY = ("ours_mosaic",)
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def on_hopper() -> bool:
  """A GPU of compute capability 9.x (H100, H200): what the Mosaic kernels are built for."""
  if not on_gpu():
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def effective(config):
  """The config with `config.cpu` overrides applied when not on a GPU (and shrink_on_cpu)."""
  cfg = config.copy_and_resolve_references()
  if not on_gpu() and cfg.get("shrink_on_cpu", True) and "cpu" in cfg:
    print(f"not on a GPU: applying the config's `cpu` sizes ({', '.join(cfg.cpu.keys())}); "
          "pass --config.shrink_on_cpu=False to run the sizes as given", flush=True)
    with cfg.unlocked():
      for k, v in cfg.cpu.items():
        cfg[k] = v
  return cfg


@dataclasses.dataclass
class Workload:
  tree: PrefixTree
  q: jax.Array          # [R, h, d]
  k_pool: jax.Array     # [n_chunks, h_kv, c, d]
  v_pool: jax.Array
  b: int
  n: int                # tokens per row
  n_s: int              # shared tokens (requested; sharing is at chunk granularity)

  def unique_kv_bytes(self) -> int:
    c = self.tree.chunk_size
    shared = (self.n_s // c) * c
    _, h_kv, _, d = self.k_pool.shape
    return 2 * (shared + self.b * (self.n - shared)) * h_kv * d * self.k_pool.dtype.itemsize


def make_workload(cfg, *, b: int, n_s: int, n_priv: int, seed: int = 0) -> Workload:
  """b rows: an n_s-token prompt shared by all, then n_priv distinct tokens each."""
  rng = np.random.default_rng(seed)
  c = cfg.chunk_size
  n = n_s + n_priv
  tree = PrefixTree(ChunkPool(b * -(-n // c) + 1, seed=seed), c)
  system = rng.integers(0, 32000, n_s).tolist()
  for _ in range(b):
    tree.insert(system + rng.integers(0, 32000, n_priv).tolist())
  dtype = jnp.dtype(cfg.dtype)
  shape = (tree.pool.capacity, cfg.h_kv, c, cfg.d)
  key = jax.random.key(seed)
  kk, kv, kq = jax.random.split(key, 3)
  k_pool = jax.random.normal(kk, shape, dtype)
  v_pool = jax.random.normal(kv, shape, dtype)
  r_cap = bucket(b, 8)
  q = jax.random.normal(kq, (r_cap, cfg.h, cfg.d), dtype)
  return Workload(tree, q, k_pool, v_pool, b, n, n_s)


def dense_kv(wl: Workload):
  """K/V materialised per sequence, [b, n, h_kv, d] each (all rows have n tokens)."""
  rows = wl.tree.seq_ids()
  slots = jnp.asarray([wl.tree.chunk_path(s) for s in rows], jnp.int32)  # [b, n/c]

  def gather(pool):
    x = pool[slots]  # [b, n/c, h_kv, c, d]
    x = jnp.swapaxes(x, 2, 3).reshape(wl.b, -1, pool.shape[1], pool.shape[3])
    return x[:, :wl.n]
  return gather(wl.k_pool), gather(wl.v_pool)


def policy_for(cfg) -> CostModelPolicy:
  kw = dict(cfg.get("policy", {}))
  return CostModelPolicy.for_shapes(num_heads=cfg.h, num_kv_heads=cfg.h_kv, head_dim=cfg.d,
                                    chunk_size=cfg.chunk_size,
                                    dtype_bytes=jnp.dtype(cfg.dtype).itemsize, **kw)


@dataclasses.dataclass
class Impl:
  """One implementation at one workload: `fn(q)` (jitted) on its own query layout `q`."""

  fn: Callable
  q: jax.Array
  plan: object = None
  note: str = ""

  def __call__(self):
    return self.fn(self.q)


def kernel_configs(cfg) -> dict:
  """`two_phase_decode` knobs from the config (`--config.chunk_first_config.block_n=32`, ...)."""
  out = {}
  if cfg.get("chunk_first_config"):
    out["chunk_first_config"] = ChunkFirstConfig(**dict(cfg.chunk_first_config))
  if cfg.get("sequence_first_config"):
    out["sequence_first_config"] = SequenceFirstConfig(**dict(cfg.sequence_first_config))
  return out


def _two_phase(wl, plan, impl, cfg):
  dplan = jax.device_put(plan)
  knobs = kernel_configs(cfg) if impl == "pallas" else {}
  if impl == "mosaic" and cfg.get("mosaic_config"):
    knobs = dict(mosaic_config=MosaicConfig(**dict(cfg.mosaic_config)))
  # The plan was built here from the tree: skip the eager value check inside the timed call.
  fn = jax.jit(lambda q: decode_attention(q, wl.k_pool, wl.v_pool, dplan, impl=impl,
                                          validate=False, **knobs))
  return Impl(fn, wl.q, plan)


def _naive(wl, cfg):
  k, v = dense_kv(wl)
  g = cfg.h // cfg.h_kv

  @jax.jit
  def fn(q):
    qg = q.reshape(wl.b, cfg.h_kv, g, cfg.d)
    s = jnp.einsum("bjgd,bnjd->bjgn", qg, k, preferred_element_type=jnp.float32) * cfg.d ** -0.5
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bjgn,bnjd->bjgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(wl.b, cfg.h, cfg.d).astype(q.dtype)
  return Impl(fn, wl.q[:wl.b])


def _cudnn(wl, cfg):
  k, v = dense_kv(wl)
  fn = jax.jit(lambda q: jax.nn.dot_product_attention(
      q, k, v, scale=cfg.d ** -0.5, implementation="cudnn")[:, 0])
  return Impl(fn, wl.q[:wl.b, None])  # q [b, 1, h, d]


def _jax_paged(wl, cfg):
  from jax.experimental.pallas.ops.gpu import paged_attention as jpa  # noqa: PLC0415 (GPU only)
  page = 16
  c = wl.tree.chunk_size
  per = c // page
  n_chunks, h_kv, _, d = wl.k_pool.shape
  kp = wl.k_pool.reshape(n_chunks, h_kv, per, page, d).transpose(1, 0, 2, 3, 4).reshape(
      h_kv, n_chunks * per, page, d)
  vp = wl.v_pool.reshape(n_chunks, h_kv, per, page, d).transpose(1, 0, 2, 3, 4).reshape(
      h_kv, n_chunks * per, page, d)
  slots = np.asarray([wl.tree.chunk_path(s) for s in wl.tree.seq_ids()])  # [b, n/c]
  tables = jnp.asarray((slots[:, :, None] * per + np.arange(per)).reshape(wl.b, -1), jnp.int32)
  lengths = jnp.full((wl.b,), wl.n, jnp.int32)
  q = (wl.q[:wl.b].astype(jnp.float32) * d ** -0.5).astype(wl.q.dtype)  # it applies no scale
  pages = tables.shape[1]
  best = None
  for k_splits in cfg.get("jax_paged_k_splits", (4, 8, 16)):
    if pages % k_splits or (pages // k_splits) & (pages // k_splits - 1):
      continue
    ppcb = min(8, pages // k_splits)
    paged = functools.partial(jpa.paged_attention, k_splits=k_splits,
                              pages_per_compute_block=ppcb)
    impl = Impl(jax.jit(lambda q, paged=paged: paged(q, kp, vp, tables, lengths)), q,
                note=f"k_splits={k_splits}")
    t = common.time_device(impl, iters=5)
    if best is None or t < best[0]:
      best = (t, impl)
  if best is None:
    raise ValueError(f"no valid k_splits for {pages} pages")
  return best[1]


def implementations(cfg, wl: Workload) -> dict:
  """name -> Impl (its call returns [>= b, h, d]), or a str: why it was skipped."""
  out = {}
  b = wl.b
  for name in cfg.impls:
    if name in GPU_ONLY and not on_gpu():
      out[name] = "skipped: GPU only"
    elif name in HOPPER_ONLY and not on_hopper():
      out[name] = "skipped: Hopper GPU only"
    elif name == "ours":
      out[name] = _two_phase(wl, build_plan(wl.tree, policy=policy_for(cfg)), "pallas", cfg)
    elif name == "ours_mosaic":
      out[name] = _two_phase(wl, build_plan(wl.tree, policy=policy_for(cfg)), "mosaic", cfg)
    elif name == "paged":
      out[name] = _two_phase(wl, build_plan(wl.tree, threshold=max(b, 1)), "pallas", cfg)
    elif name == "xla_two_phase":
      out[name] = _two_phase(wl, build_plan(wl.tree, policy=policy_for(cfg)), "xla", cfg)
    elif name == "naive":
      out[name] = _naive(wl, cfg)
    elif name == "cudnn":
      out[name] = _cudnn(wl, cfg)
    elif name == "jax_paged":
      out[name] = _jax_paged(wl, cfg)
    else:
      raise ValueError(f"unknown impl {name!r}")
  return out


def time_device_per_call(impl: Impl, *, calls: int, iters: int, warmup: int) -> float:
  """Device time of one call in microseconds: one jitted program runs `calls` calls on distinct
  queries back to back (no host round trip between them); its median time / `calls`."""
  keys = jax.random.split(jax.random.key(1234), calls)
  qs = [jax.random.normal(k, impl.q.shape, impl.q.dtype) for k in keys]
  program = jax.jit(lambda *qs: [impl.fn(q) for q in qs])
  return common.time_device(lambda: program(*qs), iters=iters, warmup=warmup) / calls


def measure_bandwidth(nbytes: int, iters: int) -> float:
  """Read bandwidth in bytes/us of a reduction over an nbytes fp16 array."""
  x = jnp.ones((nbytes // 2 // 1024, 1024), jnp.float16)
  fn = jax.jit(lambda x: jnp.sum(x, axis=0, dtype=jnp.float32))
  t = common.time_device(lambda: fn(x), iters=iters)
  return nbytes / t


def reference_output(wl: Workload):
  plan = build_plan(wl.tree, threshold=max(wl.b, 1))
  return reference_decode_attention(wl.q, wl.k_pool, wl.v_pool, plan)[:wl.b].astype(jnp.float32)


def check(name, out, ref, b, tol):
  err = float(jnp.max(jnp.abs(out[:b].astype(jnp.float32) - ref)))
  if not np.isfinite(err) or err > tol:
    raise AssertionError(f"{name} differs from the reference by {err} > {tol}")
  return err


def time_point(cfg, wl: Workload, bandwidth: float, progress_msg=None) -> list[dict]:
  """Check and time every implementation on one workload; one row per implementation."""
  ref = reference_output(wl)
  floor = wl.unique_kv_bytes() / bandwidth
  rows = []
  for name, impl in implementations(cfg, wl).items():
    row = dict(b=wl.b, n_p=wl.n, n_s=wl.n_s, impl=name, us=None, device_us=None, floor_us=floor,
               floor_ratio=None, max_abs_err=None, shared_items=None, note=impl)
    if isinstance(impl, Impl):
      row.update(note=impl.note,
                 shared_items=None if impl.plan is None else impl.plan.num_shared_items())
      row["max_abs_err"] = check(name, impl(), ref, wl.b, TOLERANCE[cfg.dtype])
      row["us"] = common.time_device(impl, iters=cfg.iters, warmup=cfg.warmup)
      row["device_us"] = time_device_per_call(impl, calls=cfg.device_calls, iters=cfg.iters,
                                              warmup=cfg.warmup)
      row["floor_ratio"] = floor / row["device_us"]
    rows.append(row)
  return rows


def run(config, progress):
  cfg = effective(config)
  bandwidth = measure_bandwidth(cfg.floor_bytes, cfg.iters)
  rows = []
  for i, (n_p, n_s) in enumerate(cfg.grid):
    progress(i + 1, len(cfg.grid), f"n_p={n_p} n_s={n_s}")
    wl = make_workload(cfg, b=cfg.batch, n_s=n_s, n_priv=n_p - n_s, seed=i)
    for row in time_point(cfg, wl, bandwidth):
      row.update(n_c=0, bandwidth_gbps=bandwidth / 1e3, dtype=cfg.dtype, h=cfg.h, h_kv=cfg.h_kv,
                 d=cfg.d, c=cfg.chunk_size)
      rows.append(row)
  return rows


def summary(rows, config):
  skipped = sorted({r["impl"] for r in rows if r["us"] is None})
  lines = [f"read bandwidth for the floor: {rows[0]['bandwidth_gbps']:.1f} GB/s"]
  if skipped:
    lines.append(f"skipped (GPU or Hopper only, not on {jax.default_backend()}): "
                 f"{', '.join(skipped)}")
  return "\n".join(lines)


def plot(rows, workdir) -> list[str]:
  """Device time per call vs n_s, one panel per n_p, every implementation and the floor."""
  n_ps = sorted({r["n_p"] for r in rows})
  fig, axes = common.subplots(ncols=len(n_ps), figsize=(4.5 * len(n_ps), 4), squeeze=False)
  for ax, n_p in zip(axes[0], n_ps):
    sub = [r for r in rows if r["n_p"] == n_p]
    for impl in dict.fromkeys(r["impl"] for r in sub):
      pts = sorted((r["n_s"], r["device_us"]) for r in sub
                   if r["impl"] == impl and r["device_us"] is not None)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    floor = sorted({(r["n_s"], r["floor_us"]) for r in sub})
    ax.plot(*zip(*floor), linestyle="--", color="gray", label="floor (unique K/V / bandwidth)")
    ax.set_xlabel("shared prefix n_s (tokens)")
    ax.set_ylabel("device time per call (us)")
    ax.set_yscale("log")
    ax.set_title(f"n_p = {n_p}")
  axes[0][-1].legend(fontsize=7)
  return [common.save_figure(fig, workdir, "table3_latency.png")]
