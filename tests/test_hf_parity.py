"""Loaded checkpoints vs transformers itself: logits and greedy tokens on committed fixtures.

Each directory under tests/fixtures/hf/ is a random-weight `LlamaForCausalLM` saved by
transformers (4.45.2, 4.57.6 or 5.24.0, see its fixture.json) with the logits and greedy tokens
transformers computed for four prompts, three of which share a 9-token prefix
(scripts/make_hf_fixtures.py; torch and transformers are not needed here). Weights are stored in
fp16/bf16 (fp32 for one) and the reference ran in float32 on those exact values, so the models load
with dtype="float32" and must match within 1e-4, with identical greedy tokens (every greedy step's
top-1 logit beats the runner-up by at least 2e-3 in the reference).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from chunkattn_jax import checkpoint, dense_baseline, layers, rope
from chunkattn_jax.engine import Engine, EngineConfig

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FIXTURES = sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)))
ATOL = 1e-4


class Fixture:

  def __init__(self, name):
    self.path = os.path.join(ROOT, name)
    self.expected = dict(np.load(os.path.join(self.path, "expected.npz")))
    with open(os.path.join(self.path, "config.json")) as f:
      self.hf_config = json.load(f)
    with open(os.path.join(self.path, "fixture.json")) as f:
      self.meta = json.load(f)
    self.prompts = [[int(t) for t in p if t >= 0] for p in self.expected["prompts"]]

  def logits(self, i):
    return self.expected[f"logits_{i}"]

  def greedy(self, i):
    return self.expected[f"greedy_{i}"].tolist(), self.expected[f"greedy_logits_{i}"]


_MODELS = {}


def _load(name, **kw):
  key = (name, tuple(sorted(kw.items())))
  if key not in _MODELS:
    _MODELS[key] = checkpoint.load_hf_checkpoint(os.path.join(ROOT, name), dtype="float32", **kw)
  return _MODELS[key]


def _forward(model, prompt):
  """float32 logits `[T, V]` of every prompt position (dense path)."""
  cache = model.make_dense_cache(1, 32)
  logits, _ = model(jnp.asarray(prompt)[None], cache,
                    layers.DenseInputs(positions=jnp.arange(len(prompt))[None]))
  return np.asarray(logits[0])


def test_fixtures_cover_the_issue():
  """Every configuration the issue lists, in both config formats, from real transformers."""
  assert len(FIXTURES) >= 9
  fx = {n: Fixture(n) for n in FIXTURES}
  formats = {n: f.meta["format"] for n, f in fx.items()}
  assert {"v4_torch_dtype", "v4", "v5"} <= set(formats.values())
  assert "torch_dtype" in fx["llama2_mha_v4"].hf_config
  assert "rope_scaling" in fx["llama31_scaling_v4"].hf_config
  assert "rope_theta" not in fx["llama31_scaling_v5"].hf_config  # v5: only rope_parameters
  assert fx["llama31_scaling_v5"].hf_config["rope_parameters"]["rope_type"] == "llama3"
  assert fx["llama32_tied_v5"].hf_config["tie_word_embeddings"]
  assert fx["bias_v5"].hf_config["attention_bias"] and fx["bias_v5"].hf_config["mlp_bias"]
  for f in fx.values():
    assert os.path.getsize(os.path.join(f.path, "model.safetensors")) < 100_000


@pytest.mark.parametrize("name", FIXTURES)
def test_config_and_rope_frequencies(name):
  fx = Fixture(name)
  cfg = checkpoint.read_config(fx.path)
  inv = rope.inverse_frequencies(cfg.d_head, cfg.rope_theta, cfg.rope_scaling)
  np.testing.assert_array_equal(inv, fx.expected["inv_freq"])
  # The config's own dtype is the default (transformers 4.56+ write "dtype", older "torch_dtype").
  stored = fx.hf_config.get("dtype", fx.hf_config.get("torch_dtype"))
  assert cfg.dtype == cfg.param_dtype == stored == fx.meta["storage_dtype"]


def test_both_formats_give_the_same_config():
  v4 = checkpoint.read_config(os.path.join(ROOT, "llama31_scaling_v4"))
  v5 = checkpoint.read_config(os.path.join(ROOT, "llama31_scaling_v5"))
  assert v4 == v5 and v4.rope_scaling.rope_type == "llama3" and v4.rope_theta == 5e5


@pytest.mark.parametrize("name", FIXTURES)
def test_prefill_logits_match_transformers(name):
  fx = Fixture(name)
  model = _load(name)
  for i, prompt in enumerate(fx.prompts):
    np.testing.assert_allclose(_forward(model, prompt), fx.logits(i), atol=ATOL, rtol=0,
                               err_msg=f"{name} prompt {i}")


# What each fixture exercises, and a change that must move the logits: proof that the comparison
# above would catch the feature being dropped (as the old loader dropped v5 rope_parameters,
# o_proj.bias, mlp_bias and hidden_act).
WITHOUT_FEATURE = {
    "llama3_gqa_v5": dict(rope_theta=10000.0),
    "llama31_scaling_v4": dict(rope_scaling=None),
    "llama31_scaling_v5": dict(rope_scaling=None),
    "llama32_tied_v5": dict(rope_scaling=None),
    "linear_scaling_v4": dict(rope_scaling=None),
    "gelu_tanh_v5": dict(hidden_act="silu"),
    "llama2_mha_v4": dict(rms_norm_eps=1e-2),
}


@pytest.mark.parametrize("name", sorted(WITHOUT_FEATURE))
def test_fixture_detects_a_dropped_feature(name):
  fx = Fixture(name)
  model = _load(name, **WITHOUT_FEATURE[name])
  worst = max(np.abs(_forward(model, p) - fx.logits(i)).max() for i, p in enumerate(fx.prompts))
  assert worst > 100 * ATOL, worst


def test_bias_fixture_needs_every_bias():
  fx = Fixture("bias_v5")
  for path in (("self_attn", "o_proj"), ("mlp", "down_proj"), ("mlp", "gate_proj")):
    model = checkpoint.load_hf_checkpoint(fx.path, dtype="float32")
    proj = getattr(getattr(model.layers[1], path[0]), path[1])
    proj.bias.set_value(jnp.zeros_like(proj.bias.get_value()))
    assert np.abs(_forward(model, fx.prompts[0]) - fx.logits(0)).max() > 100 * ATOL, path


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_dense_baseline_matches_transformers(name):
  """All four prompts as one batch of the dense baseline (`DenseRunner`), greedy."""
  fx = Fixture(name)
  model = _load(name)
  runner = dense_baseline.DenseRunner(model)
  n_new = len(fx.greedy(0)[0])
  cache = model.make_dense_cache(len(fx.prompts), 32)
  logits, cache = runner.prefill(cache, fx.prompts)
  positions = np.array([len(p) for p in fx.prompts], np.int32)
  tokens, step_logits = [], []
  for _ in range(n_new):
    row_logits = np.asarray(logits)
    step_logits.append(row_logits)
    tokens.append(row_logits.argmax(-1).astype(np.int32))
    logits, cache = runner.decode(cache, tokens[-1], positions)
    positions = positions + 1  # a new array: jax may alias the one passed to decode
  for i in range(len(fx.prompts)):
    want_tokens, want_logits = fx.greedy(i)
    assert [int(t[i]) for t in tokens] == want_tokens, (name, i)
    np.testing.assert_allclose(np.stack([l[i] for l in step_logits]), want_logits, atol=ATOL,
                               rtol=0)


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_engine_with_prefix_sharing_matches_transformers(name):
  """Staggered arrivals: prompts 1 and 2 reuse the chunks of prompt 0's shared 9-token prefix
  (chunk size 4: two full chunks) while it is still decoding; impl="xla". One prefill per call
  and plan capacities fixed up front, so each fixture compiles two steps."""
  fx = Fixture(name)
  model = _load(name)
  n_new = len(fx.greedy(0)[0])
  eng = Engine(model, EngineConfig(n_chunks=32, chunk_size=4, record_logits=True, pool_seed=1,
                                   max_prefill_batch=1, min_plan_capacities=(8, 8, 4, 4, 4)))
  rids = [eng.submit(fx.prompts[0], n_new)]
  eng.step()
  eng.step()
  rids += [eng.submit(p, n_new) for p in fx.prompts[1:3]]
  eng.step()
  rids.append(eng.submit(fx.prompts[3], n_new))
  list(eng.run())
  for i, rid in enumerate(rids):
    want_tokens, want_logits = fx.greedy(i)
    assert eng.result(rid) == want_tokens, (name, i)
    np.testing.assert_allclose(np.stack(eng.request_info(rid)["logits"]), want_logits, atol=ATOL,
                               rtol=0)
  assert [eng.request_info(r)["num_cached"] for r in rids[1:3]] == [8, 8]
  eng.tree.check_invariants()
