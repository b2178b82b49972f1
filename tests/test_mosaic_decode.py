"""The Mosaic GPU decode kernels (pallas_kernels/mosaic_decode.py).

* CPU: Mosaic GPU's interpreter (TMA, mbarriers, warpgroups and wgmma simulated; race detection
  on) == the plain-jnp references == an fp64 dense attention assembled per sequence from the tree,
  on multi-level trees with split runs, shuffled pool slots, lengths off chunk boundaries and
  `length_delta`; partial entries no item covers stay NaN (the interpreter starts every buffer as
  NaN); spare rows are zeros even with NaN queries; K/V past a row's length set to NaN is never
  used. A representative set runs every time; the rest is marked `slow`.
* Lowering for `cuda` on an abstract H100, and XLA's deviceless sm_90a compile (Mosaic's own
  ptxas run): 0 spills, shared memory within the opt-in limit, two kernels per call (one without
  shared items).
* GPU (marker `gpu`, skipped without a Hopper GPU): the compiled kernels against the dense
  attention.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
# 0.11.2: the interpreter's race report and reset are not public API.
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, interpret_pallas_call
from jax.experimental.pallas import mosaic_gpu as plgpu

from chunkattn_jax.attention import decode_attention, plan_kwargs
from configs import kernel_resources_mosaic
from experiments import kernel_resources
from kernel_cases import TOL, check_against_dense, make_case, split
from pallas_kernels import (MosaicConfig, chunk_first_reference, deviceless, mosaic_chunk_first,
                            mosaic_sequence_first, two_phase_decode)
from pallas_kernels.mosaic_decode import check_mosaic
from test_deviceless import require_sm90_toolchain
from test_lowering import lower_for_cuda, plan_specs

ITEM_ARGS = ("item_chunks", "item_num_chunks", "item_row_begin", "item_row_end", "item_slot")
ROW_ARGS = ("num_rows", "length_delta", "row_private_chunks", "row_private_len", "row_num_items")


def races_found() -> bool:
  state = gpu_callbacks._races  # None after a reset, until the next interpreted kernel
  return state is not None and state.races_found


def covered_slots(plan) -> np.ndarray:
  """[R, K] bool: the (row, partial slot) pairs some live item writes."""
  out = np.zeros((plan.row_capacity, plan.items_per_row), bool)
  for i in np.flatnonzero(np.asarray(plan.item_num_chunks)):
    out[plan.item_row_begin[i]:plan.item_row_end[i], plan.item_slot[i]] = True
  return out


def poison_tails(case):
  """NaN in every live row's last private chunk past its length (never read, never used)."""
  p = case.plan
  c = p.chunk_size
  k, v = np.array(case.k_pool.astype(jnp.float32)), np.array(case.v_pool.astype(jnp.float32))
  poisoned = 0
  for r in range(int(p.num_rows)):
    length = int(p.row_private_len[r]) + int(p.length_delta)
    if length % c:
      slot = p.row_private_chunks[r, length // c]
      k[slot, :, length % c:] = np.nan
      v[slot, :, length % c:] = np.nan
      poisoned += 1
  assert poisoned >= 3
  dtype = case.k_pool.dtype
  return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def run_case(case, config=None):
  """Both phases in the interpreter; checks the partials against `chunk_first_reference`."""
  kw = {k: jnp.asarray(v) for k, v in plan_kwargs(case.plan).items()}
  p = case.plan
  items = [kw[k] for k in ITEM_ARGS]
  part = mosaic_chunk_first(case.q, case.k_pool, case.v_pool, *items,
                            items_per_row=p.items_per_row, item_rows_capacity=p.item_rows_capacity,
                            config=config, interpret=True)
  out = mosaic_sequence_first(case.q, case.k_pool, case.v_pool, *[kw[k] for k in ROW_ARGS],
                              part, config=config, interpret=True)
  assert not races_found()
  ref_o, ref_lse = chunk_first_reference(case.q, case.k_pool, case.v_pool, *items,
                                         items_per_row=p.items_per_row,
                                         item_rows_capacity=p.item_rows_capacity)
  g = case.g
  covered = covered_slots(p)  # [R, K]; the partials are [R, h_kv, K, ...]: slots to axis 1
  o, lse, ref_o, ref_lse = (np.moveaxis(np.asarray(x), 2, 1) for x in (*part, ref_o, ref_lse))
  assert covered.sum() >= 8
  assert not np.isnan(lse[covered][..., :g]).any()
  assert np.isnan(lse[~covered]).all() and np.isnan(o[~covered]).all()  # never written
  # P is rounded to the input dtype per tile here, per item there: the dtype's tolerance.
  np.testing.assert_allclose(o[covered][..., :g, :], ref_o[covered][..., :g, :],
                             atol=TOL[case.q.dtype.type], rtol=0)
  np.testing.assert_allclose(lse[covered][..., :g], ref_lse[covered][..., :g], atol=1e-4,
                             rtol=1e-5)  # fp32 scores and sums
  return out


def check_xla(case, out, dtype):
  xla = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="xla")
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                             np.asarray(xla.astype(jnp.float32)), atol=TOL[dtype], rtol=0)


