"""The engine's device side: the KV pool and the jitted prefill and decode steps.

`ModelRunner` turns the scheduler's batches into padded device inputs (powers of two, so few
shapes compile), runs one jitted model call that also samples, and returns the tokens on the host.
It owns the device KV pool, which a call updates in place (donated). When a call raises, the pool
is still usable: the one before the call if it was not consumed, else the one the call produced
(whose extra writes land only in slots the scheduler then frees), else, when both are gone, a
fresh zero pool; `num_pool_resets` counts those, and the engine then recomputes every request.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from chunkattn_jax import kv_pool as kv_pool_lib
from chunkattn_jax import layers
from chunkattn_jax import sampling as sampling_lib
from chunkattn_jax import plan as plan_lib
from chunkattn_jax.plan import bucket
from chunkattn_jax.scheduler import DecodeWork, PrefillEntry

# The decode-plan capacities the runner pads to high-water marks, in `plan_capacities` order.
PLAN_CAPACITY_NAMES = ("row_capacity", "private_chunks", "items_per_row", "item_capacity",
                       "item_rows_capacity")


class ModelRunner:
  """Device calls of an engine.

  Args:
    model: an nnx model, see `Engine`.
    config: the `EngineConfig`.
    pool_sharding: sharding of the KV pool arrays, or None.

  `prefill_step` and `decode_step` are the jitted calls `(state, pool, tokens, inputs, ...) ->
  (tokens, logits, pool)`; tests wrap them to inject failures.
  """

  def __init__(self, model, config, pool_sharding=None):
    self.config = config
    self.graphdef, self.state = nnx.split(model)
    self._make_pool = functools.partial(model.make_pool, config.n_chunks, config.chunk_size,
                                        dtype=config.kv_dtype, sharding=pool_sharding)
    self.pool = self._make_pool()
    self.num_pool_resets = 0
    self.plan_capacities = tuple(config.min_plan_capacities)
    self._path_cap = 0
    self.prefill_step = functools.partial(_prefill_step, self.graphdef)
    self.decode_step = functools.partial(_decode_step, self.graphdef)

  # ------------------------------------------------------------------ model calls
  def prefill(self, batch: Sequence[PrefillEntry]) -> tuple[np.ndarray, np.ndarray | None]:
    """Computes every entry's tokens `[num_cached, len(tokens))` (the unmatched suffix, or one
    piece of it under chunked prefill) and samples each one's next token from its last position
    (the engine keeps it only for a request's last piece).

    Sequences and tokens are padded to powers of two so few shapes compile; padding sequences
    repeat the first one with their writes dropped.

    Returns:
      int32 `[len(batch)]` tokens and, with `record_logits`, float32 `[len(batch), V]` logits.
    """
    drop = self.pool.drop_slot
    s_cap = bucket(len(batch))
    t_cap = bucket(max(len(e.tokens) - e.num_cached for e in batch),
                   self.config.min_prefill_tokens)
    path_cap = max(bucket(max(len(e.chunk_path) for e in batch), 4), self._path_cap)
    tokens = np.zeros((s_cap, t_cap), np.int32)
    positions = np.zeros((s_cap, t_cap), np.int32)
    slots = np.zeros((s_cap, t_cap, 2), np.int32)
    slots[..., 0] = drop
    chunk_paths = np.zeros((s_cap, path_cap), np.int32)
    last = np.zeros(s_cap, np.int32)
    num_tokens = np.zeros(s_cap, np.int32)  # attention skips padding tokens and sequences
    for i in range(s_cap):
      src = i if i < len(batch) else 0
      e = batch[src]
      start, n = e.num_cached, len(e.tokens)  # tokens [start, n) are computed
      tokens[i, : n - start] = e.tokens[start:]
      positions[i, : n - start] = np.arange(start, n)
      if i == src:  # padding sequences keep the dropped slots and attend to nothing
        slots[i] = kv_pool_lib.pad_slots(e.slots, t_cap, drop)
        num_tokens[i] = n - start
      chunk_paths[i, : len(e.chunk_path)] = e.chunk_path
      last[i] = n - start - 1
    samp = self.sampling_arrays([(e.request.sampling, len(e.request.output)) for e in batch],
                                s_cap)
    # The engine's arrays come from its own tree: the layer's input check is skipped.
    inputs = layers.PrefillInputs(positions=positions, slots=slots, chunk_paths=chunk_paths,
                                  num_tokens=num_tokens, check=False)
    tok, logits = self._call(self.prefill_step, tokens, inputs, last, *samp)
    self._path_cap = path_cap
    return tok[: len(batch)], None if logits is None else logits[: len(batch)]

  def decode(self, work: DecodeWork, plan) -> tuple[np.ndarray, np.ndarray | None]:
    """One decode step over the plan's rows for the requests of `work` (their pending tokens
    already appended to the tree the plan was built from).

    Returns:
      int32 `[len(work.requests)]` tokens and, with `record_logits`, float32 logits `[n, V]`, in
      `work.requests` order.
    """
    plan = self.pad_plan(plan)
    r_cap = plan.row_capacity
    rows = plan.rows_of([req.seq_id for req in work.requests])
    tokens = np.zeros(r_cap, np.int32)
    positions = np.zeros(r_cap, np.int32)
    slots = np.zeros((r_cap, 2), np.int32)
    slots[:, 0] = self.pool.drop_slot
    row_sampling: list = [None] * r_cap
    for req, r, slot in zip(work.requests, rows, work.slots):
      tokens[r] = req.output[-1]
      positions[r] = req.num_tokens - 1
      slots[r] = slot
      row_sampling[r] = (req.sampling, len(req.output))
    samp = self.sampling_arrays(row_sampling, r_cap)
    # The engine's plans come from its own tree: the layer's input (and plan) checks are skipped.
    inputs = layers.DecodeInputs(positions=positions, slots=slots, plan=plan, check=False)
    tok, logits = self._call(self.decode_step, tokens, inputs, *samp)
    return tok[rows], None if logits is None else logits[rows]

  def _call(self, step, *args) -> tuple[np.ndarray, np.ndarray | None]:
    """Runs a jitted step on the pool; on success the pool advances. Results are brought to the
    host before returning, so a device failure raises here, with the pool left usable."""
    pool, new_pool = self.pool, None
    try:
      tok, logits, new_pool = step(self.state, pool, *args)
      tok = np.asarray(tok)
      logits = np.asarray(logits) if self.config.record_logits else None
    except BaseException:
      self._recover_pool(pool, new_pool)
      raise
    self.pool = new_pool
    return tok, logits

  def _recover_pool(self, old, new) -> None:
    if new is not None:
      try:
        self.pool = jax.block_until_ready(new)
        return
      except Exception:  # pylint: disable=broad-except
        pass  # the call itself failed: fall back to the old pool
    if not any(a.is_deleted() for a in jax.tree.leaves(old)):
      self.pool = old
      return
    self.pool = self._make_pool()  # donated and lost: every chunk's K/V must be recomputed
    self.num_pool_resets += 1

  # ------------------------------------------------------------------ inputs
  @staticmethod
  def sampling_arrays(rows: Sequence[tuple[sampling_lib.SamplingParams, int] | None], size: int):
    """Per-row sampling inputs: `(params, index of the token being generated)` or None for
    padding rows -> float32 temperature, int32 top_k, float32 top_p, uint32 seed, int32 counter,
    each `[size]`."""
    temp = np.zeros(size, np.float32)
    top_k = np.zeros(size, np.int32)
    top_p = np.ones(size, np.float32)
    seeds = np.zeros(size, np.uint32)
    counters = np.zeros(size, np.int32)
    for i, row in enumerate(rows):
      if row is not None:
        s, counter = row
        temp[i], top_k[i], top_p[i], seeds[i], counters[i] = (
            s.temperature, s.top_k, s.top_p, s.seed, counter)
    return temp, top_k, top_p, seeds, counters

  def pad_plan(self, plan):
    """Pads the plan's capacities up to their high-water marks (never shrinking), so the jitted
    step recompiles only when a capacity exceeds every earlier one. Spare entries are inert."""
    caps = plan_lib.plan_capacities(plan)
    prev = tuple(self.plan_capacities) + (0,) * (len(caps) - len(self.plan_capacities))
    self.plan_capacities = tuple(max(a, b) for a, b in zip(caps, prev))
    return plan_lib.pad_plan(plan, self.plan_capacities)


# Module-level jitted steps (the graph definition is static), so engines over the same model share
# compiled executables. The pool (argument 2) is donated: it is updated in place.
@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill_step(graphdef, state, pool, tokens, inputs, last, temp, top_k, top_p, seeds, counters):
  model = nnx.merge(graphdef, state)
  logits, pool = model(tokens, pool, inputs, logits_index=last)
  return sampling_lib.sample(logits, temp, top_k, top_p, seeds, counters), logits, pool


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode_step(graphdef, state, pool, tokens, inputs, temp, top_k, top_p, seeds, counters):
  model = nnx.merge(graphdef, state)
  logits, pool = model(tokens, pool, inputs)
  return sampling_lib.sample(logits, temp, top_k, top_p, seeds, counters), logits, pool
