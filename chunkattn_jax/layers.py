"""A Flax nnx attention layer over the chunked, prefix-shared KV cache (and the pieces it uses).

`ChunkAttention` is a drop-in causal self-attention block for any JAX model: q/k/v/o projections,
RoPE, GQA. It writes the new tokens' K/V into the pool slots the prefix tree assigned and attends:

* prefill (`PrefillInputs`): the new tokens of `S` sequences attend causally to their sequence's
  cached prefix chunks (read from the pool through the chunk path) and to themselves; only the
  unmatched suffix is computed;
* decode (`DecodeInputs`): one new token per plan row, the two-phase `decode_attention` over a
  `DecodePlan` (chunk-first pass over shared chunks, sequence-first over private ones);
* dense (`DenseInputs`): a plain per-request dense KV cache, the no-sharing baseline.

Pool and inputs go in and out explicitly (pytrees), so a model step is a pure function that jits
cleanly; the attention implementation is a constructor argument (`impl`), never a branch spread
through a model. Shape vocabulary: docs/design.md (`S` sequences, `T` new tokens per sequence,
`R` plan rows, `D` model width, `h`, `h_kv`, `g = h // h_kv`, `d`, `c`, `n_chunks`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from chunkattn_jax import attention
from chunkattn_jax import kv_pool as kv_pool_lib
from chunkattn_jax import rope as rope_lib
from pallas_kernels import prefill as prefill_lib

IMPLS = attention.IMPLS
# The name of the mesh axis that splits KV heads (and with them the query heads of each group).
MODEL_AXIS = "model"


# ----------------------------------------------------------------------------- inputs (pytrees)
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["positions", "slots", "chunk_paths", "num_tokens", "sharing"],
                   meta_fields=["check"])
@dataclasses.dataclass(frozen=True)
class PrefillInputs:
  """Prefill of the unmatched suffixes of `S` sequences, each padded to `T` tokens.

  Attributes:
    positions: int32 `[S, T]` absolute position of each new token in its sequence (padding
      tokens: any position < the sequence length, e.g. 0; their outputs are garbage).
    slots: int32 `[S, T, 2]` (pool slot, offset) where each token's K/V is written; padding tokens
      and tokens whose K/V is already cached use slot `n_chunks` (write dropped).
    chunk_paths: int32 `[S, Pc]` each sequence's pool slots, root to leaf, covering at least every
      position in `positions`; padded with any valid slot (masked by causality).
    num_tokens: optional int32 `[S]` valid new tokens per sequence (tokens `t >= num_tokens[s]`
      are padding; the Pallas and XLA paths then skip them). Default: all `T` are computed.
    sharing: optional `PrefillSharing` (`prefill_sharing.plan_prefill_sharing`): cached chunks
      that several sequences share, read once for all of them by the Pallas path.
    check: validate the index arrays (`check_prefill_inputs`, and `num_tokens` / `sharing`) when
      the layer gets them as concrete values (outside `jit`); on by default. The engine, which
      builds them from the tree, passes False. Static (part of the pytree structure).
  """
  positions: Any
  slots: Any
  chunk_paths: Any
  num_tokens: Any = None
  sharing: Any = None
  check: bool = True


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["positions", "slots", "plan"], meta_fields=["check"])
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  """One new token per plan row.

  Attributes:
    positions: int32 `[R]` position of each row's new token (spare rows: 0).
    slots: int32 `[R, 2]` (pool slot, offset) of each row's new token, already appended to the
      tree (so the plan's lengths include it); spare rows use slot `n_chunks` (write dropped).
    plan: the `DecodePlan` (rows in plan row order).
    check: validate the host-side inputs (`check_decode_inputs`) when they are concrete (outside
      `jit`); on by default. The engine, whose plans come from its own tree, passes False. Static.
  """
  positions: Any
  slots: Any
  plan: Any
  check: bool = True


@functools.partial(jax.tree_util.register_dataclass, data_fields=["positions"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DenseInputs:
  """Tokens of `B` requests against a dense per-request cache `[B, T_max, h_kv, d]` (baseline).

  Attributes:
    positions: int32 `[B, T]` position of each token; the K/V of a token at position `p` is written
      at cache row `p`; padding tokens use position `T_max` (write dropped, output garbage).
  """
  positions: Any


# ----------------------------------------------------------------------------- input checks
def _host(*arrays) -> list[np.ndarray] | None:
  """The arrays as NumPy, or None if any is traced (inside `jit` nothing can be checked)."""
  if any(isinstance(a, jax.core.Tracer) for a in arrays):
    return None
  return [np.asarray(a) for a in arrays]


def _check_index_array(a: np.ndarray, name: str, shape: tuple) -> None:
  if a.dtype.kind not in "iu":
    raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
  if a.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


def _first(mask: np.ndarray) -> tuple[int, ...]:
  return tuple(int(x) for x in np.argwhere(mask)[0])


def _check_writes(slot: np.ndarray, off: np.ndarray, live: np.ndarray, name: str,
                  n_chunks: int, chunk_size: int) -> None:
  """Written (slot, offset) pairs must be inside the pool and distinct: a negative slot would wrap
  to the end of the pool, a repeated one races. `live` marks the entries to check; slot `n_chunks`
  drops a write."""
  outside = live & ((slot < 0) | (slot > n_chunks) | (off < 0) | (off >= chunk_size))
  if outside.any():
    i = _first(outside)
    raise ValueError(f"{name}{list(i)} = ({int(slot[i])}, {int(off[i])}): the pool has slots "
                     f"[0, {n_chunks}) ({n_chunks} drops the write) and offsets [0, {chunk_size})")
  keys = np.sort((slot.astype(np.int64) * chunk_size + off)[live & (slot != n_chunks)])
  repeated = keys[1:][keys[1:] == keys[:-1]]
  if repeated.size:
    k = int(repeated[0])
    raise ValueError(f"{name}: (slot {k // chunk_size}, offset {k % chunk_size}) is written by "
                     f"{int((keys == k).sum())} tokens")


def check_prefill_inputs(positions, slots, chunk_paths, *, n_chunks: int, chunk_size: int) -> bool:
  """Checks prefill inputs against a pool of `n_chunks` chunks of `chunk_size` tokens.

  Vectorised NumPy, O(S * (T + Pc)) plus a sort of the written slots: well under a millisecond
  for a few thousand tokens. Rejects what would read or write the wrong pool memory silently (XLA
  clamps out-of-range gathers and wraps negative scatter indices):

  * integer arrays shaped `positions [S, T]`, `slots [S, T, 2]`, `chunk_paths [S, Pc]`;
  * chunk path entries outside `[0, n_chunks)`;
  * positions < 0 or beyond the chunk path (`>= Pc * chunk_size`);
  * written slots outside the pool, offsets outside `[0, chunk_size)`, the same (slot, offset)
    written twice, and a token written anywhere but where its sequence's attention reads it:
    `(chunk_paths[s, p // c], p % c)` for position `p` (slot `n_chunks` drops a write).

  Returns:
    True if checked, False if any array is traced (inside `jit`: check the host arrays before the
    jitted call instead).

  Raises:
    ValueError: naming the field, the index and the value.
  """
  host = _host(positions, slots, chunk_paths)
  if host is None:
    return False
  positions, slots, chunk_paths = host
  c = chunk_size
  if positions.ndim != 2:
    raise ValueError(f"PrefillInputs.positions must be [S, T], got shape {positions.shape}")
  s_, t = positions.shape
  _check_index_array(positions, "PrefillInputs.positions", (s_, t))
  _check_index_array(slots, "PrefillInputs.slots", (s_, t, 2))
  if chunk_paths.ndim != 2:
    raise ValueError(f"PrefillInputs.chunk_paths must be [S, Pc], got shape {chunk_paths.shape}")
  _check_index_array(chunk_paths, "PrefillInputs.chunk_paths", (s_, chunk_paths.shape[1]))
  pc = chunk_paths.shape[1]
  if chunk_paths.size and (chunk_paths.min() < 0 or chunk_paths.max() >= n_chunks):
    i = _first((chunk_paths < 0) | (chunk_paths >= n_chunks))
    raise ValueError(f"PrefillInputs.chunk_paths{list(i)} = {int(chunk_paths[i])} is outside the "
                     f"pool's slots [0, {n_chunks})")
  if positions.size and (positions.min() < 0 or positions.max() >= pc * c):
    i = _first((positions < 0) | (positions >= pc * c))
    raise ValueError(f"PrefillInputs.positions{list(i)} = {int(positions[i])} is outside the chunk "
                     f"path, which covers positions [0, {pc * c}) ({pc} chunks of {c})")
  slot, off = slots[..., 0], slots[..., 1]
  written = slot != n_chunks
  path_slot = np.take_along_axis(chunk_paths, positions // c, axis=1)  # [S, T]
  misplaced = written & ((slot != path_slot) | (off != positions % c))
  if misplaced.any():
    _check_writes(slot, off, misplaced, "PrefillInputs.slots", n_chunks, c)  # outside the pool?
    i = _first(misplaced)
    raise ValueError(
        f"PrefillInputs.slots{list(i)} = ({int(slot[i])}, {int(off[i])}), but position "
        f"{int(positions[i])} of sequence {i[0]} is read from (chunk_paths[{i[0]}, "
        f"{int(positions[i]) // c}] = {int(path_slot[i])}, {int(positions[i]) % c})")
  _check_writes(slot, off, written, "PrefillInputs.slots", n_chunks, c)
  return True


def check_decode_inputs(positions, slots, num_rows, *, n_chunks: int, chunk_size: int) -> bool:
  """Checks the per-row decode inputs (not the plan, which `attention.decode_attention`
  validates): integer `positions [R]` >= 0 and `slots [R, 2]` written inside the pool, each
  (slot, offset) at most once; rows from `num_rows` (the plan's, a scalar) on are spare and not
  checked.

  Returns True if checked, False if any array is traced. Raises ValueError.
  """
  host = _host(positions, slots, num_rows)
  if host is None:
    return False
  positions, slots, num_rows = host
  r = positions.shape[0] if positions.ndim == 1 else -1
  _check_index_array(positions, "DecodeInputs.positions", (r,))
  _check_index_array(slots, "DecodeInputs.slots", (r, 2))
  live = np.arange(r) < num_rows
  negative = live & (positions < 0)
  if negative.any():
    i = _first(negative)[0]
    raise ValueError(f"DecodeInputs.positions[{i}] = {int(positions[i])} is negative")
  _check_writes(slots[:, 0], slots[:, 1], live, "DecodeInputs.slots", n_chunks, chunk_size)
  return True


# ----------------------------------------------------------------------------- RoPE
def rope_frequencies(head_dim: int, theta: float, scaling: rope_lib.RopeScaling | None = None
                     ) -> np.ndarray:
  """float32 `[d // 2]` inverse frequencies (`rope.inverse_frequencies`; default: `theta ** (-2i / d)`)."""
  return rope_lib.inverse_frequencies(head_dim, theta, scaling)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               scaling: rope_lib.RopeScaling | None = None) -> jax.Array:
  """Rotary embedding in the half-split ("rotate_half") convention, computed in float32.

  Pair `(x[i], x[i + d/2])` is rotated by `positions * inv_freq[i]`, with HF's inverse frequencies
  for `theta` and `scaling` (`rope.py`). This is the convention of Hugging Face Llama checkpoints
  (whose q/k weights were permuted from Meta's interleaved layout for it), so HF weights load
  without any permutation (see `checkpoint.py`).

  Args:
    x: `[..., n, d]` (heads axis `n` just before `d`).
    positions: int `[...]` matching `x.shape[:-2]`.
    theta: RoPE base.
    scaling: optional `rope.RopeScaling` (linear, dynamic, llama3).

  Returns:
    `[..., n, d]` in `x.dtype`.
  """
  return rope_lib.apply_rope(x, positions, rope_frequencies(x.shape[-1], theta, scaling))


# ----------------------------------------------------------------------------- attention functions
def _softmax_attend(q, k, v, mask, sm_scale):
  """q `[..., h_kv, g, t, d]`, k/v `[..., h_kv, n, d]`, mask bool `[..., t, n]` -> `[..., h_kv, g, t, d]`.

  fp32 softmax; fully masked rows give zeros.
  """
  s = jnp.einsum("...hgtd,...hnd->...hgtn", q.astype(jnp.float32), k.astype(jnp.float32))
  s = s * sm_scale
  mask = mask[..., None, None, :, :]
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("...hgtn,...hnd->...hgtd", p, v.astype(jnp.float32))
  return o / jnp.where(l > 0, l, 1.0)


def prefill_attention(q: jax.Array, positions: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                      chunk_paths: jax.Array, *, sm_scale: float | None = None,
                      impl: str = "xla", num_tokens: jax.Array | None = None, sharing=None,
                      check: bool = True, **knobs) -> jax.Array:
  """Causal attention of new tokens to their sequence's chunks in the pool (already written).

  Args:
    q: `[S, T, h, d]` queries (post-RoPE).
    positions: int32 `[S, T]` query positions; key `j` of a sequence is visible iff `j <= position`.
    k_pool, v_pool: `[n_chunks, h_kv, c, d]` one layer's pool, the new tokens' K/V already written.
    chunk_paths: int32 `[S, Pc]` each sequence's chunk slots, root to leaf (padding masked).
    sm_scale: softmax scale, default `1/sqrt(d)`.
    impl: one of `IMPLS`: "pallas" (the flash-attention kernel over the chunk pool,
      `pallas_kernels.prefill`; GPU), "pallas_interpret" (the same in interpret mode, CPU), "xla"
      (the blocked XLA path: online softmax over key tiles, memory O(T x tile); the CPU default)
      or "reference" (gathers every sequence's chunks and materialises the `[S, h, T, n]` scores);
      "mosaic" / "mosaic_interpret" (decode-only backends) prefill as "pallas" / "pallas_interpret".
    num_tokens: optional int32 `[S]` valid new tokens per sequence (padding tokens are skipped by
      "pallas" and "xla" and output zeros).
    sharing: optional `PrefillSharing` for the Pallas paths (the others read every sequence's
      chunks themselves and only check it).
    check: when the arrays are concrete (outside `jit`), reject chunk path entries outside the
      pool, valid tokens' positions the path does not cover, and unsound sharing items
      (`pallas_kernels.InvalidPrefillError`, a ValueError).
    **knobs: `config` (Pallas) or `block_q` / `block_kv` (XLA).

  Returns:
    `[S, T, h, d]` in `q.dtype`.
  """
  s_, t, h, d = q.shape
  n_chunks, h_kv, c, _ = k_pool.shape
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
  if h % h_kv:
    raise ValueError(f"query heads must be a multiple of KV heads: {q.shape=} {k_pool.shape=}")
  if chunk_paths.ndim != 2 or chunk_paths.shape[0] != s_:
    raise ValueError(f"expected chunk_paths [S, Pc] with S = {s_}, got {chunk_paths.shape=}")
  if positions.shape != (s_, t):
    raise ValueError(f"expected positions [S, T] = {(s_, t)}, got {positions.shape=}")
  items = {} if sharing is None else sharing.kernel_kwargs()
  arrays = (positions, chunk_paths, num_tokens, *items.values())
  if check and not any(isinstance(x, jax.core.Tracer) for x in arrays):
    prefill_lib.validate_prefill_arrays(
        positions, chunk_paths, num_tokens, n_chunks=n_chunks, chunk_size=c,
        **{k: np.asarray(v) for k, v in items.items()})
  if impl != "reference":
    # No Mosaic prefill kernel yet: layers that decode with "mosaic*" prefill with the Triton one.
    impl = {"mosaic": "pallas", "mosaic_interpret": "pallas_interpret"}.get(impl, impl)
    if num_tokens is not None and impl != "xla" and "out" not in knobs:
      # The kernels write no padding token: start from zeros, as the XLA path returns them (the
      # next layer's norms and MLP then never see uninitialised memory).
      knobs["out"] = jnp.zeros_like(q)
    return prefill_lib.prefill(q, k_pool, v_pool, positions, chunk_paths, num_tokens, impl=impl,
                               sm_scale=sm_scale, **items, **knobs)
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  pc = chunk_paths.shape[1]
  k = jnp.moveaxis(k_pool[chunk_paths], 2, 1).reshape(s_, h_kv, pc * c, d)
  v = jnp.moveaxis(v_pool[chunk_paths], 2, 1).reshape(s_, h_kv, pc * c, d)
  qg = jnp.moveaxis(q.reshape(s_, t, h_kv, h // h_kv, d), 1, 3)  # [S, h_kv, g, T, d]
  mask = jnp.arange(pc * c)[None, None, :] <= positions[:, :, None]  # [S, T, n]
  o = _softmax_attend(qg, k, v, mask, sm_scale)  # [S, h_kv, g, T, d]
  return jnp.moveaxis(o, 3, 1).reshape(s_, t, h, d).astype(q.dtype)


def dense_attention(q: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    *, sm_scale: float | None = None) -> jax.Array:
  """Causal attention against a dense per-request cache (already written).

  Args:
    q: `[B, T, h, d]`; positions: int32 `[B, T]`; k_cache, v_cache: `[B, T_max, h_kv, d]`.

  Returns:
    `[B, T, h, d]` in `q.dtype`.
  """
  b, t, h, d = q.shape
  t_max, h_kv = k_cache.shape[1], k_cache.shape[2]
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  k = jnp.moveaxis(k_cache, 2, 1)  # [B, h_kv, T_max, d]
  v = jnp.moveaxis(v_cache, 2, 1)
  qg = jnp.moveaxis(q.reshape(b, t, h_kv, h // h_kv, d), 1, 3)
  mask = jnp.arange(t_max)[None, None, :] <= positions[:, :, None]
  o = _softmax_attend(qg, k, v, mask, sm_scale)
  return jnp.moveaxis(o, 3, 1).reshape(b, t, h, d).astype(q.dtype)


def decode_attention(q, k_pool, v_pool, plan, *, impl: str = "xla", sm_scale=None,
                     validate: bool = True):
  """Two-phase decode attention, `[R, h, d]` -> `[R, h, d]`: `chunkattn_jax.attention`'s, with the
  implementation (one of `IMPLS`) as data."""
  return attention.decode_attention(q, k_pool, v_pool, plan, impl=impl, sm_scale=sm_scale,
                                    validate=validate)


# ----------------------------------------------------------------------------- the layer
class ChunkAttention(nnx.Module):
  """Causal self-attention over a chunked prefix-shared KV pool (or a dense cache), with RoPE.

  Args:
    embed_dim: model width `D`.
    num_heads: query heads `h`.
    num_kv_heads: KV heads `h_kv` (GQA; must divide `h`).
    head_dim: `d` (default `D // h`).
    rope_theta: RoPE base (10000 for Llama-2, 500000 for Llama-3).
    rope_scaling: optional `rope.RopeScaling` (linear, dynamic, llama3 frequency schedules).
    impl: attention implementation (one of `IMPLS`), for decode (`decode_attention`) and prefill
      (`prefill_attention`): "pallas" and "pallas_interpret" run the Pallas kernels (prefill:
      the flash kernel over the chunk pool), "xla" the plain-XLA two-phase decode and blocked
      prefill, "reference" the dense gathers.
    sm_scale: softmax scale (default `1/sqrt(d)`).
    use_bias: biases on the q/k/v projections.
    use_output_bias: a bias on the o projection (Llama's `attention_bias` puts biases on q, k, v
      and o; Qwen2-style models bias only q, k, v).
    dtype: computation dtype (None: the param dtype).
    param_dtype: parameter dtype.
    mesh: optional `jax.sharding.Mesh` with axis `MODEL_AXIS`; attention then runs under
      `shard_map` with KV heads (and their query heads) split over that axis.
    rngs: `nnx.Rngs`.

  `sharding.shard_model` places the parameters: q/k/v kernels split on their output (head) axis,
  o on its input axis, over `MODEL_AXIS`.
  """

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
               *, rope_theta: float = 10000.0, rope_scaling: rope_lib.RopeScaling | None = None,
               impl: str = "xla", sm_scale: float | None = None, use_bias: bool = False,
               use_output_bias: bool = False, dtype=None, param_dtype=jnp.float32, mesh=None,
               rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads must be a multiple of num_kv_heads, got {num_heads=} {num_kv_heads=}")
    if impl not in IMPLS:
      raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    head_dim = embed_dim // num_heads if head_dim is None else head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = float(rope_theta)
    self.rope_scaling = rope_scaling
    rope_frequencies(head_dim, self.rope_theta, rope_scaling)  # bad RoPE settings fail here
    self.impl = impl
    self.sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    self.mesh = mesh
    lin = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = lin(embed_dim, num_heads * head_dim, use_bias=use_bias)
    self.k_proj = lin(embed_dim, num_kv_heads * head_dim, use_bias=use_bias)
    self.v_proj = lin(embed_dim, num_kv_heads * head_dim, use_bias=use_bias)
    self.o_proj = lin(num_heads * head_dim, embed_dim, use_bias=use_output_bias)

  def _qkv(self, x, positions):
    """x `[..., D]`, positions `[...]` -> q `[..., h, d]`, k, v `[..., h_kv, d]` (q, k rotated)."""
    lead = x.shape[:-1]
    q = self.q_proj(x).reshape(*lead, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
    inv_freq = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    return (rope_lib.apply_rope(q, positions, inv_freq), rope_lib.apply_rope(k, positions, inv_freq),
            v)

  def _sharded(self, fn, head_axes_in, head_axes_out, n_replicated):
    """Wraps `fn(*head_sharded_args, *replicated_args)` in shard_map over KV heads if a mesh is set."""
    if self.mesh is None:
      return fn
    def spec(ndim, axis):
      s = [None] * ndim
      s[axis] = MODEL_AXIS
      return P(*s)
    def wrapped(*args):
      n_sharded = len(args) - n_replicated
      in_specs = tuple(spec(a.ndim, ax) for a, ax in zip(args[:n_sharded], head_axes_in))
      in_specs += tuple(jax.tree.map(lambda _: P(), a) for a in args[n_sharded:])
      out_specs = spec(head_axes_out[0], head_axes_out[1])
      return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)(*args)
    return wrapped

  def __call__(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, inputs
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention for new tokens; writes their K/V and returns the updated cache.

    Args:
      x: `[S, T, D]` for `PrefillInputs`, `[R, D]` for `DecodeInputs`, `[B, T, D]` for `DenseInputs`.
      k_cache, v_cache: this layer's pool `[n_chunks, h_kv, c, d]` (prefill/decode) or dense
        cache `[B, T_max, h_kv, d]` (dense).
      inputs: `PrefillInputs`, `DecodeInputs` or `DenseInputs`.

    Returns:
      `(y, k_cache, v_cache)`: `y` shaped like `x`; the caches with the new K/V written.
    """
    if x.shape[-1] != self.q_proj.in_features:
      raise ValueError(f"expected x [..., {self.q_proj.in_features}], got {x.shape=}")
    if isinstance(inputs, PrefillInputs):
      if x.ndim != 3 or inputs.positions.shape != x.shape[:2]:
        raise ValueError(f"prefill expects x [S, T, D] and positions [S, T], got {x.shape=} "
                         f"{inputs.positions.shape=}")
      if inputs.check:
        check_prefill_inputs(inputs.positions, inputs.slots, inputs.chunk_paths,
                             n_chunks=k_cache.shape[0], chunk_size=k_cache.shape[2])
      q, k, v = self._qkv(x, inputs.positions)
      s_, t = x.shape[:2]
      slots = inputs.slots.reshape(s_ * t, 2)
      k_cache, v_cache = kv_pool_lib.write_layer(
          k_cache, v_cache, k.reshape(s_ * t, *k.shape[2:]), v.reshape(s_ * t, *v.shape[2:]), slots)
      attn = self._sharded(
          lambda q_, kp, vp, pos, paths, num_tokens, sharing: prefill_attention(
              q_, pos, kp, vp, paths, sm_scale=self.sm_scale, impl=self.impl,
              num_tokens=num_tokens, sharing=sharing, check=inputs.check),
          (2, 1, 1), (4, 2), 4)
      o = attn(q, k_cache, v_cache, inputs.positions, inputs.chunk_paths, inputs.num_tokens,
               inputs.sharing)
    elif isinstance(inputs, DecodeInputs):
      if x.ndim != 2 or inputs.positions.shape != x.shape[:1]:
        raise ValueError(f"decode expects x [R, D] and positions [R], got {x.shape=} "
                         f"{inputs.positions.shape=}")
      if inputs.check:
        check_decode_inputs(inputs.positions, inputs.slots, inputs.plan.num_rows,
                            n_chunks=k_cache.shape[0], chunk_size=k_cache.shape[2])
        # The plan's values too (skipped for traced plans, e.g. inside the engine's jitted step).
        attention.validate_plan(inputs.plan, k_cache.shape[0])
      q, k, v = self._qkv(x, inputs.positions)
      k_cache, v_cache = kv_pool_lib.write_layer(k_cache, v_cache, k, v, inputs.slots)
      attn = self._sharded(
          lambda q_, kp, vp, plan: decode_attention(q_, kp, vp, plan, impl=self.impl,
                                                    sm_scale=self.sm_scale, validate=False),
          (1, 1, 1), (3, 1), 1)
      o = attn(q, k_cache, v_cache, inputs.plan)
    elif isinstance(inputs, DenseInputs):
      if x.ndim != 3 or inputs.positions.shape != x.shape[:2]:
        raise ValueError(f"dense expects x [B, T, D] and positions [B, T], got {x.shape=} "
                         f"{inputs.positions.shape=}")
      q, k, v = self._qkv(x, inputs.positions)
      b = x.shape[0]
      bidx = jnp.broadcast_to(jnp.arange(b)[:, None], inputs.positions.shape)
      k_cache = k_cache.at[bidx, inputs.positions].set(k.astype(k_cache.dtype), mode="drop")
      v_cache = v_cache.at[bidx, inputs.positions].set(v.astype(v_cache.dtype), mode="drop")
      attn = self._sharded(
          lambda q_, kc, vc, pos: dense_attention(q_, pos, kc, vc, sm_scale=self.sm_scale),
          (2, 2, 2), (4, 2), 1)
      o = attn(q, k_cache, v_cache, inputs.positions)
    else:
      raise TypeError(f"unsupported attention inputs {type(inputs).__name__}")
    o = o.reshape(*o.shape[:-2], self.num_heads * self.head_dim)
    return self.o_proj(o), k_cache, v_cache
