"""RoPE inverse frequencies against transformers' own, and the schedule's validation."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from chunkattn_jax import rope

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "rope.npz")


def _cases():
  table = np.load(FIXTURE)
  for name in table.files:
    if not name.endswith("_case"):
      yield name, json.loads(str(table[name + "_case"])), table[name]


@pytest.mark.parametrize("name,case,expected", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_inverse_frequencies_equal_transformers(name, case, expected):
  """`LlamaRotaryEmbedding.inv_freq` of transformers 5.24 for real shapes (head_dim 64/128,
  Llama-2/3/3.1/3.2 settings, linear and dynamic scaling): equal bit for bit."""
  scaling = dict(case["scaling"] or {"rope_type": "default"})
  rope_type = scaling.pop("rope_type")
  if rope_type == "dynamic":
    scaling["original_max_position_embeddings"] = case["max_position_embeddings"]
  s = None if rope_type == "default" else rope.RopeScaling(rope_type, **scaling)
  got = rope.inverse_frequencies(case["head_dim"], case["theta"], s)
  assert got.dtype == np.float32 and got.shape == expected.shape
  np.testing.assert_array_equal(got, expected, err_msg=name)


def test_llama3_schedule_has_all_three_bands():
  """The Llama-3.1 case keeps high frequencies, divides low ones by the factor and interpolates
  in between (so the fixture comparison above exercises every branch)."""
  s = rope.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  plain = rope.inverse_frequencies(128, 5e5)
  scaled = rope.inverse_frequencies(128, 5e5, s)
  ratio = plain / scaled
  assert np.sum(ratio == 1) > 0 and np.sum(ratio == 8) > 0
  assert np.sum((ratio > 1) & (ratio < 8)) > 0


def test_linear_divides_and_dynamic_equals_default_within_context():
  plain = rope.inverse_frequencies(64, 1e4)
  np.testing.assert_array_equal(rope.inverse_frequencies(64, 1e4, rope.RopeScaling("linear", 4.0)),
                                plain / np.float32(4))
  dyn = rope.RopeScaling("dynamic", 2.0, original_max_position_embeddings=4096)
  np.testing.assert_array_equal(rope.inverse_frequencies(64, 1e4, dyn), plain)


@pytest.mark.parametrize("kw,match", [
    (dict(rope_type="yarn", factor=4.0), "rope_type='yarn' is not supported"),
    (dict(rope_type="linear", factor=0.0), "factor must be a finite number > 0, got 0.0"),
    (dict(rope_type="linear", factor=float("inf")), "factor must be a finite number > 0"),
    (dict(rope_type="default", factor=2.0), "takes no factor"),
    (dict(rope_type="llama3", factor=8.0), "needs low_freq_factor"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
          original_max_position_embeddings=8192), "high_freq_factor > low_freq_factor"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192.0), "original_max_position_embeddings must be a positive integer"),
    (dict(rope_type="linear", factor=2.0, low_freq_factor=1.0), "does not use low_freq_factor=1.0"),
    (dict(rope_type="dynamic", factor=2.0), "needs original_max_position_embeddings"),
])
def test_scaling_validation(kw, match):
  with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
    rope.RopeScaling(**kw)


@pytest.mark.parametrize("head_dim,theta,match", [
    (7, 1e4, "even head dim, got head_dim=7"), (0, 1e4, "head_dim=0"),
    (8, -1.0, "rope_theta must be a finite number > 0, got -1.0"),
])
def test_frequency_validation(head_dim, theta, match):
  with pytest.raises(ValueError, match=match):
    rope.inverse_frequencies(head_dim, theta)


def test_apply_rope_rotates_pairs_half_apart():
  x = np.random.default_rng(0).normal(size=(3, 2, 8)).astype(np.float32)
  pos = np.array([0, 1, 7])
  inv = rope.inverse_frequencies(8, 100.0)
  y = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[:, None, None] * inv.astype(np.float64))
  np.testing.assert_allclose(y, np.concatenate([z.real, z.imag], -1), atol=1e-5)
  with pytest.raises(ValueError, match="inv_freq must have shape"):
    rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv[:2])
