"""The tests' oracle: dense attention in float64 NumPy over one sequence's K/V, read chunk by chunk
from the pool through the tree (never through the plan or the code under test)."""

import numpy as np


def dense_attention(q, k, v, scale=None):
  """One query per head against one sequence.

  Args:
    q: [h, d]; k, v: [n, h_kv, d] (h % h_kv == 0); scale: default 1/sqrt(d).

  Returns:
    [h, d] float64.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  h, d = q.shape
  g = h // k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  out = np.empty((h, d))
  for head in range(h):
    s = k[:, head // g] @ q[head] * scale
    w = np.exp(s - s.max())
    out[head] = w @ v[:, head // g] / w.sum()
  return out


def sequence_kv(k_pool, v_pool, chunk_path, length):
  """K/V of one sequence: the pool chunks on its path, concatenated, cut to its length.

  Args:
    k_pool, v_pool: [n_chunks, h_kv, c, d]; chunk_path: pool slots root to leaf; length: tokens.

  Returns:
    (k, v), each [length, h_kv, d] float64.
  """
  k_pool = np.asarray(k_pool, np.float64)
  v_pool = np.asarray(v_pool, np.float64)
  k = np.concatenate([k_pool[s].transpose(1, 0, 2) for s in chunk_path])[:length]
  v = np.concatenate([v_pool[s].transpose(1, 0, 2) for s in chunk_path])[:length]
  return k, v
