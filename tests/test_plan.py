import dataclasses

import jax
import numpy as np
import pytest

from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.plan import (GpuFill, PlanBuilder, build_plan, bucket, pad_plan,
                                plan_capacities)
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
  assert plan.item_slot[:2].tolist() == [0, 1]  # the run's two items: slots 0 and 1
  assert plan.items_per_row == 2
  assert plan.row_items[:5].tolist() == [[0, 1]] * 5
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


def test_nested_items_and_slots():
  t = PrefixTree(256, 4)
  for i in range(4):
    t.insert(list(range(8)) + [50 + i // 2] * 4 + [60 + i])
  plan = build_plan(t)
  n = plan.num_shared_items()
  assert n == 3
  rng = [(int(plan.item_row_begin[i]), int(plan.item_row_end[i])) for i in range(n)]
  assert sorted(rng) == [(0, 2), (0, 4), (2, 4)]
  assert plan.row_num_items[:4].tolist() == [2, 2, 2, 2]
  # The root item is at slot 0 of every row; each child item at slot 1 of its rows.
  slot = {(int(plan.item_row_begin[i]), int(plan.item_row_end[i])): int(plan.item_slot[i])
          for i in range(n)}
  assert slot == {(0, 4): 0, (0, 2): 1, (2, 4): 1}
  for r in range(4):
    for k in range(2):
      i = plan.row_items[r, k]
      assert plan.item_slot[i] == k and plan.item_row_begin[i] <= r < plan.item_row_end[i]


def test_fill_splits_runs_to_two_programs_per_sm():
  """Table 3 at full sharing (b = 32, h = h_kv = 32, c = 64): every point gets >= 264 programs."""
  fill = GpuFill(num_kv_heads=32)
  assert fill.min_programs == 264 and fill.programs_per_item(32) == 32
  for n_s in (1024, 2048, 4096):
    t = PrefixTree(2048, 64)
    for _ in range(32):
      t.insert(list(range(n_s)))  # identical prompts: n_s / 64 shared full chunks, no private
    plan = build_plan(t, fill=fill)
    n = plan.num_shared_items()
    programs = sum(fill.programs_per_item(int(plan.item_row_end[i] - plan.item_row_begin[i]))
                   for i in range(n))
    assert n == 9 and programs == 288 >= 264
    sizes = plan.item_num_chunks[:n].tolist()
    assert sum(sizes) == n_s // 64 and max(sizes) - min(sizes) <= 1
    assert plan.item_slot[:n].tolist() == list(range(9)) and plan.items_per_row == 16
    assert (plan.row_num_items[:32] == 9).all()
  # GQA 8 at b = 32: 256 query rows per item = 4 row blocks of 64 per KV head (4 heads).
  gqa = GpuFill(num_kv_heads=4, group_size=8)
  assert gqa.programs_per_item(32) == 16
  plan = build_plan(t, fill=gqa)
  assert plan.num_shared_items() == 17  # ceil(264 / 16)


def test_fill_splits_each_run_by_its_share_of_the_work():
  """A shared system prompt (12 chunks, 8 rows) and two few-shot blocks (4 chunks, 4 rows each):
  W = 12 * 1 + 4 * 1 + 4 * 1 = 20 program-chunks for 8 programs: ceil(8 * L / 20) pieces."""
  t = PrefixTree(1024, 4)
  for i in range(8):
    t.insert(list(range(48)) + [500 + i % 2] * 16 + [900 + i])
  plan = build_plan(t, fill=GpuFill(num_kv_heads=1, num_sms=8, programs_per_sm=1))
  by_rows = {}
  for i in np.flatnonzero(plan.item_num_chunks):
    key = (int(plan.item_row_begin[i]), int(plan.item_row_end[i]))
    by_rows.setdefault(key, []).append(int(plan.item_num_chunks[i]))
  assert sorted(by_rows[(0, 8)]) == [2, 2, 2, 3, 3]  # ceil(8 * 12 / 20) = 5 pieces
  assert by_rows[(0, 4)] == [2, 2] and by_rows[(4, 8)] == [2, 2]  # ceil(8 * 4 / 20) = 2 pieces
  assert plan.row_num_items[:8].tolist() == [7] * 8


def test_fill_never_splits_below_one_chunk():
  t = PrefixTree(64, 4)
  for i in range(3):
    t.insert(list(range(8)) + [i])  # 2 shared chunks
  plan = build_plan(t, fill=GpuFill(num_kv_heads=1, num_sms=100))
  assert plan.num_shared_items() == 2 and plan.item_num_chunks[:2].tolist() == [1, 1]


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
  assert {f.name for f in dataclasses.fields(plan)} >= {"item_slot", "item_rows_capacity"}
  traced = jax.jit(lambda p: p.private_lengths())(plan)
  np.testing.assert_array_equal(traced, plan.private_lengths())


@pytest.mark.parametrize("kw, match", [(dict(threshold=0), "threshold"),
                                       (dict(threshold=True), "threshold"),
                                       (dict(max_chunks_per_item=3), "power of two"),
                                       (dict(fill=5), "GpuFill")])
def test_bad_plan_args(kw, match):
  t, _ = shared_prompt_tree()
  with pytest.raises(ValueError, match=match):
    build_plan(t, **kw)


def test_empty_tree_plan():
  plan = build_plan(PrefixTree(8, 4))
  assert int(plan.num_rows) == 0 and plan.row_capacity == 8 and plan.num_shared_items() == 0
  assert plan.item_capacity == 0  # no chunk-first pass at all


def test_gpu_fill_validates():
  with pytest.raises(ValueError, match="num_kv_heads"):
    GpuFill(num_kv_heads=0)
  with pytest.raises(ValueError, match="block_m"):
    GpuFill(num_kv_heads=1, block_m=True)


def test_pad_plan_keeps_attention_and_rejects_shrinking():
  t, _ = shared_prompt_tree()
  plan = build_plan(t)
  caps = plan_capacities(plan)
  padded = pad_plan(plan, (caps[0] * 2, caps[1] * 4, caps[2] * 2, caps[3] * 2, caps[4] * 2))
  assert plan_capacities(padded) == (caps[0] * 2, caps[1] * 4, caps[2] * 2, caps[3] * 2,
                                     caps[4] * 2)
  assert (padded.row_seq_ids[caps[0]:] == -1).all() and (padded.item_num_chunks[caps[3]:] == 0).all()
  assert pad_plan(plan, caps) is plan
  with pytest.raises(ValueError, match="capacity R"):
    pad_plan(plan, (caps[0] // 2,))
  with pytest.raises(ValueError, match="power of two"):
    pad_plan(plan, (caps[0] * 3,))
