"""Phase 2 of two-phase decode attention: sequence-first over each row.

One program per (row, KV head). It attends the row's ``g`` query heads to the row's private chunks
straight from the pool (only the valid tokens of the last one are read), merges the chunk-first
partials of the shared items covering the row (``row_num_items[r]`` partial slots, read as
contiguous ``[slots, gp, d]`` blocks: no chain of dependent loads), normalises, and writes the
output in q's natural ``[R, h, d]`` layout. Live rows, the private length and the spare-row rule
come from ``num_rows`` and ``length_delta`` inside the kernel (no glue kernels around it).

Two ways to compute the private scores, chosen statically by the group size:

* CUDA cores (``g <= 2``, MHA and small groups): no padding of one query head to a 16-row MMA.
  Each of the ``block_n`` token lanes of a K/V tile keeps its own running max, sum and
  ``[d]`` accumulator across tiles; the lanes are merged once after the loop, so the loop body is
  element-wise and needs no cross-warp reduction (no barrier) per tile.
* Tensor cores (``g >= 4``): the group's queries, padded to ``max(16, gp)`` rows, as one
  ``[rows, d] x [d, block_n]`` product per tile, with a standard online softmax.

Spare-row convention: rows ``>= num_rows`` (and live rows with no private token and no item) get an
all-zero output and never produce NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common
from pallas_kernels._common import NEG

# Largest group size computed on CUDA cores (per-head [block_n, d] accumulators in registers).
CUDA_CORE_MAX_GROUP = 2
# Elements of one partial block [slots, gp, d] held in registers while merging.
MERGE_BLOCK_ELEMS = 2048
# Private chunk slots read into registers at a time on the tensor-core path.
SLOT_BLOCK = 16


def mma_rows(nq: int, dtype, d: int) -> int:
  """Rows of the tensor-core path's query block for nq queries per (row, KV head): 16 (one
  warp's MMA) up to 16 queries at d <= 128; for 16-bit inputs otherwise at least 64, one
  warpgroup MMA per 64 rows, so the row statistics stay inside each warp (a 32-row block, or 16
  rows over several warps, would split its columns across warps: 6 barriers per tile at d = 256,
  where a [16, 256] fp32 accumulator does not fit one warp). fp32 products run on CUDA cores,
  where 64 padded rows would spill: no padding."""
  gp = max(16, _common.partial_heads(nq))
  if jnp.dtype(dtype).itemsize > 2 or (gp == 16 and d <= 128):
    return gp
  return max(64, gp)


@dataclasses.dataclass(frozen=True)
class SequenceFirstConfig:
  """Tuning knobs of the sequence-first kernel (static; hashable).

  Attributes:
    block_n: tokens per K/V tile; a power of two dividing the chunk size, >= 16.
    num_warps: warps per program.
    num_stages: software-pipeline depth of the tensor-core tile loop (tiles in flight while one
      is computed = num_stages - 2). The CUDA-core loop prefetches two tiles by hand instead
      (the compiler pipelines only loads that feed a dot) and ignores it.
    cuda_core: compute private scores on CUDA cores (default: iff g <= CUDA_CORE_MAX_GROUP).
  """

  block_n: int = 32
  num_warps: int = 4
  num_stages: int = 4
  cuda_core: bool | None = None

  def __post_init__(self):
    if not _common.is_pow2(self.block_n) or self.block_n < 16:
      raise ValueError(f"block_n must be a power of two >= 16: {self.block_n=}")
    if self.num_warps not in (1, 2, 4, 8):
      raise ValueError(f"num_warps must be 1, 2, 4 or 8: {self.num_warps=}")
    if not 1 <= self.num_stages <= 6:
      raise ValueError(f"num_stages must be in [1, 6]: {self.num_stages=}")

  @classmethod
  def default(cls, *, d: int, c: int, g: int, dtype,
              tokens_per_row: int = 1) -> "SequenceFirstConfig":
    """Heuristic, from the sm_90a resource table (docs/kernels.md).

    CUDA cores (g <= 2): 4 warps (8 for fp32 at d = 256), tiles of ~4K 16-bit (2K fp32) elements
    per head accumulator. Tensor cores: one warp per program where a [16, d] fp32 accumulator
    fits its registers (16-bit inputs at d <= 128, fp32 at d <= 64), so row max and sum never
    leave the warp (with more warps a 16-row MMA splits a tile's columns across warps and every
    row statistic needs a shared-memory round trip); fp32 at d > 64: 4 warps. 4 stages = 2 tiles
    in flight. 16-bit inputs with more than 16 queries per (row, KV head) (T * g, rows with T > 1
    new tokens), or any group at d = 256, are padded to 64-row blocks (`mma_rows`): 4 warps (a
    warpgroup MMA) at d <= 128; 8 warps and 6 stages (4 tiles in flight) at d = 256.
    """
    itemsize = jnp.dtype(dtype).itemsize
    nq = g * tokens_per_row
    if nq <= CUDA_CORE_MAX_GROUP:
      elems = 4096 if itemsize <= 2 else 2048
      return cls(block_n=max(16, min(c, elems // (d * nq))),
                 num_warps=8 if (itemsize == 4 and d >= 256) else 4, num_stages=1,
                 cuda_core=True)
    rows = mma_rows(nq, dtype, d)
    stages = 4
    if rows == 16:
      warps = 1 if d <= (128 if itemsize <= 2 else 64) else 4
    elif itemsize <= 2 and d >= 256:
      # A [64, 256] accumulator spills with 4 warps; 8 split its columns over two warpgroups
      # (3 barriers per tile) and leave one program per SM, so 6 stages keep 4 tiles in flight.
      warps, stages = 8, 6
    else:
      warps = 4 if rows <= 64 and itemsize <= 2 or rows <= 32 else 8
    return cls(block_n=min(c, 32 if d <= 64 and itemsize <= 2 else 16), num_warps=warps,
               num_stages=stages, cuda_core=False)


# --------------------------------------------------------------------------------------------
# 1. Kernel body.
# --------------------------------------------------------------------------------------------
def _tile_loader(k_ref, v_ref, slots_ref, r, j, length, *, h_kv, c, block_n):
  """Functions (slot_of(n), load(n, slot)) for tile n of the row's private tokens."""
  d = k_ref.shape[-1]
  col = jnp.arange(d)[None, :]
  tok = jnp.arange(block_n)
  tiles_per_chunk = c // block_n
  P = slots_ref.shape[1]

  def slot_of(n):
    chunk, _ = _common.divmod_static(n, tiles_per_chunk)
    return slots_ref[r, jnp.minimum(chunk, P - 1)]  # tiles past the end are masked below

  def load(n, slot):
    _, tile = _common.divmod_static(n, tiles_per_chunk)
    valid = n * block_n + tok < length  # only valid tokens are read: the tail is partial
    kv_row = (slot * h_kv + j) * c + tile * block_n + tok
    kt = plgpu.load(k_ref.at[kv_row[:, None], col], mask=valid[:, None], other=0.0)
    vt = plgpu.load(v_ref.at[kv_row[:, None], col], mask=valid[:, None], other=0.0)
    return kt, vt

  return slot_of, load


