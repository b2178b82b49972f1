"""Host-side cost of the prefix tree: per operation, per plan rebuild, amortised per decode step.

For each batch size b: b requests share an n_s-token prefix and have n_priv private prompt tokens
each (c-token chunks). Timed on the host (no device work): insert (per request), one decode step's
append (one token to every row), a full plan rebuild (split for an H100 at h_kv = 8: the engine's
default), the eager plan validation `decode_attention` runs on user plans, remove (per request), and
the amortised host
overhead of a decode step over `steps` steps: append one token to every row, then fetch the plan
(rebuilt only when a row opened a new chunk; otherwise the cached plan with a length delta).
"""

from __future__ import annotations

import numpy as np

from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.attention import validate_plan
from chunkattn_jax.plan import GpuFill, PlanBuilder, build_plan
from chunkattn_jax.prefix_tree import PrefixTree
from experiments import common


def _tree_with_requests(config, b, seed=0):
  c = config.chunk_size
  rng = np.random.default_rng(seed)
  per_req = -(-(config.n_priv + config.steps) // c) + 1
  tree = PrefixTree(ChunkPool(config.n_s // c + b * per_req + 1, seed=seed), c)
  prefix = rng.integers(0, 32000, config.n_s).tolist()
  prompts = [prefix + rng.integers(0, 32000, config.n_priv).tolist() for _ in range(b)]
  return tree, prompts


def run(config, progress):
  rows = []
  batches = list(config.batches)
  for i, b in enumerate(batches):
    progress(i + 1, len(batches), f"b={b}")
    tree, prompts = _tree_with_requests(config, b)
    # insert: each request after the first matches the shared prefix.
    ids = []
    insert_us = common.time_host(lambda: ids.append(tree.insert(prompts[len(ids)]).seq_id),
                                 iters=b - 1, warmup=1)
    fill = GpuFill(num_kv_heads=8, group_size=4)
    plan_us = common.time_host(lambda: build_plan(tree, fill=fill), iters=config.plan_iters)
    plan = build_plan(tree, fill=fill)
    validate_us = common.time_host(lambda: validate_plan(plan, tree.pool.capacity),
                                   iters=config.plan_iters)
    tokens = [1] * b
    builder = PlanBuilder(tree)
    builder.plan()
    rebuilds_before = builder.num_rebuilds

    def step():
      tree.append_tokens(ids, tokens)
      builder.plan()
    step_us = common.time_host(step, iters=config.steps, warmup=0)
    rebuilds = builder.num_rebuilds - rebuilds_before
    append_us = common.time_host(lambda: tree.append_tokens(ids, tokens), iters=8, warmup=0)
    remove_us = common.time_host(lambda: tree.remove(ids.pop()), iters=b, warmup=0)
    tree.check_invariants()
    common_fields = dict(batch=b, n_s=config.n_s, n_priv=config.n_priv, chunk_size=config.chunk_size)
    rows += [
        dict(op="insert (per request)", us=insert_us, **common_fields),
        dict(op="append step (1 token x b rows)", us=append_us, **common_fields),
        dict(op="plan rebuild", us=plan_us, target_us=config.plan_target_us, **common_fields),
        dict(op="plan validation", us=validate_us, **common_fields),
        dict(op="remove (per request)", us=remove_us, **common_fields),
        dict(op=f"amortised step ({config.steps} steps, {rebuilds} rebuilds)", us=step_us,
             target_us=config.step_target_us, **common_fields),
    ]
  return rows


def plot(rows, workdir):
  ops = list(dict.fromkeys(r["op"].split(" (")[0] for r in rows))
  batches = sorted({r["batch"] for r in rows})
  fig, ax = common.subplots(figsize=(7, 3.5))
  width = 0.8 / len(batches)
  for j, b in enumerate(batches):
    vals = [next(r["us"] for r in rows if r["batch"] == b and r["op"].startswith(op)) for op in ops]
    ax.bar(np.arange(len(ops)) + j * width, vals, width, label=f"b = {b}")
  ax.set_xticks(np.arange(len(ops)) + width * (len(batches) - 1) / 2, ops, fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("host time (us)")
  ax.set_title("Prefix-tree host overhead")
  ax.legend()
  return [common.save_figure(fig, workdir, "tree_overhead.png")]