# (g, dtype, c, d): every g, both dtypes, every d, every c, each at least once per set.
FAST = [(1, jnp.float16, 16, 64), (4, jnp.bfloat16, 64, 128), (8, jnp.float16, 32, 64)]
SLOW = [(2, jnp.float16, 128, 128), (1, jnp.bfloat16, 32, 256), (8, jnp.bfloat16, 16, 128),
        (4, jnp.float16, 128, 256)]


def _id(g, dtype, c, d):
  return f"g{g}-{jnp.dtype(dtype).name}-c{c}-d{d}"


@pytest.mark.parametrize("g,dtype,c,d", FAST + [pytest.param(*x, marks=pytest.mark.slow)
                                                for x in SLOW],
                         ids=[_id(*x) for x in FAST + SLOW])
def test_interpreter_matches_references_and_dense(rng, g, dtype, c, d):
  case = make_case(rng, c=c, g=g, d=d, dtype=dtype, seed=20 + g, append=1, length_delta=2,
                   plan_kwargs_=split(8), n_chunks=128)
  assert case.plan.num_shared_items() >= 4 and int(case.plan.length_delta) == 2
  out = run_case(case)
  assert out.dtype == dtype and out.shape == case.q.shape
  check_against_dense(case, out, dtype)
  check_xla(case, out, dtype)


def test_nan_tails_spare_rows_and_the_public_entry_point(rng):
  """Through `decode_attention(impl="mosaic_interpret")`: K/V past each row's length is NaN and
  spare rows' queries are NaN; outputs stay finite and spare rows exactly zero."""
  case = make_case(rng, c=16, g=2, d=64, dtype=jnp.float16, seed=31, append=3, n_chunks=128)
  b = int(case.plan.num_rows)
  assert b < case.q.shape[0]
  case.k_pool, case.v_pool = poison_tails(case)
  case.q = case.q.at[b:].set(jnp.nan)
  out = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="mosaic_interpret")
  assert not races_found()
  check_against_dense(case, out, jnp.float16)


def test_paged_plan_is_one_kernel_and_small_configs(rng):
  """No shared item: phase 2 alone, here with 16-token tiles over 32-token chunks (two tiles per
  chunk), a 3-deep ring and one merge stage."""
  case = make_case(rng, c=32, g=4, d=64, dtype=jnp.bfloat16, seed=32, append=1,
                   plan_kwargs_=dict(threshold=1000), n_chunks=128)
  assert case.plan.num_shared_items() == 0
  config = MosaicConfig(block_n=16, num_stages=3, merge_stages=1)
  out = two_phase_decode(case.q, case.k_pool, case.v_pool, **plan_kwargs(case.plan),
                         impl="mosaic_interpret", mosaic_config=config)
  assert not races_found()
  check_against_dense(case, out, jnp.bfloat16)


@pytest.mark.slow
def test_more_slots_than_merge_stages_and_deep_ring(rng):
  """Rows covered by more items than merge stages (the ring refills), 128-token tiles."""
  case = make_case(rng, c=32, g=1, d=64, dtype=jnp.float16, seed=33, plan_kwargs_=split(24),
                   n_chunks=128)
  assert int(np.asarray(case.plan.row_num_items).max()) >= 3
  out = run_case(case, MosaicConfig(block_n=128, num_stages=4, merge_stages=1))
  check_against_dense(case, out, jnp.float16)


