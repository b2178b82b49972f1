"""Device KV pool: the K/V bytes of every chunk slot of the host `ChunkPool`, for every layer.

Layout (docs/design.md §1): per layer `k, v: [n_chunks, h_kv, c, d]`; token `t` of the chunk in
slot `s` lives at `k[s, :, t, :]`. `KVPool` holds `L` such layers (logically `[L, n_chunks, h_kv, c, d]`).
One host tree/pool serves every layer, so one `(slot, offset)` pair addresses a token in all layers.

Writes address tokens by `slots: int32 [n, 2]` = (pool slot, offset in chunk), exactly what
`PrefixTree.insert/append` return. A slot equal to `n_chunks` (`pool.drop_slot`) is a padding entry
whose write is dropped; the engine pads ragged batches with it so jitted shapes stay fixed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVPool:
  """K/V storage of all layers: one `[n_chunks, h_kv, c, d]` array per layer and per K/V.

  Attributes:
    k: tuple of `L` arrays `[n_chunks, h_kv, c, d]`, the keys (post-RoPE) of layer `i` at `k[i]`.
    v: tuple of `L` arrays `[n_chunks, h_kv, c, d]`, the values.

  Logically this is `k, v: [L, n_chunks, h_kv, c, d]` (`stacked()` returns that view). The layers
  are kept as separate buffers so that an attention kernel reads layer `i`'s pool in place: slicing
  `k_all[i]` out of one stacked array would make XLA copy the whole layer pool before every custom
  (Pallas) call, doubling the decode memory traffic.
  """
  k: tuple
  v: tuple

  @classmethod
  def create(cls, num_layers: int, n_chunks: int, num_kv_heads: int, chunk_size: int,
             head_dim: int, dtype=jnp.float32, sharding=None) -> "KVPool":
    """A zero-filled pool. `sharding` (optional) is a `jax.sharding.Sharding` for every array."""
    shape = (n_chunks, num_kv_heads, chunk_size, head_dim)
    if min(shape) < 1 or num_layers < 1:
      raise ValueError(f"every KV pool dimension must be >= 1, got {num_layers=} {shape=}")
    make = functools.partial(jnp.zeros, shape, dtype)
    if sharding is not None:
      make = jax.jit(make, out_shardings=sharding)
    return cls(k=tuple(make() for _ in range(num_layers)), v=tuple(make() for _ in range(num_layers)))

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def n_chunks(self) -> int:
    return self.k[0].shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.k[0].shape[1]

  @property
  def chunk_size(self) -> int:
    return self.k[0].shape[2]

  @property
  def head_dim(self) -> int:
    return self.k[0].shape[3]

  @property
  def dtype(self):
    return self.k[0].dtype

  @property
  def drop_slot(self) -> int:
    """The padding slot id whose writes are dropped (`n_chunks`)."""
    return self.n_chunks

  def stacked(self) -> tuple[jax.Array, jax.Array]:
    """`(k, v)` as `[L, n_chunks, h_kv, c, d]` arrays (a copy)."""
    return jnp.stack(self.k), jnp.stack(self.v)

  def nbytes_per_chunk(self) -> int:
    """Bytes of K plus V of one chunk slot across all layers."""
    per = self.num_layers * self.num_kv_heads * self.chunk_size * self.head_dim
    return 2 * per * jnp.dtype(self.dtype).itemsize

  def nbytes(self) -> int:
    return self.n_chunks * self.nbytes_per_chunk()


def write_layer(k_pool: jax.Array, v_pool: jax.Array, k_new: jax.Array, v_new: jax.Array,
                slots: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes one layer's new K/V at `(slot, offset)` pairs (traceable; use inside jit).

  Args:
    k_pool, v_pool: `[n_chunks, h_kv, c, d]` one layer's pool.
    k_new, v_new: `[n, h_kv, d]` the new tokens' K/V (cast to the pool dtype).
    slots: `int32 [n, 2]` = (pool slot, offset); rows with slot `n_chunks` are dropped.

  Returns:
    The updated `(k_pool, v_pool)`.
  """
  if k_new.ndim != 3 or k_new.shape != v_new.shape:
    raise ValueError(f"expected k_new, v_new [n, h_kv, d], got {k_new.shape=} {v_new.shape=}")
  if slots.ndim != 2 or slots.shape != (k_new.shape[0], 2):
    raise ValueError(f"expected slots [n, 2] with n = {k_new.shape[0]}, got {slots.shape=}")
  if k_pool.shape[1] != k_new.shape[1] or k_pool.shape[3] != k_new.shape[2]:
    raise ValueError(f"pool {k_pool.shape=} does not match new K/V {k_new.shape=}")
  slot, off = slots[:, 0], slots[:, 1]
  # Advanced indices separated by a slice move to the front: the update is [n, h_kv, d].
  idx = (slot, slice(None), off)
  k_pool = k_pool.at[idx].set(k_new.astype(k_pool.dtype), mode="drop")
  v_pool = v_pool.at[idx].set(v_new.astype(v_pool.dtype), mode="drop")
  return k_pool, v_pool


