"""Phase 1 of two-phase decode attention: chunk-first over shared work items.

One program per (shared work item, KV head, row block). A work item is a run of up to ``G`` full,
shared chunks whose rows are ``[item_row_begin, item_row_end)``. The queries of those rows, for all
``g`` query heads of the KV head's group, form one ``[rows * g, d]`` matrix (flattened row-major as
(row, head-in-group)), so the scores are a matrix-matrix product and the item's K/V is read once
per row block instead of once per sequence.

Partial layout (fp32, head-major so a program's rows are contiguous):

* ``o: [h_kv, Q * g, d]`` unnormalised ``sum_t exp(s_t - m) v_t``;
* ``m: [h_kv, Q * g]`` row max of the scaled scores (natural log base);
* ``l: [h_kv, Q * g]`` ``sum_t exp(s_t - m)``.

Partial row ``p`` (``p = item_partial_offset[i] + r - item_row_begin[i]``) of query head
``hq = j * g + gi`` lives at ``[j, p * g + gi]``. ``Q`` is ``partial_capacity``. Entries that no live
item covers are never written (they hold whatever the buffer held).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common
from pallas_kernels._common import NEG


# --------------------------------------------------------------------------------------------
# 1. Kernel body.
# --------------------------------------------------------------------------------------------
def _chunk_first_kernel(
    # inputs
    item_chunks_ref,  # [I, G] int32 pool slots
    item_num_chunks_ref,  # [I] int32, 0 = spare item
    item_row_begin_ref,  # [I] int32
    item_row_end_ref,  # [I] int32
    item_partial_offset_ref,  # [I] int32
    q_ref,  # [h_kv, R * g, d] queries, row-major (row, head in group)
    k_pool_ref,  # [n_chunks, h_kv, c, d]
    v_pool_ref,  # [n_chunks, h_kv, c, d]
    o_in_ref, m_in_ref, l_in_ref,  # aliased to the outputs below (unused)
    # outputs
    o_ref,  # [h_kv, Q * g, d] f32
    m_ref,  # [h_kv, Q * g] f32
    l_ref,  # [h_kv, Q * g] f32
    *,
    g: int,
    block_m: int,
    sm_scale: float,
):
  del o_in_ref, m_in_ref, l_in_ref
  i = pl.program_id(0)  # work item
  j = pl.program_id(1)  # KV head
  t = pl.program_id(2)  # row block inside the item
  d = q_ref.shape[-1]
  num_chunks = item_num_chunks_ref[i]
  begin = item_row_begin_ref[i]
  num_q = (item_row_end_ref[i] - begin) * g  # flattened query rows of this item
  start = t * block_m

  @pl.when((num_chunks > 0) & (start < num_q))
  def _compute():
    row_valid = start + jnp.arange(block_m) < num_q  # [block_m]
    mask_md = jnp.broadcast_to(row_valid[:, None], (block_m, d))
    q = plgpu.load(q_ref.at[j, pl.ds(begin * g + start, block_m), :], mask=mask_md,
                   other=0.0)  # [block_m, d]

    def body(k, carry):
      o, m, l = carry
      slot = item_chunks_ref[i, k]
      kc = k_pool_ref[slot, j, :, :]  # [c, d]
      vc = v_pool_ref[slot, j, :, :]  # [c, d]
      s = plgpu.dot(q, kc, trans_b=True) * sm_scale  # [block_m, c] f32; shared chunks are full
      m_new = jnp.maximum(m, s.max(axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[:, None])
      l_new = alpha * l + p.sum(axis=-1)
      o_new = alpha[:, None] * o + plgpu.dot(p.astype(vc.dtype), vc)  # f32 accumulation
      return o_new, m_new, l_new

    o0 = jnp.zeros((block_m, d), jnp.float32)
    m0 = jnp.full((block_m,), NEG, jnp.float32)
    l0 = jnp.zeros((block_m,), jnp.float32)
    o, m, l = lax.fori_loop(0, num_chunks, body, (o0, m0, l0))

    dst = item_partial_offset_ref[i] * g + start
    plgpu.store(o_ref.at[j, pl.ds(dst, block_m), :], o, mask=mask_md)
    plgpu.store(m_ref.at[j, pl.ds(dst, block_m)], m, mask=row_valid)
    plgpu.store(l_ref.at[j, pl.ds(dst, block_m)], l, mask=row_valid)


# --------------------------------------------------------------------------------------------
# 2. pallas_call wrapper.
# --------------------------------------------------------------------------------------------
def _chunk_first_call(q_flat, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin,
                      item_row_end, item_partial_offset, partials, *, g, item_rows_capacity,
                      block_m, sm_scale, num_warps, num_stages, interpret):
  h_kv = k_pool.shape[1]
  num_items = item_chunks.shape[0]
  row_blocks = pl.cdiv(item_rows_capacity * g, block_m)
  kernel = functools.partial(_chunk_first_kernel, g=g, block_m=block_m, sm_scale=sm_scale)
  out_shape = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in partials]
  # Plan arrays, q and the pools are whole-array refs (no BlockSpec): the kernel indexes them.
  return pl.pallas_call(
      kernel,
      grid=(num_items, h_kv, row_blocks),
      out_shape=out_shape,
      # Outputs alias the caller's partial buffers: unwritten entries keep their values.
      input_output_aliases={8: 0, 9: 1, 10: 2},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"chunk_first_{g=}_{block_m=}",
  )(item_chunks, item_num_chunks, item_row_begin, item_row_end, item_partial_offset, q_flat,
    k_pool, v_pool, *partials)


# --------------------------------------------------------------------------------------------
# 3. Public jitted function.
# --------------------------------------------------------------------------------------------
def flatten_queries(q, h_kv: int):
  """q [R, h, d] -> [h_kv, R * g, d] (row-major over (row, head in group))."""
  R, h, d = q.shape
  g = h // h_kv
  return q.reshape(R, h_kv, g, d).transpose(1, 0, 2, 3).reshape(h_kv, R * g, d)


def empty_partials(h_kv: int, g: int, d: int, partial_capacity: int, fill=0.0):
  """A partial buffer (o, m, l) in the layout of the module docstring, filled with `fill`."""
  rows = partial_capacity * g
  return (jnp.full((h_kv, rows, d), fill, jnp.float32), jnp.full((h_kv, rows), fill, jnp.float32),
          jnp.full((h_kv, rows), fill, jnp.float32))


def default_block_m(item_rows_capacity: int, g: int) -> int:
  """Flattened query rows per program: all the item's rows up to 64, at least 16 (Triton dot)."""
  return min(64, max(16, _common.next_pow2(item_rows_capacity * g)))


