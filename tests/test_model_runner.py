"""The engine's device side: a failed model call leaves a usable KV pool."""

import collections

import jax
import numpy as np
import pytest
from flax import nnx

from chunkattn_jax import llama
from chunkattn_jax.engine import EngineConfig
from chunkattn_jax.model_runner import ModelRunner
from chunkattn_jax.sampling import GREEDY
from chunkattn_jax.scheduler import Request, Scheduler

CFG = EngineConfig(n_chunks=16, chunk_size=4)


@pytest.fixture(scope="module")
def model():
  return llama.Llama(llama.tiny(), impl="xla", rngs=nnx.Rngs(1))


class Boom(Exception):
  pass


class _Poisoned:
  def __array__(self, *args, **kwargs):
    raise Boom("device error surfacing on transfer")


def _batch(prompts):
  s = Scheduler(CFG, 512, collections.Counter())
  for i, p in enumerate(prompts):
    s.add(Request(i, p, 4, frozenset(), GREEDY, None))
  (batch,) = s.plan_prefill()
  return batch


@pytest.mark.parametrize("when", ["before", "after", "fetch"])
def test_failed_call_leaves_a_usable_pool(model, when):
  """Raised before the call: the old pool stays. After it (the donated pool is consumed, the new
  one never returned): a fresh zero pool, counted in `num_pool_resets`. On fetching the tokens:
  the call's new pool, which holds the batch's K/V."""
  batch = _batch([[1, 2, 3, 4, 5], [9, 8, 7]])
  expected, _ = ModelRunner(model, CFG).prefill(batch)
  runner = ModelRunner(model, CFG)
  real = runner.prefill_step
  old = runner.pool

  def failing(*args):
    if when == "before":
      raise Boom("before")
    out = real(*args)
    if when == "after":
      raise Boom("after")
    return (_Poisoned(),) + tuple(out[1:])
  runner.prefill_step = failing
  with pytest.raises(Boom):
    runner.prefill(batch)
  k = np.asarray(runner.pool.k[0])
  written = batch[0].slots[0]
  if when == "before":
    assert runner.pool is old and runner.num_pool_resets == 0
  elif when == "after":
    assert old.k[0].is_deleted() and runner.num_pool_resets == 1
    assert not k.any() and runner.pool.k[0].shape == old.k[0].shape
  else:
    assert runner.num_pool_resets == 0 and k[written[0], :, written[1]].any()
  runner.prefill_step = real
  tokens, _ = runner.prefill(batch)
  np.testing.assert_array_equal(tokens, expected)
  assert not any(a.is_deleted() for a in jax.tree.leaves(runner.pool))
