import dataclasses

import jax
import numpy as np
import pytest

from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.plan import PlanBuilder, build_plan, bucket
from chunkattn_jax.prefix_tree import PrefixTree


def shared_prompt_tree(b=5, n_s=32, n_priv=5, c=4, seed=0):
  t = PrefixTree(ChunkPool(256, seed=seed), c)
  ids = [t.insert(list(range(n_s)) + [100 + i] * n_priv).seq_id for i in range(b)]
  return t, ids


def test_bucket():
  assert [bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
  assert bucket(3, minimum=8) == 8


def test_grouping_cuts_runs_into_items():
  t, ids = shared_prompt_tree(b=5, n_s=32, c=4)  # 8 shared chunks in one run
  plan = build_plan(t, max_chunks_per_item=4)
  assert plan.num_shared_items() == 2
  assert plan.item_num_chunks[:2].tolist() == [4, 4]
  assert plan.item_row_begin[:2].tolist() == [0, 0] and plan.item_row_end[:2].tolist() == [5, 5]
  assert plan.item_partial_offset[:2].tolist() == [0, 5]
  assert plan.partial_capacity == 16
  assert plan.row_num_items[:5].tolist() == [2] * 5
  assert plan.row_private_len[:5].tolist() == [5] * 5
  assert plan.row_capacity == 8  # minimum row capacity


def test_threshold_at_batch_gives_paged_plan():
  t, ids = shared_prompt_tree(b=5)
  plan = build_plan(t, threshold=5)
  assert plan.num_shared_items() == 0 and (plan.row_num_items == 0).all()
  assert plan.row_private_len[:5].tolist() == [37] * 5
  assert (plan.row_private_chunks[0, :10] == plan.row_private_chunks[1, :10]).sum() == 8


def test_policy_decides_per_run():
  t = PrefixTree(256, 4)
  for i in range(4):  # two levels: 8 chunks shared by 4 rows, then 1 chunk by 2 rows
    t.insert(list(range(32)) + [50 + i // 2] * 4 + [60 + i])
  calls = []

  def policy(num_rows, num_chunks):
    calls.append((num_rows, num_chunks))
    return num_chunks > 1
  plan = build_plan(t, policy=policy)
  assert sorted(calls) == [(2, 1), (2, 1), (4, 8)]
  assert plan.num_shared_items() == 1 and plan.item_num_chunks[0] == 8


def test_nested_items_and_partial_offsets():
  t = PrefixTree(256, 4)
  for i in range(4):
    t.insert(list(range(8)) + [50 + i // 2] * 4 + [60 + i])
  plan = build_plan(t)
  n = plan.num_shared_items()
  assert n == 3
  rng = [(int(plan.item_row_begin[i]), int(plan.item_row_end[i])) for i in range(n)]
  assert sorted(rng) == [(0, 2), (0, 4), (2, 4)]
  assert plan.row_num_items[:4].tolist() == [2, 2, 2, 2]


def test_builder_caches_and_uses_length_delta():
  t, ids = shared_prompt_tree(b=3, n_s=8, n_priv=1, c=4)
  pb = PlanBuilder(t)
  p0 = pb.plan()
  assert pb.plan() is p0
  t.append_tokens(ids, [1, 2, 3])
  p1 = pb.plan()
  assert pb.num_rebuilds == 1 and int(p1.length_delta) == 1
  assert p1.row_private_chunks is p0.row_private_chunks  # no new arrays
  assert p1.private_lengths()[:3].tolist() == [2, 2, 2]
  t.append_tokens(ids[:1], [7])  # only one row: lengths re-read, structure kept
  p2 = pb.plan()
  assert pb.num_rebuilds == 1 and pb.num_length_rereads == 1
  assert p2.private_lengths()[:3].tolist() == [3, 2, 2] and int(p2.length_delta) == 0
  t.append_tokens(ids, [1, 1, 1])  # row 0 fills its tail; others fine
  p3 = pb.plan()
  assert p3.private_lengths()[:3].tolist() == [4, 3, 3]
  t.append_tokens(ids, [1, 1, 1])  # row 0 needs a new chunk: rebuild
  p4 = pb.plan()
  assert pb.num_rebuilds == 2
  assert p4.private_lengths()[:3].tolist() == [5, 4, 4]
  fresh = build_plan(t)
  for f in dataclasses.fields(fresh):
    if f.name != "length_delta":
      np.testing.assert_array_equal(np.asarray(getattr(p4, f.name)), np.asarray(getattr(fresh, f.name)))


def test_plan_is_a_pytree_with_static_metadata():
  t, _ = shared_prompt_tree()
  plan = build_plan(t)
  leaves, treedef = jax.tree_util.tree_flatten(plan)
  assert len(leaves) == 12 and all(x.dtype == np.int32 for x in leaves)
  traced = jax.jit(lambda p: p.private_lengths())(plan)
  np.testing.assert_array_equal(traced, plan.private_lengths())


@pytest.mark.parametrize("kw, match", [(dict(threshold=0), "threshold"),
                                       (dict(max_chunks_per_item=3), "power of two")])
def test_bad_plan_args(kw, match):
  t, _ = shared_prompt_tree()
  with pytest.raises(ValueError, match=match):
    build_plan(t, **kw)


def test_empty_tree_plan():
  plan = build_plan(PrefixTree(8, 4))
  assert int(plan.num_rows) == 0 and plan.row_capacity == 8 and plan.num_shared_items() == 0
