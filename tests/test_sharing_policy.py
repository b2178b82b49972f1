"""Cost model for the per-run chunk-first decision."""

import numpy as np
import pytest

from chunkattn_jax.plan import build_plan
from chunkattn_jax.sharing_policy import CostModelPolicy
from kernel_cases import build_tree


def test_table3_shape_goes_chunk_first_and_tiny_runs_do_not():
  p = CostModelPolicy()  # b=32, h=32, d=128, c=64, fp16 defaults
  assert p(32, 32)  # n_s = 2048 shared by 32 rows
  assert p(32, 1)
  assert not p(2, 1)  # one chunk shared by two rows: the fixed cost dominates
  assert not p(1, 100)  # never share a chunk used by one row


def test_monotone_in_sharing_degree_and_run_length():
  p = CostModelPolicy.for_shapes(num_heads=32, num_kv_heads=8, head_dim=128, chunk_size=64)
  rows = [r for r in range(2, 257) if p(r, 4)]
  assert rows and rows == list(range(rows[0], 257))  # once worth it, more rows stay worth it
  runs = [n for n in range(1, 129) if p(8, n)]
  assert runs and runs == list(range(runs[0], 129))


def test_gqa_needs_more_sharing():
  """Same KV bytes, g times more partial traffic: the break-even sharing degree does not drop."""
  def break_even(g):
    p = CostModelPolicy(group_size=g, num_kv_heads=1, overhead_us=0.0, num_sms=1)
    return next(r for r in range(2, 10_000) if p(r, 2))
  assert break_even(1) <= break_even(8) <= break_even(32)
  assert break_even(1) < break_even(32)


def test_more_sms_lower_single_program_speed():
  """With a fixed per-SM stream rate, a bigger GPU makes one chunk-first program relatively slower."""
  small, big = CostModelPolicy(num_sms=16, num_kv_heads=1), CostModelPolicy(num_sms=132, num_kv_heads=1)
  t_small, _ = small.estimate_us(8, 16)
  t_big, _ = big.estimate_us(8, 16)
  assert t_big > t_small


def test_threshold_override():
  p = CostModelPolicy(threshold=4)
  assert not p(4, 1000) and p(5, 1)


@pytest.mark.parametrize("kw", [dict(group_size=0), dict(bandwidth_gbps=0.0), dict(threshold=0),
                                dict(overhead_us=-1.0)])
def test_validation(kw):
  with pytest.raises(ValueError):
    CostModelPolicy(**kw)
  with pytest.raises(ValueError, match="multiple"):
    CostModelPolicy.for_shapes(num_heads=6, num_kv_heads=4, head_dim=64, chunk_size=16)


def test_frozen_hashable_and_usable_by_build_plan(rng):
  p = CostModelPolicy.for_shapes(num_heads=8, num_kv_heads=2, head_dim=64, chunk_size=16)
  assert hash(p) == hash(CostModelPolicy.for_shapes(num_heads=8, num_kv_heads=2, head_dim=64,
                                                    chunk_size=16))
  tree = build_tree(rng, 16)
  plan_all = build_plan(tree, threshold=1)
  plan_none = build_plan(tree, policy=CostModelPolicy(threshold=10_000))
  plan_model = build_plan(tree, policy=p)
  assert plan_none.num_shared_items() == 0
  shared_chunks = lambda plan: int(np.asarray(plan.item_num_chunks).sum())
  assert shared_chunks(plan_model) <= shared_chunks(plan_all)
  # Tiny test shapes (d = 64, h_kv = 2): a cost model with zero overhead shares the big runs.
  plan_free = build_plan(tree, policy=CostModelPolicy.for_shapes(
      num_heads=8, num_kv_heads=2, head_dim=64, chunk_size=16, overhead_us=0.0,
      sm_bandwidth_ratio=1e6))
  assert plan_free.num_shared_items() > 0
  assert np.asarray(plan_free.item_num_chunks).sum() > 0


def test_split_pieces_and_their_partial_traffic():
  """Table 3 at full sharing: h_kv = 32, 32 rows -> 32 programs per item, 9 items for 264; each
  piece costs one partial (d + 1 floats) per row and query head, written and read back."""
  p = CostModelPolicy()
  assert p.fill.min_programs == 264 and p.fill.programs_per_item(32) == 32
  assert p.pieces(32, 16) == 9 and p.pieces(32, 64) == 9 and p.pieces(32, 4) == 4
  assert p.pieces(32, 400) == 25  # G = 16 chunks per item at most
  t_chunk, t_seq = p.estimate_us(32, 16)
  bw = p.bandwidth_gbps * 1e3
  partial = 2 * 32 * 1 * 32 * 129 * 4 * 9 / bw
  kv = 32 * 2 * 16 * 64 * 128 * 2 / bw
  assert t_chunk == pytest.approx(max(kv, 2 * 2 * 64 * 128 * 2 / (p.sm_bandwidth_ratio * bw / 132))
                                  + partial + p.overhead_us)
  assert t_seq == pytest.approx(32 * kv)


def test_build_plan_takes_the_policys_fill():
  from chunkattn_jax.prefix_tree import PrefixTree
  t = PrefixTree(2048, 64)
  for _ in range(32):
    t.insert(list(range(1024)))
  plan = build_plan(t, policy=CostModelPolicy())
  assert plan.num_shared_items() == 9  # 9 items x 32 KV heads = 288 >= 264 programs
