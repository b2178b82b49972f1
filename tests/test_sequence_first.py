"""Phase 2 (sequence-first) kernel: interpret mode == plain-jnp reference; spare-row convention."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import TOL, check_against_dense, make_case, poisoned_partials, split
from pallas_kernels import SequenceFirstConfig, empty_partials
from pallas_kernels.chunk_first import chunk_first_reference
from pallas_kernels.sequence_first import (mma_rows, sequence_first,
                                           sequence_first_reference)


def row_args(plan):
  return (plan.num_rows, plan.length_delta, plan.row_private_chunks, plan.row_private_len,
          plan.row_num_items)


def phase1(case):
  p = case.plan
  return chunk_first_reference(
      case.q, case.k_pool, case.v_pool, p.item_chunks, p.item_num_chunks, p.item_row_begin,
      p.item_row_end, p.item_slot, poisoned_partials(case), items_per_row=p.items_per_row)


@pytest.mark.parametrize("g,dtype,config", [
    (1, jnp.float16, None), (2, jnp.float32, None), (4, jnp.float32, None),
    (8, jnp.bfloat16, None), (1, jnp.float32, SequenceFirstConfig(block_n=16, cuda_core=False)),
    (4, jnp.float16, SequenceFirstConfig(block_n=16, num_warps=4))])
def test_interpret_matches_reference_and_dense(rng, g, dtype, config):
  case = make_case(rng, g=g, dtype=dtype, seed=40 + g, length_delta=1,
                   plan_kwargs_=split(6))
  partials = phase1(case)  # NaN wherever no live item wrote
  args = (case.q, case.k_pool, case.v_pool, *row_args(case.plan), partials)
  got = sequence_first(*args, config=config, interpret=True)
  want = sequence_first_reference(*args)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)),
                             np.asarray(want.astype(jnp.float32)), atol=TOL[dtype], rtol=0)
  check_against_dense(case, got, dtype)


@pytest.mark.parametrize("g,dtype", [(4, jnp.bfloat16), (8, jnp.float16)])
def test_d256_groups_pad_to_a_warpgroup_block(rng, g, dtype):
  """16-bit d = 256 with g >= 4 runs the 64-row (warpgroup) tensor-core block by default."""
  assert mma_rows(g, dtype, 256) == 64 and mma_rows(g, dtype, 128) == 16
  case = make_case(rng, g=g, d=256, dtype=dtype, seed=60 + g, length_delta=1,
                   plan_kwargs_=split(6))
  args = (case.q, case.k_pool, case.v_pool, *row_args(case.plan), phase1(case))
  got = sequence_first(*args, interpret=True)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)),
                             np.asarray(sequence_first_reference(*args).astype(jnp.float32)),
                             atol=TOL[dtype], rtol=0)
  check_against_dense(case, got, dtype)


def test_rows_without_private_tokens_and_spare_rows(rng):
  case = make_case(rng, g=4, seed=50)
  lens = case.plan.private_lengths()
  b = int(case.plan.num_rows)
  assert (lens[:b] == 0).sum() >= 2  # identical prompts ending at a shared full chunk
  assert b < case.plan.row_capacity  # spare rows exist
  q = case.q.at[b:].set(jnp.nan)  # spare rows' queries are never read into live outputs
  out = sequence_first(q, case.k_pool, case.v_pool, *row_args(case.plan), phase1(case),
                       interpret=True)
  check_against_dense(case, out, jnp.float32)  # includes: spare rows are exactly zero


def test_private_only_without_partials(rng):
  """A paged plan (no items): no partial buffers at all."""
  case = make_case(rng, g=8, seed=51, plan_kwargs_=dict(threshold=1000))
  assert case.plan.item_capacity == 0
  out = sequence_first(case.q, case.k_pool, case.v_pool, *row_args(case.plan), None,
                       interpret=True)
  check_against_dense(case, out, jnp.float32)


def test_only_valid_tail_tokens_are_read(rng):
  """K/V beyond each row's private length are never read: NaN there leaves outputs finite."""
  case = make_case(rng, g=1, seed=53, append=2)
  k, v = np.array(case.k_pool), np.array(case.v_pool)
  c = case.plan.chunk_size
  lens = case.plan.private_lengths()
  for r in range(int(case.plan.num_rows)):
    n = int(lens[r])
    if n % c:
      last = case.plan.row_private_chunks[r, n // c]
      k[last, :, n % c:] = np.nan
      v[last, :, n % c:] = np.nan
  case.k_pool, case.v_pool = jnp.asarray(k), jnp.asarray(v)
  out = sequence_first(case.q, case.k_pool, case.v_pool, *row_args(case.plan), phase1(case),
                       interpret=True)
  check_against_dense(case, out, jnp.float32)


def test_rejects_bad_partials_and_config(rng):
  case = make_case(rng, g=1, seed=52)
  R = case.plan.row_capacity
  h_kv = case.k_pool.shape[1]
  bad = empty_partials(R, h_kv, 1, 32, case.plan.items_per_row)  # wrong d
  with pytest.raises(ValueError, match="partials"):
    sequence_first(case.q, case.k_pool, case.v_pool, *row_args(case.plan), bad, interpret=True)
  with pytest.raises(ValueError, match="block_n"):
    SequenceFirstConfig(block_n=8)
  case8 = make_case(rng, g=8, seed=52)
  with pytest.raises(ValueError, match="cuda_core"):
    sequence_first(case8.q, case8.k_pool, case8.v_pool, *row_args(case8.plan), phase1(case8),
                   config=SequenceFirstConfig(cuda_core=True), interpret=True)
