"""Golden tree shapes (small chunk sizes so the expected structure is readable) and bad input."""

import gc

import numpy as np
import pytest

from chunkattn_jax.chunk_pool import ChunkPool, PoolExhaustedError
from chunkattn_jax.plan import build_plan
from chunkattn_jax.prefix_tree import PrefixTree, UnknownSequenceError


def make_tree(capacity=32, c=4, seed=None):
  return PrefixTree(ChunkPool(capacity, seed=seed), c)


def test_prompt_multiple_of_chunk_size_shares_every_chunk():
  t = make_tree()
  a = t.insert(list(range(8)))
  assert a.num_cached == 0 and a.slots.shape == (8, 2)
  b = t.insert(list(range(8)))
  assert b.num_cached == 8 and b.slots.shape == (0, 2)
  assert t.chunk_path(a.seq_id) == t.chunk_path(b.seq_id)
  assert t.pool.num_used == 2
  # Both end at the same full chunk; each append opens its own private chunk under it.
  sa = t.append(a.seq_id, [100])
  sb = t.append(b.seq_id, [200])
  assert sa[0, 1] == 0 and sb[0, 1] == 0 and sa[0, 0] != sb[0, 0]
  assert t.tokens(a.seq_id) == list(range(8)) + [100]
  assert t.tokens(b.seq_id) == list(range(8)) + [200]
  t.check_invariants()


def test_identical_prompts_share_full_chunks_but_not_tails():
  t = make_tree()
  a = t.insert(list(range(10)))
  b = t.insert(list(range(10)))
  assert b.num_cached == 8
  pa, pb = t.chunk_path(a.seq_id), t.chunk_path(b.seq_id)
  assert pa[:2] == pb[:2] and pa[2] != pb[2]
  assert b.slots.tolist() == [[pb[2], 0], [pb[2], 1]]
  assert t.num_shared_chunks(a.seq_id) == 2
  t.check_invariants()


def test_divergence_inside_a_chunk_shares_only_earlier_chunks():
  t = make_tree()
  a = t.insert([0, 1, 2, 3, 4, 5, 6, 7, 8])
  b = t.insert([0, 1, 2, 3, 4, 5, 9, 9, 9, 9])
  assert b.num_cached == 4
  pa, pb = t.chunk_path(a.seq_id), t.chunk_path(b.seq_id)
  assert pa[0] == pb[0] and pa[1] != pb[1]
  assert len(pb) == 3 and t.pool.num_used == 5
  t.check_invariants()


def test_partial_tail_is_not_matched_until_full():
  t = make_tree()
  a = t.insert([1, 2, 3])
  assert t.insert([1, 2, 3, 4, 5]).num_cached == 0  # a's chunk is partial: not shareable
  t.append(a.seq_id, [4])  # a's chunk fills, but the first full [1, 2, 3, 4] stays the match
  c = t.insert([1, 2, 3, 4, 6])
  assert c.num_cached == 4
  t.check_invariants()


def test_min_new_tokens_leaves_the_last_chunk_uncached():
  t = make_tree()
  t.insert(list(range(8)))
  r = t.insert(list(range(8)), min_new_tokens=1)
  assert r.num_cached == 4 and r.slots.shape == (4, 2)
  assert t.match_length(list(range(8))) == 8


def test_removing_a_middle_row_shifts_later_rows():
  t = make_tree()
  sys_prompt = list(range(8))
  ids = [t.insert(sys_prompt + [10 + i]).seq_id for i in range(3)]
  plan = build_plan(t)
  assert plan.row_seq_ids[:3].tolist() == ids
  freed = t.remove(ids[1])
  assert len(freed) == 1  # only the private tail; the shared chunks stay
  plan = build_plan(t)
  assert plan.row_seq_ids[:2].tolist() == [ids[0], ids[2]]
  assert plan.item_row_begin[0] == 0 and plan.item_row_end[0] == 2
  with pytest.raises(UnknownSequenceError):
    t.tokens(ids[1])
  t.check_invariants()


