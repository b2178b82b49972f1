"""Two-phase decode attention in Pallas Mosaic GPU (Hopper): TMA paged gathers, mbarrier rings,
wgmma.

The same two phases and the same partial layout as the Triton kernels (`chunk_first.py`,
`sequence_first.py`; docs/kernels.md), written for Hopper's own machinery:

* **Phase 1, shared items** (`mosaic_chunk_first`): one program per (item, KV head, block of
  ``rows_per_block`` rows). Its ``BLOCK_M = 64`` query rows are the item's rows times the GQA group,
  ordered (head in group, row) so that each head's rows are one strided TMA box of ``q``; they are
  one wgmma M block against every K/V tile of the item.
* **Phase 2, rows** (`mosaic_sequence_first`): one program per (row, KV head). It attends the row's
  ``g`` queries to the row's private chunks, merges the row's partial slots, and writes the output.

Both phases share one pipeline (`_attend`): TMA copies of whole chunks, ``pool.at[slot, j]`` with
the slot read from the plan at run time, into a ring of ``num_stages`` K/V buffers guarded by
"loaded" mbarriers (transaction counts); per tile, ``S = q K^T`` (wgmma into a scoped accumulator),
an online softmax in registers, ``P`` through shared memory, ``P V`` (wgmma), then the stage is
refilled. One warpgroup per 128 output columns (two at d = 256, which share the ring through
"consumed" mbarriers). Tiles hold ``block_n`` tokens: several chunks when ``c < block_n`` (the
slots past the last chunk repeat it and are masked), a slice of one otherwise.

Conventions (the contract of `two_phase.two_phase_decode`): 16-bit inputs (fp32 would run the
products at TF32 on tensor cores), ``g = h // h_kv <= 8``, ``d in {64, 128, 256}``,
``c in {16, 32, 64, 128}``. Partials are fp32 ``o [R, h_kv, K, gp, d]`` (normalised) and
``lse [R, h_kv, K, gp]`` (natural log), written at the item's slot of each row it covers; entries
no item covers are never written or read. Rows ``>= num_rows`` get zeros.

The kernels run on the CPU in Mosaic GPU's interpreter (``interpret=True``:
`plgpu.InterpretGPUParams` with race detection), which simulates TMA, mbarriers, warpgroups and
wgmma.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from pallas_kernels._common import NEG
from pallas_kernels.chunk_first import chunk_first_reference
from pallas_kernels.sequence_first import sequence_first_reference

BLOCK_M = 64  # query rows per program: one warpgroup wgmma M block
MAX_GROUP = 8  # largest GQA group: phase 1 needs >= 8 rows per head in a 64-row block
HEAD_ROWS = 8  # query rows phase 2 loads per (row, KV head): the group, padded to a TMA tile
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Tuning knobs of both Mosaic kernels (static; hashable).

  Attributes:
    block_n: tokens per K/V tile (wgmma N of ``q K^T``, K of ``P V``): 16, 32, 64 or 128.
    num_stages: K/V tiles in the shared-memory ring (TMA copies in flight ahead of the consumer).
    merge_stages: partial slots in flight while phase 2 merges (a ring of [8, d] fp32 buffers;
      at most the plan's slots per row are used).
  """

  block_n: int = 64
  num_stages: int = 2
  merge_stages: int = 4

  def __post_init__(self):
    if self.block_n not in (16, 32, 64, 128):
      raise ValueError(f"block_n must be 16, 32, 64 or 128: {self.block_n=}")
    if isinstance(self.num_stages, bool) or self.num_stages not in range(2, 9):
      raise ValueError(f"num_stages must be in [2, 8]: {self.num_stages=}")
    if isinstance(self.merge_stages, bool) or self.merge_stages not in range(1, 9):
      raise ValueError(f"merge_stages must be in [1, 8]: {self.merge_stages=}")

  @classmethod
  def default(cls, *, d: int, c: int) -> "MosaicConfig":
    """Heuristic: 64-token tiles (32 at d = 256) in a ring of ~64 KB, so that with q, P and the
    merge buffers two programs fit one SM's shared memory at d <= 128 (the epilogue's buffers
    alias the ring)."""
    del c
    block_n = 64 if d <= 128 else 32
    stage_bytes = 2 * block_n * d * 2
    return cls(block_n=block_n, num_stages=max(2, min(4, (64 * 1024) // stage_bytes)),
               merge_stages=4 if d <= 128 else 2)


def rows_per_block(g: int) -> int:
  """Rows of an item one phase-1 program covers: each head's rows are a multiple of 8 (a TMA
  tile of the swizzled q buffer) and ``g * rows <= 64``."""
  return HEAD_ROWS * (MAX_GROUP // g)


def _swizzled(dtype, minor: int):
  """Tiling and swizzle of a 16-bit shared-memory operand whose minor dimension is `minor`."""
  swizzle = min(128, minor * jnp.dtype(dtype).itemsize)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


# --------------------------------------------------------------------------------------------
# 1. Kernel bodies.
# --------------------------------------------------------------------------------------------
def num_warpgroups(d: int) -> int:
  """Warpgroups of a program: each owns 128 output columns (d = 256: two), since one warpgroup
  holding a [64, 256] fp32 output plus its per-tile P V would spill registers."""
  return max(1, d // 128)


def _attend(*, wg, k_ref, v_ref, j, slot_of, num_chunks, num_tokens, q_smem, ring, c: int,
            block_n: int, num_stages: int, sm_scale: float, zero_tail: bool):
  """Online softmax of the 64 query rows in `q_smem` over `num_tokens` tokens of the pool, for
  the output columns of warpgroup `wg`.

  The tokens are the program's chunks in order; `slot_of(n)` reads the pool slot of chunk n from
  GMEM. Warpgroup 0 copies tile n (`block_n` tokens) by TMA into stage n % num_stages of the K/V
  ring; tiles n + 1 .. n + num_stages - 1 are in flight while tile n is computed, and the slots of
  the tile after the next refill are read one iteration early, so no GMEM latency is waited on in
  the loop. Every warpgroup computes S = q K^T and the softmax (the same values), then P V for its
  own columns; with several warpgroups, a stage is refilled once all arrived on its "consumed"
  barrier. Tokens from `num_tokens` on are masked; with `zero_tail`, each warpgroup zeroes its V
  columns past it in shared memory before P V (the pool holds anything there; 0 * NaN is NaN).

  Returns (o: tuple of this warpgroup's [64, 64] column blocks of the unnormalised output,
  m [64] running max in the log2 domain, l [64] running sum).
  """
  k_smem, v_smem, p_smem, loaded, consumed = ring
  num_wg = num_warpgroups(k_smem.shape[-1])
  dtype = k_smem.dtype
  chunks_per_tile = max(1, block_n // c)
  tiles_per_chunk = max(1, c // block_n)
  rows = min(block_n, c)  # tokens of one TMA copy
  num_tiles = pl.cdiv(num_tokens, block_n)
  last_chunk = jnp.maximum(num_chunks - 1, 0)
  my_blocks = k_smem.shape[-1] // 64 // num_wg  # this warpgroup's 64-column blocks

  def tile_slots(n):  # the pool slots of tile n (chunks past the last repeat it; masked)
    if tiles_per_chunk == 1:
      return tuple(slot_of(jnp.clip(n * chunks_per_tile + u, 0, last_chunk))
                   for u in range(chunks_per_tile))
    return (slot_of(jnp.minimum(lax.div(n, tiles_per_chunk), last_chunk)),)

  def issue(n, slots):
    s = lax.rem(n, num_stages)
    src = pl.ds(0 if tiles_per_chunk == 1 else lax.rem(n, tiles_per_chunk) * rows, rows)
    for u, slot in enumerate(slots):
      dst = pl.ds(u * rows, rows)
      plgpu.copy_gmem_to_smem(k_ref.at[slot, j, src], k_smem.at[s, dst], loaded.at[s])
      plgpu.copy_gmem_to_smem(v_ref.at[slot, j, src], v_smem.at[s, dst], loaded.at[s])

  @pl.when(wg == 0)
  def _prologue():
    for n in range(num_stages):
      pl.when(n < num_tiles)(functools.partial(issue, n, tile_slots(n)))

  scale = sm_scale * LOG2E  # scores in the log2 domain: exp2 is one instruction

  def body(n, carry):
    o, m, l, next_slots = carry
    s = lax.rem(n, num_stages)
    left = num_tokens - n * block_n  # valid tokens from this tile on
    after_slots = tile_slots(n + num_stages + 1)  # read now, used by the next iteration
    plgpu.barrier_wait(loaded.at[s])

    def qk(acc):
      plgpu.wgmma(acc, q_smem, k_smem.at[s].T)
      return acc[...]

    scores = pl.run_scoped(qk, plgpu.ACC((BLOCK_M, block_n), jnp.float32)) * scale

    def mask(x):  # only the last tile has tokens past the end
      tok = plgpu.broadcasted_iota(jnp.int32, (BLOCK_M, block_n), 1, layout=plgpu.Layout.WGMMA)
      return jnp.where(tok < left, x, NEG)

    scores = lax.cond(left < block_n, mask, lambda x: x, scores)
    m_new = jnp.maximum(m, scores.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    cols = [pl.ds((wg * my_blocks + b) * 64, 64) for b in range(my_blocks)]
    if zero_tail:
      @pl.when(left < block_n)
      def _():
        for col in cols:
          # [block_n, 64] as a WGMMA-layout array (64 | rows): the block, or its transpose.
          vt = v_smem.at[s, :, col] if block_n % 64 == 0 else v_smem.at[s, :, col].T
          tok_dim = 0 if block_n % 64 == 0 else 1
          row = plgpu.broadcasted_iota(jnp.int32, vt.shape, tok_dim, layout=plgpu.Layout.WGMMA)
          v = plgpu.load(vt, layout=plgpu.Layout.WGMMA)
          vt[...] = jnp.where(row < left, v, jnp.zeros_like(v))
    p_smem.at[wg][...] = p.astype(dtype)
    plgpu.commit_smem()  # P (and a zeroed tail) visible to the tensor cores
    alpha_b = lax.broadcast_in_dim(alpha, (BLOCK_M, 64), [0])
    o_new = []
    for b, col in enumerate(cols):  # P V by 64-column blocks: one [64, 64] temporary at a time
      def pv(acc, col=col):
        plgpu.wgmma(acc, p_smem.at[wg], v_smem.at[s, :, col])
        return acc[...]

      o_new.append(o[b] * alpha_b + pl.run_scoped(pv, plgpu.ACC((BLOCK_M, 64), jnp.float32)))

    # Stage s is free once every warpgroup's wgmmas reading it have completed: refill it with
    # tile n + stages.
    if num_wg > 1:
      plgpu.barrier_arrive(consumed.at[s])

    @pl.when(wg == 0)
    def _refill():
      if num_wg > 1:
        plgpu.barrier_wait(consumed.at[s])  # every phase, so that warpgroup 0 sees them all
      pl.when(n + num_stages < num_tiles)(
          functools.partial(issue, n + num_stages, next_slots))

    return tuple(o_new), m_new, l, after_slots

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  init = (tuple(plgpu.layout_cast(jnp.zeros((BLOCK_M, 64), jnp.float32), plgpu.Layout.WGMMA)
                for _ in range(my_blocks)),
          plgpu.layout_cast(jnp.full((BLOCK_M,), NEG, jnp.float32), row_layout),
          plgpu.layout_cast(jnp.zeros((BLOCK_M,), jnp.float32), row_layout),
          tile_slots(num_stages))
  o, m, l, _ = lax.fori_loop(0, num_tiles, body, init)
  if num_wg > 1:  # the epilogue's buffers alias the ring: wait for every warpgroup to leave it
    plgpu.barrier_arrive(consumed.at[num_stages])
    plgpu.barrier_wait(consumed.at[num_stages])
  return o, m, l


def _ring_types(dtype, d, block_n, num_stages, c):
  """The K/V pipeline's shared memory (K ring, V ring, P per warpgroup) and its barriers
  ("loaded" per stage; "consumed" per stage plus one for leaving the ring, if several
  warpgroups)."""
  num_wg = num_warpgroups(d)
  copies = 2 * max(1, block_n // c)  # K and V copies arriving on one stage's barrier
  # wgmma wants both operands of one product swizzled alike: V as P, whose minor dim is block_n.
  smem = (plgpu.SMEM((num_stages, block_n, d), dtype, transforms=_swizzled(dtype, d)),
          plgpu.SMEM((num_stages, block_n, d), dtype, transforms=_swizzled(dtype, block_n)),
          plgpu.SMEM((num_wg, BLOCK_M, block_n), dtype, transforms=_swizzled(dtype, block_n)))
  barriers = (plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
              plgpu.Barrier(num_arrivals=num_wg, num_barriers=num_stages + 1))
  return smem, barriers


def _store_rows(o_smem, o, l):
  """o / l into `o_smem` [64, dw] f32 (this warpgroup's columns, contiguous for TMA)."""
  inv = lax.broadcast_in_dim(1.0 / l, (BLOCK_M, 64), [0])
  for b, ob in enumerate(o):
    o_smem[:, pl.ds(b * 64, 64)] = ob * inv


def _items_kernel(
    # inputs (GMEM)
    item_chunks_ref,  # [I, G] int32 pool slots
    item_num_chunks_ref,  # [I] int32, 0 = spare item
    item_row_begin_ref,  # [I] int32
    item_row_end_ref,  # [I] int32
    item_slot_ref,  # [I] int32 the item's partial slot k in its rows
    q_ref,  # [R, h_kv, g, d] queries, natural layout
    k_ref,  # [n_chunks, h_kv, c, d]
    v_ref,  # [n_chunks, h_kv, c, d]
    # outputs (GMEM)
    po_ref,  # [R, h_kv, K, gp, d] f32 normalised partial outputs
    plse_ref,  # [R, h_kv, K, gp] f32 partial log-sum-exp (natural log)
    *,
    c: int,
    block_n: int,
    num_stages: int,
    sm_scale: float,
):
  i = lax.axis_index("item")
  j = lax.axis_index("head")
  t = lax.axis_index("block")
  wg = lax.axis_index("wg")
  _, _, g, d = q_ref.shape
  num_wg = num_warpgroups(d)
  dw = d // num_wg  # this warpgroup's output columns: [wg * dw, (wg + 1) * dw)
  nr = rows_per_block(g)
  dtype = q_ref.dtype
  num_chunks = item_num_chunks_ref[i]
  row0 = item_row_begin_ref[i] + t * nr
  n_valid = jnp.clip(item_row_end_ref[i] - row0, 0, nr)  # rows of this block inside the item

  def scoped(q_smem, q_ready, union, loaded, consumed):
    ring, (o_smem, lse_smem) = union

    @pl.when(wg == 0)
    def _load_q():
      for gi in range(g):  # head gi's rows: one strided TMA box, rows [gi * nr, (gi + 1) * nr)
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, nr), j, gi],
                                q_smem.at[pl.ds(gi * nr, nr)], q_ready.at[0])

    plgpu.barrier_wait(q_ready.at[0])
    o, m, l = _attend(wg=wg, k_ref=k_ref, v_ref=v_ref, j=j,
                      slot_of=lambda n: item_chunks_ref[i, n], num_chunks=num_chunks,
                      num_tokens=num_chunks * c, q_smem=q_smem, ring=(*ring, loaded, consumed),
                      c=c, block_n=block_n, num_stages=num_stages, sm_scale=sm_scale,
                      zero_tail=False)
    # Covered rows saw >= 1 full chunk: l >= 1. Rows outside the item are never stored.
    _store_rows(o_smem.at[wg], o, l)
    lse_smem.at[wg][...] = (m + jnp.log2(l)) * LN2
    plgpu.commit_smem()
    slot = item_slot_ref[i]
    cols = pl.ds(wg * dw, dw)
    for gi in range(g):
      # Rows [row0, row0 + n_valid) of head gi, as TMA boxes of power-of-two sizes.
      done = jnp.int32(0)
      size = nr
      while size >= 1:
        take = (n_valid & size) != 0

        @pl.when(take)
        def _(done=done, size=size, gi=gi):
          plgpu.copy_smem_to_gmem(o_smem.at[wg, pl.ds(gi * nr + done, size)],
                                  po_ref.at[pl.ds(row0 + done, size), j, slot, gi, cols])

        done = done + jnp.where(take, size, 0)
        size //= 2

    @pl.when(wg == 0)
    def _store_lse():
      @pl.loop(0, n_valid)
      def _(r):  # 4 bytes per (row, head): below TMA's 16-byte granule
        for gi in range(g):
          plse_ref[row0 + r, j, slot, gi] = lse_smem[0, gi * nr + r]

    plgpu.wait_smem_to_gmem(0)

  ring, (loaded, consumed) = _ring_types(dtype, d, block_n, num_stages, c)

  @pl.when((num_chunks > 0) & (n_valid > 0))
  def _():
    pl.run_scoped(
        scoped,
        plgpu.SMEM((BLOCK_M, d), dtype, transforms=_swizzled(dtype, d)),
        plgpu.Barrier(num_arrivals=g, num_barriers=1),
        # The epilogue's buffers reuse the ring's memory (the ring is idle by then).
        plgpu.RefUnion(ring, (plgpu.SMEM((num_wg, BLOCK_M, dw), jnp.float32),
                              plgpu.SMEM((num_wg, BLOCK_M), jnp.float32))),
        loaded,
        consumed,
        collective_axes="wg")


def _rows_kernel(
    # inputs (GMEM)
    num_rows_ref,  # [1] int32 live rows
    length_delta_ref,  # [1] int32 tokens appended to every live row since the plan was built
    row_private_chunks_ref,  # [R, P] int32 pool slots
    row_private_len_ref,  # [R] int32 private tokens at plan build time
    row_num_items_ref,  # [R] int32 partial slots in use
    q_ref,  # [R * h, d] queries, natural layout flattened
    k_ref,  # [n_chunks, h_kv, c, d]
    v_ref,  # [n_chunks, h_kv, c, d]
    *refs,  # with K > 0: po_ref [R, h_kv, K, gp, d] f32 and plse_ref [R * h_kv * K * gp] f32
    #         (flat); then the output out_ref [R * h, d], q dtype
    g: int,
    K: int,
    c: int,
    block_n: int,
    num_stages: int,
    merge_stages: int,
    sm_scale: float,
):
  po_ref, plse_ref, out_ref = refs if K else (None, None, *refs)
  r = lax.axis_index("row")
  j = lax.axis_index("head")
  wg = lax.axis_index("wg")
  d = q_ref.shape[-1]
  num_wg = num_warpgroups(d)
  dw = d // num_wg  # this warpgroup's output columns: [wg * dw, (wg + 1) * dw)
  h = q_ref.shape[0] // row_private_len_ref.shape[0]
  num_kv = k_ref.shape[1]
  gp = _common.partial_heads(g)
  dtype = q_ref.dtype
  live = r < num_rows_ref[0]
  length = jnp.where(live, row_private_len_ref[r] + length_delta_ref[0], 0)
  num_items = jnp.where(live, row_num_items_ref[r], 0) if K else 0
  head0 = r * h + j * g  # the group's first query row in q and the output

  def scoped(q_smem, q_ready, part_smem, part_ready, lse_row, union, loaded, consumed):
    ring, (o_smem, lse_smem, out_smem) = union
    cols = pl.ds(wg * dw, dw)
    my_part = part_smem.at[wg]  # [merge_stages, 8, dw] this warpgroup's columns of the partials

    @pl.when(wg == 0)
    def _load_q():  # the group's g queries (+ 8 - g rows that are computed and never stored)
      plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(head0, HEAD_ROWS)],
                              q_smem.at[pl.ds(0, HEAD_ROWS)], q_ready.at[0])

    def fetch_partial(k, s):
      plgpu.copy_gmem_to_smem(po_ref.at[r, j, k, :, cols], my_part.at[s, pl.ds(0, gp)],
                              part_ready.at[wg * merge_stages + s])

    # Partial slots load during the private pass, issued before the row's scalars arrive (one
    # memory round trip, not two, for a row with only shared work): the row's K * gp
    # log-sum-exps in one copy (the box is rounded up to 128 bytes; what it reads past the row is
    # never used), and the first `merge_stages` slots of o, used or not.
    if K:
      @pl.when(wg == 0)
      def _():
        plgpu.copy_gmem_to_smem(plse_ref.at[pl.ds((r * num_kv + j) * K * gp, lse_row.shape[0])],
                                lse_row, part_ready.at[num_wg * merge_stages])

    for s in range(merge_stages if K else 0):
      fetch_partial(s, s)
    plgpu.barrier_wait(q_ready.at[0])
    o, m, l = _attend(wg=wg, k_ref=k_ref, v_ref=v_ref, j=j,
                      slot_of=lambda n: row_private_chunks_ref[r, n],
                      num_chunks=pl.cdiv(length, c), num_tokens=length, q_smem=q_smem,
                      ring=(*ring, loaded, consumed), c=c, block_n=block_n,
                      num_stages=num_stages, sm_scale=sm_scale, zero_tail=True)
    # The private part as one more partial: normalised output and log-sum-exp (NEG if empty).
    has = l > 0.0
    _store_rows(o_smem.at[wg], o, jnp.where(has, l, 1.0))
    lse_smem.at[wg][...] = jnp.where(has, (m + jnp.log2(jnp.where(has, l, 1.0))) * LN2, NEG)
    # Rows 0..7 of this warpgroup's columns as [8, dw] arrays in a strided layout (each thread
    # holds 16-byte vectors).
    layout = plgpu.Layout.WG_STRIDED((HEAD_ROWS, dw), vec_size=4)
    head = plgpu.broadcasted_iota(jnp.int32, (HEAD_ROWS, dw), 0, layout=layout)

    def per_head(value_of):  # [8, dw] array whose row gi < g is the scalar value_of(gi)
      out = plgpu.layout_cast(jnp.full((HEAD_ROWS, dw), NEG, jnp.float32), layout)
      for gi in range(g):
        out = jnp.where(head == gi, value_of(gi), out)
      return out

    # Merge state over rows 0..7 (rows >= g are never stored): running max of the partials'
    # log-sum-exps, sum of exp(lse - max) * o and sum of exp(lse - max). A row with no private
    # token starts at (NEG, 0, 1): the first partial's weight exp(NEG - lse) = 0 resets it, and
    # with no partial at all its output is 0 / 1 = 0.
    mx = per_head(lambda gi: lse_smem[wg, gi])
    num = plgpu.load(o_smem.at[wg, pl.ds(0, HEAD_ROWS)], layout=layout)
    den = plgpu.layout_cast(jnp.ones((HEAD_ROWS, dw), jnp.float32), layout)
    if K:
      plgpu.barrier_wait(part_ready.at[num_wg * merge_stages])

      def merge(k, carry):
        mx, num, den = carry
        s = lax.rem(k, merge_stages)
        lse = per_head(lambda gi: lse_row[k * gp + gi])
        plgpu.barrier_wait(part_ready.at[wg * merge_stages + s])
        part = plgpu.load(my_part.at[s], layout=layout)
        m_new = jnp.maximum(mx, lse)
        alpha = jnp.exp(mx - m_new)
        w = jnp.exp(lse - m_new)
        plgpu.commit_smem()  # every thread has read stage s before it is refilled

        @pl.when(k + merge_stages < num_items)
        def _():
          fetch_partial(k + merge_stages, s)

        return m_new, alpha * num + w * part, alpha * den + w

      mx, num, den = lax.fori_loop(0, num_items, merge, (mx, num, den))
      for s in range(merge_stages):  # stages loaded and never used: observe their copies
        pl.when(num_items <= s)(functools.partial(plgpu.barrier_wait,
                                                  part_ready.at[wg * merge_stages + s]))
    out_smem.at[wg][...] = (num / den).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem.at[wg, pl.ds(0, g)], out_ref.at[pl.ds(head0, g), cols])
    plgpu.wait_smem_to_gmem(0)

  ring, (loaded, consumed) = _ring_types(dtype, d, block_n, num_stages, c)
  pl.run_scoped(
      scoped,
      plgpu.SMEM((BLOCK_M, d), dtype, transforms=_swizzled(dtype, d)),
      plgpu.Barrier(num_arrivals=1, num_barriers=1),
      plgpu.SMEM((num_wg, merge_stages, HEAD_ROWS, dw), jnp.float32),
      plgpu.Barrier(num_arrivals=1, num_barriers=num_wg * merge_stages + 1),
      # The row's lse: Mosaic's TMA (Lane semantics) moves multiples of 128 bytes.
      plgpu.SMEM((-(-max(K * gp, 1) // 32) * 32,), jnp.float32),
      # The epilogue's buffers reuse the ring's memory (the ring is idle by then).
      plgpu.RefUnion(ring, (plgpu.SMEM((num_wg, BLOCK_M, dw), jnp.float32),
                            plgpu.SMEM((num_wg, BLOCK_M), jnp.float32),
                            plgpu.SMEM((num_wg, HEAD_ROWS, dw), dtype))),
      loaded,
      consumed,
      collective_axes="wg")


# --------------------------------------------------------------------------------------------
# 2. plgpu.kernel wrappers.
# --------------------------------------------------------------------------------------------
# Lane semantics: layouts are chosen here (the warpgroup semantics' layout inference rejects the
# dynamic row offsets of the epilogue's TMA stores). exp2 at the hardware's approximation.
_COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True,
                                        lowering_semantics=plgpu.LoweringSemantics.Lane)


def _interpret_params(interpret):
  if interpret is True:
    return plgpu.InterpretGPUParams(detect_races=True)
  return interpret or None


def _items_call(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin, item_row_end,
                item_slot, *, K, item_rows_capacity, config, sm_scale, interpret):
  R, h, d = q.shape
  _, h_kv, c, _ = k_pool.shape
  g = h // h_kv
  gp = _common.partial_heads(g)
  blocks = pl.cdiv(item_rows_capacity, rows_per_block(g))
  block_n = config.block_n
  kernel = functools.partial(_items_kernel, c=c, block_n=block_n,
                             num_stages=config.num_stages, sm_scale=sm_scale)
  kernel.__name__ = f"mosaic_chunk_first_g{g}_n{block_n}"
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((R, h_kv, K, gp, d), jnp.float32),
                jax.ShapeDtypeStruct((R, h_kv, K, gp), jnp.float32)),
      grid=(item_chunks.shape[0], h_kv, blocks),
      grid_names=("item", "head", "block"),
      num_threads=num_warpgroups(d),
      thread_name="wg",
      compiler_params=_COMPILER_PARAMS,
      interpret=_interpret_params(interpret),
  )(item_chunks, item_num_chunks, item_row_begin, item_row_end, item_slot,
    q.reshape(R, h_kv, g, d), k_pool, v_pool)


def _rows_call(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks, row_private_len,
               row_num_items, partials, *, config, sm_scale, interpret):
  R, h, d = q.shape
  _, h_kv, c, _ = k_pool.shape
  g = h // h_kv
  K = 0 if partials is None else partials[0].shape[2]
  block_n = config.block_n
  kernel = functools.partial(
      _rows_kernel, g=g, K=K, c=c, block_n=block_n, num_stages=config.num_stages,
      merge_stages=max(1, min(config.merge_stages, K)), sm_scale=sm_scale)
  kernel.__name__ = f"mosaic_sequence_first_g{g}_n{block_n}"
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((R * h, d), q.dtype),
      grid=(R, h_kv),
      grid_names=("row", "head"),
      num_threads=num_warpgroups(d),
      thread_name="wg",
      compiler_params=_COMPILER_PARAMS,
      interpret=_interpret_params(interpret),
  )(num_rows.reshape(1), length_delta.reshape(1), row_private_chunks, row_private_len,
    row_num_items, q.reshape(R * h, d), k_pool, v_pool,
    *(() if partials is None else (partials[0], partials[1].reshape(-1)))).reshape(R, h, d)


# --------------------------------------------------------------------------------------------
# 3. Public jitted functions.
# --------------------------------------------------------------------------------------------
def check_mosaic(q, k_pool, v_pool) -> tuple[int, int, int, int, int]:
  """Trace-time checks of what the Mosaic kernels support; returns (R, h, h_kv, c, d)."""
  R, h, h_kv, c, d = _common.check_qkv(q, k_pool, v_pool, pallas=True)
  if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"the Mosaic kernels take float16 or bfloat16 (fp32 products would run at "
                     f"TF32 on the tensor cores): {q.dtype=}")
  if h // h_kv > MAX_GROUP:
    raise ValueError(f"the Mosaic kernels support query heads per KV head up to {MAX_GROUP}: "
                     f"{q.shape=} {k_pool.shape=}")
  return R, h, h_kv, c, d


