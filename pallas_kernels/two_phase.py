"""Two-phase (chunk-first, then sequence-first) decode attention on a paged chunk pool.

`two_phase_decode` is the one public entry point; the implementation is data (`impl=`):

* ``"pallas"``: `chunk_first` then `sequence_first`, Pallas Triton kernels (GPU);
* ``"pallas_interpret"``: the same kernels in Pallas interpret mode (CPU, slow; for tests);
* ``"xla"``: the same two phases in plain XLA (`chunk_first_reference`, `sequence_first_reference`);
* ``"reference"``: no phases: every row gathers all its chunks (items' then private) and runs a
  dense fp32 softmax. The simplest correct implementation.

Plan arrays follow docs/design.md (section 3); all int32, capacities R, I, G, P, K, Q.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import _common
from pallas_kernels.chunk_first import chunk_first, chunk_first_reference, empty_partials
from pallas_kernels.sequence_first import sequence_first, sequence_first_reference

IMPLS = ("pallas", "pallas_interpret", "xla", "reference")


def effective_private_len(num_rows, row_private_len, length_delta):
  """Private tokens per row now: row_private_len + length_delta for live rows, 0 for spare rows."""
  R = row_private_len.shape[0]
  live = jnp.arange(R, dtype=jnp.int32) < num_rows
  return jnp.where(live, row_private_len + length_delta, 0).astype(jnp.int32)


def _reference(q, k_pool, v_pool, private_len, row_private_chunks, row_items, row_num_items,
               item_chunks, item_num_chunks, sm_scale):
  R, h, d = q.shape
  _, h_kv, c, _ = k_pool.shape
  g = h // h_kv
  K = row_items.shape[1]
  I, G = item_chunks.shape
  P = row_private_chunks.shape[1]
  # Shared chunks of each row, [R, K*G], valid where the item and the chunk are valid.
  shared = item_chunks[row_items].reshape(R, K * G)
  shared_ok = ((jnp.arange(K)[None, :, None] < row_num_items[:, None, None])
               & (jnp.arange(G)[None, None, :] < item_num_chunks[row_items][:, :, None]))
  shared_tok = jnp.broadcast_to(shared_ok.reshape(R, K * G, 1), (R, K * G, c))
  priv_tok = (jnp.arange(P)[:, None] * c + jnp.arange(c)[None, :])[None] < private_len[:, None, None]
  slots = jnp.concatenate([shared, row_private_chunks], axis=1)  # [R, K*G + P]
  tok_ok = jnp.concatenate([shared_tok, priv_tok], axis=1).reshape(R, -1)  # [R, n]
  kk = k_pool[slots].astype(jnp.float32).transpose(0, 2, 1, 3, 4).reshape(R, h_kv, -1, d)
  vv = v_pool[slots].astype(jnp.float32).transpose(0, 2, 1, 3, 4).reshape(R, h_kv, -1, d)
  qq = q.astype(jnp.float32).reshape(R, h_kv, g, d)
  s = jnp.einsum("rjgd,rjnd->rjgn", qq, kk, precision=lax.Precision.HIGHEST) * sm_scale
  ok = tok_ok[:, None, None, :]
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(ok, jnp.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  o = jnp.einsum("rjgn,rjnd->rjgd", p, vv, precision=lax.Precision.HIGHEST)
  out = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
  return out.reshape(R, h, d).astype(q.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("partial_capacity", "impl", "sm_scale", "item_rows_capacity", "block_m",
                     "num_warps", "num_stages"))
def two_phase_decode(q, k_pool, v_pool, *, num_rows, row_private_chunks, row_private_len,
                     row_items, row_num_items, item_chunks, item_num_chunks, item_row_begin,
                     item_row_end, item_partial_offset, length_delta=0, partial_capacity: int,
                     impl: str = "xla", sm_scale: float | None = None,
                     item_rows_capacity: int | None = None, block_m: int | None = None,
                     num_warps: int = 4, num_stages: int = 2, partials=None):
  """Decode attention of one query per row over a paged chunk pool, by two-phase partition.

  Args:
    q: [R, h, d] one query per row (rows >= num_rows are spare), float16/bfloat16/float32.
    k_pool, v_pool: [n_chunks, h_kv, c, d], same dtype as q; h % h_kv == 0.
    num_rows: int32 [] live rows b.
    row_private_chunks: int32 [R, P]; row_private_len: int32 [R] (at plan build time).
    row_items: int32 [R, K]; row_num_items: int32 [R].
    item_chunks: int32 [I, G]; item_num_chunks, item_row_begin, item_row_end,
      item_partial_offset: int32 [I].
    length_delta: int32 [] tokens appended to every live row since the plan was built.
    partial_capacity: Q (static), partial rows.
    impl: "pallas" | "pallas_interpret" | "xla" | "reference".
    sm_scale: score scale (static), default 1/sqrt(d).
    item_rows_capacity: static upper bound on any item's row count (default R); smaller values
      shrink the chunk-first grid ("pallas") and the dense item blocks ("xla").
    block_m, num_warps, num_stages: Pallas knobs (see `chunk_first`).
    partials: optional (o, m, l) partial buffers to write into (tests poison them with NaN).

  Returns:
    [R, h, d] in q.dtype; spare rows are zeros.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}: {impl=}")
  pallas = impl.startswith("pallas")
  R, h, h_kv, c, d = _common.check_qkv(q, k_pool, v_pool, pallas=pallas)
  g = h // h_kv
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
  private_len = effective_private_len(num_rows, row_private_len, length_delta)
  row_num_items = jnp.where(jnp.arange(R) < num_rows, row_num_items, 0).astype(jnp.int32)
  if impl == "reference":
    return _reference(q, k_pool, v_pool, private_len, row_private_chunks, row_items,
                      row_num_items, item_chunks, item_num_chunks, sm_scale)
  if partials is None:
    partials = empty_partials(h_kv, g, d, partial_capacity)
  item_args = (item_chunks, item_num_chunks, item_row_begin, item_row_end, item_partial_offset)
  row_args = (row_private_chunks, private_len, row_items, row_num_items, item_row_begin,
              item_partial_offset)
  if impl == "xla":
    partials = chunk_first_reference(q, k_pool, v_pool, *item_args, partials,
                                     partial_capacity=partial_capacity, sm_scale=sm_scale,
                                     item_rows_capacity=item_rows_capacity)
    return sequence_first_reference(q, k_pool, v_pool, *row_args, partials, sm_scale=sm_scale)
  interpret = impl == "pallas_interpret"
  partials = chunk_first(q, k_pool, v_pool, *item_args, partials,
                         partial_capacity=partial_capacity, sm_scale=sm_scale,
                         item_rows_capacity=item_rows_capacity, block_m=block_m,
                         num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  return sequence_first(q, k_pool, v_pool, *row_args, partials, sm_scale=sm_scale,
                        num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def validate_plan_arrays(*, num_rows, row_private_chunks, row_private_len, row_items,
                         row_num_items, item_chunks, item_num_chunks, item_row_begin,
                         item_row_end, item_partial_offset, partial_capacity, n_chunks, chunk_size,
                         length_delta=0, item_rows_capacity=None) -> None:
  """Eager value checks (indices in range, consistent items and rows). Raises ValueError."""
  a = {k: np.asarray(v) for k, v in dict(
      row_private_chunks=row_private_chunks, row_private_len=row_private_len, row_items=row_items,
      row_num_items=row_num_items, item_chunks=item_chunks, item_num_chunks=item_num_chunks,
      item_row_begin=item_row_begin, item_row_end=item_row_end,
      item_partial_offset=item_partial_offset).items()}
  b = int(num_rows)
  R, P = a["row_private_chunks"].shape
  I, G = a["item_chunks"].shape
  K = a["row_items"].shape[1]
  if not 0 <= b <= R:
    raise ValueError(f"num_rows out of range: {b=} {R=}")
  for name in ("row_private_chunks", "item_chunks"):
    if a[name].min(initial=0) < 0 or a[name].max(initial=0) >= n_chunks:
      raise ValueError(f"{name} holds slots outside [0, {n_chunks})")
  plen = a["row_private_len"][:b] + int(length_delta)
  if (plen < 0).any() or (plen > P * chunk_size).any():
    raise ValueError(f"private lengths outside [0, P*c]: {plen=}")
  n = a["item_num_chunks"]
  if (n < 0).any() or (n > G).any():
    raise ValueError(f"item_num_chunks outside [0, G]: {n=}")
  live = n > 0
  beg, end, off = a["item_row_begin"], a["item_row_end"], a["item_partial_offset"]
  if (live & ((beg < 0) | (end > b) | (beg >= end))).any():
    raise ValueError("live item with an empty or out-of-range row range")
  if (live & ((off < 0) | (off + end - beg > partial_capacity))).any():
    raise ValueError("live item's partial rows exceed partial_capacity")
  if item_rows_capacity is not None and (live & (end - beg > item_rows_capacity)).any():
    raise ValueError(f"a live item has more rows than {item_rows_capacity=}")
  nk = a["row_num_items"][:b]
  if (nk < 0).any() or (nk > K).any():
    raise ValueError(f"row_num_items outside [0, K]: {nk=}")
  for r in range(b):
    for i in a["row_items"][r, :nk[r]]:
      if not (0 <= i < I and live[i] and beg[i] <= r < end[i]):
        raise ValueError(f"row {r} lists item {i} that does not cover it")
