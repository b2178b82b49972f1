"""Prefill attention over the chunk pool: time, throughput and temporary memory per implementation.

At each point `(T, cached_tokens, S)`, `S` prompts of `T` tokens whose first `cached_tokens` are
already in the pool (one cached system prompt shared by all `S`) compute the attention of their
`T - cached_tokens` new tokens (one layer, K/V already written). Every implementation's output is
checked against the XLA path before it is timed (the experiment raises otherwise).

Columns: `us` (median of back-to-back blocked calls), `tokens_per_s` (new tokens of all sequences
per second), `temp_mib` (XLA's temporary buffer for the compiled call,
`jax.jit(...).lower(...).compile().memory_analysis()`; on the CPU too).

Implementations (`config.impls`):
  ours           Pallas prefill kernel over the chunk pool (GPU only)
  ours_shared    the same with the shared-prefix pass over the cached prefix, where the planner
                 finds one (rows with S > 1 and a cached prefix; GPU only)
  xla            the blocked XLA path (online softmax over key tiles)
  materialising  the dense path: gathers the chunks, materialises [S, h, T, n] scores
  cudnn          jax.nn.dot_product_attention(implementation="cudnn") on a dense copy of K/V made
                 outside the timed call (GPU only; cold prompts: its causal mask is for aligned
                 queries and keys)
  naive          einsum-softmax-einsum on the same dense copy

A second part, `memory`, compiles (without running) one cold prompt of each length in
`config.memory_points` at `config.memory_shape` (the 7B shape, also on the CPU) and records each
implementation's temporary memory. A third, `sharing_counts`, counts (no timing; any machine,
always at `config.count_shape`) what the shared-prefix pass changes over the cached prefix: K/V
bytes read, MMA FLOPs including the padding rows of partly filled blocks, and the partial-state
bytes it adds, with the planner's decision (`chunkattn_jax.prefill_sharing`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn_jax import layers
from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.prefill_sharing import SharingCost, plan_prefill_sharing
from chunkattn_jax.prefix_tree import PrefixTree
from experiments import common
from experiments.table3 import effective, on_gpu
from pallas_kernels import prefill as prefill_lib

GPU_ONLY = ("ours", "ours_shared", "cudnn")
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}


def make_inputs(cfg, *, T: int, cached: int, S: int, seed: int = 0) -> dict:
  """S prompts of T tokens sharing their first `cached` tokens, cached in the pool (a live
  sequence holds them); the prefill computes the rest of each."""
  rng = np.random.default_rng(seed)
  c = cfg.chunk_size
  tree = PrefixTree(ChunkPool(S * -(-T // c) + -(-cached // c) + 1, seed=seed), c)
  system = rng.integers(0, 32000, cached).tolist()
  if cached:
    tree.insert(system)
  results = [tree.insert(system + rng.integers(0, 32000, T - cached).tolist(), min_new_tokens=1)
             for _ in range(S)]
  new = T - results[0].num_cached
  positions = np.stack([np.arange(r.num_cached, T) for r in results]).astype(np.int32)
  paths = np.asarray([tree.chunk_path(r.seq_id) for r in results], np.int32)
  dtype = jnp.dtype(cfg.dtype)
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  shape = (tree.pool.capacity, cfg.h_kv, c, cfg.d)
  return dict(q=jax.random.normal(kq, (S, new, cfg.h, cfg.d), dtype),
              k_pool=jax.random.normal(kk, shape, dtype), v_pool=jax.random.normal(kv, shape, dtype),
              positions=jnp.asarray(positions), chunk_paths=jnp.asarray(paths), new=new,
              num_cached=results[0].num_cached)


def dense_copy(inp, T: int):
  """K/V of each sequence as dense [S, T, h_kv, d] arrays (made once, outside any timing)."""
  def gather(pool):
    x = pool[inp["chunk_paths"]]  # [S, Pc, h_kv, c, d]
    x = jnp.swapaxes(x, 2, 3).reshape(x.shape[0], -1, pool.shape[1], pool.shape[3])
    return x[:, :T]
  return jax.block_until_ready((gather(inp["k_pool"]), gather(inp["v_pool"])))


def _naive(q, k, v, positions):
  """Dense causal attention on a dense copy: q [S, t, h, d], k/v [S, T, h_kv, d]."""
  S, t, h, d = q.shape
  h_kv = k.shape[2]
  qg = q.reshape(S, t, h_kv, h // h_kv, d).astype(jnp.float32)
  s = jnp.einsum("stjgd,snjd->sjgtn", qg, k.astype(jnp.float32)) * d ** -0.5
  mask = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]  # [S, t, n]
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("sjgtn,snjd->stjgd", p, v.astype(jnp.float32))
  return o.reshape(S, t, h, d).astype(q.dtype)


def implementations(cfg, inp, T: int) -> dict:
  """name -> (jitted fn, args) for the implementations that apply at this point."""
  q, kp, vp, pos, paths = (inp[k] for k in ("q", "k_pool", "v_pool", "positions", "chunk_paths"))
  S = q.shape[0]
  out = {}
  for name in cfg.impls:
    if name in GPU_ONLY and not on_gpu():
      continue
    if name == "ours":
      out[name] = (jax.jit(functools.partial(layers.prefill_attention, impl="pallas",
                                             check=False)), (q, pos, kp, vp, paths))
    elif name == "ours_shared":
      sharing = plan_prefill_sharing(
          np.asarray(pos), np.asarray(paths), chunk_size=cfg.chunk_size,
          cost=SharingCost(group_size=cfg.h // cfg.h_kv, head_dim=cfg.d,
                           itemsize=jnp.dtype(cfg.dtype).itemsize,
                           block_m=prefill_lib.PrefillConfig.default(
                               d=cfg.d, g=cfg.h // cfg.h_kv, dtype=cfg.dtype).block_m))
      if S > 1 and sharing is not None:
        sharing = jax.device_put(sharing)
        out[name] = (jax.jit(lambda q_, p_, k_, v_, c_, sh: layers.prefill_attention(
            q_, p_, k_, v_, c_, impl="pallas", sharing=sh, check=False)),
                     (q, pos, kp, vp, paths, sharing))
    elif name == "xla":
      out[name] = (jax.jit(functools.partial(layers.prefill_attention, impl="xla",
                                             check=False)), (q, pos, kp, vp, paths))
    elif name == "materialising":
      out[name] = (jax.jit(functools.partial(layers.prefill_attention, impl="reference",
                                             check=False)), (q, pos, kp, vp, paths))
    elif name == "cudnn":
      if inp["num_cached"] == 0:
        k, v = dense_copy(inp, T)
        out[name] = (jax.jit(lambda q_, k_, v_: jax.nn.dot_product_attention(
            q_, k_, v_, is_causal=True, implementation="cudnn")), (q, k, v))
    elif name == "naive":
      k, v = dense_copy(inp, T)
      out[name] = (jax.jit(_naive), (q, k, v, pos))
    else:
      raise ValueError(f"unknown prefill implementation {name!r}")
  return out


def temp_bytes(fn, args) -> int:
  return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def memory_at_shape(cfg) -> list[dict]:
  """Temporary memory of one cold prompt per implementation at `config.memory_shape`, compiled
  (not run) for this machine's backend: rows of part "memory"."""
  shape = cfg.memory_shape
  h, h_kv, d, c = shape.h, shape.h_kv, shape.d, shape.chunk_size
  dt = jnp.dtype(shape.dtype)
  A = jax.ShapeDtypeStruct
  rows = []
  for T in cfg.memory_points:
    pool = A((T // c + 1, h_kv, c, d), dt)
    chunked = (A((1, T, h, d), dt), A((1, T), jnp.int32), pool, pool, A((1, T // c), jnp.int32))
    dense = (A((1, T, h, d), dt), A((1, T, h_kv, d), dt), A((1, T, h_kv, d), dt))
    fns = {"xla": (functools.partial(layers.prefill_attention, impl="xla", check=False),
                   chunked),
           "materialising": (functools.partial(layers.prefill_attention, impl="reference",
                                               check=False), chunked),
           "naive": (_naive, dense + (A((1, T), jnp.int32),))}
    if on_gpu():
      fns["ours"] = (functools.partial(layers.prefill_attention, impl="pallas", check=False),
                     chunked)
      fns["cudnn"] = (lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn"), dense)
    for name in cfg.impls:
      if name in fns:
        fn, args = fns[name]
        rows.append(dict(part="memory", T=T, cached_tokens=0, S=1, impl=name,
                         temp_mib=temp_bytes(jax.jit(fn), args) / 2 ** 20,
                         note=f"compiled only ({jax.default_backend()}), "
                              f"h={h} d={d} c={c} {shape.dtype}"))
  return rows


def sharing_counts(cfg) -> list[dict]:
  """What the shared-prefix pass changes over a cached prefix (per call, all KV heads)."""
  shape = cfg.count_shape
  c, d, h, item = shape.chunk_size, shape.d, shape.h, shape.itemsize
  L = cfg.count_cached // c
  rows = []
  for S in cfg.count_seqs:
    for new in cfg.count_new_tokens:
      for g in cfg.count_groups:
        h_kv = h // g
        block_m = prefill_lib.PrefillConfig.default(d=d, g=g, dtype=jnp.bfloat16).block_m
        cost = SharingCost(group_size=g, head_dim=d, itemsize=item, block_m=block_m)
        tokens = [new] * S
        alone, packed = cost.blocks_alone(tokens), cost.blocks_packed(tokens)
        kv = lambda blocks: blocks * h_kv * L * c * d * 2 * item / 2 ** 20
        flops = lambda blocks: blocks * h_kv * block_m * L * c * d * 4 / 1e9
        paths = np.concatenate([np.tile(np.arange(L), (S, 1)), L + np.arange(S)[:, None]], 1)
        positions = np.tile(L * c + np.arange(new), (S, 1))
        plan = plan_prefill_sharing(positions, paths, chunk_size=c, cost=cost)
        rows.append(dict(part="sharing_counts", S=S, new_tokens=new, cached_tokens=L * c, g=g,
                         blocks_alone=alone * h_kv, blocks_packed=packed * h_kv,
                         kv_mib_alone=kv(alone), kv_mib_shared=kv(packed),
                         gflop_alone=flops(alone), gflop_shared=flops(packed),
                         partial_mib=S * new * h * (d + 1) * 8 / 2 ** 20,
                         shares=plan is not None))
  return rows


def run(config, progress) -> list[dict]:
  cfg = effective(config)
  rows = []
  points = list(cfg.points)
  for i, (T, cached, S) in enumerate(points):
    progress(i, len(points), f"T={T} cached={cached} S={S}")
    inp = make_inputs(cfg, T=T, cached=cached, S=S)
    impls = implementations(cfg, inp, T)
    ref = None
    for name, (fn, args) in impls.items():
      base = dict(part="prefill", T=T, cached_tokens=inp["num_cached"], S=S, impl=name,
                  new_tokens=inp["new"])
      temp = temp_bytes(fn, args)
      if temp > cfg.max_temp_gib * 2 ** 30:
        rows.append(dict(base, temp_mib=temp / 2 ** 20,
                         note=f"skipped: temp > {cfg.max_temp_gib} GiB"))
        continue
      out = jax.block_until_ready(fn(*args))
      if name == "xla":
        ref = out
      err = (float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
             if ref is not None else None)
      if err is not None and not err <= TOLERANCE[cfg.dtype]:
        raise AssertionError(f"{name} at T={T} cached={cached} S={S}: max error {err}")
      us = common.time_device(lambda: fn(*args), iters=cfg.iters, warmup=cfg.warmup)
      rows.append(dict(base, us=us, tokens_per_s=S * inp["new"] / (us * 1e-6),
                       temp_mib=temp / 2 ** 20, max_abs_err=err, note=""))
  return rows + memory_at_shape(cfg) + sharing_counts(cfg)


def plot(rows, workdir):
  fig, (ax_t, ax_m) = common.subplots(ncols=2, figsize=(11, 4))
  cold = [r for r in rows if r["part"] == "prefill" and r["cached_tokens"] == 0 and r["S"] == 1]
  for impl in dict.fromkeys(r["impl"] for r in cold):
    timed = sorted((r["T"], r["us"]) for r in cold if r["impl"] == impl and r.get("us"))
    if timed:
      ax_t.plot(*zip(*timed), marker="o", label=impl)
  memory = [r for r in rows if r["part"] == "memory"]
  for impl in dict.fromkeys(r["impl"] for r in memory):
    pts = sorted((r["T"], max(r["temp_mib"], 1e-3)) for r in memory if r["impl"] == impl)
    ax_m.plot(*zip(*pts), marker="o", label=impl)
  cached = [r for r in rows if r["part"] == "prefill" and r["cached_tokens"] > 0 and r["S"] == 1
            and r.get("us")]
  for r in cached:
    ax_t.scatter([r["T"]], [r["us"]], marker="x", color="k")
  for ax, title, unit in ((ax_t, "prefill attention time (x: cached prefix)", "us"),
                          (ax_m, "temporary memory at the 7B shape (compiled)", "MiB")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8)
  return [common.save_figure(fig, workdir, "prefill.png")]


def summary(rows, config) -> str:
  counts = [r for r in rows if r["part"] == "sharing_counts"]
  cols = ("S", "new_tokens", "g", "blocks_alone", "blocks_packed", "kv_mib_alone", "kv_mib_shared",
          "gflop_alone", "gflop_shared", "partial_mib", "shares")
  return ("shared-prefix pass over a cached prefix of "
          f"{config.count_cached} tokens (counts, per call, all KV heads):\n"
          + common.format_table(counts, cols) + "\n")