def _check_items(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin, item_row_end,
                 item_partial_offset, partials, partial_capacity, pallas):
  R, h, h_kv, c, d = _common.check_qkv(q, k_pool, v_pool, pallas=pallas)
  _common.check_int("item_chunks", item_chunks, (None, None))
  num_items = item_chunks.shape[0]
  for name, x in (("item_num_chunks", item_num_chunks), ("item_row_begin", item_row_begin),
                  ("item_row_end", item_row_end), ("item_partial_offset", item_partial_offset)):
    _common.check_int(name, x, (num_items,))
  if partial_capacity < 1:
    raise ValueError(f"partial_capacity must be >= 1: {partial_capacity=}")
  g = h // h_kv
  if partials is not None:
    want = ((h_kv, partial_capacity * g, d), (h_kv, partial_capacity * g), (h_kv, partial_capacity * g))
    got = tuple(x.shape for x in partials)
    if got != want or any(x.dtype != jnp.float32 for x in partials):
      raise ValueError(f"partials must be float32 of shapes {want}: "
                       f"{got=} {tuple(x.dtype for x in partials)=}")
  return R, h, h_kv, c, d, g


@functools.partial(
    jax.jit,
    static_argnames=("partial_capacity", "sm_scale", "item_rows_capacity", "block_m", "num_warps",
                     "num_stages", "interpret"))