def _private_cuda_core(q_ref, k_ref, v_ref, slots_ref, r, j, length, *, g, T, h, h_kv, c,
                       block_n, sm_scale):
  """Private attention of one (row, KV head) on CUDA cores.

  The compiler pipelines only loads that feed a dot, so the tile loop prefetches by hand: tile n+2
  is requested (and the slot of tile n+3) before tile n, loaded two iterations earlier, is used.

  Returns per query qn = t * g + gi < T * g: (o [d] unnormalised, m [], l []) as lists.
  """
  d = q_ref.shape[-1]
  tok = jnp.arange(block_n)
  slot_of, load = _tile_loader(k_ref, v_ref, slots_ref, r, j, length, h_kv=h_kv, c=c,
                               block_n=block_n)
  queries = [divmod(qn, g) for qn in range(T * g)]  # (token, head in group)
  qs = [q_ref[(r * T + t) * h + j * g + gi, :].astype(jnp.float32) * sm_scale
        for t, gi in queries]
  # Token t of the row's T new ones sees the private tokens before it (causal inside the tail).
  limits = [length - (T - 1 - t) for t, _ in queries]

  def body(n, carry):
    lanes, tile_n, tile_n1, slot_n2 = carry
    slot_n3 = slot_of(n + 3)
    tile_n2 = load(n + 2, slot_n2)
    kt, vt = (x.astype(jnp.float32) for x in tile_n)
    pos = n * block_n + tok
    out = []
    for qn, limit in enumerate(limits):
      o, m, l = lanes[qn]
      valid = pos < limit
      s = jnp.where(valid, jnp.sum(kt * qs[qn][None, :], axis=1), NEG)  # [block_n]
      m_new = jnp.maximum(m, s)
      alpha = jnp.exp(m - m_new)
      p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
      out.append((alpha[:, None] * o + p[:, None] * vt, m_new, alpha * l + p))
    return tuple(out), tile_n1, tile_n2, slot_n3

  lanes = tuple((jnp.zeros((block_n, d), jnp.float32), jnp.full((block_n,), NEG, jnp.float32),
                 jnp.zeros((block_n,), jnp.float32)) for _ in queries)
  init = (lanes, load(0, slot_of(0)), load(1, slot_of(1)), slot_of(2))
  lanes = lax.fori_loop(0, pl.cdiv(length, block_n), body, init)[0]
  result = []
  for o, m, l in lanes:  # merge the token lanes
    m_all = m.max()
    w = jnp.exp(m - m_all)
    result.append(((w[:, None] * o).sum(axis=0), m_all, (w * l).sum()))
  return result


