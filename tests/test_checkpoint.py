"""Loading Hugging Face-format Llama checkpoints (config.json + safetensors) from disk."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import _ref_llama
from chunkattn_jax import checkpoint, layers, llama
from chunkattn_jax.prefix_tree import PrefixTree

HF_CONFIG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                 rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False,
                 torch_dtype="float32", model_type="llama")


def _meta_weights(seed=0):
  """Random weights in HF names but with q/k in Meta's interleaved RoPE layout."""
  rng = np.random.default_rng(seed)
  c = HF_CONFIG
  D, h, hkv, f = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
  d = D // h
  w = {"model.embed_tokens.weight": rng.normal(size=(c["vocab_size"], D)),
       "model.norm.weight": 1 + 0.1 * rng.normal(size=D),
       "lm_head.weight": rng.normal(size=(c["vocab_size"], D)) / np.sqrt(D)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes = {"self_attn.q_proj": (h * d, D), "self_attn.k_proj": (hkv * d, D),
              "self_attn.v_proj": (hkv * d, D), "self_attn.o_proj": (D, h * d),
              "mlp.gate_proj": (f, D), "mlp.up_proj": (f, D), "mlp.down_proj": (D, f)}
    for name, shape in shapes.items():
      w[p + name + ".weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
    w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
    w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
  return {k: v.astype(np.float32) for k, v in w.items()}


def _write(path, weights, config=HF_CONFIG, shards=2):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  names = sorted(weights)
  for s in range(shards):
    save_file({k: weights[k] for k in names[s::shards]},
              os.path.join(path, f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))


def _hf_permuted(meta):
  """What HF's conversion script does: permute q/k rows for the rotate_half convention."""
  hf = dict(meta)
  h, hkv = HF_CONFIG["num_attention_heads"], HF_CONFIG["num_key_value_heads"]
  for k in meta:
    if k.endswith("q_proj.weight"):
      hf[k] = checkpoint.interleaved_to_half(meta[k], h)
    elif k.endswith("k_proj.weight"):
      hf[k] = checkpoint.interleaved_to_half(meta[k], hkv)
  return hf


def _logits(model, toks):
  tree = PrefixTree(32, 4)
  res = tree.insert(toks)
  pool = model.make_pool(32, 4)
  path = np.asarray(tree.chunk_path(res.seq_id), np.int32)[None]
  inp = layers.PrefillInputs(positions=jnp.arange(len(toks))[None], slots=res.slots[None],
                             chunk_paths=path)
  return np.asarray(model(jnp.asarray(toks)[None], pool, inp)[0][0])


def test_hf_checkpoint_matches_meta_interleaved_forward(tmp_path):
  """Weights made in Meta's layout, permuted as HF does, saved in two shards, loaded: logits equal
  an independent forward that applies interleaved RoPE to the unpermuted weights."""
  meta = _meta_weights()
  _write(str(tmp_path), _hf_permuted(meta))
  model = checkpoint.load_hf_checkpoint(str(tmp_path))
  assert model.config.num_kv_heads == 2 and model.config.vocab_size == 61
  toks = list(np.random.default_rng(1).integers(0, 61, 13))
  ref = _ref_llama.forward(meta, HF_CONFIG, toks, layout="interleaved")
  np.testing.assert_allclose(_logits(model, toks), ref, atol=2e-4 * np.abs(ref).max())
  # Sanity: without the permutation the logits differ (the test would catch a wrong convention).
  unpermuted = _ref_llama.forward(meta, HF_CONFIG, toks, layout="half")
  assert np.abs(unpermuted - ref).max() > 1e-2 * np.abs(ref).max()


def test_interleaved_layout_option(tmp_path):
  meta = _meta_weights(seed=2)
  _write(str(tmp_path), meta, shards=1)
  model = checkpoint.load_hf_checkpoint(str(tmp_path), rope_layout="interleaved")
  toks = [3, 1, 4, 1, 5, 9, 2, 6]
  ref = _ref_llama.forward(meta, HF_CONFIG, toks, layout="interleaved")
  np.testing.assert_allclose(_logits(model, toks), ref, atol=2e-4 * np.abs(ref).max())


def test_save_load_roundtrip_bf16(tmp_path):
  cfg = llama.tiny(dtype="bfloat16", param_dtype="bfloat16", num_layers=1)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  checkpoint.save_hf_checkpoint(model, str(tmp_path))
  loaded = checkpoint.load_hf_checkpoint(str(tmp_path))
  assert loaded.config == cfg
  a, b = checkpoint.hf_state_dict(model), checkpoint.hf_state_dict(loaded)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  f32 = checkpoint.load_hf_checkpoint(str(tmp_path), dtype="float32")
  assert f32.config.dtype == "float32"


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  w = _meta_weights()
  del w["model.layers.1.mlp.up_proj.weight"]
  _write(str(tmp_path), w, shards=1)
  with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  w = _meta_weights()
  w["model.norm.weight"] = w["model.norm.weight"][:-1]
  _write(str(tmp_path), w, shards=1)
  with pytest.raises(ValueError, match="model.norm.weight.*shape"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match="rope_scaling"):
    checkpoint.config_from_hf({**HF_CONFIG, "rope_scaling": {"rope_type": "llama3"}})
