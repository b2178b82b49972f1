"""The Llama model on the chunk cache vs an independent float64 NumPy forward."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _ref_llama
from chunkattn_jax import checkpoint, layers, llama, rope
from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.prefix_tree import PrefixTree


def _prefill_logits(model, tokens, tree, pool, min_new=0):
  """Inserts `tokens`, prefills the unmatched suffix; returns (logits [n_new, V], pool, n_cached)."""
  res = tree.insert(tokens, min_new_tokens=min_new)
  n0 = res.num_cached
  path = np.asarray(tree.chunk_path(res.seq_id), np.int32)[None]
  inp = layers.PrefillInputs(positions=jnp.arange(n0, len(tokens))[None],
                             slots=jnp.asarray(res.slots)[None], chunk_paths=jnp.asarray(path))
  fn = nnx.jit(lambda m, t, p, i: m(t, p, i))
  logits, pool = fn(model, jnp.asarray(tokens[n0:])[None], pool, inp)
  return np.asarray(logits[0]), pool, n0


@pytest.mark.parametrize("cfg", [
    llama.tiny(),
    llama.tiny(num_kv_heads=1, rope_theta=500000.0, tie_word_embeddings=True),  # MQA, Llama-3 theta
    llama.tiny(num_heads=4, num_kv_heads=4, head_dim=8, attention_bias=True, mlp_bias=True),
    llama.tiny(hidden_act="gelu"),
], ids=["gqa", "mqa_tied_theta5e5", "mha_biases", "gelu"])
def test_prefill_matches_independent_forward(cfg):
  model = llama.Llama(cfg, rngs=nnx.Rngs(3))
  key = jax.random.key(1)
  for layer in model.layers:  # make every bias (q, k, v, o; gate, up, down) non-zero
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                 layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                 layer.mlp.down_proj):
      if proj.bias is not None:
        key, sub = jax.random.split(key)
        proj.bias.set_value(0.3 * jax.random.normal(sub, proj.bias.get_value().shape))
  if cfg.attention_bias:
    assert model.layers[0].self_attn.o_proj.bias is not None  # HF: o has a bias too
  if cfg.mlp_bias:
    assert model.layers[0].mlp.down_proj.bias is not None
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, 19).tolist()
  tree = PrefixTree(ChunkPool(16, seed=0), 4)
  logits, _, _ = _prefill_logits(model, toks, tree, model.make_pool(16, 4))
  ref = _ref_llama.forward(checkpoint.hf_state_dict(model), checkpoint.config_to_hf(cfg), toks)
  np.testing.assert_allclose(logits, ref, atol=5e-4 * np.abs(ref).max())


def test_prefix_reuse_prefill_equals_full_prefill():
  """Model level: the second prompt's suffix logits with 2 cached chunks equal a full prefill."""
  model = llama.Llama(llama.tiny(), rngs=nnx.Rngs(4))
  rng = np.random.default_rng(1)
  sys_p = rng.integers(0, 97, 10).tolist()
  a, b = sys_p + [1, 2, 3], sys_p + [4, 5, 6, 7, 8]
  tree = PrefixTree(ChunkPool(32, seed=5), 4)
  pool = model.make_pool(32, 4)
  _, pool, _ = _prefill_logits(model, a, tree, pool)
  lb, pool, n0 = _prefill_logits(model, b, tree, pool, min_new=1)
  assert n0 == 8
  full, _, _ = _prefill_logits(model, b, PrefixTree(ChunkPool(32), 4), model.make_pool(32, 4))
  np.testing.assert_allclose(lb, full[8:], atol=1e-4)
  tree.check_invariants()


def test_dense_path_matches_chunk_path():
  model = llama.Llama(llama.tiny(), rngs=nnx.Rngs(5))
  toks = list(range(3, 20))
  tree = PrefixTree(ChunkPool(16), 4)
  chunk_logits, _, _ = _prefill_logits(model, toks, tree, model.make_pool(16, 4))
  cache = model.make_dense_cache(1, 32)
  dense_logits, _ = model(jnp.asarray(toks)[None], cache,
                          layers.DenseInputs(positions=jnp.arange(len(toks))[None]))
  np.testing.assert_allclose(chunk_logits, np.asarray(dense_logits[0]), atol=1e-4)


def test_bf16_model_close_to_fp32():
  cfg = llama.tiny()
  m32 = llama.Llama(cfg, rngs=nnx.Rngs(6))
  m16 = llama.Llama(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
  toks = list(range(1, 12))
  l32, _, _ = _prefill_logits(m32, toks, PrefixTree(16, 4), m32.make_pool(16, 4))
  l16, _, _ = _prefill_logits(m16, toks, PrefixTree(16, 4), m16.make_pool(16, 4))
  assert m16.make_pool(1, 4).dtype == jnp.bfloat16
  np.testing.assert_allclose(l16, l32, atol=0.1 * np.abs(l32).max())


@pytest.mark.parametrize("name,params,kv_heads,theta", [
    ("open_llama_7b", 6_738_415_616, 32, 1e4),
    ("llama2_7b", 6_738_415_616, 32, 1e4),
    ("llama3_8b", 8_030_261_248, 8, 5e5),
])
def test_config_shapes(name, params, kv_heads, theta):
  cfg = llama.CONFIGS[name]()
  assert cfg.num_kv_heads == kv_heads and cfg.rope_theta == theta and cfg.d_head == 128
  model = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == params


def test_activations_match_transformers():
  """Each supported `hidden_act` against transformers' `ACT2FN[name]` on a grid (fixture written
  by scripts/make_hf_fixtures.py)."""
  grid = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "activations.npz"))
  x = jnp.asarray(grid["x"])
  assert set(llama.ACTIVATIONS) == set(grid.files) - {"x"}
  for name, fn in llama.ACTIVATIONS.items():
    np.testing.assert_allclose(np.asarray(fn(x)), grid[name], rtol=1e-6, atol=1e-6, err_msg=name)
  # The grid tells the GELU variants apart (exact erf vs tanh approximation).
  assert np.abs(grid["gelu"] - grid["gelu_pytorch_tanh"]).max() > 1e-4


@pytest.mark.parametrize("field,value,match", [
    ("num_layers", 0, "num_layers must be a positive integer, got 0"),
    ("num_layers", -1, "num_layers must be a positive integer, got -1"),
    ("vocab_size", 97.0, "vocab_size must be a positive integer, got 97.0"),
    ("num_heads", True, "num_heads must be a positive integer, got True"),
    ("head_dim", 15, "head_dim must be even"),
    ("head_dim", 0, "head_dim must be a positive integer, got 0"),
    ("rms_norm_eps", -1.0, "rms_norm_eps must be a finite number > 0, got -1.0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number > 0, got nan"),
    ("rope_theta", 0.0, "rope_theta must be a finite number > 0"),
    ("hidden_act", "tanh", "hidden_act='tanh' is not supported"),
    ("attention_bias", 1, "attention_bias must be a bool, got 1"),
    ("dtype", "float64", "dtype must be one of"),
    ("param_dtype", "int8", "param_dtype must be one of"),
    ("rope_scaling", {"rope_type": "linear"}, "rope_scaling must be a rope.RopeScaling"),
    ("rope_scaling", rope.RopeScaling("dynamic", 2.0, original_max_position_embeddings=64),
     "dynamic RoPE scaling is relative to max_position_embeddings=512"),
])
def test_config_validation(field, value, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    llama.tiny(**{field: value})


def test_config_validation_heads():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    llama.tiny(num_heads=4, num_kv_heads=3)
