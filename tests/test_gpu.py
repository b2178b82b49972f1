"""Checks that need a GPU: the Pallas kernels compiled and run for real (not interpreted).

Skipped on machines without a GPU (CI); `scripts/device_check.sh` runs them on a lent GPU with
`pytest -m gpu`. The CPU suite covers the same numerics in interpret mode and the CUDA lowering.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chunkattn_jax import dense_baseline, llama
from chunkattn_jax.attention import decode_attention, plan_kwargs
from chunkattn_jax.engine import Engine, EngineConfig
from chunkattn_jax.sharing_policy import CostModelPolicy
from kernel_cases import TOL, check_against_dense, make_case, poisoned_partials, split
from pallas_kernels import two_phase_decode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
    pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("g", [1, 2, 4, 8])
@pytest.mark.parametrize("c,d", [(16, 64), (64, 128), (128, 256)])
def test_pallas_matches_dense(rng, c, d, g, dtype):
  """Compiled kernels at the CPU tests' tolerances: fp32 must be full precision (not TF32)."""
  case = make_case(rng, c=c, d=d, g=g, dtype=dtype, seed=c + g, append=1, length_delta=1,
                   n_chunks=512, plan_kwargs_=split(6))
  out = two_phase_decode(case.q, case.k_pool, case.v_pool, **plan_kwargs(case.plan),
                         impl="pallas", partials=poisoned_partials(case))
  check_against_dense(case, out, dtype)
  xla = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="xla")
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                             np.asarray(xla.astype(jnp.float32)), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("plan_kwargs_", [dict(threshold=1000), dict(
    policy=CostModelPolicy.for_shapes(num_heads=8, num_kv_heads=2, head_dim=64, chunk_size=16))])
def test_pallas_paged_and_cost_model_plans(rng, plan_kwargs_):
  case = make_case(rng, c=16, g=4, dtype=jnp.float16, seed=5, plan_kwargs_=plan_kwargs_)
  out = decode_attention(case.q, case.k_pool, case.v_pool, case.plan, impl="pallas")
  check_against_dense(case, out, jnp.float16)


def test_engine_with_pallas_matches_dense_cache():
  cfg = llama.tiny(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)
  model = llama.Llama(cfg, impl="pallas", rngs=nnx.Rngs(0))
  system = list(range(10, 74))
  prompts = [system + [1, 2], system + [3], system + [4, 5, 6], [7, 8, 9]]
  eng = Engine(model, EngineConfig(n_chunks=64, chunk_size=16, record_logits=True))
  rids = [eng.submit(p, 6) for p in prompts]
  list(eng.run())
  for rid, p in zip(rids, prompts):
    toks, logits = dense_baseline.generate(model, p, 6)
    assert eng.result(rid) == toks
    np.testing.assert_allclose(np.stack(eng.request_info(rid)["logits"]), np.stack(logits),
                               atol=2e-3)
  eng.tree.check_invariants()