def test_removing_everything_returns_every_chunk():
  t = make_tree(capacity=64, seed=1)
  ids = [t.insert(list(range(n)) + [99] * (n % 3)).seq_id for n in range(1, 20, 2)]
  for i in ids[::2]:
    t.append(i, [5, 6, 7, 8, 9])
  for i in ids:
    t.remove(i)
  assert t.pool.num_free == 64 and len(t) == 0 and t.seq_ids() == []
  t.check_invariants()


def test_forest_of_roots_and_depth_first_rows():
  t = make_tree()
  a = t.insert([1, 1, 1, 1, 2])
  b = t.insert([5, 5, 5, 5, 6])
  c = t.insert([1, 1, 1, 1, 3])
  assert t.seq_ids() == [a.seq_id, c.seq_id, b.seq_id]  # c sits under a's first chunk


def test_multi_token_append_crosses_chunks():
  t = make_tree()
  a = t.insert([0, 1, 2])
  slots = t.append(a.seq_id, list(range(3, 12)))
  path = t.chunk_path(a.seq_id)
  assert len(path) == 3
  expected = [[path[p // 4], p % 4] for p in range(3, 12)]
  assert slots.tolist() == expected
  out = t.append_many({a.seq_id: [1], t.insert([7]).seq_id: [8, 9]})
  assert [v.shape for v in out.values()] == [(1, 2), (2, 2)]
  t.check_invariants()


@pytest.mark.parametrize("tokens, match", [
    ([], "empty"), ([1.5, 2.0], "integers"), ("abc", "string"), ([1, -2], "non-negative"),
    ([[1, 2]], "1-D"), ([True, False], "integers"), ([1, "a"], "integers"), (None, "1-D"),
])
def test_bad_tokens_leave_tree_unchanged(tokens, match):
  t = make_tree()
  a = t.insert([1, 2, 3, 4, 5])
  before = t.snapshot()
  with pytest.raises(ValueError, match=match):
    t.insert(tokens)
  with pytest.raises(ValueError, match=match):
    t.append(a.seq_id, tokens)
  with pytest.raises(ValueError, match=match):
    t.append_many({a.seq_id: tokens})
  assert t.snapshot() == before


def test_unknown_and_removed_ids():
  t = make_tree()
  a = t.insert([1, 2, 3])
  t.remove(a.seq_id)
  before = t.snapshot()
  for bad in (a.seq_id, 12345, "x", None):
    for op in (t.remove, t.tokens, t.chunk_path, lambda s: t.append(s, [1])):
      with pytest.raises(UnknownSequenceError, match="unknown sequence id"):
        op(bad)
  assert t.snapshot() == before


def test_append_many_is_all_or_nothing_on_unknown_id():
  t = make_tree()
  a = t.insert([1, 2, 3])
  before = t.snapshot()
  with pytest.raises(UnknownSequenceError, match="777"):
    t.append_many({a.seq_id: [4], 777: [5]})
  with pytest.raises(ValueError, match="repeated"):
    t.append_tokens([a.seq_id, a.seq_id], [1, 2])
  assert t.snapshot() == before


def test_pool_exhausted_mid_insert_and_mid_append():
  t = make_tree(capacity=4)
  a = t.insert(list(range(8)))  # 2 full chunks
  b = t.insert([9, 9, 9, 9])    # 1 full chunk; 1 slot left
  before = t.snapshot()
  with pytest.raises(PoolExhaustedError, match="needed 2"):
    t.insert(list(range(8)) + [1, 2, 3, 4, 5])  # matches 2 chunks, needs 2 more
  assert t.snapshot() == before
  with pytest.raises(PoolExhaustedError, match="needed 2"):
    t.append_many({a.seq_id: [1], b.seq_id: [1, 2, 3]})  # a's append would fit alone
  assert t.snapshot() == before
  with pytest.raises(PoolExhaustedError, match="needed 2"):
    t.append_tokens([a.seq_id, b.seq_id], [1, 2])
  assert t.snapshot() == before
  t.append_tokens([a.seq_id], [1])  # exactly fits
  t.check_invariants()


@pytest.mark.parametrize("c", [0, 1, 3, 6, 512, 2.0, True, -4])
def test_chunk_size_must_be_power_of_two(c):
  with pytest.raises(ValueError, match="chunk_size must be a power of two"):
    PrefixTree(8, c)


def test_bad_min_new_tokens():
  t = make_tree()
  before = t.snapshot()
  with pytest.raises(ValueError, match="min_new_tokens"):
    t.insert([1, 2], min_new_tokens=3)
  assert t.snapshot() == before


def test_prefix_cache_keeps_full_chunks_of_removed_sequences():
  t = PrefixTree(ChunkPool(8), 4, keep_cached=True)
  a = t.insert(list(range(10)))  # chunks [0..3], [4..7], partial [8, 9]
  freed = t.remove(a.seq_id)
  assert len(freed) == 1 and t.num_cached_chunks == 2 and len(t) == 0
  assert build_plan(t).num_rows == 0 and t.seq_ids() == []
  b = t.insert(list(range(8)) + [42])
  assert b.num_cached == 8 and t.num_cached_chunks == 0  # revived, not recomputed
  t.check_invariants()


def test_cached_chunks_are_evicted_lru_leaves_first_only_when_needed():
  t = PrefixTree(ChunkPool(6), 4, keep_cached=True)
  old = t.insert([1] * 8)   # 2 chunks
  new = t.insert([2] * 8)   # 2 chunks
  old_path, new_path = t.chunk_path(old.seq_id), t.chunk_path(new.seq_id)
  t.remove(old.seq_id)
  t.remove(new.seq_id)
  assert t.cached_slots() == old_path[::-1] + new_path[::-1]  # LRU first, leaves first
  assert t.num_available_chunks == 6 and t.pool.num_free == 2
  c = t.insert([3] * 4 + [4])  # needs 2 chunks: the free ones, no eviction
  assert t.num_cached_chunks == 4
  t.append(c.seq_id, [4, 4, 4, 5])  # needs 1 more: evicts the least recently used leaf
  assert t.cached_slots() == [old_path[0]] + new_path[::-1]
  assert t.match_length([1] * 8) == 4 and t.match_length([2] * 8) == 8
  assert t.can_insert([2] * 8 + [9] * 4) and not t.can_insert([9] * 20)
  before = t.snapshot()
  with pytest.raises(PoolExhaustedError):
    t.insert([9] * 20)  # 5 chunks > 0 free + 3 cached: nothing evicted
  assert t.snapshot() == before
  t.check_invariants()


def test_revived_chunks_are_not_evicted_by_their_own_insert():
  t = PrefixTree(ChunkPool(3), 4, keep_cached=True)
  a = t.insert([1] * 8)
  t.remove(a.seq_id)
  assert not t.can_insert([1] * 8 + [2] * 8)  # 2 revived + 2 new > 3 slots
  r = t.insert([1] * 8 + [2])  # 2 revived + 1 new == 3
  assert r.num_cached == 8 and t.pool.num_free == 0
  t.check_invariants()


def test_removing_without_cache_frees_cached_chunks_below():
  t = PrefixTree(ChunkPool(8), 4)
  a = t.insert([1] * 4 + [2] * 4 + [3])
  b = t.insert([1] * 4 + [5])
  t.remove(a.seq_id, keep_cached=True)  # [2]*4 stays cached under the shared [1]*4
  assert t.num_cached_chunks == 1
  freed = t.remove(b.seq_id)  # [1]*4 is freed, so its cached child goes too
  assert len(freed) == 3 and t.pool.num_free == 8 and t.num_cached_chunks == 0
  t.check_invariants()


def test_sequence_ids_must_be_ints():
  """True == 1 and 1.0 == 1 as dict keys: before, they acted as sequence id 1."""
  t = make_tree()
  t.insert([1, 2, 3])
  b = t.insert([4, 5])
  assert b.seq_id == 1
  before = t.snapshot()
  ops = (t.remove, t.tokens, t.length, t.chunk_path, t.num_shared_chunks,
         lambda s: t.append(s, [1]), lambda s: t.append_many({s: [1]}),
         lambda s: t.append_tokens([s], [1]), lambda s: t.truncate(s, 1))
  for bad in (True, False, 1.0, 0.0, np.float64(1), np.bool_(True)):
    for op in ops:
      with pytest.raises(UnknownSequenceError, match="sequence ids are integers"):
        op(bad)
    assert bad not in t
  assert t.snapshot() == before
  assert 1 in t and np.int64(1) in t and t.length(np.int32(1)) == 2


def test_evict_cached_count_is_checked():
  """Before: evict_cached(-1) made the eviction counter negative."""
  t = PrefixTree(ChunkPool(8), 4, keep_cached=True)
  t.remove(t.insert(list(range(8))).seq_id)
  before = t.snapshot()
  for bad in (-1, 1.5, True, "2"):
    with pytest.raises(ValueError, match="evict_cached"):
      t.evict_cached(bad)
  assert t.snapshot() == before and t.num_evictions == 0
  assert len(t.evict_cached(np.int64(1))) == 1 and t.num_evictions == 1
  assert len(t.evict_cached(0)) == 0 and t.num_evictions == 1


def test_a_pool_backs_one_tree():
  """Before: two trees on one pool handed out each other's slots."""
  pool = ChunkPool(8)
  t = PrefixTree(pool, 4)
  with pytest.raises(ValueError, match="already belongs to another PrefixTree"):
    PrefixTree(pool, 4)
  t.insert([1, 2, 3])
  used = ChunkPool(8)
  used.allocate(1)
  with pytest.raises(ValueError, match="1 of its 8 slots are in use"):
    PrefixTree(used, 4)
  spare = ChunkPool(4)
  PrefixTree(spare, 4)  # an owner that is gone, and left the pool empty, no longer holds it
  gc.collect()
  PrefixTree(spare, 4).check_invariants()
  for bad in (1, "x"):
    with pytest.raises(ValueError, match="keep_cached"):
      PrefixTree(8, 4, keep_cached=bad)


def test_truncate_is_the_undo_of_append():
  t = make_tree(c=4)
  a = t.insert(list(range(6)))          # [0 1 2 3] [4 5]
  b = t.insert(list(range(4)) + [9])    # shares [0 1 2 3]
  before_append = t.tokens(a.seq_id)
  t.append(a.seq_id, [6, 7, 8])         # [0 1 2 3] [4 5 6 7] [8]: [4 5 6 7] is now matchable
  assert t.insert(list(range(8)) + [50]).num_cached == 8
  t.remove(2)
  freed = t.truncate(a.seq_id, 6)
  assert len(freed) == 1 and t.tokens(a.seq_id) == before_append == list(range(6))
  assert t.length(a.seq_id) == 6 and len(t.chunk_path(a.seq_id)) == 2
  assert t.insert(list(range(8)) + [50]).num_cached == 4  # [4 5] is partial again: no match
  t.check_invariants()
  slots = t.append(a.seq_id, [6])      # appends go on where the cut left off
  assert slots.tolist() == [[t.chunk_path(a.seq_id)[1], 2]]
  before = t.snapshot()
  with pytest.raises(ValueError, match="length 2 of sequence 1 cuts a chunk that 2 other live"):
    t.truncate(b.seq_id, 2)  # inside [0 1 2 3], which `a` and sequence 3 share
  for bad in (0, 99, 2.0, True):
    with pytest.raises(ValueError, match="truncate: length"):
      t.truncate(a.seq_id, bad)
  assert t.snapshot() == before
  assert t.truncate(b.seq_id, 4) and t.tokens(b.seq_id) == [0, 1, 2, 3]  # to a shared boundary
  assert t.truncate(b.seq_id, 4) == []
  t.check_invariants()


def test_truncate_frees_cached_chunks_below_the_cut():
  t = PrefixTree(ChunkPool(8), 4, keep_cached=True)
  a = t.insert(list(range(4)))
  b = t.insert(list(range(12)))         # [0..3] shared, [4..7] [8..11] private
  t.remove(b.seq_id)                    # [4..7] [8..11] cached under a's chunk
  assert t.num_cached_chunks == 2
  t.append(a.seq_id, [4])               # a opens its own chunk under [0..3]
  t.truncate(a.seq_id, 3)               # cuts inside [0..3], which only a now uses
  assert t.num_cached_chunks == 0 and t.pool.num_used == 1
  assert t.insert(list(range(12))).num_cached == 0
  t.check_invariants()
