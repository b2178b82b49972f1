"""Small helpers shared by the kernel modules (plain arrays, no project imports)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

# Finite "minus infinity" for masked scores and empty running maxima. Finite on purpose:
# exp(NEG - NEG) stays finite (no inf - inf = NaN); every live quantity is far above it.
NEG = -0.7 * float(np.finfo(np.float32).max)

SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
PALLAS_HEAD_DIMS = (64, 128, 256)
PALLAS_CHUNK_SIZES = (16, 32, 64, 128)


def next_pow2(n: int) -> int:
  """Smallest power of two >= max(n, 1)."""
  n = max(int(n), 1)
  return 1 << (n - 1).bit_length()


def is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def divmod_static(x, m: int):
  """(x // m, x % m) for non-negative int32 x and a static m >= 1, as truncating lax ops (which
  equal floor semantics here) so the Triton lowering needs no sign fix-ups; m = 1 costs nothing."""
  if m == 1:
    return x, jnp.zeros_like(x)
  return lax.div(x, jnp.int32(m)), lax.rem(x, jnp.int32(m))


def partial_heads(nq: int) -> int:
  """gp: the queries of one (row, KV head) as stored in the partial buffers: nq = T * g (T tokens
  per row times g query heads per KV head), padded to a power of two."""
  return next_pow2(nq)


def dot_precision(dtype):
  """Full fp32 products for fp32 inputs (the GPU default would be TF32); default otherwise."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def tokens_per_row(q) -> int:
  """T: new tokens (queries) per row, for q [R, h, d] (T = 1) or [R, T, h, d]."""
  return 1 if q.ndim == 3 else q.shape[1]


def check_qkv(q, k_pool, v_pool, *, pallas: bool) -> tuple[int, int, int, int, int]:
  """Trace-time checks of q [R, h, d] or [R, T, h, d], k_pool/v_pool [n_chunks, h_kv, c, d].

  Returns (R, h, h_kv, c, d).
  """
  if q.ndim not in (3, 4) or 0 in q.shape:
    raise ValueError(f"q must be [R, h, d] or [R, T, h, d], got {q.shape=}")
  if k_pool.ndim != 4:
    raise ValueError(f"k_pool must be [n_chunks, h_kv, c, d], got {k_pool.shape=}")
  if v_pool.shape != k_pool.shape:
    raise ValueError(f"v_pool must match k_pool: {k_pool.shape=} {v_pool.shape=}")
  R, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  _, h_kv, c, d_kv = k_pool.shape
  if d_kv != d:
    raise ValueError(f"head dims differ: {q.shape=} {k_pool.shape=}")
  if h % h_kv:
    raise ValueError(f"query heads must be a multiple of KV heads: {q.shape=} {k_pool.shape=}")
  for name, x in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
      raise ValueError(f"{name} dtype must be float16, bfloat16 or float32: {x.dtype=}")
  if not (q.dtype == k_pool.dtype == v_pool.dtype):
    raise ValueError(f"q, k_pool, v_pool dtypes differ: {q.dtype=} {k_pool.dtype=} {v_pool.dtype=}")
  if pallas:
    if d not in PALLAS_HEAD_DIMS:
      raise ValueError(f"Pallas kernels support d in {PALLAS_HEAD_DIMS}: {q.shape=}")
    if c not in PALLAS_CHUNK_SIZES:
      raise ValueError(f"Pallas kernels support c in {PALLAS_CHUNK_SIZES}: {k_pool.shape=}")
  return R, h, h_kv, c, d


def check_int(name: str, x, shape: tuple[int | None, ...]) -> None:
  """Trace-time check of an int32 plan array's shape (None entries: any size)."""
  if x.dtype != jnp.int32:
    raise ValueError(f"{name} must be int32: {x.dtype=}")
  if len(x.shape) != len(shape) or any(s is not None and s != t for s, t in zip(shape, x.shape)):
    raise ValueError(f"{name} must have shape {shape}: {x.shape=}")


def check_partials(partials, R: int, h_kv: int, K: int, gp: int, d: int) -> None:
  """Trace-time check of a partial buffer pair (o [R, h_kv, K, gp, d], lse [R, h_kv, K, gp])."""
  want = ((R, h_kv, K, gp, d), (R, h_kv, K, gp))
  got = tuple(tuple(x.shape) for x in partials)
  if got != want or any(x.dtype != jnp.float32 for x in partials):
    raise ValueError(f"partials must be float32 (o, lse) of shapes {want}: {got=} "
                     f"{tuple(str(x.dtype) for x in partials)=}")
