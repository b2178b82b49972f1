"""Shared test helpers: small trees and an fp32 dense attention written independently of the code
under test."""

import numpy as np
import pytest


def dense_attention_fp32(q, k, v, scale=None):
  """One query against one sequence's keys, numpy fp64->fp32.

  q: [h, d]; k, v: [n, h_kv, d]. Returns [h, d] float32.
  """
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  v = np.asarray(v, np.float64)
  h, d = q.shape
  h_kv = k.shape[1]
  g = h // h_kv
  scale = d ** -0.5 if scale is None else scale
  out = np.zeros((h, d))
  for head in range(h):
    kh = k[:, head // g, :]
    s = kh @ q[head] * scale
    p = np.exp(s - s.max())
    out[head] = (p / p.sum()) @ v[:, head // g, :]
  return out.astype(np.float32)


def sequence_kv(k_pool, v_pool, chunk_path, length, chunk_size):
  """K/V of one sequence read chunk by chunk from the pool: [length, h_kv, d] each."""
  k_pool = np.asarray(k_pool)
  v_pool = np.asarray(v_pool)
  ks = [k_pool[s].transpose(1, 0, 2) for s in chunk_path]  # [c, h_kv, d]
  vs = [v_pool[s].transpose(1, 0, 2) for s in chunk_path]
  return np.concatenate(ks)[:length], np.concatenate(vs)[:length]


@pytest.fixture
def rng():
  return np.random.default_rng(0)
