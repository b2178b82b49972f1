"""Two-phase decode attention: every implementation against an independent fp32 dense attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkattn_jax.attention import decode_attention, plan_kwargs
from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.plan import build_plan
from chunkattn_jax.prefix_tree import PrefixTree
from chunkattn_jax.sharing_policy import CostModelPolicy
from dense_oracle import dense_attention, sequence_kv
from kernel_cases import (TOL, check_against_dense, dense_rows, dense_rows_multi, make_case,
                          poisoned_partials, split)
from pallas_kernels import InvalidPlanError, two_phase_decode, validate_plan_arrays

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_xla_and_reference_match_dense(rng, impl, g, dtype):
  case = make_case(rng, g=g, dtype=dtype, seed=g)
  assert case.plan.num_shared_items() >= 4  # a real multi-level tree
  out = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl=impl)
  assert out.dtype == dtype and out.shape == case.q.shape
  check_against_dense(case, out, dtype)


@pytest.mark.parametrize("g,dtype", [(1, jnp.float32), (2, jnp.float16), (4, jnp.bfloat16),
                                     (8, jnp.float16)])
def test_pallas_interpret_matches_dense_and_xla(rng, g, dtype):
  case = make_case(rng, g=g, dtype=dtype, seed=10 + g, append=1, length_delta=2,
                   plan_kwargs_=split(8))
  assert int(case.plan.length_delta) == 2
  kw = dict(**plan_kwargs(case.plan))
  out = two_phase_decode(case.q, case.k_pool, case.v_pool, **kw, impl="pallas_interpret",
                         partials=poisoned_partials(case))
  check_against_dense(case, out, dtype)
  xla = two_phase_decode(case.q, case.k_pool, case.v_pool, **kw, impl="xla")
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                             np.asarray(xla.astype(jnp.float32)), atol=TOL[dtype], rtol=0)


def test_pallas_interpret_chunk_64_paper_lengths(rng):
  """c = 64 with the lengths 3, 63, 64, 65, 513 (private tails) and shared prefixes."""
  case = make_case(rng, c=64, g=4, dtype=jnp.float32, n_chunks=96)
  lengths = {case.tree.length(s) - 64 * case.tree.num_shared_chunks(s) for s in case.tree.seq_ids()}
  assert {3, 63, 64, 65, 513} <= lengths
  out = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="pallas_interpret")
  check_against_dense(case, out, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_paged_plan_without_shared_items(rng, impl):
  """threshold >= b: no chunk-first work at all (the paper's PagedAttn ablation)."""
  case = make_case(rng, g=4, plan_kwargs_=dict(threshold=1000), seed=3)
  assert case.plan.num_shared_items() == 0
  out = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl=impl)
  check_against_dense(case, out, jnp.float32)


def test_cost_model_plan_matches_dense(rng):
  policy = CostModelPolicy.for_shapes(num_heads=8, num_kv_heads=2, head_dim=64, chunk_size=16,
                                      overhead_us=0.0)
  case = make_case(rng, g=4, plan_kwargs_=dict(policy=policy), seed=4)
  out = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="xla")
  check_against_dense(case, out, jnp.float32)


def test_xla_with_poisoned_partials_and_item_rows_capacity(rng):
  case = make_case(rng, g=1, seed=5)
  p = case.plan
  max_rows = int((p.item_row_end - p.item_row_begin).max())
  assert p.item_rows_capacity == 1 << (max_rows - 1).bit_length()
  out = two_phase_decode(case.q, case.k_pool, case.v_pool, **plan_kwargs(p), impl="xla",
                         partials=poisoned_partials(case))
  check_against_dense(case, out, jnp.float32)


def test_deterministic_and_eager_equals_jit(rng):
  case = make_case(rng, g=4, seed=6)
  a = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="xla")
  b = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="xla")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with jax.disable_jit():
    c = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="xla")
  np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6, rtol=0)


def test_custom_sm_scale(rng):
  case = make_case(rng, g=1, seed=7)
  out = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="xla", sm_scale=0.3)
  want, b = dense_rows(case, sm_scale=0.3)
  np.testing.assert_allclose(np.asarray(out)[:b], want, atol=2e-5, rtol=0)


