"""Prefill attention over the chunk pool: flash attention that reads K/V through each sequence's
chunk path, with an optional shared-prefix pass.

The new tokens of ``S`` sequences (each padded to ``T``) attend causally to every key of their
sequence up to their own position: cached prefix chunks and the chunks the new tokens were just
written to, both read straight from the pool viewed as ``[n_chunks * h_kv * c, d]`` (token ``t`` of
slot ``s``, KV head ``j`` at row ``(s * h_kv + j) * c + t``) by computed row indices. K/V is never
gathered into a dense copy, and no ``[T, n]`` score matrix exists anywhere: scores live in
registers one ``[block_m, block_n]`` tile at a time (online softmax, fp32).

One program per (block of new tokens, KV head, sequence). Its ``block_m`` rows are
``block_m // g`` consecutive new tokens times the ``g`` query heads of the KV head's group
(row ``r`` = token ``r // g``, head ``r % g``), so GQA/MQA groups fill the MMA rows and each K/V
tile is read once for the whole group. The tile loop runs over the keys ``[key_lo, max position]``
in three ranges: tiles every row sees completely (no mask; the chunk slots are read 16 at a time
into registers before the software-pipelined loop, so no K/V address waits for a load), and the
partial tiles at either end (the diagonal, and the first tile after the shared prefix), masked by
``key_lo <= key <= position``.

Shared prefix (optional, two kernels): a work *item* is a run of ``L`` full cached chunks at the
start of the paths of several sequences of the call. `shared_prefix` attends the queries of all the
item's sequences, their valid tokens packed back to back into common row blocks, to those chunks
(read once per row block instead of once per block of each sequence), and writes per (token, query
head) a normalised partial output and its log-sum-exp (base 2), fp32. The main kernel then starts such a sequence at key ``L * c`` with its
running state initialised from the partial. Every key of the item must precede every new token of
its sequences (cached chunks do), so the shared pass needs no causal mask.

Layout (flattened in the kernels; ``S`` sequences, ``T`` new tokens each, ``h = h_kv * g``):

* q, output: ``[S, T, h, d]``; partial o: f32 ``[S, T, h, d]``; partial lse: f32 ``[S, T, h]``;
* positions: int32 ``[S, T]``; chunk_paths: int32 ``[S, Pc]``; num_tokens: int32 ``[S]`` (tokens
  ``t >= num_tokens[s]`` are padding: computed by nobody, written by nobody);
* items: ``item_seqs`` int32 ``[I, M]`` (the sequences of item ``i`` are
  ``item_seqs[i, :item_num_seqs[i]]``), ``item_num_chunks`` int32 ``[I]`` (``L``; 0 = spare item,
  writes nothing; the chunks are the first ``L`` of the paths of its sequences, which agree),
  ``seq_shared_chunks`` int32 ``[S]`` (``L`` of the sequence's item, 0 if none).

`prefill_attention` (Pallas, Triton backend) and `prefill_attention_xla` (the plain-jnp reference:
a blocked scan over query blocks and key tiles with the same online softmax, so its memory is
O(S x block_q x tile) rather than O(T x n); the CPU path) share this contract; `prefill` picks one
by ``impl``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common
from pallas_kernels._common import NEG

LOG2E = math.log2(math.e)
# Chunk slots read into registers at a time, outside the pipelined tile loop.
SLOT_BLOCK = 16
IMPLS = ("pallas", "pallas_interpret", "xla")


class InvalidPrefillError(ValueError):
  """Prefill arrays that are inconsistent or would read outside the pool."""


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
  """Tuning knobs of the prefill kernels (static; hashable).

  Attributes:
    block_m: query rows per program, ``block_m // g`` tokens times ``g`` heads; a power of two
      >= 16 and >= g. 64 lets Hopper use one warpgroup MMA (wgmma) per 4 warps.
    block_n: keys per tile; a power of two >= 16 (a tile may span several chunks).
    num_warps: warps per program.
    num_stages: software-pipeline depth of the unmasked tile loop.
  """

  block_m: int = 64
  block_n: int = 64
  num_warps: int = 4
  num_stages: int = 3

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
  def default(cls, *, d: int, g: int, dtype) -> "PrefillConfig":
    """Heuristic, from the sm_90a resource table (docs/kernels.md, prefill section).

    16-bit inputs: 64-row blocks (one warpgroup MMA, wgmma, per 4 warps), 64-key tiles and 4 warps
    (d <= 128: ~115 KB of shared memory, two programs per SM); at d = 256, 32-key tiles and 8 warps
    (4 warps would need more than 255 registers per thread). fp32 runs its products on CUDA cores
    at full precision (tensor cores would round to TF32): 16 x 16 blocks and 8 warps, so the
    operands stay in registers (4 warps spill at d = 256, and at d = 64 with the scalar slots of
    a 16-chunk block live through the tile loop). Groups larger than a block widen it to hold the whole group. 3 stages: one tile is
    loaded while one is computed (prefill is compute-bound: each tile feeds block_m x block_n x d
    x 4 flops).
    """
    if jnp.dtype(dtype).itemsize > 2:
      block_m, block_n, num_warps = 16, 16, 8
    elif d <= 128:
      block_m, block_n, num_warps = 64, 64, 4
    else:
      block_m, block_n, num_warps = 64, 32, 8
    return cls(block_m=max(block_m, _common.next_pow2(g)), block_n=block_n, num_warps=num_warps,
               num_stages=3)


# --------------------------------------------------------------------------------------------
# 1. Kernel bodies.
# --------------------------------------------------------------------------------------------
def _div(x, m: int):
  """x // m for non-negative int32 x (truncating: no sign fix-ups in the Triton lowering)."""
  return _common.divmod_static(x, m)[0]


