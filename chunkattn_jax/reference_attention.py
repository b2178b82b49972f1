"""Reference decode attention over a DecodePlan in plain jnp: the simplest correct implementation.

Every row gathers the K/V of all its chunks (its shared items' chunks, then its private chunks)
from the pool, masks what is not a token of the row, and takes an fp32 softmax. No partials, no
merging: it is the oracle the two-phase kernels are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from chunkattn_jax.plan import DecodePlan


def gather_row_kv(k_pool: jax.Array, v_pool: jax.Array, plan: DecodePlan):
  """Gathers every row's keys and values through the plan.

  Args:
    k_pool, v_pool: [n_chunks, h_kv, c, d].
    plan: the decode plan (R rows, K items per row, G chunks per item, P private chunks per row).

  Returns:
    (k, v, valid): k and v [R, n, h_kv, d] with n = (K * G + P) * c key positions per row, and
    valid bool [R, n], True where the position holds one of the row's tokens.
  """
  c = plan.chunk_size
  r_cap, k_cap = plan.row_items.shape
  g_cap = plan.item_chunks.shape[1]
  p_cap = plan.row_private_chunks.shape[1]
  # Private part: [R, P] chunk slots; token j of the private list is valid iff j < private length.
  chunks = jnp.asarray(plan.row_private_chunks)
  valid = jnp.arange(p_cap * c)[None, :] < plan.private_lengths()[:, None]
  if plan.item_capacity:  # shared part: [R, K, G] chunk slots and validity
    live = jnp.arange(r_cap) < plan.num_rows
    shared_chunks = jnp.asarray(plan.item_chunks)[plan.row_items]
    item_ok = (jnp.arange(k_cap)[None, :] < plan.row_num_items[:, None]) & live[:, None]
    chunk_ok = (jnp.arange(g_cap)[None, None, :]
                < jnp.asarray(plan.item_num_chunks)[plan.row_items][..., None])
    shared_ok = (item_ok[..., None] & chunk_ok).reshape(r_cap, k_cap * g_cap)
    shared_tok_ok = jnp.repeat(shared_ok, c, axis=1)  # shared chunks are full
    chunks = jnp.concatenate([shared_chunks.reshape(r_cap, -1), chunks], axis=1)
    valid = jnp.concatenate([shared_tok_ok, valid], axis=1)

  def gather(pool):
    x = pool[chunks]  # [R, n_chunks_per_row, h_kv, c, d]
    x = jnp.swapaxes(x, 2, 3)  # [R, chunks, c, h_kv, d]
    return x.reshape(r_cap, -1, pool.shape[1], pool.shape[3])

  return gather(k_pool), gather(v_pool), valid


def reference_decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                               plan: DecodePlan, *, sm_scale: float | None = None) -> jax.Array:
  """Decode attention of one query per row over the row's cached tokens.

  Args:
    q: [R, h, d] queries in plan row order (R = plan.row_capacity).
    k_pool, v_pool: [n_chunks, h_kv, c, d]; h % h_kv == 0 (MHA, GQA, MQA).
    plan: the decode plan.
    sm_scale: score scale; default 1/sqrt(d).

  Returns:
    [R, h, d] in q's dtype; spare rows (and rows with no tokens) are 0.
  """
  r_cap, h, d = q.shape
  h_kv = k_pool.shape[1]
  if q.shape[0] != plan.row_capacity:
    raise ValueError(f"q has {q.shape[0]} rows but the plan has {plan.row_capacity=}")
  if h % h_kv:
    raise ValueError(f"query heads must be a multiple of KV heads: {q.shape=}, {k_pool.shape=}")
  scale = d ** -0.5 if sm_scale is None else sm_scale
  k, v, valid = gather_row_kv(k_pool, v_pool, plan)
  qg = q.astype(jnp.float32).reshape(r_cap, h_kv, h // h_kv, d)
  s = jnp.einsum("rkgd,rnkd->rkgn", qg, k.astype(jnp.float32)) * scale
  s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("rkgn,rnkd->rkgd", p, v.astype(jnp.float32)) / jnp.where(l > 0, l, 1.0)
  return o.reshape(r_cap, h, d).astype(q.dtype)