def test_plan_arrays_validate(rng):
  case = make_case(rng, g=1, seed=8, plan_kwargs_=split(6))
  p = case.plan
  kw = dict(plan_kwargs(p), n_chunks=case.k_pool.shape[0], chunk_size=p.chunk_size)
  validate_plan_arrays(**kw)

  def rejects(match, **changes):
    with pytest.raises(InvalidPlanError, match=match):
      validate_plan_arrays(**dict(kw, **changes))

  def changed(name, fn):
    x = np.array(getattr(p, name))
    fn(x)
    return {name: x}

  b = int(p.num_rows)
  live = np.flatnonzero(p.item_num_chunks)
  two = np.flatnonzero(p.row_num_items[:b] >= 2)[0]  # a row covered by two items
  rejects("outside the live rows", **changed("item_row_end", lambda x: x.__setitem__(live[0], b + 1)))
  rejects("row_private_chunks holds pool slot", **changed(
      "row_private_chunks", lambda x: x.__setitem__((0, 0), case.k_pool.shape[0])))
  rejects("item_chunks holds pool slot -1", **changed(
      "item_chunks", lambda x: x.__setitem__((live[0], 0), -1)))
  rejects("private length", **changed("row_private_len", lambda x: x.__setitem__(0, -5)))
  rejects("num_rows", num_rows=np.int32(p.row_capacity + 1))
  # The same item listed twice by one row (its second listing sits at the wrong slot).
  rejects("not a live item covering", **changed(
      "row_items", lambda x: x.__setitem__((two, 1), x[two, 0])))
  # Two items sharing one partial slot of a row (overlapping partial rows).
  i0, i1 = p.row_items[two, 0], p.row_items[two, 1]
  rejects("not a live item covering", **changed(
      "item_slot", lambda x: x.__setitem__(i1, x[i0])))
  # A row that stops listing an item covering it.
  rejects("not listed by every row", **changed(
      "row_num_items", lambda x: x.__setitem__(two, x[two] - 1)))
  rejects("not a live item covering", **changed(
      "item_num_chunks", lambda x: x.__setitem__(i0, 0)))


def test_decode_attention_validates_user_plans(rng):
  case = make_case(rng, g=1, seed=12)
  bad = dataclasses.replace(case.plan, row_private_chunks=np.full_like(
      case.plan.row_private_chunks, case.k_pool.shape[0] + 3))
  with pytest.raises(InvalidPlanError, match="outside"):
    decode_attention(case.q, case.k_pool, case.v_pool, bad, impl="xla")
  # validate=False skips the check (the engine's own plans); XLA then clamps the gathers.
  out = decode_attention(case.q, case.k_pool, case.v_pool, bad, impl="xla", validate=False)
  assert out.shape == case.q.shape
  # Under jit the plan is a tracer: no check, no error.
  f = jax.jit(lambda q, plan: decode_attention(q, case.k_pool, case.v_pool, plan, impl="xla"))
  assert f(case.q, bad).shape == case.q.shape


def test_trace_time_validation(rng):
  case = make_case(rng, g=1, seed=9)
  q, k, v, p = case.q, case.k_pool, case.v_pool, case.plan
  with pytest.raises(ValueError, match="q.dtype"):
    decode_attention(q.astype(jnp.float16), k, v, p)
  with pytest.raises(ValueError, match="multiple of KV heads"):
    decode_attention(q[:, :1], k, v, p)
  with pytest.raises(ValueError, match="impl"):
    decode_attention(q, k, v, p, impl="cuda")
  with pytest.raises(ValueError, match=r"k_pool.shape="):
    decode_attention(q, k[:, :, :8], v[:, :, :8], p)
  with pytest.raises(ValueError, match="Pallas kernels support d"):
    decode_attention(q[..., :32], k[..., :32], v[..., :32], p, impl="pallas_interpret")
  with pytest.raises(ValueError, match="int32"):
    two_phase_decode(q, k, v, **dict(plan_kwargs(p), row_items=p.row_items.astype(np.float32)))
  with pytest.raises(ValueError, match="v_pool"):
    decode_attention(q, k, v[:-1], p)


