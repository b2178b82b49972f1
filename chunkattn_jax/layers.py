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
from pallas_kernels import prefill as prefill_lib

IMPLS = attention.IMPLS
# The name of the mesh axis that splits KV heads (and with them the query heads of each group).
MODEL_AXIS = "model"


# ----------------------------------------------------------------------------- inputs (pytrees)
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["positions", "slots", "chunk_paths", "num_tokens", "sharing"],
                   meta_fields=[])
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
  """
  positions: Any
  slots: Any
  chunk_paths: Any
  num_tokens: Any = None
  sharing: Any = None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["positions", "slots", "plan"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  """One new token per plan row.

  Attributes:
    positions: int32 `[R]` position of each row's new token (spare rows: 0).
    slots: int32 `[R, 2]` (pool slot, offset) of each row's new token, already appended to the
      tree (so the plan's lengths include it); spare rows use slot `n_chunks` (write dropped).
    plan: the `DecodePlan` (rows in plan row order).
  """
  positions: Any
  slots: Any
  plan: Any


@functools.partial(jax.tree_util.register_dataclass, data_fields=["positions"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DenseInputs:
  """Tokens of `B` requests against a dense per-request cache `[B, T_max, h_kv, d]` (baseline).

  Attributes:
    positions: int32 `[B, T]` position of each token; the K/V of a token at position `p` is written
      at cache row `p`; padding tokens use position `T_max` (write dropped, output garbage).
  """
  positions: Any


# ----------------------------------------------------------------------------- RoPE
def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """float32 `[d // 2]` inverse frequencies `theta ** (-2i / d)`."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {head_dim=}")
  return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the half-split ("rotate_half") convention, computed in float32.

  Pair `(x[i], x[i + d/2])` is rotated by `positions * theta ** (-2i/d)`. This is the convention of
  Hugging Face Llama checkpoints (whose q/k weights were permuted from Meta's interleaved layout for
  it), so HF weights load without any permutation (see `checkpoint.py`).

  Args:
    x: `[..., n, d]` (heads axis `n` just before `d`).
    positions: int `[...]` matching `x.shape[:-2]`.
    theta: RoPE base.

  Returns:
    `[..., n, d]` in `x.dtype`.
  """
  d = x.shape[-1]
  inv = jnp.asarray(rope_frequencies(d, theta))
  angle = positions.astype(jnp.float32)[..., None, None] * inv  # [..., 1, d/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


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
                      validate: bool = True, **knobs) -> jax.Array:
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
      or "reference" (gathers every sequence's chunks and materialises the `[S, h, T, n]` scores).
    num_tokens: optional int32 `[S]` valid new tokens per sequence (padding tokens are skipped by
      "pallas" and "xla" and output zeros / unspecified values).
    sharing: optional `PrefillSharing` for the Pallas paths (the others read every sequence's
      chunks themselves and only check it).
    validate: check concrete (non-traced) arrays first (`pallas_kernels.InvalidPrefillError`).
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
  items = {} if sharing is None else sharing.kernel_kwargs()
  arrays = (positions, chunk_paths, num_tokens, *items.values())
  if validate and not any(isinstance(x, jax.core.Tracer) for x in arrays):
    prefill_lib.validate_prefill_arrays(
        positions, chunk_paths, num_tokens, n_chunks=n_chunks, chunk_size=c,
        **{k: np.asarray(v) for k, v in items.items()})
  if impl != "reference":
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


def decode_attention(q, k_pool, v_pool, plan, *, impl: str = "xla", sm_scale=None):
  """Two-phase decode attention, `[R, h, d]` -> `[R, h, d]`: `chunkattn_jax.attention`'s, with the
  implementation (one of `IMPLS`) as data."""
  return attention.decode_attention(q, k_pool, v_pool, plan, impl=impl, sm_scale=sm_scale)


# ----------------------------------------------------------------------------- the layer
class ChunkAttention(nnx.Module):
  """Causal self-attention over a chunked prefix-shared KV pool (or a dense cache), with RoPE.

  Args:
    embed_dim: model width `D`.
    num_heads: query heads `h`.
    num_kv_heads: KV heads `h_kv` (GQA; must divide `h`).
    head_dim: `d` (default `D // h`).
    rope_theta: RoPE base (10000 for Llama-2, 500000 for Llama-3).
    impl: attention implementation (one of `IMPLS`), for decode (`decode_attention`) and prefill
      (`prefill_attention`): "pallas" and "pallas_interpret" run the Pallas kernels (prefill:
      the flash kernel over the chunk pool), "xla" the plain-XLA two-phase decode and blocked
      prefill, "reference" the dense gathers.
    sm_scale: softmax scale (default `1/sqrt(d)`).
    use_bias: biases on the q/k/v projections (Qwen-style); o has none.
    dtype: computation dtype (None: the param dtype).
    param_dtype: parameter dtype.
    mesh: optional `jax.sharding.Mesh` with axis `MODEL_AXIS`; attention then runs under
      `shard_map` with KV heads (and their query heads) split over that axis.
    rngs: `nnx.Rngs`.

  `sharding.shard_model` places the parameters: q/k/v kernels split on their output (head) axis,
  o on its input axis, over `MODEL_AXIS`.
  """

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
               *, rope_theta: float = 10000.0, impl: str = "xla", sm_scale: float | None = None,
               use_bias: bool = False, dtype=None, param_dtype=jnp.float32, mesh=None,
               rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads must be a multiple of num_kv_heads, got {num_heads=} {num_kv_heads=}")
    if impl not in IMPLS:
      raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    head_dim = embed_dim // num_heads if head_dim is None else head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = float(rope_theta)
    self.impl = impl
    self.sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    self.mesh = mesh
    lin = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = lin(embed_dim, num_heads * head_dim, use_bias=use_bias)
    self.k_proj = lin(embed_dim, num_kv_heads * head_dim, use_bias=use_bias)
    self.v_proj = lin(embed_dim, num_kv_heads * head_dim, use_bias=use_bias)
    self.o_proj = lin(num_heads * head_dim, embed_dim, use_bias=False)

  def _qkv(self, x, positions):
    """x `[..., D]`, positions `[...]` -> q `[..., h, d]`, k, v `[..., h_kv, d]` (q, k rotated)."""
    lead = x.shape[:-1]
    q = self.q_proj(x).reshape(*lead, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
    return apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta), v

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
      q, k, v = self._qkv(x, inputs.positions)
      s_, t = x.shape[:2]
      slots = inputs.slots.reshape(s_ * t, 2)
      k_cache, v_cache = kv_pool_lib.write_layer(
          k_cache, v_cache, k.reshape(s_ * t, *k.shape[2:]), v.reshape(s_ * t, *v.shape[2:]), slots)
      attn = self._sharded(
          lambda q_, kp, vp, pos, paths, num_tokens, sharing: prefill_attention(
              q_, pos, kp, vp, paths, sm_scale=self.sm_scale, impl=self.impl,
              num_tokens=num_tokens, sharing=sharing),
          (2, 1, 1), (4, 2), 4)
      o = attn(q, k_cache, v_cache, inputs.positions, inputs.chunk_paths, inputs.num_tokens,
               inputs.sharing)
    elif isinstance(inputs, DecodeInputs):
      if x.ndim != 2 or inputs.positions.shape != x.shape[:1]:
        raise ValueError(f"decode expects x [R, D] and positions [R], got {x.shape=} "
                         f"{inputs.positions.shape=}")
      q, k, v = self._qkv(x, inputs.positions)
      k_cache, v_cache = kv_pool_lib.write_layer(k_cache, v_cache, k, v, inputs.slots)
      attn = self._sharded(
          lambda q_, kp, vp, plan: decode_attention(q_, kp, vp, plan, impl=self.impl,
                                                    sm_scale=self.sm_scale),
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
