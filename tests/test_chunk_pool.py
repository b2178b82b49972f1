import pytest

from chunkattn_jax.chunk_pool import ChunkPool, PoolExhaustedError


def test_allocate_free_refcounts():
  pool = ChunkPool(4)
  a = pool.allocate(3)
  assert sorted(a) == [0, 1, 2] and pool.num_free == 1 and pool.num_used == 3
  pool.incref(a[0])
  assert pool.refcount(a[0]) == 2
  assert not pool.decref(a[0])
  assert pool.decref(a[0])
  assert pool.num_free == 2 and pool.refcount(a[0]) == 0


def test_exhaustion_allocates_nothing():
  pool = ChunkPool(3)
  pool.allocate(2)
  before = pool.snapshot()
  with pytest.raises(PoolExhaustedError, match="needed 2 chunk slot.*1 free of 3"):
    pool.allocate(2)
  assert pool.snapshot() == before


def test_seeded_pool_is_shuffled_and_complete():
  pool = ChunkPool(64, seed=3)
  slots = pool.allocate(64)
  assert sorted(slots) == list(range(64)) and slots != list(range(64))


@pytest.mark.parametrize("capacity", [0, -1, 2.5, True, "8"])
def test_bad_capacity(capacity):
  with pytest.raises(ValueError, match="capacity"):
    ChunkPool(capacity)


def test_bad_slot_operations():
  pool = ChunkPool(2)
  with pytest.raises(ValueError, match="slot 5 out of range"):
    pool.incref(5)
  with pytest.raises(ValueError, match="slot 0 is free"):
    pool.decref(0)
  with pytest.raises(ValueError, match="negative"):
    pool.allocate(-1)
