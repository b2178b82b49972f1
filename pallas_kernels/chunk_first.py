"""Phase 1 of two-phase decode attention: chunk-first over shared work items.

One program per (shared work item, KV head, row block). A work item is a piece of a run of full,
shared chunks (at most ``G`` chunks) whose rows are ``[item_row_begin, item_row_end)``; long runs
are split into several items by the plan so that the phase has enough programs to fill the GPU.
The queries of the item's rows, for all ``g`` query heads of the KV head's group (and all ``T``
new tokens of each row when rows carry several), form one ``[rows * T * g, d]`` matrix (flattened
row-major as (row, token, head in group)), so the scores are a matrix-matrix product and the
item's K/V is read once per row block instead of once per row. Shared chunks precede every new
token, so no causal mask applies here.

q is read in its natural ``[R, h, d]`` layout and K/V straight from the pool, by computed row
indices (no transposed or padded copies). The item's ``G`` pool slots are read once, before the
tile loop, so every K/V address in the loop is arithmetic on registers: the compiler's software
pipeline can then keep ``num_stages - 1`` tiles in flight (a slot read inside the loop would make
each tile's address wait for a load, and the pipeline would collapse to one tile).

Each program writes, per (row, query head), a normalised partial output and its log-sum-exp, fp32,
at the item's *slot* ``k = item_slot[i]``: the item's position in the list of items of every row it
covers (the same for all of them, by construction of the plan). Partial layout
(``gp = next_pow2(T * g)``, ``K`` slots per row; query ``(t, gi)`` at ``t * g + gi``):

* ``o: [R, h_kv, K, gp, d]`` ``sum_t softmax(s)_t v_t`` over the item's tokens;
* ``lse: [R, h_kv, K, gp]`` ``log(sum_t exp(s_t))`` of the scaled scores (natural log).

So one row's partials for one KV head are one contiguous ``[K * gp, d]`` block, which phase 2 reads
with one masked load per block of slots. Entries no live item covers are never written.
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

@dataclasses.dataclass(frozen=True)
class ChunkFirstConfig:
  """Tuning knobs of the chunk-first kernel (static; hashable).

  Attributes:
    block_m: flattened query rows (rows x g) per program; power of two >= 16 (Triton's dot).
      64 lets Hopper use one warpgroup MMA (wgmma) with row statistics inside each warp.
    block_n: tokens per K/V tile; a power of two >= 16 (capped at the chunk size).
    num_warps: warps per program.
    num_stages: software-pipeline depth of the K/V tile loop (tiles in flight while one is
      computed = num_stages - 2).
  """

  block_m: int = 64
  block_n: int = 64
  num_warps: int = 4
  num_stages: int = 4

  def __post_init__(self):
    for name in ("block_m", "block_n"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or not _common.is_pow2(v) or v < 16:
        raise ValueError(f"{name} must be a power of two >= 16: {name}={v!r}")
    if self.num_warps not in (1, 2, 4, 8):
      raise ValueError(f"num_warps must be 1, 2, 4 or 8: {self.num_warps=}")
    if self.num_stages not in range(1, 7):
      raise ValueError(f"num_stages must be in [1, 6]: {self.num_stages=}")

  @classmethod
  def default(cls, *, d: int, c: int, dtype) -> "ChunkFirstConfig":
    """Heuristic, from the sm_90a resource table (docs/kernels.md).

    16-bit inputs: 64-row blocks (one warpgroup MMA, wgmma), 32-token tiles (16 at d = 256) and
    4 stages, so the K/V ring and q take ~80 KB: two programs per SM. fp32 runs its products on
    CUDA cores at full precision (tensor cores would round to TF32); large blocks would spill, so
    16 x 16 blocks.
    """
    if jnp.dtype(dtype).itemsize > 2:
      return cls(block_m=16, block_n=min(c, 16), num_warps=4, num_stages=4)
    return cls(block_m=64, block_n=min(c, 32 if d <= 128 else 16), num_warps=4, num_stages=4)


# --------------------------------------------------------------------------------------------
# 1. Kernel body.
# --------------------------------------------------------------------------------------------
def _chunk_first_kernel(
    # inputs
    item_chunks_ref,  # [I, G] int32 pool slots
    item_num_chunks_ref,  # [I] int32, 0 = spare item
    item_row_begin_ref,  # [I] int32
    item_row_end_ref,  # [I] int32
    item_slot_ref,  # [I] int32 the item's partial slot k in its rows
    q_ref,  # [R * T * h, d] queries, natural layout ([R, T, h, d]) flattened
    k_ref,  # [n_chunks * h_kv * c, d] the pool flattened: token t of slot s, head j at (s*h_kv+j)*c+t
    v_ref,  # [n_chunks * h_kv * c, d]
    # outputs
    o_ref,  # [R * h_kv * K * gp, d] f32
    lse_ref,  # [R * h_kv * K * gp] f32
    *,
    g: int,
    T: int,
    h: int,
    h_kv: int,
    K: int,
    c: int,
    block_m: int,
    block_n: int,
    sm_scale: float,
    precision,
):
  i = pl.program_id(0)  # work item
  j = pl.program_id(1)  # KV head
  b = pl.program_id(2)  # row block inside the item
  nq = T * g  # queries per (row, KV head)
  gp = _common.partial_heads(nq)
  d = q_ref.shape[-1]
  G = item_chunks_ref.shape[1]
  num_chunks = item_num_chunks_ref[i]
  begin = item_row_begin_ref[i]
  num_q = (item_row_end_ref[i] - begin) * nq  # flattened query rows of this item
  start = b * block_m

  @pl.when((num_chunks > 0) & (start < num_q))
  def _compute():
    qi = start + jnp.arange(block_m)  # [block_m] flattened (row, token, head in group)
    row_ok = qi < num_q
    row_in_item, qn = _common.divmod_static(qi, nq)
    t, gi = _common.divmod_static(qn, g)
    row = begin + row_in_item
    col = jnp.arange(d)[None, :]
    q = plgpu.load(q_ref.at[((row * T + t) * h + j * g + gi)[:, None], col],
                   mask=row_ok[:, None], other=0.0)  # [block_m, d]
    tiles_per_chunk = c // block_n
    tok = jnp.arange(block_n)
    slots = item_chunks_ref[i, :]  # [G], read once: loop addresses need no load

    def body(n, carry):
      o, m, l = carry
      chunk, tile = _common.divmod_static(n, tiles_per_chunk)
      slot = jnp.sum(jnp.where(jnp.arange(G) == chunk, slots, 0))
      kv_row = (slot * h_kv + j) * c + tile * block_n + tok  # [block_n]
      kt = plgpu.load(k_ref.at[kv_row[:, None], col])  # [block_n, d]; shared chunks are full
      vt = plgpu.load(v_ref.at[kv_row[:, None], col])
      s = plgpu.dot(q, kt, trans_b=True, precision=precision) * sm_scale  # [block_m, block_n] f32
      m_new = jnp.maximum(m, s.max(axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[:, None])
      l_new = alpha * l + p.sum(axis=-1)
      o_new = alpha[:, None] * o + plgpu.dot(p.astype(vt.dtype), vt, precision=precision)
      return o_new, m_new, l_new

    o0 = jnp.zeros((block_m, d), jnp.float32)
    m0 = jnp.full((block_m,), NEG, jnp.float32)
    l0 = jnp.zeros((block_m,), jnp.float32)
    o, m, l = lax.fori_loop(0, num_chunks * tiles_per_chunk, body, (o0, m0, l0))

    # Every covered row saw >= 1 full chunk, so l >= 1 here.
    dst = ((row * h_kv + j) * K + item_slot_ref[i]) * gp + qn  # [block_m]
    plgpu.store(o_ref.at[dst[:, None], col], o / l[:, None], mask=row_ok[:, None])
    plgpu.store(lse_ref.at[dst], m + jnp.log(l), mask=row_ok)


# --------------------------------------------------------------------------------------------
# 2. pallas_call wrapper.
# --------------------------------------------------------------------------------------------
def _chunk_first_call(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin, item_row_end,
                      item_slot, partials, *, K, item_rows_capacity, config, sm_scale, interpret):
  R, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  T = _common.tokens_per_row(q)
  n_chunks, h_kv, c, _ = k_pool.shape
  g = h // h_kv
  gp = _common.partial_heads(T * g)
  num_items = item_chunks.shape[0]
  block_n = min(config.block_n, c)
  row_blocks = pl.cdiv(item_rows_capacity * T * g, config.block_m)
  kernel = functools.partial(
      _chunk_first_kernel, g=g, T=T, h=h, h_kv=h_kv, K=K, c=c, block_m=config.block_m,
      block_n=block_n, sm_scale=sm_scale, precision=_common.dot_precision(q.dtype))
  flat = (jax.ShapeDtypeStruct((R * h_kv * K * gp, d), jnp.float32),
          jax.ShapeDtypeStruct((R * h_kv * K * gp,), jnp.float32))
  extra = {}
  args = [item_chunks, item_num_chunks, item_row_begin, item_row_end, item_slot,
          q.reshape(R * T * h, d), k_pool.reshape(n_chunks * h_kv * c, d),
          v_pool.reshape(n_chunks * h_kv * c, d)]
  if partials is not None:
    # Write into the caller's buffers (tests poison them): unwritten entries keep their values.
    args += [partials[0].reshape(flat[0].shape), partials[1].reshape(flat[1].shape)]
    extra["input_output_aliases"] = {8: 0, 9: 1}
    body = kernel
    kernel = lambda *refs: body(*refs[:8], *refs[10:])  # the aliased inputs are not read
  o, lse = pl.pallas_call(
      kernel,
      grid=(num_items, h_kv, row_blocks),
      out_shape=flat,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name=f"chunk_first_g{g}_m{config.block_m}_n{block_n}",
      **extra,
  )(*args)  # Plan arrays, q and the pools are whole-array refs (no BlockSpec).
  return o.reshape(R, h_kv, K, gp, d), lse.reshape(R, h_kv, K, gp)


# --------------------------------------------------------------------------------------------
# 3. Public jitted function.
# --------------------------------------------------------------------------------------------
def empty_partials(R: int, h_kv: int, g: int, d: int, K: int, fill=jnp.nan, T: int = 1):
  """A partial buffer (o, lse) in the layout of the module docstring, filled with `fill`."""
  gp = _common.partial_heads(T * g)
  return (jnp.full((R, h_kv, K, gp, d), fill, jnp.float32),
          jnp.full((R, h_kv, K, gp), fill, jnp.float32))


def _check_items(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin, item_row_end,
                 item_slot, partials, K, pallas):
  R, h, h_kv, c, d = _common.check_qkv(q, k_pool, v_pool, pallas=pallas)
  _common.check_int("item_chunks", item_chunks, (None, None))
  num_items = item_chunks.shape[0]
  for name, x in (("item_num_chunks", item_num_chunks), ("item_row_begin", item_row_begin),
                  ("item_row_end", item_row_end), ("item_slot", item_slot)):
    _common.check_int(name, x, (num_items,))
  if K < 1:
    raise ValueError(f"items_per_row must be >= 1: {K=}")
  g = h // h_kv
  if partials is not None:
    nq = _common.tokens_per_row(q) * g
    _common.check_partials(partials, R, h_kv, K, _common.partial_heads(nq), d)
  return R, h, h_kv, c, d, g


@functools.partial(
    jax.jit,
    static_argnames=("items_per_row", "sm_scale", "item_rows_capacity", "config", "interpret"))
def chunk_first(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin, item_row_end,
                item_slot, partials=None, *, items_per_row: int, sm_scale: float | None = None,
                item_rows_capacity: int | None = None, config: ChunkFirstConfig | None = None,
                interpret: bool = False):
  """Chunk-first partial attention of every shared work item (Pallas, Triton backend).

  Args:
    q: [R, h, d] queries (one per row) or [R, T, h, d] (T new tokens per row),
      float16/bfloat16/float32.
    k_pool, v_pool: [n_chunks, h_kv, c, d], same dtype as q.
    item_chunks: int32 [I, G] pool slots of each item's (full) chunks.
    item_num_chunks: int32 [I] valid chunks per item; 0 = spare item (writes nothing).
    item_row_begin, item_row_end: int32 [I] the item's rows [begin, end).
    item_slot: int32 [I] the item's partial slot in each of its rows, in [0, items_per_row).
    partials: optional (o, lse) buffers to write into (tests poison them); default: fresh,
      uninitialised buffers (entries no item covers are never read).
    items_per_row: K, partial slots per row.
    sm_scale: score scale, default 1/sqrt(d).
    item_rows_capacity: an upper bound on end - begin of any item (default R).
    config: tuning knobs (default `ChunkFirstConfig.default`).
    interpret: run the kernel in Pallas interpret mode (CPU).

  Returns:
    (o f32 [R, h_kv, K, gp, d], lse f32 [R, h_kv, K, gp]), gp = next_pow2(T * h // h_kv); query
    (token t, head gi of the group) at t * g + gi.
  """
  R, h, h_kv, c, d, g = _check_items(q, k_pool, v_pool, item_chunks, item_num_chunks,
                                     item_row_begin, item_row_end, item_slot, partials,
                                     items_per_row, pallas=True)
  config = ChunkFirstConfig.default(d=d, c=c, dtype=q.dtype) if config is None else config
  item_rows_capacity = R if item_rows_capacity is None else item_rows_capacity
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  return _chunk_first_call(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin,
                           item_row_end, item_slot, partials, K=items_per_row,
                           item_rows_capacity=item_rows_capacity, config=config,
                           sm_scale=float(sm_scale), interpret=interpret)


# --------------------------------------------------------------------------------------------
# 4. Plain-jnp reference of the same function (also the phase 1 of the "xla" implementation).
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("items_per_row", "sm_scale", "item_rows_capacity"))
def chunk_first_reference(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin,
                          item_row_end, item_slot, partials=None, *, items_per_row: int,
                          sm_scale: float | None = None, item_rows_capacity: int | None = None):
  """Same contract as `chunk_first`, in plain XLA (gathers + einsums, fp32 accumulation).

  Every item is computed as a dense [item_rows_capacity * g, G * c] block (rows past `end` and
  chunks past `item_num_chunks` are masked and not written). Without `partials`, entries no item
  covers are zero.
  """
  R, h, h_kv, c, d, g = _check_items(q, k_pool, v_pool, item_chunks, item_num_chunks,
                                     item_row_begin, item_row_end, item_slot, partials,
                                     items_per_row, pallas=False)
  K = items_per_row
  T = _common.tokens_per_row(q)
  nq = T * g  # the (token, head in group) queries of one (row, KV head), token-major
  gp = _common.partial_heads(nq)
  RI = R if item_rows_capacity is None else item_rows_capacity
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  G = item_chunks.shape[1]
  if partials is None:
    partials = empty_partials(R, h_kv, g, d, K, fill=0.0, T=T)
  rel = jnp.arange(RI, dtype=jnp.int32)
  rows = item_row_begin[:, None] + rel  # [I, RI]
  live = (rows < item_row_end[:, None]) & (item_num_chunks[:, None] > 0)
  q_rj = q.reshape(R, T, h_kv, g, d).transpose(0, 2, 1, 3, 4).reshape(R, h_kv, nq, d)
  qi = q_rj[jnp.clip(rows, 0, R - 1)]  # [I, RI, h_kv, nq, d]
  kc = k_pool[item_chunks]  # [I, G, h_kv, c, d]
  vc = v_pool[item_chunks]
  s = jnp.einsum("irjgd,injtd->irjgnt", qi, kc, preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST) * sm_scale
  chunk_valid = (jnp.arange(G)[None, :] < item_num_chunks[:, None])[:, None, None, None, :, None]
  s = jnp.where(chunk_valid, s, NEG)
  m = s.max(axis=(-1, -2))  # [I, RI, h_kv, g]
  p = jnp.where(chunk_valid, jnp.exp(s - m[..., None, None]), 0.0)
  l = p.sum(axis=(-1, -2))
  o = jnp.einsum("irjgnt,injtd->irjgd", p.astype(vc.dtype), vc,
                 preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
  safe_l = jnp.where(l > 0, l, 1.0)
  o = o / safe_l[..., None]
  lse = m + jnp.log(safe_l)
  if gp != nq:
    o = jnp.pad(o, ((0, 0),) * 3 + ((0, gp - nq), (0, 0)))
    lse = jnp.pad(lse, ((0, 0),) * 3 + ((0, gp - nq),), constant_values=NEG)
  # Scatter item rows to (row, slot); dead (item, row) pairs go out of bounds and are dropped.
  dst_row = jnp.where(live, rows, R)  # [I, RI]
  dst_slot = jnp.broadcast_to(item_slot[:, None], rows.shape)
  po, plse = partials
  po = po.at[dst_row, :, dst_slot].set(o, mode="drop")
  plse = plse.at[dst_row, :, dst_slot].set(lse, mode="drop")
  return po, plse
