"""Phase 2 (sequence-first) kernel: interpret mode == plain-jnp reference; spare-row convention."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import empty_partials
from pallas_kernels.chunk_first import chunk_first_reference
from pallas_kernels.sequence_first import sequence_first, sequence_first_reference
from pallas_kernels.two_phase import effective_private_len
from kernel_cases import TOL, check_against_dense, make_case, poisoned_partials


def row_args(plan):
  lens = effective_private_len(plan.num_rows, plan.row_private_len, plan.length_delta)
  num_items = np.where(np.arange(plan.row_capacity) < plan.num_rows, plan.row_num_items, 0)
  return (plan.row_private_chunks, lens, plan.row_items, num_items.astype(np.int32),
          plan.item_row_begin, plan.item_partial_offset)


def phase1(case):
  p = case.plan
  return chunk_first_reference(
      case.q, case.k_pool, case.v_pool, p.item_chunks, p.item_num_chunks, p.item_row_begin,
      p.item_row_end, p.item_partial_offset, poisoned_partials(case),
      partial_capacity=p.partial_capacity)


@pytest.mark.parametrize("g,dtype", [(1, jnp.float16), (4, jnp.float32), (8, jnp.bfloat16)])
def test_interpret_matches_reference_and_dense(rng, g, dtype):
  case = make_case(rng, g=g, dtype=dtype, seed=40 + g, length_delta=1)
  partials = phase1(case)  # NaN wherever no live item wrote
  args = (case.q, case.k_pool, case.v_pool, *row_args(case.plan), partials)
  got = sequence_first(*args, interpret=True)
  want = sequence_first_reference(*args)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)),
                             np.asarray(want.astype(jnp.float32)), atol=TOL[dtype], rtol=0)
  check_against_dense(case, got, dtype)


def test_rows_without_private_tokens_and_spare_rows(rng):
  case = make_case(rng, g=4, seed=50)
  lens = np.asarray(row_args(case.plan)[1])
  b = int(case.plan.num_rows)
  assert (lens[:b] == 0).sum() >= 2  # identical prompts ending at a shared full chunk
  assert b < case.plan.row_capacity  # spare rows exist
  out = sequence_first(case.q, case.k_pool, case.v_pool, *row_args(case.plan), phase1(case),
                       interpret=True)
  check_against_dense(case, out, jnp.float32)  # includes: spare rows are exactly zero


def test_private_only_with_poisoned_partials(rng):
  """A paged plan (no items): partials are never read, even when NaN."""
  case = make_case(rng, g=8, seed=51, plan_kwargs_=dict(threshold=1000))
  out = sequence_first(case.q, case.k_pool, case.v_pool, *row_args(case.plan),
                       poisoned_partials(case), interpret=True)
  check_against_dense(case, out, jnp.float32)


def test_rejects_bad_partials(rng):
  case = make_case(rng, g=1, seed=52)
  h_kv = case.k_pool.shape[1]
  bad = empty_partials(h_kv, 1, 32, case.plan.partial_capacity)  # wrong d
  with pytest.raises(ValueError, match="partials"):
    sequence_first(case.q, case.k_pool, case.v_pool, *row_args(case.plan), bad, interpret=True)
