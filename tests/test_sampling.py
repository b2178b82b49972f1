"""SamplingParams checks and the per-row sampler."""

import jax.numpy as jnp
import numpy as np
import pytest

from chunkattn_jax import sampling
from chunkattn_jax.sampling import SamplingParams


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=2**31), "top_k"),  # before: accepted, then every step overflowed int32
    (dict(temperature=1e39), "temperature"),  # before: accepted, inf in float32
    (dict(temperature=1e-9), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature="0.5"), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=None), "top_p"),
    (dict(seed=-1), "seed"), (dict(seed=2**32), "seed"), (dict(seed=1.0), "seed"),
    (dict(seed=True), "seed"),
])
def test_bad_params_are_rejected(kw, match):
  with pytest.raises(ValueError, match=f"SamplingParams.{match}"):
    SamplingParams(**kw)


def test_params_are_normalised_to_python_values():
  p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), top_p=1, seed=np.uint32(7))
  assert p == SamplingParams(temperature=0.5, top_k=3, top_p=1.0, seed=7)
  assert type(p.temperature) is float and type(p.top_k) is int and type(p.seed) is int
  assert SamplingParams(seed=2**32 - 1, top_k=2**31 - 1, temperature=1e6).seed == 2**32 - 1
  assert SamplingParams().greedy and not SamplingParams(temperature=0.1).greedy


def test_sample_rows_independently():
  """Greedy rows take the argmax, top_k=1 does too at any temperature, and a sampled row's token
  depends only on its own seed and counter."""
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
  args = dict(temperature=jnp.asarray([0.0, 5.0, 1.0, 1.0]), top_k=jnp.asarray([0, 1, 0, 0]),
              top_p=jnp.asarray([1.0, 1.0, 1.0, 0.5]), seeds=jnp.asarray([0, 0, 3, 3], jnp.uint32),
              counters=jnp.asarray([0, 0, 5, 5]))
  tok = np.asarray(sampling.sample(logits, **args))
  best = np.asarray(jnp.argmax(logits, -1))
  assert tok[0] == best[0] and tok[1] == best[1]
  # Rows 2 and 3 share seed and counter; moved to other rows of a batch, they draw the same.
  swapped = {k: v[::-1] for k, v in args.items()}
  np.testing.assert_array_equal(np.asarray(sampling.sample(logits[::-1], **swapped)), tok[::-1])
  # Row 3 keeps only the most likely tokens holding half the mass.
  probs = np.exp(np.asarray(logits[3]) - float(jnp.max(logits[3])))
  probs = probs / probs.sum()
  order = np.argsort(-probs)
  nucleus = order[: np.searchsorted(np.cumsum(probs[order]), 0.5) + 1]
  assert tok[3] in nucleus
