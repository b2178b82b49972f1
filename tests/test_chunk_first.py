"""Phase 1 (chunk-first) kernel: interpret mode == plain-jnp reference == dense per item."""

import jax.numpy as jnp
import numpy as np
import pytest

from dense_oracle import dense_attention
from kernel_cases import TOL, make_case, poisoned_partials, split
from pallas_kernels import ChunkFirstConfig
from pallas_kernels.chunk_first import chunk_first, chunk_first_reference


def item_args(plan):
  return (plan.item_chunks, plan.item_num_chunks, plan.item_row_begin, plan.item_row_end,
          plan.item_slot)


def covered(plan):
  """bool [R, K]: the (row, slot) partials live items write."""
  out = np.zeros((plan.row_capacity, plan.items_per_row), bool)
  for i in np.flatnonzero(plan.item_num_chunks):
    out[plan.item_row_begin[i]:plan.item_row_end[i], plan.item_slot[i]] = True
  return out


@pytest.mark.parametrize("g,dtype,config", [
    (1, jnp.float32, None), (2, jnp.float16, ChunkFirstConfig(block_m=16, block_n=16)),
    (4, jnp.bfloat16, ChunkFirstConfig(block_m=16)), (8, jnp.float16, None)])
def test_interpret_matches_reference_and_writes_only_live_items(rng, g, dtype, config):
  case = make_case(rng, g=g, dtype=dtype, seed=20 + g, plan_kwargs_=split(6))
  plan = case.plan
  args = (case.q, case.k_pool, case.v_pool, *item_args(plan))
  kw = dict(items_per_row=plan.items_per_row)
  got = chunk_first(*args, poisoned_partials(case), **kw, config=config, interpret=True)
  want = chunk_first_reference(*args, poisoned_partials(case), **kw)
  live = covered(plan)
  assert live.any() and not live.all()  # spare partial slots exist
  heads = np.arange(got[1].shape[3]) < g  # padded heads (gp > g) are written but never read
  by_slot = lambda x: np.moveaxis(np.asarray(x), 2, 1)  # [R, K, h_kv, gp, ...]
  for x, y in zip(got, want):
    x, y = by_slot(x), by_slot(y)
    assert x.dtype == np.float32  # partials never below fp32
    assert not np.isnan(x[live][:, :, heads]).any() and np.isnan(x[~live]).all()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(x))
  (o, lse), (ro, rlse) = ((by_slot(x)[live][:, :, heads] for x in pair) for pair in (got, want))
  np.testing.assert_allclose(o, ro, atol=TOL[dtype], rtol=0)
  np.testing.assert_allclose(lse, rlse, atol=10 * TOL[dtype], rtol=1e-5)


def test_partials_are_dense_attention_over_the_item(rng):
  case = make_case(rng, g=4, seed=30, plan_kwargs_=split(8))
  plan = case.plan
  q = np.asarray(case.q, np.float64)
  kp, vp = np.asarray(case.k_pool, np.float64), np.asarray(case.v_pool, np.float64)
  h, d = q.shape[1:]
  h_kv = kp.shape[1]
  g = h // h_kv
  o, lse = chunk_first(case.q, case.k_pool, case.v_pool, *item_args(plan),
                       items_per_row=plan.items_per_row, interpret=True)
  o, lse = np.asarray(o), np.asarray(lse)
  for i in np.flatnonzero(plan.item_num_chunks):
    slots = plan.item_chunks[i, :plan.item_num_chunks[i]]
    k = np.concatenate([kp[s].transpose(1, 0, 2) for s in slots])  # [n*c, h_kv, d]
    v = np.concatenate([vp[s].transpose(1, 0, 2) for s in slots])
    k_slot = plan.item_slot[i]
    for r in range(plan.item_row_begin[i], plan.item_row_end[i]):
      np.testing.assert_allclose(o[r, :, k_slot, :g].reshape(h, d), dense_attention(q[r], k, v),
                                 atol=2e-5, rtol=0)
      for hq in range(h):
        s = k[:, hq // g] @ q[r, hq] * d ** -0.5
        want = s.max() + np.log(np.exp(s - s.max()).sum())
        assert lse[r, hq // g, k_slot, hq % g] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_spare_item_writes_nothing(rng):
  case = make_case(rng, g=1, seed=31)
  plan = case.plan
  live_items = np.flatnonzero(plan.item_num_chunks)
  num_chunks = plan.item_num_chunks.copy()
  i = live_items[0]
  num_chunks[i] = 0  # turn a live item into a spare one
  args = list(item_args(plan))
  args[1] = num_chunks
  o, lse = chunk_first(case.q, case.k_pool, case.v_pool, *args, poisoned_partials(case),
                       items_per_row=plan.items_per_row, interpret=True)
  rows = slice(plan.item_row_begin[i], plan.item_row_end[i])
  assert np.isnan(np.asarray(lse)[rows, :, plan.item_slot[i]]).all()
  assert np.isnan(np.asarray(o)[rows, :, plan.item_slot[i]]).all()


def test_rejects_bad_config_and_partials(rng):
  case = make_case(rng, g=1, seed=32)
  args = (case.q, case.k_pool, case.v_pool, *item_args(case.plan))
  with pytest.raises(ValueError, match="block_m"):
    ChunkFirstConfig(block_m=24)
  with pytest.raises(ValueError, match="num_stages"):
    ChunkFirstConfig(num_stages=0)
  o, lse = poisoned_partials(case)
  with pytest.raises(ValueError, match="partials"):
    chunk_first(*args, (o[:, :, :-1], lse), items_per_row=case.plan.items_per_row,
                interpret=True)
