"""Two-phase (chunk-first, then sequence-first) decode attention on a paged chunk pool.

`two_phase_decode` is the one public entry point; the implementation is data (`impl=`):

* ``"pallas"``: `chunk_first` then `sequence_first`, Pallas Triton kernels (GPU). Two kernel
  launches per call (one when the plan has no shared items) and nothing else: q and the output keep
  their natural layout, partial buffers are never zero-filled, live rows and length deltas are
  applied inside the kernels;
* ``"pallas_interpret"``: the same kernels in Pallas interpret mode (CPU, slow; for tests);
* ``"mosaic"``: the same two phases as Pallas Mosaic GPU kernels (`mosaic_decode`; Hopper, 16-bit
  inputs, groups up to 8): TMA gathers, mbarrier rings, producer/consumer warpgroups, wgmma;
* ``"mosaic_interpret"``: those kernels in the Mosaic GPU interpreter (CPU, race detection on);
* ``"xla"``: the same two phases in plain XLA (`chunk_first_reference`, `sequence_first_reference`);
* ``"reference"``: no phases: every row gathers all its chunks (items' then private) and runs a
  dense fp32 softmax. The simplest correct implementation.

Plan arrays follow docs/design.md (section 3); all int32, capacities R, I, G, P, K.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import _common, mosaic_decode
from pallas_kernels.chunk_first import ChunkFirstConfig, chunk_first, chunk_first_reference
from pallas_kernels.sequence_first import (SequenceFirstConfig, sequence_first,
                                           sequence_first_reference)

IMPLS = ("pallas", "pallas_interpret", "mosaic", "mosaic_interpret", "xla", "reference")
# T * g: rows carrying T new tokens, g query heads per KV head (the sm_90a compile sweep covers it).
MAX_QUERIES_PER_KV_HEAD = 64


class InvalidPlanError(ValueError):
  """A decode plan whose arrays are inconsistent or point outside the pool."""


def _reference(q, k_pool, v_pool, private_len, row_private_chunks, row_items, row_num_items,
               item_chunks, item_num_chunks, sm_scale):
  R, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  T = _common.tokens_per_row(q)
  _, h_kv, c, _ = k_pool.shape
  g = h // h_kv
  P = row_private_chunks.shape[1]
  # [R, T, P * c]: token t of the row's T new ones sees private positions < length - (T - 1 - t).
  limit = private_len[:, None] - (T - 1 - jnp.arange(T))[None, :]  # [R, T]
  tok_ok = jnp.arange(P * c)[None, None, :] < limit[:, :, None]
  slots = row_private_chunks
  if item_chunks.shape[0]:
    K = row_items.shape[1]
    G = item_chunks.shape[1]
    # Shared chunks of each row, [R, K*G], valid where the item and the chunk are valid.
    shared = item_chunks[row_items].reshape(R, K * G)
    shared_ok = ((jnp.arange(K)[None, :, None] < row_num_items[:, None, None])
                 & (jnp.arange(G)[None, None, :] < item_num_chunks[row_items][:, :, None]))
    shared_tok = jnp.broadcast_to(shared_ok.reshape(R, 1, K * G, 1), (R, T, K * G, c))
    slots = jnp.concatenate([shared, slots], axis=1)  # [R, K*G + P]
    tok_ok = jnp.concatenate([shared_tok.reshape(R, T, -1), tok_ok], axis=2)  # [R, T, n]
  kk = k_pool[slots].astype(jnp.float32).transpose(0, 2, 1, 3, 4).reshape(R, h_kv, -1, d)
  vv = v_pool[slots].astype(jnp.float32).transpose(0, 2, 1, 3, 4).reshape(R, h_kv, -1, d)
  qq = q.astype(jnp.float32).reshape(R, T, h_kv, g, d).transpose(0, 2, 1, 3, 4)
  qq = qq.reshape(R, h_kv, T * g, d)
  s = jnp.einsum("rjgd,rjnd->rjgn", qq, kk, precision=lax.Precision.HIGHEST) * sm_scale
  ok = jnp.repeat(tok_ok, g, axis=1)[:, None]  # [R, 1, T * g, n]
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(ok, jnp.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  o = jnp.einsum("rjgn,rjnd->rjgd", p, vv, precision=lax.Precision.HIGHEST)
  out = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)  # [R, h_kv, T * g, d]
  out = out.reshape(R, h_kv, T, g, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(q.shape).astype(q.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("impl", "sm_scale", "item_rows_capacity", "chunk_first_config",
                     "sequence_first_config", "mosaic_config"))
def two_phase_decode(q, k_pool, v_pool, *, num_rows, row_private_chunks, row_private_len,
                     row_items, row_num_items, item_chunks, item_num_chunks, item_row_begin,
                     item_row_end, item_slot, length_delta=0, impl: str = "xla",
                     sm_scale: float | None = None, item_rows_capacity: int | None = None,
                     chunk_first_config: ChunkFirstConfig | None = None,
                     sequence_first_config: SequenceFirstConfig | None = None, partials=None,
                     mosaic_config: mosaic_decode.MosaicConfig | None = None):
  """Decode attention of one query per row over a paged chunk pool, by two-phase partition.

  Args:
    q: [R, h, d] one query per row (rows >= num_rows are spare), float16/bfloat16/float32; or
      [R, T, h, d]: T new tokens per row (speculative verification, a short chunked prefill),
      the last T of the row's private tokens (the plan's lengths include them), each attending
      to the row's shared items, its private tokens before it and itself.
    k_pool, v_pool: [n_chunks, h_kv, c, d], same dtype as q; h % h_kv == 0.
    num_rows: int32 [] live rows b.
    row_private_chunks: int32 [R, P]; row_private_len: int32 [R] (at plan build time).
    row_items: int32 [R, K] item at each partial slot of the row; row_num_items: int32 [R].
    item_chunks: int32 [I, G]; item_num_chunks, item_row_begin, item_row_end, item_slot:
      int32 [I]. I may be 0 (no shared items).
    length_delta: int32 [] tokens appended to every live row since the plan was built.
    impl: "pallas" | "pallas_interpret" | "mosaic" | "mosaic_interpret" | "xla" | "reference".
    sm_scale: score scale (static), default 1/sqrt(d).
    item_rows_capacity: static upper bound on any item's row count (default R); smaller values
      shrink the chunk-first grid ("pallas") and the dense item blocks ("xla").
    chunk_first_config, sequence_first_config: Pallas tuning knobs (static; defaults per shape).
    partials: optional (o, lse) partial buffers for chunk-first to write into (tests poison
      them with NaN to show that unwritten entries are never read). Not with "mosaic*" (its
      interpreter starts every output buffer as NaN instead).
    mosaic_config: `mosaic_decode.MosaicConfig` knobs of the "mosaic*" kernels (static).

  Returns:
    q's shape and dtype; spare rows are zeros.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}: {impl=}")
  pallas = impl.startswith("pallas")
  R, h, h_kv, c, d = _common.check_qkv(q, k_pool, v_pool, pallas=pallas)
  T = _common.tokens_per_row(q)
  if pallas and T * (h // h_kv) > MAX_QUERIES_PER_KV_HEAD:
    raise ValueError(f"the Pallas kernels take at most {MAX_QUERIES_PER_KV_HEAD} queries per (row, "
                     f"KV head) = tokens per row x group size: {q.shape=} {k_pool.shape=}; "
                     f"use impl='xla' or fewer tokens per row")
  num_rows = jnp.asarray(num_rows, jnp.int32)
  length_delta = jnp.asarray(length_delta, jnp.int32)
  for name, x in (("num_rows", num_rows), ("length_delta", length_delta)):
    if x.shape != ():
      raise ValueError(f"{name} must be a scalar: {x.shape=}")
  _common.check_int("row_private_len", row_private_len, (R,))
  _common.check_int("row_num_items", row_num_items, (R,))
  _common.check_int("row_private_chunks", row_private_chunks, (R, None))
  _common.check_int("row_items", row_items, (R, None))
  _common.check_int("item_chunks", item_chunks, (None, None))
  sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  K = row_items.shape[1]
  has_items = item_chunks.shape[0] > 0
  if impl == "reference":
    live = jnp.arange(R) < num_rows
    private_len = jnp.where(live, row_private_len + length_delta, 0).astype(jnp.int32)
    return _reference(q, k_pool, v_pool, private_len, row_private_chunks, row_items,
                      jnp.where(live, row_num_items, 0), item_chunks, item_num_chunks, sm_scale)
  if impl.startswith("mosaic"):
    if partials is not None:
      raise ValueError(f"partials= is not supported by {impl=}")
    if q.ndim != 3:
      raise ValueError(f"{impl=} takes one new token per row (q [R, h, d]): {q.shape=}; use "
                       f"impl='pallas' or 'xla' for rows of several tokens")
    return mosaic_decode.mosaic_two_phase(
        q, k_pool, v_pool, num_rows=num_rows, length_delta=length_delta,
        row_private_chunks=row_private_chunks, row_private_len=row_private_len,
        row_items=row_items, row_num_items=row_num_items, item_chunks=item_chunks,
        item_num_chunks=item_num_chunks, item_row_begin=item_row_begin,
        item_row_end=item_row_end, item_slot=item_slot, sm_scale=sm_scale,
        item_rows_capacity=item_rows_capacity, config=mosaic_config,
        interpret=impl == "mosaic_interpret")
  item_args = (item_chunks, item_num_chunks, item_row_begin, item_row_end, item_slot)
  row_args = (num_rows, length_delta, row_private_chunks, row_private_len)
  if impl == "xla":
    if has_items:
      partials = chunk_first_reference(q, k_pool, v_pool, *item_args, partials, items_per_row=K,
                                       sm_scale=sm_scale, item_rows_capacity=item_rows_capacity)
    else:
      partials = _no_partials(R, h_kv, _common.tokens_per_row(q) * (h // h_kv), d)
      row_num_items = jnp.zeros_like(row_num_items)
    return sequence_first_reference(q, k_pool, v_pool, *row_args, row_num_items, partials,
                                     sm_scale=sm_scale)
  interpret = impl == "pallas_interpret"
  if has_items:
    partials = chunk_first(q, k_pool, v_pool, *item_args, partials, items_per_row=K,
                           sm_scale=sm_scale, item_rows_capacity=item_rows_capacity,
                           config=chunk_first_config, interpret=interpret)
  else:
    partials = None
  return sequence_first(q, k_pool, v_pool, *row_args, row_num_items, partials, sm_scale=sm_scale,
                        config=sequence_first_config, interpret=interpret)


def _no_partials(R, h_kv, nq, d):
  gp = _common.partial_heads(nq)
  return (jnp.zeros((R, h_kv, 1, gp, d), jnp.float32), jnp.zeros((R, h_kv, 1, gp), jnp.float32))


def validate_plan_arrays(*, num_rows, row_private_chunks, row_private_len, row_items,
                         row_num_items, item_chunks, item_num_chunks, item_row_begin,
                         item_row_end, item_slot, n_chunks, chunk_size, length_delta=0,
                         item_rows_capacity=None, tokens_per_row=1) -> None:
  """Eager value checks of a plan (vectorised NumPy). Raises `InvalidPlanError` naming the problem.

  Checks: every slot inside the pool; live rows' private lengths in [T, P * c] (T = tokens per
  row: the new tokens are private; 0 allowed when T = 1); items' chunk
  counts in [0, G] and row ranges inside the live rows; every (row, slot k < row_num_items) lists a
  live item that covers the row and sits at slot k (so no item is listed twice and no two items
  share a partial slot of a row); every row a live item covers lists it.
  """
  a = {k: np.asarray(v) for k, v in dict(
      row_private_chunks=row_private_chunks, row_private_len=row_private_len, row_items=row_items,
      row_num_items=row_num_items, item_chunks=item_chunks, item_num_chunks=item_num_chunks,
      item_row_begin=item_row_begin, item_row_end=item_row_end, item_slot=item_slot).items()}
  b = int(num_rows)
  R, P = a["row_private_chunks"].shape
  I, G = a["item_chunks"].shape
  K = a["row_items"].shape[1]
  if not 0 <= b <= R:
    raise InvalidPlanError(f"num_rows outside [0, {R}]: {b}")
  for name in ("row_private_chunks", "item_chunks"):
    x = a[name]
    if x.size and (x.min() < 0 or x.max() >= n_chunks):
      bad = x[(x < 0) | (x >= n_chunks)][0]
      raise InvalidPlanError(f"{name} holds pool slot {bad} outside [0, {n_chunks})")
  plen = a["row_private_len"][:b].astype(np.int64) + int(length_delta)
  lo = 0 if tokens_per_row == 1 else tokens_per_row
  if (plen < lo).any() or (plen > P * chunk_size).any():
    r = int(np.flatnonzero((plen < lo) | (plen > P * chunk_size))[0])
    raise InvalidPlanError(f"row {r}: private length {plen[r]} outside [{lo}, P*c = "
                           f"{P * chunk_size}]" + (f" (its {tokens_per_row} new tokens must be "
                                                    "private)" if lo else ""))
  n = a["item_num_chunks"]
  if (n < 0).any() or (n > G).any():
    raise InvalidPlanError(f"item_num_chunks outside [0, G = {G}]: {n[(n < 0) | (n > G)][:4]}")
  live = n > 0
  beg, end, slot = a["item_row_begin"], a["item_row_end"], a["item_slot"]
  bad = live & ((beg < 0) | (end > b) | (beg >= end) | (slot < 0) | (slot >= K))
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise InvalidPlanError(f"item {i}: rows [{beg[i]}, {end[i]}) or slot {slot[i]} outside "
                           f"the live rows [0, {b}) / slots [0, {K})")
  if item_rows_capacity is not None and (live & (end - beg > item_rows_capacity)).any():
    raise InvalidPlanError(f"a live item has more rows than {item_rows_capacity=}")
  nk = a["row_num_items"][:b]
  if (nk < 0).any() or (nk > K).any():
    raise InvalidPlanError(f"row_num_items outside [0, K = {K}]: {nk[(nk < 0) | (nk > K)][:4]}")
  rr, kk = np.nonzero(np.arange(K)[None, :] < nk[:, None])  # listed (row, slot) pairs
  items = a["row_items"][rr, kk]
  ok = (items >= 0) & (items < I)
  it = np.where(ok, items, 0)
  if I:
    ok &= live[it] & (beg[it] <= rr) & (rr < end[it]) & (slot[it] == kk)
  if not ok.all():
    x = int(np.flatnonzero(~ok)[0])
    raise InvalidPlanError(f"row {rr[x]} lists item {items[x]} at slot {kk[x]}, which is not a "
                           f"live item covering that row at that slot")
  if len(rr) != int((end - beg)[live].sum()):
    raise InvalidPlanError("a live item is not listed by every row it covers")