def _cdiv(x, m: int):
  return _div(x + (m - 1), m)


class _KeyWalker:
  """Online-softmax attention of one program's ``[block_m, d]`` queries to key tiles of one
  sequence's chunk path (one KV head).

  Tile ``n`` holds keys ``[n * block_n, (n + 1) * block_n)``, key ``p`` being token ``p % c`` of
  chunk ``p // c`` of the path. Running state: (o unnormalised [block_m, d], m [block_m], l
  [block_m]) in base 2 (scores are pre-multiplied by log2(e)).
  """

  def __init__(self, q, k_ref, v_ref, paths_ref, path_base, *, j, h_kv, c, num_path_chunks,
               block_n, qk_scale, precision):
    self.q, self.k_ref, self.v_ref = q, k_ref, v_ref
    self.paths_ref, self.path_base = paths_ref, path_base  # the path: paths_ref[base + chunk]
    self.j, self.h_kv, self.c, self.P = j, h_kv, c, num_path_chunks
    self.block_n, self.qk_scale, self.precision = block_n, qk_scale, precision
    self.d = k_ref.shape[-1]
    # Slot blocks cover whole tiles: SLOT_BLOCK chunks, or one tile's chunks if more.
    self.sb = max(SLOT_BLOCK, block_n // c)
    self.tiles_per_block = self.sb * c // block_n

  def _slots(self, first_chunk, n):
    """Slots of path chunks [first_chunk, first_chunk + n) as n scalars (clamped to the path's
    last chunk past its end: never used there). Scalars, not a vector: picking one is a chain of
    scalar selects, with no cross-thread reduction (and no barrier) in the tile loop."""
    last = self.path_base + self.P - 1
    return [self.paths_ref[jnp.minimum(self.path_base + first_chunk + k, last)] for k in range(n)]

  def _rows(self, n, slots, first_chunk):
    """Pool rows [block_n] of tile n, given the slots of chunks [first_chunk, first_chunk + sb)."""
    block_n, c = self.block_n, self.c
    tok = jnp.arange(block_n)
    if block_n <= c:  # the tile lies in one chunk: one slot
      chunk, off = _common.divmod_static(n * block_n, c)
      rel = chunk - first_chunk
    else:  # block_n // c chunks per tile: a slot per key
      chunk, off = _common.divmod_static(n * block_n + tok, c)
      rel = chunk - first_chunk
    slot = slots[0] + jnp.zeros_like(rel)
    for k in range(1, len(slots)):
      slot = jnp.where(rel == k, slots[k], slot)
    return (slot * self.h_kv + self.j) * c + off + (tok if block_n <= c else 0)

  def _step(self, carry, rows, mask, key_ok=None):
    """One tile; `key_ok` [block_n]: keys to load at all (masked tiles: none past the block's last
    position, whose K/V may be stale or unwritten; a 0 * NaN would poison the output)."""
    o, m, l = carry
    col = jnp.arange(self.d)[None, :]
    if key_ok is None:
      kt = plgpu.load(self.k_ref.at[rows[:, None], col])  # [block_n, d]
      vt = plgpu.load(self.v_ref.at[rows[:, None], col])
    else:
      kt = plgpu.load(self.k_ref.at[rows[:, None], col], mask=key_ok[:, None], other=0.0)
      vt = plgpu.load(self.v_ref.at[rows[:, None], col], mask=key_ok[:, None], other=0.0)
    s = plgpu.dot(self.q, kt, trans_b=True, precision=self.precision) * self.qk_scale
    if mask is not None:
      s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)  # a row whose keys are all masked so far keeps l = 0
    o = alpha[:, None] * o + plgpu.dot(p.astype(vt.dtype), vt, precision=self.precision)
    return o, m_new, alpha * l + p.sum(axis=-1)

  def full_tiles(self, carry, lo, hi):
    """Tiles [lo, hi), every key visible to every row: no mask."""
    tpb = self.tiles_per_block

    def block(b, carry):
      first_chunk = b * self.sb
      slots = self._slots(first_chunk, self.sb)  # read once: the tile loop's addresses need no load

      def body(n, carry):
        return self._step(carry, self._rows(n, slots, first_chunk), None)

      return lax.fori_loop(jnp.maximum(lo, b * tpb), jnp.minimum(hi, (b + 1) * tpb), body, carry)

    return lax.fori_loop(_div(lo, tpb), _cdiv(hi, tpb), block, carry)

  def masked_tiles(self, carry, lo, hi, key_lo, key_hi, last_key):
    """Tiles [lo, hi) with keys masked to key_lo <= key <= key_hi[row]; keys past `last_key` (the
    largest key_hi of a live row) are not loaded. Few tiles: the slots are read inside the loop."""
    tok = jnp.arange(self.block_n)
    per_tile = max(1, self.block_n // self.c)

    def body(n, carry):
      first_chunk = _div(n * self.block_n, self.c)
      slots = self._slots(first_chunk, per_tile)
      key = n * self.block_n + tok
      key_ok = (key >= key_lo) & (key <= last_key)
      mask = key_ok[None, :] & (key[None, :] <= key_hi[:, None])
      return self._step(carry, self._rows(n, slots, first_chunk), mask, key_ok)

    return lax.fori_loop(lo, hi, body, carry)

  def keys(self, carry, key_lo, key_hi, row_ok):
    """All keys key_lo <= key <= key_hi[row] (rows with row_ok; others see whatever)."""
    bn = self.block_n
    lo_min = jnp.min(jnp.where(row_ok, key_hi, jnp.int32(2 ** 30)))
    hi_max = jnp.max(jnp.where(row_ok, key_hi, -1))
    n_total = jnp.where(hi_max >= key_lo, _div(jnp.maximum(hi_max, 0), bn) + 1, 0)
    first = _div(key_lo, bn)
    full_lo = jnp.minimum(_cdiv(key_lo, bn), n_total)  # first tile starting at or after key_lo
    full_hi = jnp.maximum(full_lo, jnp.minimum(_div(lo_min + 1, bn), n_total))  # all rows see
    carry = self.masked_tiles(carry, first, full_lo, key_lo, key_hi, hi_max)  # key_lo mid-tile
    carry = self.full_tiles(carry, full_lo, full_hi)
    return self.masked_tiles(carry, full_hi, n_total, key_lo, key_hi, hi_max)  # the diagonal


def _prefill_kernel(
    # inputs
    num_tokens_ref,  # [S] int32 valid new tokens per sequence
    positions_ref,  # [S * T] int32
    paths_ref,  # [S * Pc] int32 pool slots, root to leaf
    *refs,
    # with sharing: seq_shared_chunks_ref [S] int32, po_ref [S*T*h, d] f32, plse_ref [S*T*h] f32;
    # then q_ref [S*T*h, d], k_ref, v_ref [n_chunks*h_kv*c, d]; output o_ref [S*T*h, d]
    shared: bool,
    T: int,
    g: int,
    h: int,
    h_kv: int,
    c: int,
    num_path_chunks: int,
    num_token_blocks: int,
    block_m: int,
    block_n: int,
    qk_scale: float,
    precision,
):
  if shared:
    shared_chunks_ref, po_ref, plse_ref, q_ref, k_ref, v_ref, o_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref = refs
  tb = num_token_blocks - 1 - pl.program_id(0)  # the longest (last) token blocks start first
  j = pl.program_id(1)  # KV head
  s = pl.program_id(2)  # sequence
  d = q_ref.shape[-1]
  block_t = block_m // g
  t0 = tb * block_t
  n_valid = num_tokens_ref[s] - t0

  @pl.when(n_valid > 0)
  def _compute():
    r = jnp.arange(block_m)
    tk, gi = _common.divmod_static(r, g)  # row = (token in block, head in group)
    row_ok = (tk < block_t) & (tk < n_valid)
    t = t0 + tk
    col = jnp.arange(d)[None, :]
    qrow = (s * T + t) * h + j * g + gi  # [block_m]
    q = plgpu.load(q_ref.at[qrow[:, None], col], mask=row_ok[:, None], other=0.0)
    pos = plgpu.load(positions_ref.at[s * T + t], mask=row_ok, other=0)
    if shared:
      num_shared = shared_chunks_ref[s]
      from_item = row_ok & (num_shared > 0)
      m = plgpu.load(plse_ref.at[qrow], mask=from_item, other=NEG)
      o = plgpu.load(po_ref.at[qrow[:, None], col], mask=from_item[:, None], other=0.0)
      l = jnp.where(from_item, 1.0, 0.0)  # the partial is normalised: state (o, lse, 1)
      key_lo = num_shared * c
    else:
      o = jnp.zeros((block_m, d), jnp.float32)
      m = jnp.full((block_m,), NEG, jnp.float32)
      l = jnp.zeros((block_m,), jnp.float32)
      key_lo = jnp.int32(0)
    walker = _KeyWalker(q, k_ref, v_ref, paths_ref, s * num_path_chunks, j=j, h_kv=h_kv, c=c,
                        num_path_chunks=num_path_chunks, block_n=block_n, qk_scale=qk_scale,
                        precision=precision)
    o, m, l = walker.keys((o, m, l), key_lo, pos, row_ok)
    out = o / jnp.where(l > 0.0, l, 1.0)[:, None]
    plgpu.store(o_ref.at[qrow[:, None], col], out.astype(o_ref.dtype), mask=row_ok[:, None])


def _shared_prefix_kernel(
    # inputs
    item_seqs_ref,  # [I * M] int32 sequences of each item
    item_num_seqs_ref,  # [I] int32
    item_num_chunks_ref,  # [I] int32 L, 0 = spare item
    num_tokens_ref,  # [S] int32
    paths_ref,  # [S * Pc] int32
    q_ref,  # [S * T * h, d]
    k_ref,  # [n_chunks * h_kv * c, d]
    v_ref,
    # outputs
    po_ref,  # [S * T * h, d] f32 normalised partial output
    plse_ref,  # [S * T * h] f32 log2-sum-exp2 of the scaled scores (base 2)
    *,
    M: int,
    T: int,
    g: int,
    h: int,
    h_kv: int,
    c: int,
    num_path_chunks: int,
    block_m: int,
    block_n: int,
    qk_scale: float,
    precision,
):
  rb = pl.program_id(0)  # row block of the item's packed (token, head) rows
  j = pl.program_id(1)
  i = pl.program_id(2)
  d = q_ref.shape[-1]
  num_seqs = item_num_seqs_ref[i]
  num_chunks = item_num_chunks_ref[i]
  # The item's sequences and their token counts, in registers: the valid tokens of sequence k of
  # the item are packed rows [starts[k], starts[k] + counts[k]) (times g heads).
  mp = _common.next_pow2(M)
  k = jnp.arange(mp)
  seq_ok = k < num_seqs
  seqs = plgpu.load(item_seqs_ref.at[i * M + k], mask=seq_ok, other=0)  # [mp]
  counts = plgpu.load(num_tokens_ref.at[seqs], mask=seq_ok, other=0)
  ends = jnp.cumsum(counts)
  starts = ends - counts
  start = rb * block_m

  @pl.when((num_chunks > 0) & (start < jnp.sum(counts) * g))
  def _compute():
    tok, gi = _common.divmod_static(start + jnp.arange(block_m), g)  # packed token, head
    member = jnp.sum((ends[None, :] <= tok[:, None]).astype(jnp.int32), axis=1)  # [block_m]
    pick = k[None, :] == member[:, None]  # [block_m, mp]
    row_ok = member < num_seqs
    seq = jnp.sum(jnp.where(pick, seqs[None, :], 0), axis=1)
    tk = tok - jnp.sum(jnp.where(pick, starts[None, :], 0), axis=1)
    col = jnp.arange(d)[None, :]
    qrow = (seq * T + tk) * h + j * g + gi
    q = plgpu.load(q_ref.at[qrow[:, None], col], mask=row_ok[:, None], other=0.0)
    first_seq = jnp.sum(jnp.where(k == 0, seqs, 0))  # its chunks: the start of any of its paths
    walker = _KeyWalker(q, k_ref, v_ref, paths_ref, first_seq * num_path_chunks, j=j, h_kv=h_kv,
                        c=c, num_path_chunks=num_path_chunks, block_n=block_n, qk_scale=qk_scale,
                        precision=precision)
    init = (jnp.zeros((block_m, d), jnp.float32), jnp.full((block_m,), NEG, jnp.float32),
            jnp.zeros((block_m,), jnp.float32))
    last_key = jnp.full((block_m,), num_chunks * c - 1, jnp.int32)
    o, m, l = walker.keys(init, jnp.int32(0), last_key, row_ok)
    # Every row saw L >= 1 full chunks, so l >= 1.
    plgpu.store(po_ref.at[qrow[:, None], col], o / l[:, None], mask=row_ok[:, None])
    plgpu.store(plse_ref.at[qrow], m + jnp.log2(l), mask=row_ok)


# --------------------------------------------------------------------------------------------
# 2. pallas_call wrappers.
# --------------------------------------------------------------------------------------------
def _common_kw(q, k_pool, chunk_paths, config):
  S, T, h, d = q.shape
  _, h_kv, c, _ = k_pool.shape
  return dict(T=T, g=h // h_kv, h=h, h_kv=h_kv, c=c, num_path_chunks=chunk_paths.shape[1],
              block_m=config.block_m, block_n=config.block_n,
              precision=_common.dot_precision(q.dtype))


def _flat_pool(x):
  n, h_kv, c, d = x.shape
  return x.reshape(n * h_kv * c, d)


def _shared_prefix_call(q, k_pool, v_pool, num_tokens, chunk_paths, item_seqs, item_num_seqs,
                        item_num_chunks, partials, *, config, qk_scale, interpret):
  S, T, h, d = q.shape
  kw = _common_kw(q, k_pool, chunk_paths, config)
  I, M = item_seqs.shape
  row_blocks = pl.cdiv(M * T * kw["g"], config.block_m)
  kernel = functools.partial(_shared_prefix_kernel, M=M, qk_scale=qk_scale, **kw)
  flat = (jax.ShapeDtypeStruct((S * T * h, d), jnp.float32),
          jax.ShapeDtypeStruct((S * T * h,), jnp.float32))
  args = [item_seqs.reshape(-1), item_num_seqs, item_num_chunks, num_tokens,
          chunk_paths.reshape(-1), q.reshape(S * T * h, d), _flat_pool(k_pool), _flat_pool(v_pool)]
  extra = {}
  if partials is not None:
    # Write into the caller's buffers (tests poison them): unwritten entries keep their values.
    args += [partials[0].reshape(flat[0].shape), partials[1].reshape(flat[1].shape)]
    extra["input_output_aliases"] = {8: 0, 9: 1}
    body = kernel
    kernel = lambda *refs: body(*refs[:8], *refs[10:])  # the aliased inputs are not read
  po, plse = pl.pallas_call(
      kernel,
      grid=(row_blocks, kw["h_kv"], I),
      out_shape=flat,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name=f"prefill_shared_g{kw['g']}_m{config.block_m}_n{config.block_n}",
      **extra,
  )(*args)
  return po.reshape(S, T, h, d), plse.reshape(S, T, h)


def _prefill_call(q, k_pool, v_pool, positions, chunk_paths, num_tokens, shared, out, *, config,
                  qk_scale, interpret):
  """shared: None or (seq_shared_chunks [S], partial o [S, T, h, d], partial lse [S, T, h])."""
  S, T, h, d = q.shape
  kw = _common_kw(q, k_pool, chunk_paths, config)
  block_t = config.block_m // kw["g"]
  num_token_blocks = pl.cdiv(T, block_t)
  kernel = functools.partial(_prefill_kernel, shared=shared is not None,
                             num_token_blocks=num_token_blocks, qk_scale=qk_scale, **kw)
  args = [num_tokens, positions.reshape(-1), chunk_paths.reshape(-1)]
  if shared is not None:
    args += [shared[0], shared[1].reshape(S * T * h, d), shared[2].reshape(S * T * h)]
  args += [q.reshape(S * T * h, d), _flat_pool(k_pool), _flat_pool(v_pool)]
  extra = {}
  if out is not None:
    # Write into the caller's buffer (tests poison it): padding entries keep their values.
    n_in = len(args)
    args.append(out.reshape(S * T * h, d))
    extra["input_output_aliases"] = {n_in: 0}
    body = kernel
    kernel = lambda *refs: body(*refs[:n_in], refs[n_in + 1])
  o = pl.pallas_call(
      kernel,
      grid=(num_token_blocks, kw["h_kv"], S),
      out_shape=jax.ShapeDtypeStruct((S * T * h, d), q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name=(f"prefill{'_merge' if shared is not None else ''}_g{kw['g']}_m{config.block_m}"
            f"_n{config.block_n}"),
      **extra,
  )(*args)  # Whole-array refs (no BlockSpec): rows are addressed by computed indices.
  return o.reshape(S, T, h, d)


# --------------------------------------------------------------------------------------------
# 3. Public jitted functions.
# --------------------------------------------------------------------------------------------
def _check(q, k_pool, v_pool, positions, chunk_paths, num_tokens, items, out, *, pallas):
  """Trace-time shape/dtype checks. Returns (S, T, h, h_kv, c, d)."""
  if q.ndim != 4:
    raise ValueError(f"q must be [S, T, h, d], got {q.shape=}")
  S, T, h, d = q.shape
  _common.check_qkv(q.reshape(S * T, h, d), k_pool, v_pool, pallas=pallas)
  _, h_kv, c, _ = k_pool.shape
  _common.check_int("positions", positions, (S, T))
  _common.check_int("chunk_paths", chunk_paths, (S, None))
  if chunk_paths.shape[1] < 1:
    raise ValueError(f"chunk_paths needs at least one chunk per sequence: {chunk_paths.shape=}")
  if num_tokens is not None:
    _common.check_int("num_tokens", num_tokens, (S,))
  if items is not None:
    item_seqs, item_num_seqs, item_num_chunks, seq_shared_chunks = items
    _common.check_int("item_seqs", item_seqs, (None, None))
    I = item_seqs.shape[0]
    _common.check_int("item_num_seqs", item_num_seqs, (I,))
    _common.check_int("item_num_chunks", item_num_chunks, (I,))
    _common.check_int("seq_shared_chunks", seq_shared_chunks, (S,))
  if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
    raise ValueError(f"out must match q: {q.shape=} {q.dtype=} {out.shape=} {out.dtype=}")
  return S, T, h, h_kv, c, d


def _items(item_seqs, item_num_seqs, item_num_chunks, seq_shared_chunks):
  given = [x is not None for x in (item_seqs, item_num_seqs, item_num_chunks, seq_shared_chunks)]
  if any(given) and not all(given):
    raise ValueError("shared-prefix items need all of item_seqs, item_num_seqs, item_num_chunks "
                     "and seq_shared_chunks")
  return (item_seqs, item_num_seqs, item_num_chunks, seq_shared_chunks) if all(given) else None


def _num_tokens(num_tokens, S, T):
  return jnp.full((S,), T, jnp.int32) if num_tokens is None else num_tokens


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret"))
def prefill_attention(q, k_pool, v_pool, positions, chunk_paths, num_tokens=None, *,
                      item_seqs=None, item_num_seqs=None, item_num_chunks=None,
                      seq_shared_chunks=None, out=None, sm_scale: float | None = None,
                      config: PrefillConfig | None = None, interpret: bool = False):
  """Causal prefill attention over the chunk pool (Pallas, Triton backend).

  Args:
    q: [S, T, h, d] queries of the new tokens (post-RoPE), float16/bfloat16/float32.
    k_pool, v_pool: [n_chunks, h_kv, c, d], q's dtype, the new tokens' K/V already written.
    positions: int32 [S, T] position of each new token; key p of a sequence is visible to a token
      iff p <= its position.
    chunk_paths: int32 [S, Pc] each sequence's pool slots, root to leaf, covering every position
      of its valid tokens (entries past them are never read).
    num_tokens: int32 [S] valid new tokens of each sequence (default T): tokens t >= num_tokens
      are padding, computed by nobody and written by nobody; a sequence with 0 is a padding row.
    item_seqs, item_num_seqs, item_num_chunks, seq_shared_chunks: optional shared-prefix items
      (module docstring; all or none). With items, a shared pass runs first (two kernels).
    out: optional [S, T, h, d] buffer written in place (tests poison it); default: a fresh,
      uninitialised buffer (padding entries unspecified).
    sm_scale: score scale, default 1/sqrt(d).
    config: tuning knobs (default `PrefillConfig.default`).
    interpret: run the kernels in Pallas interpret mode (CPU).

  Returns:
    [S, T, h, d] in q.dtype.
  """
  items = _items(item_seqs, item_num_seqs, item_num_chunks, seq_shared_chunks)
  S, T, h, h_kv, c, d = _check(q, k_pool, v_pool, positions, chunk_paths, num_tokens, items, out,
                               pallas=True)
  num_tokens = _num_tokens(num_tokens, S, T)
  g = h // h_kv
  config = PrefillConfig.default(d=d, g=g, dtype=q.dtype) if config is None else config
  if config.block_m < g:
    raise ValueError(f"block_m must hold a whole query group: {config.block_m=} < {g=}")
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  qk_scale = float(sm_scale) * LOG2E
  shared = None
  if items is not None and items[0].shape[0] > 0:
    partials = _shared_prefix_call(q, k_pool, v_pool, num_tokens, chunk_paths, *items[:3], None,
                                   config=config, qk_scale=qk_scale, interpret=interpret)
    shared = (items[3], *partials)
  return _prefill_call(q, k_pool, v_pool, positions, chunk_paths, num_tokens, shared, out,
                       config=config, qk_scale=qk_scale, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret"))
def shared_prefix(q, k_pool, v_pool, num_tokens, chunk_paths, item_seqs, item_num_seqs,
                  item_num_chunks, partials=None, *, sm_scale: float | None = None,
                  config: PrefillConfig | None = None, interpret: bool = False):
  """The shared pass alone (Pallas): partials of every item's rows over its chunks.

  Args: as `prefill_attention`; partials: optional (o f32 [S, T, h, d], lse f32 [S, T, h])
  buffers written in place (rows of no item keep their values).

  Returns:
    (o f32 [S, T, h, d] normalised, lse f32 [S, T, h] base-2 log-sum-exp of the scores times
    log2(e)); rows of no item and padding tokens are not written.
  """
  S, T, h, d = q.shape
  positions = jnp.zeros((S, T), jnp.int32)
  items = (item_seqs, item_num_seqs, item_num_chunks, jnp.zeros((S,), jnp.int32))
  S, T, h, h_kv, c, d = _check(q, k_pool, v_pool, positions, chunk_paths, num_tokens, items, None,
                               pallas=True)
  g = h // h_kv
  config = PrefillConfig.default(d=d, g=g, dtype=q.dtype) if config is None else config
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  return _shared_prefix_call(q, k_pool, v_pool, num_tokens, chunk_paths, item_seqs, item_num_seqs,
                             item_num_chunks, partials, config=config,
                             qk_scale=float(sm_scale) * LOG2E, interpret=interpret)


def prefill(q, k_pool, v_pool, positions, chunk_paths, num_tokens=None, *, impl: str = "xla",
            item_seqs=None, item_num_seqs=None, item_num_chunks=None, seq_shared_chunks=None,
            out=None, sm_scale: float | None = None, config: PrefillConfig | None = None,
            block_q: int | None = None, block_kv: int | None = None):
  """Prefill attention with the implementation as data (arguments as `prefill_attention`).

  impl: "pallas" (`prefill_attention`, GPU), "pallas_interpret" (the same kernels in interpret
  mode, CPU), "xla" (`prefill_attention_xla`, which reads every sequence's chunks itself: the
  shared-prefix items are checked and otherwise ignored). `config` applies to the Pallas kernels,
  `block_q` / `block_kv` to the XLA path.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown prefill impl {impl!r}; expected one of {IMPLS}")
  items = dict(item_seqs=item_seqs, item_num_seqs=item_num_seqs, item_num_chunks=item_num_chunks,
               seq_shared_chunks=seq_shared_chunks)
  if impl == "xla":
    _items(**items)
    return prefill_attention_xla(q, k_pool, v_pool, positions, chunk_paths, num_tokens, out,
                                 sm_scale=sm_scale, block_q=block_q, block_kv=block_kv)
  return prefill_attention(q, k_pool, v_pool, positions, chunk_paths, num_tokens, out=out,
                           sm_scale=sm_scale, config=config, interpret=impl == "pallas_interpret",
                           **items)


def validate_prefill_arrays(positions, chunk_paths, num_tokens, *, n_chunks: int, chunk_size: int,
                            item_seqs=None, item_num_seqs=None, item_num_chunks=None,
                            seq_shared_chunks=None) -> None:
  """Eager value checks (NumPy) that every read stays inside the pool and the items are sound.

  Raises `InvalidPrefillError` naming the first bad field: chunk slots outside [0, n_chunks),
  num_tokens outside [0, T], a valid token's position outside the path (or negative), an item
  whose sequences do not share its chunks, an item key not before every new token of its
  sequences, a sequence in two items, seq_shared_chunks not matching its item.
  """
  positions, chunk_paths = np.asarray(positions, np.int64), np.asarray(chunk_paths)
  S, T = positions.shape
  Pc = chunk_paths.shape[1]
  num_tokens = np.full(S, T) if num_tokens is None else np.asarray(num_tokens)
  if ((chunk_paths < 0) | (chunk_paths >= n_chunks)).any():
    raise InvalidPrefillError(f"chunk_paths holds slots outside the pool's [0, {n_chunks}): "
                              f"{chunk_paths[(chunk_paths < 0) | (chunk_paths >= n_chunks)][:4]}")
  if ((num_tokens < 0) | (num_tokens > T)).any():
    raise InvalidPrefillError(f"num_tokens must be in [0, {T}]: {num_tokens}")
  valid = np.arange(T)[None, :] < num_tokens[:, None]
  bad = valid & ((positions < 0) | (positions >= Pc * chunk_size))
  if bad.any():
    s, t = np.argwhere(bad)[0]
    raise InvalidPrefillError(f"positions[{s}, {t}] = {positions[s, t]} is outside the chunk "
                              f"path's {Pc * chunk_size} tokens")
  if item_seqs is None:
    return
  item_seqs, item_num_seqs = np.asarray(item_seqs), np.asarray(item_num_seqs)
  item_num_chunks, seq_shared_chunks = np.asarray(item_num_chunks), np.asarray(seq_shared_chunks)
  first_pos = np.where(valid, positions, np.iinfo(np.int32).max).min(axis=1)  # [S]
  expected = np.zeros(S, np.int64)
  for i in range(item_seqs.shape[0]):
    L, n = int(item_num_chunks[i]), int(item_num_seqs[i])
    if L == 0:
      continue
    if not 1 <= n <= item_seqs.shape[1] or L > Pc:
      raise InvalidPrefillError(f"item {i}: item_num_seqs {n} / item_num_chunks {L} out of range")
    seqs = item_seqs[i, :n]
    if ((seqs < 0) | (seqs >= S)).any() or len(set(seqs.tolist())) != n:
      raise InvalidPrefillError(f"item {i}: item_seqs {seqs} not distinct sequences in [0, {S})")
    if (expected[seqs] > 0).any():
      raise InvalidPrefillError(f"item {i}: a sequence of {seqs} is in two items")
    if (chunk_paths[seqs, :L] != chunk_paths[seqs[0], :L]).any():
      raise InvalidPrefillError(f"item {i}: its sequences' paths differ in the first {L} chunks")
    if (first_pos[seqs] < L * chunk_size).any():
      raise InvalidPrefillError(f"item {i}: its {L} chunks do not all precede the new tokens of "
                                f"sequences {seqs} (first positions {first_pos[seqs]})")
    expected[seqs] = L
  if (seq_shared_chunks != expected).any():
    raise InvalidPrefillError(f"seq_shared_chunks {seq_shared_chunks} does not match the items "
                              f"({expected})")


# --------------------------------------------------------------------------------------------
# 4. Plain-jnp references: the blocked XLA path (CPU) and the shared pass.
# --------------------------------------------------------------------------------------------
# Default blocking of the XLA path: scores are [S, h, block_q, block_kv * c] fp32 at a time.
XLA_BLOCK_Q = 256
XLA_BLOCK_KEYS = 256


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_kv"))
def prefill_attention_xla(q, k_pool, v_pool, positions, chunk_paths, num_tokens=None, out=None, *,
                          sm_scale: float | None = None, block_q: int | None = None,
                          block_kv: int | None = None):
  """Same contract as `prefill_attention`, in plain XLA, without materialising scores.

  A sequential map over query blocks of `block_q` tokens (default `XLA_BLOCK_Q`); inside, a loop
  over key tiles of `block_kv` chunks (default: `XLA_BLOCK_KEYS` keys' worth) up to the block's
  last position (causal tiles past it are skipped), gathering each tile's chunks from the pool,
  with an online softmax (fp32). Temporary memory is O(S h block_q (block_kv c + d)) plus the
  output. Padding tokens are written as zeros (or keep `out`'s values).

  Returns:
    [S, T, h, d] in q.dtype.
  """
  S, T, h, h_kv, c, d = _check(q, k_pool, v_pool, positions, chunk_paths, num_tokens, None, out,
                               pallas=False)
  num_tokens = _num_tokens(num_tokens, S, T)
  g = h // h_kv
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  bq = min(T, XLA_BLOCK_Q if block_q is None else block_q)
  tc = max(1, (XLA_BLOCK_KEYS if block_kv is None else block_kv * c) // c)  # chunks per tile
  nq = pl.cdiv(T, bq)
  Pc = chunk_paths.shape[1]
  n_tiles_max = pl.cdiv(Pc, tc)
  paths = jnp.pad(chunk_paths, ((0, 0), (0, n_tiles_max * tc - Pc)))  # slot 0: masked below
  pad_t = nq * bq - T
  valid = jnp.arange(T)[None, :] < num_tokens[:, None]
  qb = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0))).reshape(S, nq, bq, h_kv, g, d)
  pb = jnp.pad(jnp.where(valid, positions, -1), ((0, 0), (0, pad_t)),
               constant_values=-1).reshape(S, nq, bq)
  prec = lax.Precision.HIGHEST

  def query_block(args):
    qi, pos = args  # [S, bq, h_kv, g, d], [S, bq] (-1: padding)
    last = jnp.max(pos, axis=1)  # [S] each sequence's last key in this block
    n_tiles = jnp.minimum(jnp.max(last) // (tc * c) + 1, n_tiles_max)  # 0 if all padding

    def tile(n, carry):
      o, m, l = carry  # [S, h_kv, g, bq, d], [S, h_kv, g, bq] x 2
      slots = lax.dynamic_slice_in_dim(paths, n * tc, tc, axis=1)  # [S, tc]
      kt = k_pool[slots].transpose(0, 2, 1, 3, 4).reshape(S, h_kv, tc * c, d)
      vt = v_pool[slots].transpose(0, 2, 1, 3, 4).reshape(S, h_kv, tc * c, d)
      key = n * tc * c + jnp.arange(tc * c)
      # K/V past a sequence's last query position may be stale or unwritten: a 0 * NaN there would
      # poison the output, so those values are zeroed before use.
      live = (key[None, :] <= last[:, None])[:, None, :, None]  # [S, 1, n, 1]
      kt, vt = jnp.where(live, kt, 0), jnp.where(live, vt, 0)
      s = jnp.einsum("sbjgd,sjnd->sjgbn", qi, kt, preferred_element_type=jnp.float32,
                     precision=prec) * sm_scale
      mask = (key[None, None, :] <= pos[:, :, None])[:, None, None]  # [S, 1, 1, bq, n]
      s = jnp.where(mask, s, NEG)
      m_new = jnp.maximum(m, s.max(-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      o = alpha[..., None] * o + jnp.einsum("sjgbn,sjnd->sjgbd", p.astype(vt.dtype), vt,
                                            preferred_element_type=jnp.float32, precision=prec)
      return o, m_new, alpha * l + p.sum(-1)

    init = (jnp.zeros((S, h_kv, g, bq, d), jnp.float32),
            jnp.full((S, h_kv, g, bq), NEG, jnp.float32), jnp.zeros((S, h_kv, g, bq), jnp.float32))
    if n_tiles_max == 1:  # one tile: no loop (it would only slow the compile of small shapes)
      o, _, l = tile(0, init)
    else:
      o, _, l = lax.fori_loop(0, n_tiles, tile, init)
    o = o / jnp.where(l > 0, l, 1.0)[..., None]
    return jnp.moveaxis(o, 3, 1).reshape(S, bq, h, d).astype(q.dtype)

  if nq == 1:
    o = query_block((qb[:, 0], pb[:, 0]))[None]
  else:
    o = lax.map(query_block, (jnp.moveaxis(qb, 1, 0), jnp.moveaxis(pb, 1, 0)))  # [nq, S, bq, h, d]
  o = jnp.moveaxis(o, 0, 1).reshape(S, nq * bq, h, d)[:, :T]
  keep = jnp.zeros_like(q) if out is None else out
  return jnp.where(valid[:, :, None, None], o, keep)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def shared_prefix_reference(q, k_pool, v_pool, num_tokens, chunk_paths, item_seqs, item_num_seqs,
                            item_num_chunks, partials=None, *, sm_scale: float | None = None):
  """Same contract as `shared_prefix`, in plain XLA (dense over each item's chunks: for tests and
  small shapes). Without `partials`, rows of no item are NaN."""
  S, T, h, d = q.shape
  _, h_kv, c, _ = k_pool.shape
  g = h // h_kv
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  I, M = item_seqs.shape
  Pc = chunk_paths.shape[1]
  if partials is None:
    partials = (jnp.full((S, T, h, d), jnp.nan, jnp.float32), jnp.full((S, T, h), jnp.nan,
                                                                         jnp.float32))
  po, plse = partials
  seqs = jnp.clip(item_seqs, 0, S - 1)  # [I, M]
  live = ((jnp.arange(M)[None, :] < item_num_seqs[:, None]) & (item_num_chunks[:, None] > 0))
  slots = chunk_paths[seqs[:, 0]]  # [I, Pc]
  kk = k_pool[slots].transpose(0, 2, 1, 3, 4).reshape(I, h_kv, Pc * c, d)
  vv = v_pool[slots].transpose(0, 2, 1, 3, 4).reshape(I, h_kv, Pc * c, d)
  key_ok = (jnp.arange(Pc * c)[None, :] < item_num_chunks[:, None] * c)[:, None, None, None, None]
  qi = q[seqs].reshape(I, M, T, h_kv, g, d)
  f32 = lambda x: x.astype(jnp.float32)  # (the CPU has no bf16 x bf16 -> f32 dot of this form)
  s = jnp.einsum("imtjgd,ijnd->imtjgn", f32(qi), f32(kk),
                 precision=lax.Precision.HIGHEST) * (sm_scale * LOG2E)
  s = jnp.where(key_ok, s, NEG)
  m = s.max(-1)
  p = jnp.where(key_ok, jnp.exp2(s - m[..., None]), 0.0)
  l = p.sum(-1)
  o = jnp.einsum("imtjgn,ijnd->imtjgd", f32(p.astype(vv.dtype)), f32(vv),
                 precision=lax.Precision.HIGHEST) / jnp.where(l > 0, l, 1.0)[..., None]
  lse = m + jnp.log2(jnp.where(l > 0, l, 1.0))
  ok = live[:, :, None] & (jnp.arange(T)[None, None, :] < num_tokens[seqs][:, :, None])  # [I,M,T]
  dst = jnp.where(ok, seqs[:, :, None], S)  # dead rows go out of bounds and are dropped
  tt = jnp.broadcast_to(jnp.arange(T), ok.shape)
  po = po.at[dst, tt].set(o.reshape(I, M, T, h, d), mode="drop")
  plse = plse.at[dst, tt].set(lse.reshape(I, M, T, h), mode="drop")
  return po, plse