def test_race_detection_reports_a_merge_without_its_barrier_waits(rng, monkeypatch):
  """The detector is live for this kernel: without the waits on the merge's barriers, reading a
  partial slot or the row's lse races with the TMA copy into it (each barrier completes once
  here, so no phase goes unobserved, which the interpreter would report as an error instead)."""
  case = make_case(rng, c=16, g=1, d=64, dtype=jnp.float16, seed=34, plan_kwargs_=split(8),
                   n_chunks=128)
  assert 1 <= int(np.asarray(case.plan.row_num_items).max()) <= 4
  kw = {k: jnp.asarray(v) for k, v in plan_kwargs(case.plan).items()}
  part = chunk_first_reference(case.q, case.k_pool, case.v_pool, *[kw[k] for k in ITEM_ARGS],
                               items_per_row=case.plan.items_per_row)
  # The merge's barriers (4 slots + the lse row) are the only array of 5; the K/V ring has 2
  # "loaded" and 3 "consumed" barriers, q one.
  config = MosaicConfig(num_stages=2, merge_stages=4)
  wait = plgpu.barrier_wait

  def wait_except_merge(barrier, *args, **kwargs):
    if getattr(barrier, "ref", barrier).shape != (5,):
      wait(barrier, *args, **kwargs)

  assert not races_found()
  monkeypatch.setattr(plgpu, "barrier_wait", wait_except_merge)
  jax.clear_caches()  # retrace without the waits
  try:
    jax.block_until_ready(mosaic_sequence_first(
        case.q, case.k_pool, case.v_pool, *[kw[k] for k in ROW_ARGS], part, config=config,
        interpret=True))
    assert races_found()
  finally:
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    monkeypatch.undo()
    jax.clear_caches()
  assert not races_found()


