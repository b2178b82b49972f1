"""Plan + reference attention == dense attention over K/V assembled independently per sequence."""

import jax.numpy as jnp
import numpy as np
import pytest

from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.plan import build_plan
from chunkattn_jax.prefix_tree import PrefixTree
from chunkattn_jax.reference_attention import reference_decode_attention
from dense_oracle import dense_attention, sequence_kv


def random_multilevel_tree(rng, c, capacity=512, seed=0):
  """Several system prompts, few-shot blocks under them, private suffixes off chunk boundaries."""
  tree = PrefixTree(ChunkPool(capacity, seed=seed), c)
  systems = [rng.integers(0, 1000, size=n).tolist() for n in (2 * c, 3 * c + 1)]
  shots = [rng.integers(0, 1000, size=n).tolist() for n in (c, 2 * c)]
  for n in (3, c - 1, c, c + 1, 2 * c + 1, 1, 5):
    prompt = systems[rng.integers(2)] + (shots[rng.integers(2)] if rng.random() < 0.7 else [])
    tree.insert(prompt + rng.integers(0, 1000, size=n).tolist())
  tree.insert(rng.integers(0, 1000, size=c + 3).tolist())  # unrelated
  return tree


@pytest.mark.parametrize("c, h, h_kv, threshold", [(4, 4, 4, 1), (8, 8, 2, 1), (4, 8, 1, 2),
                                                   (16, 4, 4, 100)])
def test_reference_matches_dense(rng, c, h, h_kv, threshold):
  tree = random_multilevel_tree(rng, c)
  d = 16
  k_pool = rng.standard_normal((tree.pool.capacity, h_kv, c, d)).astype(np.float32)
  v_pool = rng.standard_normal((tree.pool.capacity, h_kv, c, d)).astype(np.float32)
  plan = build_plan(tree, threshold=threshold, max_chunks_per_item=2)
  if threshold == 1:
    assert plan.num_shared_items() >= 3
  q = rng.standard_normal((plan.row_capacity, h, d)).astype(np.float32)
  out = np.asarray(reference_decode_attention(jnp.asarray(q), k_pool, v_pool, plan))
  assert not np.isnan(out).any()
  for r, sid in enumerate(tree.seq_ids()):
    k, v = sequence_kv(k_pool, v_pool, tree.chunk_path(sid), tree.length(sid))
    np.testing.assert_allclose(out[r], dense_attention(q[r], k, v), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(out[len(tree):], 0.0)


def test_reference_follows_length_delta(rng):
  c = 4
  tree = PrefixTree(ChunkPool(64, seed=2), c)
  ids = [tree.insert([1] * 8 + [i]).seq_id for i in range(3)]
  from chunkattn_jax.plan import PlanBuilder
  builder = PlanBuilder(tree)
  builder.plan()
  tree.append_tokens(ids, [5, 6, 7])
  plan = builder.plan()
  assert int(plan.length_delta) == 1
  k_pool = rng.standard_normal((64, 2, c, 8)).astype(np.float32)
  v_pool = rng.standard_normal((64, 2, c, 8)).astype(np.float32)
  q = rng.standard_normal((plan.row_capacity, 2, 8)).astype(np.float32)
  out = np.asarray(reference_decode_attention(jnp.asarray(q), k_pool, v_pool, plan))
  for r, sid in enumerate(tree.seq_ids()):
    k, v = sequence_kv(k_pool, v_pool, tree.chunk_path(sid), tree.length(sid))
    np.testing.assert_allclose(out[r], dense_attention(q[r], k, v), rtol=2e-5, atol=2e-5)


def test_reference_rejects_bad_shapes(rng):
  tree = PrefixTree(16, 4)
  tree.insert([1, 2, 3])
  plan = build_plan(tree)
  pool = jnp.zeros((16, 3, 4, 8))
  with pytest.raises(ValueError, match="rows"):
    reference_decode_attention(jnp.zeros((3, 3, 8)), pool, pool, plan)
  with pytest.raises(ValueError, match="multiple of KV heads"):
    reference_decode_attention(jnp.zeros((8, 4, 8)), pool, pool, plan)
