import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkattn_jax import kv_pool
from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.prefix_tree import PrefixTree


def test_create_shapes_and_bytes():
  pool = kv_pool.KVPool.create(3, 10, 2, 4, 8, dtype=jnp.bfloat16)
  assert pool.num_layers == 3 and pool.n_chunks == 10 and pool.num_kv_heads == 2
  assert pool.chunk_size == 4 and pool.head_dim == 8 and pool.drop_slot == 10
  assert pool.stacked()[0].shape == (3, 10, 2, 4, 8)
  assert pool.nbytes_per_chunk() == 2 * 3 * 2 * 4 * 8 * 2
  assert pool.nbytes() == 10 * pool.nbytes_per_chunk()
  with pytest.raises(ValueError, match="must be >= 1"):
    kv_pool.KVPool.create(1, 0, 2, 4, 8)


def test_write_through_tree_slots_roundtrip():
  """Tokens written at the slots the tree hands out (shuffled pool) read back in order."""
  c, L, h_kv, d = 4, 2, 2, 3
  tree = PrefixTree(ChunkPool(16, seed=7), c)
  pool = kv_pool.KVPool.create(L, 16, h_kv, c, d)
  rng = np.random.default_rng(0)
  res = tree.insert(list(range(11)))
  k_new = rng.normal(size=(L, 11, h_kv, d)).astype(np.float32)
  v_new = rng.normal(size=(L, 11, h_kv, d)).astype(np.float32)
  pool = kv_pool.write(pool, k_new, v_new, jnp.asarray(res.slots))
  more = tree.append(res.seq_id, [50, 51])
  k2 = rng.normal(size=(L, 2, h_kv, d)).astype(np.float32)
  pool = kv_pool.write(pool, k2, k2, jnp.asarray(more))
  for layer in range(L):
    k, v = kv_pool.gather_tokens(pool, layer, tree.chunk_path(res.seq_id), 13)
    np.testing.assert_array_equal(k, np.concatenate([k_new[layer], k2[layer]]))
    np.testing.assert_array_equal(v[:11], v_new[layer])


def test_drop_slot_and_padding():
  pool = kv_pool.KVPool.create(1, 4, 1, 2, 2)
  slots = kv_pool.pad_slots([[1, 1]], 3, pool.drop_slot)
  np.testing.assert_array_equal(slots, [[1, 1], [4, 0], [4, 0]])
  k_new = jnp.ones((1, 3, 1, 2))
  pool = kv_pool.write(pool, k_new, 2 * k_new, jnp.asarray(slots))
  k = np.asarray(pool.k[0])
  assert k.sum() == 2 and (k[1, 0, 1] == 1).all()
  assert np.asarray(pool.v[0]).sum() == 4
  with pytest.raises(ValueError, match="cannot pad"):
    kv_pool.pad_slots(np.zeros((4, 2)), 3, 4)


def test_write_layer_validates_shapes():
  k = jnp.zeros((4, 2, 2, 3))
  with pytest.raises(ValueError, match="slots"):
    kv_pool.write_layer(k, k, jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 3)), jnp.zeros((3, 2), jnp.int32))
  with pytest.raises(ValueError, match="does not match"):
    kv_pool.write_layer(k, k, jnp.zeros((2, 1, 3)), jnp.zeros((2, 1, 3)), jnp.zeros((2, 2), jnp.int32))


def test_dense_cache():
  cache = kv_pool.DenseKVCache.create(2, 3, 8, 2, 4)
  assert cache.max_len == 8 and len(cache.k) == 2
  assert cache.nbytes() == 2 * 2 * 3 * 8 * 2 * 4 * 4
  assert jax.tree.leaves(cache)[0].shape == (3, 8, 2, 4)