def chunk_first(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin, item_row_end,
                item_partial_offset, partials=None, *, partial_capacity: int,
                sm_scale: float | None = None, item_rows_capacity: int | None = None,
                block_m: int | None = None, num_warps: int = 4, num_stages: int = 2,
                interpret: bool = False):
  """Chunk-first partial attention of every shared work item (Pallas, Triton backend).

  Args:
    q: [R, h, d] queries (one per row), float16/bfloat16/float32.
    k_pool, v_pool: [n_chunks, h_kv, c, d], same dtype as q.
    item_chunks: int32 [I, G] pool slots of each item's (full) chunks.
    item_num_chunks: int32 [I] valid chunks per item; 0 = spare item (writes nothing).
    item_row_begin, item_row_end: int32 [I] the item's rows [begin, end).
    item_partial_offset: int32 [I] first partial row of the item.
    partials: optional (o, m, l) buffers to write into (see module docstring); default zeros.
    partial_capacity: Q, partial rows.
    sm_scale: score scale, default 1/sqrt(d).
    item_rows_capacity: an upper bound on end - begin of any item (default R).
    block_m: flattened query rows (rows x g) per program, power of two >= 16.
    num_warps, num_stages: Triton compiler knobs.
    interpret: run the kernel in Pallas interpret mode (CPU).

  Returns:
    (o f32 [h_kv, Q*g, d], m f32 [h_kv, Q*g], l f32 [h_kv, Q*g]).
  """
  R, h, h_kv, c, d, g = _check_items(q, k_pool, v_pool, item_chunks, item_num_chunks,
                                     item_row_begin, item_row_end, item_partial_offset, partials,
                                     partial_capacity, pallas=True)
  item_rows_capacity = R if item_rows_capacity is None else item_rows_capacity
  block_m = default_block_m(item_rows_capacity, g) if block_m is None else block_m
  if not _common.is_pow2(block_m) or block_m < 16:
    raise ValueError(f"block_m must be a power of two >= 16: {block_m=}")
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  if partials is None:
    partials = empty_partials(h_kv, g, d, partial_capacity)
  return _chunk_first_call(
      flatten_queries(q, h_kv), k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin,
      item_row_end, item_partial_offset, tuple(partials), g=g,
      item_rows_capacity=item_rows_capacity, block_m=block_m, sm_scale=float(sm_scale),
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)


# --------------------------------------------------------------------------------------------
# 4. Plain-jnp reference of the same function (also the phase 1 of the "xla" implementation).
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("partial_capacity", "sm_scale", "item_rows_capacity"))
def chunk_first_reference(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin,
                          item_row_end, item_partial_offset, partials=None, *,
                          partial_capacity: int, sm_scale: float | None = None,
                          item_rows_capacity: int | None = None):
  """Same contract as `chunk_first`, in plain XLA (gathers + einsums, fp32 accumulation).

  Every item is computed as a dense [item_rows_capacity * g, G * c] block (rows past `end` and
  chunks past `item_num_chunks` are masked and not written).
  """
  R, h, h_kv, c, d, g = _check_items(q, k_pool, v_pool, item_chunks, item_num_chunks,
                                     item_row_begin, item_row_end, item_partial_offset, partials,
                                     partial_capacity, pallas=False)
  RI = R if item_rows_capacity is None else item_rows_capacity
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  num_items, G = item_chunks.shape
  if partials is None:
    partials = empty_partials(h_kv, g, d, partial_capacity)
  rel = jnp.arange(RI, dtype=jnp.int32)
  rows = item_row_begin[:, None] + rel  # [I, RI]
  live = (rows < item_row_end[:, None]) & (item_num_chunks[:, None] > 0)
  qi = q.reshape(R, h_kv, g, d)[jnp.clip(rows, 0, R - 1)]  # [I, RI, h_kv, g, d]
  kc = k_pool[item_chunks]  # [I, G, h_kv, c, d]
  vc = v_pool[item_chunks]
  s = jnp.einsum("irjgd,injtd->ijrgnt", qi, kc, preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST) * sm_scale
  chunk_valid = jnp.arange(G)[None, :] < item_num_chunks[:, None]  # [I, G]
  s = jnp.where(chunk_valid[:, None, None, None, :, None], s, NEG)
  m = s.max(axis=(-1, -2))  # [I, h_kv, RI, g]
  p = jnp.exp(s - m[..., None, None])
  p = jnp.where(chunk_valid[:, None, None, None, :, None], p, 0.0)
  l = p.sum(axis=(-1, -2))
  o = jnp.einsum("ijrgnt,injtd->ijrgd", p.astype(vc.dtype), vc,
                 preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
  pidx = jnp.where(live, item_partial_offset[:, None] + rel, partial_capacity)  # [I, RI]
  po, pm, pl_ = partials
  po = po.reshape(h_kv, partial_capacity, g, d).at[:, pidx].set(
      o.transpose(1, 0, 2, 3, 4), mode="drop").reshape(po.shape)
  pm = pm.reshape(h_kv, partial_capacity, g).at[:, pidx].set(
      m.transpose(1, 0, 2, 3), mode="drop").reshape(pm.shape)
  pl_ = pl_.reshape(h_kv, partial_capacity, g).at[:, pidx].set(
      l.transpose(1, 0, 2, 3), mode="drop").reshape(pl_.shape)
  return po, pm, pl_
