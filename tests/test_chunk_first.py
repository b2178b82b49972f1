"""Phase 1 (chunk-first) kernel: interpret mode == plain-jnp reference == dense per item."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunk_first import chunk_first, chunk_first_reference
from dense_oracle import dense_attention
from kernel_cases import TOL, make_case, poisoned_partials


def item_args(plan):
  return (plan.item_chunks, plan.item_num_chunks, plan.item_row_begin, plan.item_row_end,
          plan.item_partial_offset)


def covered(plan, g):
  """bool [Q*g]: partial rows written by live items."""
  out = np.zeros(plan.partial_capacity * g, bool)
  for i in range(plan.item_capacity):
    if plan.item_num_chunks[i] > 0:
      n = plan.item_row_end[i] - plan.item_row_begin[i]
      out[plan.item_partial_offset[i] * g:(plan.item_partial_offset[i] + n) * g] = True
  return out


@pytest.mark.parametrize("g,dtype,block_m", [(1, jnp.float32, None), (4, jnp.bfloat16, 16),
                                             (8, jnp.float16, 32)])
def test_interpret_matches_reference_and_writes_only_live_items(rng, g, dtype, block_m):
  case = make_case(rng, g=g, dtype=dtype, seed=20 + g)
  plan = case.plan
  args = (case.q, case.k_pool, case.v_pool, *item_args(plan))
  kw = dict(partial_capacity=plan.partial_capacity)
  got = chunk_first(*args, poisoned_partials(case), **kw, block_m=block_m, interpret=True)
  want = chunk_first_reference(*args, poisoned_partials(case), **kw)
  live = covered(plan, g)
  assert live.any() and not live.all()  # spare partial rows exist
  for x, y in zip(got, want):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == np.float32  # partials never below fp32
    assert not np.isnan(x[:, live]).any() and np.isnan(x[:, ~live]).all()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(x))
  o, m, l = (np.asarray(x)[:, live] for x in got)
  ro, rm, rl = (np.asarray(x)[:, live] for x in want)
  # Compare normalised outputs and the log-sum-exp (m + log l): the invariant representation.
  np.testing.assert_allclose(o / l[..., None], ro / rl[..., None], atol=TOL[dtype], rtol=0)
  np.testing.assert_allclose(m + np.log(l), rm + np.log(rl), atol=10 * TOL[dtype], rtol=1e-5)


def test_partials_are_dense_attention_over_the_item(rng):
  case = make_case(rng, g=4, seed=30)
  plan = case.plan
  q = np.asarray(case.q, np.float64)
  kp, vp = np.asarray(case.k_pool, np.float64), np.asarray(case.v_pool, np.float64)
  h, d = q.shape[1:]
  h_kv = kp.shape[1]
  g = h // h_kv
  o, m, l = chunk_first(case.q, case.k_pool, case.v_pool, *item_args(plan),
                        partial_capacity=plan.partial_capacity, interpret=True)
  o, m, l = np.asarray(o), np.asarray(m), np.asarray(l)
  for i in range(plan.item_capacity):
    n = plan.item_num_chunks[i]
    if not n:
      continue
    slots = plan.item_chunks[i, :n]
    k = np.concatenate([kp[s].transpose(1, 0, 2) for s in slots])  # [n*c, h_kv, d]
    v = np.concatenate([vp[s].transpose(1, 0, 2) for s in slots])
    for r in range(plan.item_row_begin[i], plan.item_row_end[i]):
      p = plan.item_partial_offset[i] + r - plan.item_row_begin[i]
      rows = o[:, p * g:(p + 1) * g] / l[:, p * g:(p + 1) * g, None]  # [h_kv, g, d]
      np.testing.assert_allclose(rows.reshape(h, d), dense_attention(q[r], k, v),
                                 atol=2e-5, rtol=0)
      s_max = max((k[:, hq // g] @ q[r, hq]).max() * d ** -0.5 for hq in range(h))
      assert m[:, p * g:(p + 1) * g].max() == pytest.approx(s_max, rel=1e-5, abs=1e-5)


def test_spare_item_writes_nothing(rng):
  case = make_case(rng, g=1, seed=31)
  plan = case.plan
  live_items = np.flatnonzero(plan.item_num_chunks)
  num_chunks = plan.item_num_chunks.copy()
  num_chunks[live_items[0]] = 0  # turn a live item into a spare one
  args = list(item_args(plan))
  args[1] = num_chunks
  o, m, l = chunk_first(case.q, case.k_pool, case.v_pool, *args, poisoned_partials(case),
                        partial_capacity=plan.partial_capacity, interpret=True)
  i = live_items[0]
  lo = plan.item_partial_offset[i]
  hi = lo + plan.item_row_end[i] - plan.item_row_begin[i]
  assert np.isnan(np.asarray(m)[:, lo:hi]).all()
  assert np.isnan(np.asarray(o)[:, lo:hi]).all()


def test_rejects_bad_block_m_and_partials(rng):
  case = make_case(rng, g=1, seed=32)
  args = (case.q, case.k_pool, case.v_pool, *item_args(case.plan))
  with pytest.raises(ValueError, match="block_m"):
    chunk_first(*args, partial_capacity=case.plan.partial_capacity, block_m=24, interpret=True)
  o, m, l = poisoned_partials(case)
  with pytest.raises(ValueError, match="partials"):
    chunk_first(*args, (o[:, :-1], m, l), partial_capacity=case.plan.partial_capacity,
                interpret=True)
