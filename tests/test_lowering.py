"""GPU lowering check without a GPU: every supported kernel configuration lowers to Triton for
`cuda` on an abstract H100 (catches Triton lowering errors such as non-power-of-two blocks; does
not run ptxas or execute anything)."""

import functools
import importlib
import itertools

import jax
import jax.numpy as jnp
import pytest
from jax._src.mesh import AbstractDevice  # 0.11.2: not public; the documented recipe
from jax.sharding import AbstractMesh

from pallas_kernels import ChunkFirstConfig, SequenceFirstConfig, two_phase_decode

S = jax.ShapeDtypeStruct
I32 = jnp.int32
R, I, G, P, K, N_CHUNKS = 32, 8, 16, 16, 4, 512
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def h100_mesh():
  return AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
      device_kind="NVIDIA H100", num_cores=132, platform="gpu"))


def lower_for_cuda(f, *args, **kwargs) -> str:
  with jax.sharding.use_abstract_mesh(h100_mesh()):
    return jax.jit(f).trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()


def plan_specs():
  return dict(
      num_rows=S((), I32), row_private_chunks=S((R, P), I32), row_private_len=S((R,), I32),
      row_items=S((R, K), I32), row_num_items=S((R,), I32), item_chunks=S((I, G), I32),
      item_num_chunks=S((I,), I32), item_row_begin=S((I,), I32), item_row_end=S((I,), I32),
      item_slot=S((I,), I32), length_delta=S((), I32))


GQA = {1: (32, 32), 2: (32, 16), 4: (32, 8), 8: (32, 4), 32: (32, 1)}  # g -> (h, h_kv); MQA
CONFIGS = list(itertools.product((64, 128, 256), (16, 32, 64, 128),
                                 (jnp.float16, jnp.bfloat16, jnp.float32), (1, 2, 4, 8)))


@pytest.mark.parametrize("d,c,dtype,g", CONFIGS,
                         ids=[f"d{d}-c{c}-{jnp.dtype(t).name}-g{g}" for d, c, t, g in CONFIGS])
def test_two_phase_lowers_for_h100(d, c, dtype, g):
  h, h_kv = GQA[g]
  f = functools.partial(two_phase_decode, impl="pallas")
  text = lower_for_cuda(f, S((R, h, d), dtype), S((N_CHUNKS, h_kv, c, d), dtype),
                        S((N_CHUNKS, h_kv, c, d), dtype), **plan_specs())
  assert text.count("__gpu$xla.gpu.triton") == 2  # both phases are Triton kernels


@pytest.mark.parametrize("g,cf,sf", [
    (32, None, None), (1, ChunkFirstConfig(block_m=16, block_n=16, num_warps=8, num_stages=3),
                       SequenceFirstConfig(block_n=64, num_warps=8)),
    (8, ChunkFirstConfig(block_m=128), SequenceFirstConfig(num_warps=2, num_stages=2)),
    (1, None, SequenceFirstConfig(cuda_core=False))])
def test_mqa_and_config_variants_lower(g, cf, sf):
  h, h_kv = GQA[g]
  f = functools.partial(two_phase_decode, impl="pallas", chunk_first_config=cf,
                        sequence_first_config=sf)
  text = lower_for_cuda(f, S((R, h, 128), jnp.float16), S((N_CHUNKS, h_kv, 64, 128), jnp.float16),
                        S((N_CHUNKS, h_kv, 64, 128), jnp.float16), **plan_specs())
  assert text.count("__gpu$xla.gpu.triton") == 2


def test_plan_without_items_is_one_kernel():
  h, h_kv = GQA[4]
  spec = dict(plan_specs(), item_chunks=S((0, G), I32), **{
      k: S((0,), I32) for k in ("item_num_chunks", "item_row_begin", "item_row_end", "item_slot")})
  text = lower_for_cuda(functools.partial(two_phase_decode, impl="pallas"),
                        S((R, h, 128), jnp.float16), S((N_CHUNKS, h_kv, 64, 128), jnp.float16),
                        S((N_CHUNKS, h_kv, 64, 128), jnp.float16), **spec)
  assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("g,T", [(1, 2), (4, 8), (8, 4)])
def test_multi_token_rows_lower(g, T):
  h, h_kv = GQA[g]
  text = lower_for_cuda(functools.partial(two_phase_decode, impl="pallas"),
                        S((R, T, h, 128), jnp.bfloat16), S((N_CHUNKS, h_kv, 64, 128), jnp.bfloat16),
                        S((N_CHUNKS, h_kv, 64, 128), jnp.bfloat16), **plan_specs())
  assert text.count("__gpu$xla.gpu.triton") == 2


def test_large_batch_lowers():
  """b = 512 rows (beyond the paper's fixed batch list), items of up to 512 rows."""
  r = 512
  spec = dict(plan_specs(), row_private_chunks=S((r, P), I32), row_private_len=S((r,), I32),
              row_items=S((r, K), I32), row_num_items=S((r,), I32))
  f = functools.partial(two_phase_decode, item_rows_capacity=r, impl="pallas")
  text = lower_for_cuda(f, S((r, 32, 128), jnp.float16), S((N_CHUNKS, 8, 64, 128), jnp.float16),
                        S((N_CHUNKS, 8, 64, 128), jnp.float16), **spec)
  assert text.count("__gpu$xla.gpu.triton") == 2


def test_check_catches_a_non_power_of_two_block():
  """The same recipe rejects a kernel with a 24-row block (the public API refuses it earlier)."""
  cf = importlib.import_module("pallas_kernels.chunk_first")
  bad_config = object.__new__(ChunkFirstConfig)  # bypass the constructor's validation
  object.__setattr__(bad_config, "block_m", 24)
  object.__setattr__(bad_config, "block_n", 64)
  object.__setattr__(bad_config, "num_warps", 4)
  object.__setattr__(bad_config, "num_stages", 2)

  def bad(q, k, v, *plan):
    return cf._chunk_first_call(q, k, v, *plan, None, K=K, item_rows_capacity=R,
                                config=bad_config, sm_scale=0.1, interpret=False)

  args = (S((R, 4, 128), jnp.float16), S((N_CHUNKS, 4, 64, 128), jnp.float16),
          S((N_CHUNKS, 4, 64, 128), jnp.float16), S((I, G), I32), *[S((I,), I32)] * 4)
  with pytest.raises(Exception, match="power of 2"):
    lower_for_cuda(bad, *args)