@functools.partial(jax.jit, donate_argnums=(0,))
def write(pool: KVPool, k_new: jax.Array, v_new: jax.Array, slots: jax.Array) -> KVPool:
  """Jitted write of new tokens' K/V into every layer (the pool is donated).

  Args:
    pool: the pool (`L` layers of `[n_chunks, h_kv, c, d]`).
    k_new, v_new: `[L, n, h_kv, d]`.
    slots: `int32 [n, 2]` = (pool slot, offset); rows with slot `n_chunks` are dropped.

  Returns:
    The updated pool.
  """
  if k_new.ndim != 4 or k_new.shape[0] != pool.num_layers:
    raise ValueError(f"expected k_new [L, n, h_kv, d] with L = {pool.num_layers}, got {k_new.shape=}")
  ks, vs = [], []
  for i in range(pool.num_layers):
    k, v = write_layer(pool.k[i], pool.v[i], k_new[i], v_new[i], slots)
    ks.append(k)
    vs.append(v)
  return KVPool(k=tuple(ks), v=tuple(vs))


def gather_tokens(pool: KVPool, layer: int, chunk_path, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Eager helper for tests/debugging: one sequence's K/V, `[length, h_kv, d]` each."""
  path = np.asarray(chunk_path, np.int64)
  k = np.asarray(pool.k[layer])[path]  # [p, h_kv, c, d]
  v = np.asarray(pool.v[layer])[path]
  k = np.swapaxes(k, 1, 2).reshape(-1, k.shape[1], k.shape[3])[:length]
  v = np.swapaxes(v, 1, 2).reshape(-1, v.shape[1], v.shape[3])[:length]
  return k, v


def pad_slots(slots, size: int, drop_slot: int) -> np.ndarray:
  """Pads `int32 [n, 2]` slots to `[size, 2]` with `(drop_slot, 0)` rows (host side)."""
  slots = np.asarray(slots, np.int32).reshape(-1, 2)
  if slots.shape[0] > size:
    raise ValueError(f"cannot pad {slots.shape[0]} slots to {size}")
  out = np.zeros((size, 2), np.int32)
  out[:, 0] = drop_slot
  out[: slots.shape[0]] = slots
  return out


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
  """The no-sharing baseline: a dense per-request cache, `L` layers of `[B, T_max, h_kv, d]`.

  Every request reserves `T_max` token slots whether it uses them or not, and a prefix common to
  several requests is stored (and read) once per request.
  """
  k: tuple
  v: tuple

  @classmethod
  def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, sharding=None) -> "DenseKVCache":
    shape = (batch, max_len, num_kv_heads, head_dim)
    make = functools.partial(jnp.zeros, shape, dtype)
    if sharding is not None:
      make = jax.jit(make, out_shardings=sharding)
    return cls(k=tuple(make() for _ in range(num_layers)), v=tuple(make() for _ in range(num_layers)))

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for a in self.k + self.v)