def test_large_batch_multilevel(rng):
  """300 rows (beyond every power of two below 512): 3 system prompts x 2 few-shot blocks."""
  c, h, h_kv, d = 16, 8, 2, 32
  tree = PrefixTree(ChunkPool(4096, seed=11), c)
  systems = [rng.integers(0, 1000, 3 * c).tolist() for _ in range(3)]
  shots = [rng.integers(0, 1000, c + 5).tolist() for _ in range(2)]
  for i in range(300):
    tree.insert(systems[i % 3] + shots[i % 2] + rng.integers(0, 1000, 1 + i % 40).tolist())
  plan = build_plan(tree)
  assert plan.row_capacity == 512 and plan.num_shared_items() >= 6
  q = jnp.asarray(rng.normal(size=(512, h, d)), jnp.float32)
  k_pool = jnp.asarray(rng.normal(size=(4096, h_kv, c, d)), jnp.float32)
  v_pool = jnp.asarray(rng.normal(size=(4096, h_kv, c, d)), jnp.float32)
  out = np.asarray(decode_attention(q, k_pool, v_pool, plan, impl="xla"))
  assert not np.isnan(out).any() and (out[300:] == 0).all()
  kp, vp = np.asarray(k_pool), np.asarray(v_pool)
  for r in range(0, 300, 23):
    sid = int(plan.row_seq_ids[r])
    k, v = sequence_kv(kp, vp, tree.chunk_path(sid), tree.length(sid))
    np.testing.assert_allclose(out[r], dense_attention(np.asarray(q[r]), k, v), atol=2e-5, rtol=0)


@pytest.mark.parametrize("g,T,dtype,impl", [
    (1, 2, jnp.float32, "pallas_interpret"), (1, 4, jnp.float16, "pallas_interpret"),
    (2, 3, jnp.float32, "pallas_interpret"), (4, 2, jnp.bfloat16, "pallas_interpret"),
    (8, 4, jnp.float32, "pallas_interpret"), (4, 3, jnp.float32, "xla"),
    (1, 5, jnp.float32, "reference")])
def test_multi_token_rows_match_causal_dense(rng, g, T, dtype, impl):
  """T new tokens per row (appended to the tree, so the plan's lengths include them): token t of a
  row attends to the shared prefix, the private tokens before it and itself."""
  case = make_case(rng, g=g, dtype=dtype, seed=60 + g + T, append=T, plan_kwargs_=split(6))
  R, h, d = case.q.shape
  q = jnp.asarray(rng.normal(size=(R, T, h, d)), dtype).at[int(case.plan.num_rows):].set(jnp.nan)
  kw = dict(partials=poisoned_partials(case, T)) if impl == "pallas_interpret" else {}
  out = two_phase_decode(q, case.k_pool, case.v_pool, **plan_kwargs(case.plan), impl=impl, **kw)
  assert out.shape == q.shape and out.dtype == dtype
  want, b = dense_rows_multi(case, q)
  got = np.asarray(out.astype(jnp.float32))
  assert not np.isnan(got[:b]).any() and (got[b:] == 0).all()
  np.testing.assert_allclose(got[:b], want, atol=TOL[dtype], rtol=0)


def test_multi_token_rows_beyond_the_kernels_are_refused(rng):
  case = make_case(rng, g=8, seed=71, append=9)
  R, h, d = case.q.shape
  q = jnp.zeros((R, 9, h, d), jnp.float32)  # 9 tokens x 8 heads = 72 queries per KV head
  with pytest.raises(ValueError, match="at most 64 queries"):
    decode_attention(q, case.k_pool, case.v_pool, case.plan, impl="pallas_interpret")


def test_multi_token_rows_need_private_new_tokens(rng):
  """With T new tokens per row, every live row must have at least T private tokens (the new ones
  are never shared): a plan that does not is refused by name."""
  case = make_case(rng, g=1, seed=70)  # two rows end exactly at a shared chunk: 0 private
  R, h, d = case.q.shape
  q = jnp.zeros((R, 2, h, d), jnp.float32)
  with pytest.raises(InvalidPlanError, match="new tokens must be private"):
    decode_attention(q, case.k_pool, case.v_pool, case.plan, impl="xla")