@functools.partial(
    jax.jit,
    static_argnames=("items_per_row", "sm_scale", "item_rows_capacity", "config", "interpret"))
def mosaic_chunk_first(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin,
                       item_row_end, item_slot, *, items_per_row: int,
                       sm_scale: float | None = None, item_rows_capacity: int | None = None,
                       config: MosaicConfig | None = None, interpret=False):
  """Phase 1 (shared items) on Hopper: the contract of `chunk_first.chunk_first`.

  Args:
    q: [R, h, d] queries, float16/bfloat16.
    k_pool, v_pool: [n_chunks, h_kv, c, d], q's dtype; h // h_kv <= 8.
    item_chunks: int32 [I, G]; item_num_chunks, item_row_begin, item_row_end, item_slot: int32 [I]
      (as in `chunk_first`).
    items_per_row: K, partial slots per row.
    sm_scale: score scale, default 1/sqrt(d).
    item_rows_capacity: an upper bound on end - begin of any item (default R).
    config: tuning knobs (default `MosaicConfig.default`).
    interpret: False (compile for the GPU), True (Mosaic GPU interpreter with race detection)
      or a `plgpu.InterpretGPUParams`.

  Returns:
    (o f32 [R, h_kv, K, gp, d], lse f32 [R, h_kv, K, gp]); entries no item covers are
    uninitialised.
  """
  R, h, h_kv, c, d = check_mosaic(q, k_pool, v_pool)
  _common.check_int("item_chunks", item_chunks, (None, None))
  for name, x in (("item_num_chunks", item_num_chunks), ("item_row_begin", item_row_begin),
                  ("item_row_end", item_row_end), ("item_slot", item_slot)):
    _common.check_int(name, x, (item_chunks.shape[0],))
  if items_per_row < 1:
    raise ValueError(f"items_per_row must be >= 1: {items_per_row=}")
  config = MosaicConfig.default(d=d, c=c) if config is None else config
  sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  return _items_call(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin,
                     item_row_end, item_slot, K=items_per_row,
                     item_rows_capacity=R if item_rows_capacity is None else item_rows_capacity,
                     config=config, sm_scale=sm_scale, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret"))
def mosaic_sequence_first(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                          row_private_len, row_num_items, partials, *,
                          sm_scale: float | None = None, config: MosaicConfig | None = None,
                          interpret=False):
  """Phase 2 (private chunks + merge) on Hopper: the contract of `sequence_first.sequence_first`.

  Args:
    q: [R, h, d]; k_pool, v_pool: [n_chunks, h_kv, c, d] (float16/bfloat16, h // h_kv <= 8).
    num_rows, length_delta: int32 []; row_private_chunks: int32 [R, P]; row_private_len,
      row_num_items: int32 [R] (as in `sequence_first`).
    partials: (o f32 [R, h_kv, K, gp, d], lse f32 [R, h_kv, K, gp]) or None (no shared items).
    sm_scale, config, interpret: as in `mosaic_chunk_first`.

  Returns:
    [R, h, d] in q.dtype; zeros for rows >= num_rows and rows with no token.
  """
  R, h, h_kv, c, d = check_mosaic(q, k_pool, v_pool)
  num_rows = jnp.asarray(num_rows, jnp.int32)
  length_delta = jnp.asarray(length_delta, jnp.int32)
  for name, x in (("num_rows", num_rows), ("length_delta", length_delta)):
    if x.shape != ():
      raise ValueError(f"{name} must be an int32 scalar: {x.shape=}")
  _common.check_int("row_private_chunks", row_private_chunks, (R, None))
  _common.check_int("row_private_len", row_private_len, (R,))
  _common.check_int("row_num_items", row_num_items, (R,))
  if partials is not None:
    partials = tuple(partials)
    _common.check_partials(partials, R, h_kv, partials[0].shape[2],
                           _common.partial_heads(h // h_kv), d)
  config = MosaicConfig.default(d=d, c=c) if config is None else config
  sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  return _rows_call(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                    row_private_len, row_num_items, partials, config=config, sm_scale=sm_scale,
                    interpret=interpret)


def mosaic_two_phase(q, k_pool, v_pool, *, num_rows, length_delta, row_private_chunks,
                     row_private_len, row_items, row_num_items, item_chunks, item_num_chunks,
                     item_row_begin, item_row_end, item_slot, sm_scale: float | None = None,
                     item_rows_capacity: int | None = None, config: MosaicConfig | None = None,
                     interpret=False):
  """Both phases (`two_phase.two_phase_decode(impl="mosaic")`): two kernels, one without items."""
  if item_chunks.shape[0] == 0:
    return mosaic_sequence_first(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                                 row_private_len, row_num_items, None, sm_scale=sm_scale,
                                 config=config, interpret=interpret)
  partials = mosaic_chunk_first(q, k_pool, v_pool, item_chunks, item_num_chunks, item_row_begin,
                                item_row_end, item_slot, items_per_row=row_items.shape[1],
                                sm_scale=sm_scale, item_rows_capacity=item_rows_capacity,
                                config=config, interpret=interpret)
  return mosaic_sequence_first(q, k_pool, v_pool, num_rows, length_delta, row_private_chunks,
                               row_private_len, row_num_items, partials, sm_scale=sm_scale,
                               config=config, interpret=interpret)


# --------------------------------------------------------------------------------------------
# 4. Reference.
# --------------------------------------------------------------------------------------------
mosaic_chunk_first_reference = chunk_first_reference
mosaic_sequence_first_reference = sequence_first_reference
