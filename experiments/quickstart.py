"""Quickstart: a shared-system-prompt workload through tree -> plan -> decode attention -> engine.

Part 1 inserts `batch` requests that share an `n_s`-token system prompt into the prefix tree, fills
the KV pool with random K/V, runs decode attention over the plan with each implementation, checks
each against a dense attention over per-sequence K/V, and reports what prefix sharing saved.
Part 2 serves requests sharing a system prompt with the engine and a tiny random Llama: later
requests find the prompt cached (their prefill skips it) and every request's tokens equal those of
the same model with a plain dense per-request cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.plan import build_plan
from chunkattn_jax.prefix_tree import PrefixTree
from chunkattn_jax.reference_attention import reference_decode_attention
from experiments import common


def build_workload(config, seed: int = 0):
  """Returns (tree, q, k_pool, v_pool) for `batch` prompts of n_p tokens sharing n_s."""
  rng = np.random.default_rng(seed)
  c = config.chunk_size
  per_seq = -(-config.n_p // c)
  tree = PrefixTree(ChunkPool(config.batch * per_seq + 1, seed=seed), c)
  system = rng.integers(0, 32000, config.n_s).tolist()
  for _ in range(config.batch):
    tree.insert(system + rng.integers(0, 32000, config.n_p - config.n_s).tolist())
  shape = (tree.pool.capacity, config.h_kv, c, config.d)
  dtype = jnp.dtype(config.dtype)
  k_pool = jnp.asarray(rng.standard_normal(shape), dtype)
  v_pool = jnp.asarray(rng.standard_normal(shape), dtype)
  return tree, rng, k_pool, v_pool


def dense_per_sequence(tree, q, k_pool, v_pool):
  """[b, h, d] fp32: each sequence's K/V copied out of the pool, then plain softmax attention."""
  outs = []
  for r, sid in enumerate(tree.seq_ids()):
    path = jnp.asarray(tree.chunk_path(sid))
    n = tree.length(sid)
    k = jnp.swapaxes(k_pool[path], 1, 2).reshape(-1, k_pool.shape[1], k_pool.shape[3])[:n]
    v = jnp.swapaxes(v_pool[path], 1, 2).reshape(-1, v_pool.shape[1], v_pool.shape[3])[:n]
    h, d = q.shape[1:]
    g = h // k.shape[1]
    k = jnp.repeat(k.astype(jnp.float32), g, axis=1)
    v = jnp.repeat(v.astype(jnp.float32), g, axis=1)
    s = jnp.einsum("hd,nhd->hn", q[r].astype(jnp.float32), k) / np.sqrt(d)
    outs.append(jnp.einsum("hn,nhd->hd", jax.nn.softmax(s, axis=-1), v))
  return jnp.stack(outs)


def implementations(config):
  """name -> fn(q, k_pool, v_pool, plan); the reference always, the two-phase kernels if built."""
  impls = {"reference": jax.jit(reference_decode_attention)}
  from chunkattn_jax import attention  # noqa: PLC0415 (kept local: heavy import)
  for impl in config.impls:
    impls[impl] = jax.jit(lambda q, k, v, p, impl=impl: attention.decode_attention(
        q, k, v, p, impl=impl))
  return impls


def run(config, progress):
  tree, rng, k_pool, v_pool = build_workload(config)
  b, c = config.batch, config.chunk_size
  unshared_chunks = b * -(-config.n_p // c)
  used = tree.pool.num_used
  plans = {"chunk (two-phase)": build_plan(tree), "paged (no compute sharing)":
           build_plan(tree, threshold=b)}
  q = jnp.asarray(rng.standard_normal((plans["paged (no compute sharing)"].row_capacity,
                                       config.h, config.d)), jnp.dtype(config.dtype))
  dense = dense_per_sequence(tree, q, k_pool, v_pool)
  impls = implementations(config)
  rows = []
  steps = [(pn, p, iname, fn) for pn, p in plans.items() for iname, fn in impls.items()]
  for i, (plan_name, plan, impl_name, fn) in enumerate(steps):
    progress(i + 1, len(steps), f"{impl_name} on the {plan_name} plan")
    out = fn(q, k_pool, v_pool, plan)
    err = float(jnp.max(jnp.abs(out[:b].astype(jnp.float32) - dense)))
    if not np.isfinite(err) or err > config.tolerance:
      raise AssertionError(f"{impl_name} on the {plan_name} plan differs from dense attention by "
                           f"{err} > {config.tolerance}")
    rows.append(dict(part="attention", plan=plan_name, impl=impl_name, batch=b, n_p=config.n_p, n_s=config.n_s,
                     shared_items=plan.num_shared_items(), max_abs_err=err,
                     us=common.time_device(lambda: fn(q, k_pool, v_pool, plan), iters=5)))
  kv_bytes_per_chunk = 2 * config.h_kv * c * config.d * jnp.dtype(config.dtype).itemsize
  print(f"\n{b} requests of {config.n_p} tokens sharing a {config.n_s}-token system prompt, "
        f"chunk size {c}:\n  pool chunks used: {used} with the prefix tree vs {unshared_chunks} "
        f"without sharing ({100 * (1 - used / unshared_chunks):.1f}% less KV memory: "
        f"{used * kv_bytes_per_chunk / 2**20:.2f} MiB vs "
        f"{unshared_chunks * kv_bytes_per_chunk / 2**20:.2f} MiB per layer)")
  for r in rows:
    r["kv_chunks_used"], r["kv_chunks_unshared"] = used, unshared_chunks
  if config.engine_requests:
    rows += engine_part(config, progress)
  return rows


def engine_part(config, progress):
  from chunkattn_jax import engine  # noqa: PLC0415 (kept local: builds a model)
  progress(1, 1, f"engine: {config.engine_requests} requests sharing a "
                 f"{config.engine_system_prompt}-token system prompt (tiny random Llama)")
  demo = engine.demo(num_requests=config.engine_requests,
                     system_prompt_len=config.engine_system_prompt,
                     max_new_tokens=config.engine_new_tokens, impl=config.impls[0])
  print("\nengine (tiny random Llama, greedy):")
  for r in demo:
    print(f"  request {r['request']}: {r['prompt_len']} prompt tokens, "
          f"{r['cached_prompt_tokens']} found cached (prefill skipped them); generated "
          f"{r['tokens']}; same as a dense per-request cache: {r['match']}")
  bad = [r["request"] for r in demo if not r["match"]]
  if bad:
    raise AssertionError(f"engine output differs from the dense-cache model for requests {bad}")
  return [dict(part="engine", impl=config.impls[0], batch=len(demo), n_p=r["prompt_len"],
               n_s=config.engine_system_prompt, request=r["request"],
               cached_prompt_tokens=r["cached_prompt_tokens"], tokens_match=r["match"])
          for r in demo]