def test_trace_time_validation(rng):
  case = make_case(rng, c=16, g=1, d=64, dtype=jnp.float32, seed=35)
  kw = plan_kwargs(case.plan)
  with pytest.raises(ValueError, match="float16 or bfloat16"):
    two_phase_decode(case.q, case.k_pool, case.v_pool, **kw, impl="mosaic_interpret")
  q16, k16 = case.q.astype(jnp.float16), case.k_pool.astype(jnp.float16)
  with pytest.raises(ValueError, match="up to 8"):
    check_mosaic(jnp.zeros((4, 32, 64), jnp.float16), jnp.zeros((8, 2, 16, 64), jnp.float16),
                 jnp.zeros((8, 2, 16, 64), jnp.float16))
  with pytest.raises(ValueError, match="partials"):
    two_phase_decode(q16, k16, k16, **kw, impl="mosaic_interpret", partials=(None, None))
  with pytest.raises(ValueError, match="Pallas kernels support d"):
    check_mosaic(q16[..., :32], k16[..., :32], k16[..., :32])
  with pytest.raises(ValueError, match="one new token per row"):  # q [R, T, h, d]
    two_phase_decode(q16[:, None], k16, k16, **kw, impl="mosaic_interpret")
  for bad in (dict(block_n=48), dict(num_stages=1), dict(merge_stages=0), dict(num_stages=True)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      MosaicConfig(**bad)


# --- Lowering for cuda on an abstract H100 ---------------------------------------------------------
GQA = {1: (32, 32), 2: (32, 16), 4: (32, 8), 8: (32, 4)}  # g -> (h, h_kv)
ALL = list(itertools.product((64, 128, 256), (16, 32, 64, 128), ("float16", "bfloat16"),
                             (1, 2, 4, 8)))
# Each d, c, dtype and g at least once.
REPRESENTATIVE = [(64, 16, "float16", 1), (128, 64, "bfloat16", 4), (256, 128, "float16", 8),
                  (128, 32, "bfloat16", 2), (256, 16, "bfloat16", 1)]


def _cid(d, c, dtype, g):
  return f"d{d}-c{c}-{dtype}-g{g}"


def lower_mosaic(d, c, dtype, g, **spec_changes):
  S = jax.ShapeDtypeStruct
  h, h_kv = GQA[g]
  dt = jnp.dtype(dtype)
  pool = S((512, h_kv, c, d), dt)
  f = functools.partial(two_phase_decode, impl="mosaic")
  return lower_for_cuda(f, S((32, h, d), dt), pool, pool, **dict(plan_specs(), **spec_changes))


@pytest.mark.parametrize("d,c,dtype,g", REPRESENTATIVE + [
    pytest.param(*x, marks=pytest.mark.slow) for x in ALL if x not in REPRESENTATIVE],
    ids=[_cid(*x) for x in REPRESENTATIVE + [x for x in ALL if x not in REPRESENTATIVE]])
def test_lowers_for_h100(d, c, dtype, g):
  text = lower_mosaic(d, c, dtype, g)
  assert text.count("custom_call @mosaic_gpu_v2(") == 2


def test_lowering_without_items_is_one_kernel():
  S = jax.ShapeDtypeStruct
  text = lower_mosaic(128, 64, "float16", 4, item_chunks=S((0, 16), jnp.int32), **{
      k: S((0,), jnp.int32) for k in ITEM_ARGS[1:]})
  assert text.count("custom_call @mosaic_gpu_v2(") == 1


# --- XLA's deviceless sm_90a compile -------------------------------------------------------------
def compile_reports(configs):
  require_sm90_toolchain()
  config = kernel_resources_mosaic.get_config()
  specs = [s for s in kernel_resources.specs(config)
           if (s["kwargs"]["d"], s["kwargs"]["c"], s["kwargs"]["dtype"], s["kwargs"]["g"])
           in configs]
  assert len(specs) == len(configs)
  reports = deviceless.compile_specs(specs)
  rows = [row for spec, rep in zip(specs, reports) for row in kernel_resources.rows_of(spec, rep)]
  return reports, rows


def check_compiled(reports, rows):
  for rep in reports:
    names = [k.kernel for k in rep.kernels]
    assert rep.num_gpu_kernels == 2, names  # nothing around the two kernels
    assert names[0].startswith("mosaic_chunk_first") and names[1].startswith(
        "mosaic_sequence_first")
  for r in rows:
    assert r["registers"] > 0 and r["threads"] in (128, 256), r  # Mosaic's ptxas report read
    assert r["spill_bytes"] == 0, r
    assert 0 < r["smem_bytes"] <= deviceless.H100.smem_per_block_optin, r
    assert r["ctas_per_sm"] >= 1 and r["mma"] == "wgmma" and r["tma_per_iteration"] >= 2, r
    assert r["mbarriers"] >= 2, r


@pytest.fixture(scope="module")
def representative_compile():
  return compile_reports(REPRESENTATIVE)


def test_representative_configurations_compile_without_spills(representative_compile):
  check_compiled(*representative_compile)


@pytest.mark.slow
def test_every_configuration_compiles_without_spills():
  check_compiled(*compile_reports(ALL))


# --- On a Hopper GPU -----------------------------------------------------------------------------
def on_hopper():
  return (jax.default_backend() == "gpu"
          and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9."))


@pytest.mark.gpu
@pytest.mark.skipif(not on_hopper(), reason="needs a Hopper GPU (H100/H200)")
@pytest.mark.parametrize("g,dtype,c,d", FAST + SLOW, ids=[_id(*x) for x in FAST + SLOW])
def test_compiled_kernels_match_dense(rng, g, dtype, c, d):
  case = make_case(rng, c=c, g=g, d=d, dtype=dtype, seed=40 + g, append=1, length_delta=2,
                   plan_kwargs_=split(8), n_chunks=256)
  case.k_pool, case.v_pool = poison_tails(case)
  out = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="mosaic")
  check_against_dense(case, out, dtype)
  paged = make_case(rng, c=c, g=g, d=d, dtype=dtype, seed=50 + g, append=1,
                    plan_kwargs_=dict(threshold=1000), n_chunks=256)
  check_against_dense(paged, decode_attention(paged.q, paged.k_pool, paged.v_pool, paged.plan,
                                              impl="mosaic"), dtype)