def _private_mma(q_ref, k_ref, v_ref, slots_ref, r, j, length, *, g, T, rows, h, h_kv, c,
                 block_n, sm_scale, precision):
  """Private attention of one (row, KV head) on tensor cores.

  Slots are read `SLOT_BLOCK` at a time into registers outside the (software-pipelined) tile loop,
  so no K/V address in that loop waits for a load.

  Returns (o [rows, d] unnormalised, m [rows], l [rows]); row qn = t * g + gi is query head gi
  of the row's new token t; rows >= T * g are padding.
  """
  d = q_ref.shape[-1]
  col = jnp.arange(d)[None, :]
  tok = jnp.arange(block_n)
  tiles_per_chunk = c // block_n
  P = slots_ref.shape[1]
  sb = min(SLOT_BLOCK, P)
  qn = jnp.arange(rows)
  t, gi = _common.divmod_static(qn, g)
  q = plgpu.load(q_ref.at[((r * T + t) * h + j * g + gi)[:, None], col],
                 mask=(qn < T * g)[:, None], other=0.0)  # [rows, d]
  limit = length - (T - 1 - t)  # [rows]: causal inside the row's new tokens
  _, load = _tile_loader(k_ref, v_ref, slots_ref, r, j, length, h_kv=h_kv, c=c, block_n=block_n)
  num_chunks = pl.cdiv(length, c)
  num_tiles = pl.cdiv(length, block_n)

  def block(b, carry):
    slots = slots_ref[r, pl.ds(b * sb, sb)]  # [sb]

    def body(n, carry):
      o, m, l = carry
      chunk, _ = _common.divmod_static(n, tiles_per_chunk)
      kt, vt = load(n, jnp.sum(jnp.where(jnp.arange(sb) == chunk - b * sb, slots, 0)))
      pos = n * block_n + tok
      valid = (pos[None, :] < limit[:, None]) if T > 1 else (pos < length)[None, :]
      s = plgpu.dot(q, kt, trans_b=True, precision=precision) * sm_scale  # [rows, block_n]
      s = jnp.where(valid, s, NEG)
      m_new = jnp.maximum(m, s.max(axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
      o_new = alpha[:, None] * o + plgpu.dot(p.astype(vt.dtype), vt, precision=precision)
      return o_new, m_new, alpha * l + p.sum(axis=-1)

    first = b * sb * tiles_per_chunk
    return lax.fori_loop(first, jnp.minimum(first + sb * tiles_per_chunk, num_tiles), body, carry)

  init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), NEG, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  return lax.fori_loop(0, pl.cdiv(num_chunks, sb), block, init)


def _stack_heads(xs):
  """[x_0, ..., x_{n-1}] (scalars or vectors) -> [n, ...] by broadcasting and selects (the Triton
  lowering stacks only pairs of tensors, only along the last axis, and no scalars)."""
  idx = jnp.arange(len(xs)).reshape((len(xs),) + (1,) * jnp.ndim(xs[0]))
  out = jnp.broadcast_to(xs[0], idx.shape[:1] + jnp.shape(xs[0]))
  for k, x in enumerate(xs[1:], 1):
    out = jnp.where(idx == k, x, out)
  return out


def _sequence_first_kernel(
    # inputs
    num_rows_ref,  # [1] int32 live rows
    length_delta_ref,  # [1] int32 tokens appended to every live row since the plan was built
    row_private_chunks_ref,  # [R, P] int32 pool slots
    row_private_len_ref,  # [R] int32 private tokens at plan build time
    row_num_items_ref,  # [R] int32 partial slots in use
    q_ref,  # [R * T * h, d] (q [R, T, h, d] flattened)
    k_ref,  # [n_chunks * h_kv * c, d]
    v_ref,  # [n_chunks * h_kv * c, d]
    *refs,  # with K > 0: po_ref [R * h_kv * K * gp, d] f32 normalised partial outputs and
    #         plse_ref [R * h_kv * K * gp] f32 partial log-sum-exp; then the output:
    #         out_ref [R * T * h, d] normalised output, q dtype
    g: int,
    T: int,
    h: int,
    h_kv: int,
    K: int,
    c: int,
    block_n: int,
    cuda_core: bool,
    sm_scale: float,
):
  po_ref, plse_ref, out_ref = refs if K else (None, None, *refs)
  r = pl.program_id(0)
  j = pl.program_id(1)
  d = q_ref.shape[-1]
  nq = T * g  # queries of this (row, KV head): (token, head in group), token-major
  gp = _common.partial_heads(nq)
  live = r < num_rows_ref[0]
  length = jnp.where(live, row_private_len_ref[r] + length_delta_ref[0], 0)
  num_items = jnp.where(live, row_num_items_ref[r], 0)
  kw = dict(g=g, T=T, h=h, h_kv=h_kv, c=c, block_n=block_n, sm_scale=sm_scale)

  # Private part as per-query running state (o unnormalised [rows, d], m [rows], l [rows]).
  if cuda_core:
    per_query = _private_cuda_core(q_ref, k_ref, v_ref, row_private_chunks_ref, r, j, length, **kw)
    rows = gp  # == nq for nq in (1, 2)
    o, m, l = (_stack_heads([x[n] for x in per_query]) for n in range(3))
  else:
    rows = mma_rows(nq, q_ref.dtype, d)
    o, m, l = _private_mma(q_ref, k_ref, v_ref, row_private_chunks_ref, r, j, length, rows=rows,
                           precision=_common.dot_precision(q_ref.dtype), **kw)

  # Merge partial slots [0, num_items), `block_k` at a time; the addresses depend only on (r, j).
  # Like the private lanes above, each of the block's slot lanes keeps its own running max/sum,
  # so the loop is element-wise (no cross-warp reduction, no barrier) and lanes are merged once.
  block_k = max(1, min(K, MERGE_BLOCK_ELEMS // (rows * d)))
  qn = jnp.arange(rows)
  query_ok = qn < gp

  def merge(n, carry):
    o_k, m_k, l_k = carry  # [block_k, rows, d], [block_k, rows], [block_k, rows]
    k = n * block_k + jnp.arange(block_k)  # [block_k]
    ok = (k < num_items)[:, None] & query_ok[None, :]  # [block_k, rows]
    idx = ((r * h_kv + j) * K + k[:, None]) * gp + qn[None, :]  # [block_k, rows]
    lse = plgpu.load(plse_ref.at[idx], mask=ok, other=NEG)
    op = plgpu.load(po_ref.at[idx[:, :, None], jnp.arange(d)[None, None, :]], mask=ok[:, :, None],
                    other=0.0)  # [block_k, rows, d]
    m_new = jnp.maximum(m_k, lse)
    alpha = jnp.exp(m_k - m_new)
    w = jnp.where(ok, jnp.exp(lse - m_new), 0.0)
    return alpha[..., None] * o_k + w[..., None] * op, m_new, alpha * l_k + w

  if K:
    lanes = (jnp.zeros((block_k, rows, d), jnp.float32),
             jnp.full((block_k, rows), NEG, jnp.float32), jnp.zeros((block_k, rows), jnp.float32))
    o_k, m_k, l_k = lax.fori_loop(0, pl.cdiv(num_items, block_k), merge, lanes)
    m_all = jnp.maximum(m, m_k.max(axis=0))
    alpha = jnp.exp(m - m_all)
    beta = jnp.exp(m_k - m_all[None, :])  # [block_k, rows]
    o = alpha[:, None] * o + (beta[..., None] * o_k).sum(axis=0)
    l = alpha * l + (beta * l_k).sum(axis=0)
  out = jnp.where((l > 0.0)[:, None], o / jnp.where(l > 0.0, l, 1.0)[:, None], 0.0)
  t, gi = _common.divmod_static(qn, g)
  plgpu.store(out_ref.at[((r * T + t) * h + j * g + gi)[:, None], jnp.arange(d)[None, :]],
              out.astype(out_ref.dtype), mask=(qn < nq)[:, None])


# --------------------------------------------------------------------------------------------
# 2. pallas_call wrapper.
# --------------------------------------------------------------------------------------------
def _sequence_first_call(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                         row_private_len, row_num_items, partials, *, config, sm_scale, interpret):
  R, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  T = _common.tokens_per_row(q)
  n_chunks, h_kv, c, _ = k_pool.shape
  g = h // h_kv
  K = 0 if partials is None else partials[0].shape[2]
  partial_args = () if partials is None else (partials[0].reshape(-1, d), partials[1].reshape(-1))
  cuda_core = (T * g <= CUDA_CORE_MAX_GROUP) if config.cuda_core is None else config.cuda_core
  kernel = functools.partial(_sequence_first_kernel, g=g, T=T, h=h, h_kv=h_kv, K=K, c=c,
                             block_n=min(config.block_n, c), cuda_core=cuda_core,
                             sm_scale=sm_scale)
  out = pl.pallas_call(
      kernel,
      grid=(R, h_kv),
      out_shape=jax.ShapeDtypeStruct((R * T * h, d), q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name=(f"sequence_first_g{g}{f'_t{T}' if T > 1 else ''}_n{config.block_n}"
            f"_{'cuda' if cuda_core else 'mma'}"),
  )(num_rows.reshape(1), length_delta.reshape(1), row_private_chunks, row_private_len,
    row_num_items, q.reshape(R * T * h, d), k_pool.reshape(n_chunks * h_kv * c, d),
    v_pool.reshape(n_chunks * h_kv * c, d), *partial_args)
  return out.reshape(q.shape)


# --------------------------------------------------------------------------------------------
# 3. Public jitted function.
# --------------------------------------------------------------------------------------------
def _check_rows(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks, row_private_len,
                row_num_items, partials, pallas):
  R, h, h_kv, c, d = _common.check_qkv(q, k_pool, v_pool, pallas=pallas)
  g = h // h_kv
  for name, x in (("num_rows", num_rows), ("length_delta", length_delta)):
    if x.shape != () or x.dtype != jnp.int32:
      raise ValueError(f"{name} must be an int32 scalar: {x.shape=} {x.dtype=}")
  _common.check_int("row_private_chunks", row_private_chunks, (R, None))
  _common.check_int("row_private_len", row_private_len, (R,))
  _common.check_int("row_num_items", row_num_items, (R,))
  if partials is None:
    return R, h, h_kv, c, d, g
  if len(partials) != 2 or partials[0].ndim != 5:
    raise ValueError(f"partials must be (o [R, h_kv, K, gp, d], lse [R, h_kv, K, gp]): "
                     f"{tuple(x.shape for x in partials)=}")
  K = partials[0].shape[2]
  nq = _common.tokens_per_row(q) * g
  _common.check_partials(partials, R, h_kv, K, _common.partial_heads(nq), d)
  return R, h, h_kv, c, d, g


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret"))
def sequence_first(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks, row_private_len,
                   row_num_items, partials, *, sm_scale: float | None = None,
                   config: SequenceFirstConfig | None = None, interpret: bool = False):
  """Private chunks of every row plus the merge of its chunk-first partials (Pallas, Triton).

  Args:
    q: [R, h, d] queries, or [R, T, h, d]: the row's last T tokens (all private), each attending
      to the shared items, the private tokens before it and itself (causal inside the tail).
    k_pool, v_pool: [n_chunks, h_kv, c, d].
    num_rows: int32 [] live rows; rows >= num_rows get zeros.
    length_delta: int32 [] tokens appended to every live row since the plan was built.
    row_private_chunks: int32 [R, P] pool slots of each row's private chunks, root to leaf.
    row_private_len: int32 [R] private tokens of each row at plan build time.
    row_num_items: int32 [R] partial slots in use per row (slots [0, n) are merged).
    partials: (o f32 [R, h_kv, K, gp, d], lse f32 [R, h_kv, K, gp]) from `chunk_first`, or None
      when the plan has no shared items (then `row_num_items` is not read).
    sm_scale: score scale, default 1/sqrt(d).
    config: tuning knobs (default `SequenceFirstConfig.default`).
    interpret: run the kernel in Pallas interpret mode (CPU).

  Returns:
    q's shape and dtype; zeros for spare rows and rows with neither private tokens nor items.
  """
  num_rows = jnp.asarray(num_rows, jnp.int32)
  length_delta = jnp.asarray(length_delta, jnp.int32)
  R, h, h_kv, c, d, g = _check_rows(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                                    row_private_len, row_num_items, partials, pallas=True)
  T = _common.tokens_per_row(q)
  if config is None:
    config = SequenceFirstConfig.default(d=d, c=c, g=g, dtype=q.dtype, tokens_per_row=T)
  if c % config.block_n and config.block_n < c:
    raise ValueError(f"block_n must divide the chunk size: {config.block_n=} {c=}")
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  if partials is not None:
    partials = tuple(partials)
  if config.cuda_core and T * g > CUDA_CORE_MAX_GROUP:
    raise ValueError(f"cuda_core supports up to {CUDA_CORE_MAX_GROUP} queries per (row, KV head) "
                     f"(tokens per row x group): {T=} {g=}")
  return _sequence_first_call(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                              row_private_len, row_num_items, partials, config=config,
                              sm_scale=float(sm_scale), interpret=interpret)


# --------------------------------------------------------------------------------------------
# 4. Plain-jnp reference of the same function (also the phase 2 of the "xla" implementation).
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("sm_scale",))
def sequence_first_reference(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                             row_private_len, row_num_items, partials, *,
                             sm_scale: float | None = None):
  """Same contract as `sequence_first`, in plain XLA (gathers + einsums, fp32 softmax)."""
  num_rows = jnp.asarray(num_rows, jnp.int32)
  length_delta = jnp.asarray(length_delta, jnp.int32)
  R, h, h_kv, c, d, g = _check_rows(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                                    row_private_len, row_num_items, partials, pallas=False)
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  P = row_private_chunks.shape[1]
  live = jnp.arange(R) < num_rows
  length = jnp.where(live, row_private_len + length_delta, 0)
  num_items = jnp.where(live, row_num_items, 0)
  T = _common.tokens_per_row(q)
  nq = T * g  # queries of one (row, KV head): (token, head in group), token-major
  # Private part; token t of the row's T new ones sees private positions < length - (T - 1 - t).
  kc = k_pool[row_private_chunks]  # [R, P, h_kv, c, d]
  vc = v_pool[row_private_chunks]
  qr = q.reshape(R, T, h_kv, g, d).transpose(0, 2, 1, 3, 4).reshape(R, h_kv, nq, d)
  s = jnp.einsum("rjgd,rpjtd->rjgpt", qr, kc, preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST) * sm_scale
  tok = jnp.arange(P)[:, None] * c + jnp.arange(c)[None, :]  # [P, c]
  limit = length[:, None] - (T - 1 - jnp.arange(nq) // g)[None, :]  # [R, nq]
  vmask = (tok[None, None] < limit[:, :, None, None])[:, None]  # [R, 1, nq, P, c]
  s = jnp.where(vmask, s, NEG)
  m = s.max(axis=(-1, -2))  # [R, h_kv, nq]
  p = jnp.where(vmask, jnp.exp(s - m[..., None, None]), 0.0)
  l = p.sum(axis=(-1, -2))
  o = jnp.einsum("rjgpt,rpjtd->rjgd", p.astype(vc.dtype), vc,
                 preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
  # Shared partials: slots [0, num_items) of each row.
  po, plse = partials
  K = po.shape[2]
  ok = (jnp.arange(K)[None, :] < num_items[:, None])[:, None, :, None]  # [R, 1, K, 1]
  lse = jnp.where(ok, plse[..., :nq], NEG)  # [R, h_kv, K, nq]
  op = jnp.where(ok[..., None], po[..., :nq, :], 0.0)  # [R, h_kv, K, nq, d]
  m_all = jnp.maximum(m, lse.max(axis=2))  # [R, h_kv, nq]
  a = jnp.exp(m - m_all)
  w = jnp.where(ok, jnp.exp(lse - m_all[:, :, None]), 0.0)  # [R, h_kv, K, nq]
  o_all = a[..., None] * o + (w[..., None] * op).sum(axis=2)
  l_all = a * l + w.sum(axis=2)
  out = jnp.where((l_all > 0.0)[..., None], o_all / jnp.where(l_all > 0.0, l_all, 1.0)[..., None],
                  0.0)  # [R, h_kv, nq, d]
  out = out.reshape(R, h_kv, T, g, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(q.shape).astype(q.dtype)
