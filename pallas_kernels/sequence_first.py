"""Phase 2 of two-phase decode attention: sequence-first over each row.

One program per (row, KV head). It computes the row's private chunks straight from the pool (the
last one masked to the row's private length), then merges the chunk-first partials of the shared
items covering the row (see `chunk_first` for the partial layout) by log-sum-exp, and normalises.
The ``g`` query heads of the KV head's group are padded to ``gp = max(16, next_pow2(g))`` rows so
the score product is a Triton dot.

Spare-row convention: a row with no private tokens and no items (spare rows: pass private length 0
and 0 items) gets an all-zero output and never produces NaN.
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
def _sequence_first_kernel(
    # inputs
    row_private_chunks_ref,  # [R, P] int32 pool slots
    row_private_len_ref,  # [R] int32 private tokens (0 for spare rows)
    row_items_ref,  # [R, K] int32 shared items covering the row
    row_num_items_ref,  # [R] int32
    item_row_begin_ref,  # [I] int32
    item_partial_offset_ref,  # [I] int32
    q_ref,  # [gp, d] this (row, KV head)'s queries, zero-padded past g
    k_pool_ref,  # [n_chunks, h_kv, c, d]
    v_pool_ref,  # [n_chunks, h_kv, c, d]
    po_ref,  # [h_kv, Q * g, d] f32 partial o
    pm_ref,  # [h_kv, Q * g] f32 partial m
    pl_ref,  # [h_kv, Q * g] f32 partial l
    # outputs
    out_ref,  # [gp, d] normalised output, q dtype
    *,
    g: int,
    sm_scale: float,
):
  r = pl.program_id(0)
  j = pl.program_id(1)
  gp, d = q_ref.shape
  c = k_pool_ref.shape[2]
  q = q_ref[...]  # [gp, d]
  length = row_private_len_ref[r]

  def private_body(k, carry):
    o, m, l = carry
    slot = row_private_chunks_ref[r, k]
    kc = k_pool_ref[slot, j, :, :]  # [c, d]
    vc = v_pool_ref[slot, j, :, :]  # [c, d]
    s = plgpu.dot(q, kc, trans_b=True) * sm_scale  # [gp, c] f32
    valid = k * c + jnp.arange(c) < length  # [c]; >= 1 valid token in every visited chunk
    s = jnp.where(valid[None, :], s, NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l_new = alpha * l + p.sum(axis=-1)
    o_new = alpha[:, None] * o + plgpu.dot(p.astype(vc.dtype), vc)
    return o_new, m_new, l_new

  o0 = jnp.zeros((gp, d), jnp.float32)
  m0 = jnp.full((gp,), NEG, jnp.float32)
  l0 = jnp.zeros((gp,), jnp.float32)
  o, m, l = lax.fori_loop(0, pl.cdiv(length, c), private_body, (o0, m0, l0))

  head_valid = jnp.arange(gp) < g  # [gp]
  mask_gd = jnp.broadcast_to(head_valid[:, None], (gp, d))

  def merge_body(k, carry):
    o, m, l = carry
    item = row_items_ref[r, k]
    p_row = item_partial_offset_ref[item] + r - item_row_begin_ref[item]
    o_p = plgpu.load(po_ref.at[j, pl.ds(p_row * g, gp), :], mask=mask_gd, other=0.0)  # [gp, d]
    m_p = plgpu.load(pm_ref.at[j, pl.ds(p_row * g, gp)], mask=head_valid, other=NEG)  # [gp]
    l_p = plgpu.load(pl_ref.at[j, pl.ds(p_row * g, gp)], mask=head_valid, other=0.0)  # [gp]
    m_new = jnp.maximum(m, m_p)
    alpha = jnp.exp(m - m_new)
    beta = jnp.exp(m_p - m_new)
    return alpha[:, None] * o + beta[:, None] * o_p, m_new, alpha * l + beta * l_p

  o, m, l = lax.fori_loop(0, row_num_items_ref[r], merge_body, (o, m, l))
  safe_l = jnp.where(l > 0.0, l, 1.0)
  out = jnp.where((l > 0.0)[:, None], o / safe_l[:, None], 0.0)
  out_ref[...] = out.astype(out_ref.dtype)


# --------------------------------------------------------------------------------------------
# 2. pallas_call wrapper.
# --------------------------------------------------------------------------------------------
def _sequence_first_call(q_pad, k_pool, v_pool, row_private_chunks, row_private_len, row_items,
                         row_num_items, item_row_begin, item_partial_offset, partials, *, g,
                         sm_scale, num_warps, num_stages, interpret):
  R, h_kv, gp, d = q_pad.shape
  kernel = functools.partial(_sequence_first_kernel, g=g, sm_scale=sm_scale)
  block = pl.BlockSpec((None, None, gp, d), lambda r, j: (r, j, 0, 0))
  # no_block_spec = whole-array ref, indexed inside the kernel.
  in_specs = [pl.no_block_spec] * 6 + [block] + [pl.no_block_spec] * 5
  return pl.pallas_call(
      kernel,
      grid=(R, h_kv),
      in_specs=in_specs,
      out_specs=block,
      out_shape=jax.ShapeDtypeStruct(q_pad.shape, q_pad.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"sequence_first_{g=}",
  )(row_private_chunks, row_private_len, row_items, row_num_items, item_row_begin,
    item_partial_offset, q_pad, k_pool, v_pool, *partials)


# --------------------------------------------------------------------------------------------
# 3. Public jitted function.
# --------------------------------------------------------------------------------------------
def _check_rows(q, k_pool, v_pool, row_private_chunks, row_private_len, row_items, row_num_items,
                item_row_begin, item_partial_offset, partials, pallas):
  R, h, h_kv, c, d = _common.check_qkv(q, k_pool, v_pool, pallas=pallas)
  g = h // h_kv
  _common.check_int("row_private_chunks", row_private_chunks, (R, None))
  _common.check_int("row_private_len", row_private_len, (R,))
  _common.check_int("row_items", row_items, (R, None))
  _common.check_int("row_num_items", row_num_items, (R,))
  _common.check_int("item_row_begin", item_row_begin, (None,))
  _common.check_int("item_partial_offset", item_partial_offset, item_row_begin.shape)
  po, pm, pl_ = partials
  if (po.ndim != 3 or po.shape[0] != h_kv or po.shape[1] % g or po.shape[2] != d
      or pm.shape != po.shape[:2] or pl_.shape != po.shape[:2]
      or any(x.dtype != jnp.float32 for x in partials)):
    raise ValueError(f"partials must be float32 [h_kv, Q*g, d], [h_kv, Q*g], [h_kv, Q*g]: "
                     f"{po.shape=} {pm.shape=} {pl_.shape=} {po.dtype=} {pm.dtype=} {pl_.dtype=}")
  return R, h, h_kv, c, d, g


@functools.partial(jax.jit,
                   static_argnames=("sm_scale", "num_warps", "num_stages", "interpret"))
def sequence_first(q, k_pool, v_pool, row_private_chunks, row_private_len, row_items,
                   row_num_items, item_row_begin, item_partial_offset, partials, *,
                   sm_scale: float | None = None, num_warps: int = 4, num_stages: int = 2,
                   interpret: bool = False):
  """Private chunks of every row plus merge of its chunk-first partials (Pallas, Triton).

  Args:
    q: [R, h, d] queries.
    k_pool, v_pool: [n_chunks, h_kv, c, d].
    row_private_chunks: int32 [R, P] pool slots of each row's private chunks, root to leaf.
    row_private_len: int32 [R] private tokens of each row right now (0 for spare rows).
    row_items: int32 [R, K]; row_num_items: int32 [R] the shared items covering each row.
    item_row_begin, item_partial_offset: int32 [I] (to locate partial rows).
    partials: (o, m, l) from `chunk_first`.
    sm_scale: score scale, default 1/sqrt(d).

  Returns:
    [R, h, d] in q.dtype; zeros for rows with neither private tokens nor items.
  """
  R, h, h_kv, c, d, g = _check_rows(q, k_pool, v_pool, row_private_chunks, row_private_len,
                                    row_items, row_num_items, item_row_begin,
                                    item_partial_offset, partials, pallas=True)
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  gp = max(16, _common.next_pow2(g))
  q_pad = jnp.pad(q.reshape(R, h_kv, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  out = _sequence_first_call(q_pad, k_pool, v_pool, row_private_chunks, row_private_len,
                             row_items, row_num_items, item_row_begin, item_partial_offset,
                             tuple(partials), g=g, sm_scale=float(sm_scale), num_warps=num_warps,
                             num_stages=num_stages, interpret=interpret)
  return out[:, :, :g, :].reshape(R, h, d)


# --------------------------------------------------------------------------------------------
# 4. Plain-jnp reference of the same function (also the phase 2 of the "xla" implementation).
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("sm_scale",))
def sequence_first_reference(q, k_pool, v_pool, row_private_chunks, row_private_len, row_items,
                             row_num_items, item_row_begin, item_partial_offset, partials, *,
                             sm_scale: float | None = None):
  """Same contract as `sequence_first`, in plain XLA (gathers + einsums, fp32 softmax)."""
  R, h, h_kv, c, d, g = _check_rows(q, k_pool, v_pool, row_private_chunks, row_private_len,
                                    row_items, row_num_items, item_row_begin,
                                    item_partial_offset, partials, pallas=False)
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  P = row_private_chunks.shape[1]
  K = row_items.shape[1]
  po, pm, pl_ = partials
  Q = po.shape[1] // g
  # Private part.
  kc = k_pool[row_private_chunks]  # [R, P, h_kv, c, d]
  vc = v_pool[row_private_chunks]
  qr = q.reshape(R, h_kv, g, d)
  s = jnp.einsum("rjgd,rpjtd->rjgpt", qr, kc, preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST) * sm_scale
  tok = jnp.arange(P)[:, None] * c + jnp.arange(c)[None, :]  # [P, c]
  valid = tok[None] < row_private_len[:, None, None]  # [R, P, c]
  vmask = valid[:, None, None]
  s = jnp.where(vmask, s, NEG)
  m = s.max(axis=(-1, -2))  # [R, h_kv, g]
  p = jnp.where(vmask, jnp.exp(s - m[..., None, None]), 0.0)
  l = p.sum(axis=(-1, -2))
  o = jnp.einsum("rjgpt,rpjtd->rjgd", p.astype(vc.dtype), vc,
                 preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
  # Shared partials.
  kvalid = jnp.arange(K)[None, :] < row_num_items[:, None]  # [R, K]
  pidx = item_partial_offset[row_items] + jnp.arange(R)[:, None] - item_row_begin[row_items]
  pidx = jnp.where(kvalid, jnp.clip(pidx, 0, Q - 1), 0)
  o_p = po.reshape(h_kv, Q, g, d)[:, pidx].transpose(1, 2, 0, 3, 4)  # [R, K, h_kv, g, d]
  m_p = pm.reshape(h_kv, Q, g)[:, pidx].transpose(1, 2, 0, 3)  # [R, K, h_kv, g]
  l_p = pl_.reshape(h_kv, Q, g)[:, pidx].transpose(1, 2, 0, 3)
  kv = kvalid[:, :, None, None]
  m_p = jnp.where(kv, m_p, NEG)
  m_all = jnp.maximum(m, m_p.max(axis=1))  # [R, h_kv, g]
  a = jnp.exp(m - m_all)
  b = jnp.where(kv, jnp.exp(m_p - m_all[:, None]), 0.0)  # [R, K, h_kv, g]
  o_p = jnp.where(kv[..., None], o_p, 0.0)
  l_p = jnp.where(kv, l_p, 0.0)
  o_all = a[..., None] * o + (b[..., None] * o_p).sum(axis=1)
  l_all = a * l + (b * l_p).sum(axis=1)
  safe_l = jnp.where(l_all > 0.0, l_all, 1.0)
  out = jnp.where((l_all > 0.0)[..., None], o_all / safe_l[..., None], 0.0)
  return out.reshape(R, h, d).astype(q.dtype)
