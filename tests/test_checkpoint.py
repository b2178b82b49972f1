"""Loading Hugging Face-format Llama checkpoints (config.json + safetensors) from disk."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import _ref_llama
from chunkattn_jax import checkpoint, layers, llama, rope
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


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(HF_CONFIG, f)
  with pytest.raises(FileNotFoundError, match="safetensors"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------- config fields
def _v5(**changes):
  """A transformers-5-style config (rope in `rope_parameters`, `dtype`) with `changes` applied;
  a value of `DROP` removes the field."""
  cfg = {k: v for k, v in HF_CONFIG.items() if k not in ("rope_theta", "torch_dtype")}
  cfg.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32",
             architectures=["LlamaForCausalLM"], transformers_version="5.24.0", use_cache=True,
             bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_dropout=0.0,
             initializer_range=0.02, pretraining_tp=1)
  cfg.update(changes)
  return {k: v for k, v in cfg.items() if v is not DROP}


DROP = object()
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)

# (id, config, error type, message fragment that names the field and its value)
REFUSED = [
    ("model_type", _v5(model_type="mistral"), checkpoint.UnsupportedConfigError,
     "model_type='mistral' is not supported"),
    ("architectures", _v5(architectures=["LlamaForSequenceClassification"]),
     checkpoint.UnsupportedConfigError, "architectures=['LlamaForSequenceClassification']"),
    ("rope_yarn_v5", _v5(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                          "original_max_position_embeddings": 64}),
     checkpoint.UnsupportedConfigError, "rope_parameters.rope_type='yarn' is not supported"),
    ("rope_longrope_v4", {**HF_CONFIG, "rope_scaling": {"type": "longrope", "factor": 2.0}},
     checkpoint.UnsupportedConfigError, "rope_scaling.rope_type='longrope' is not supported"),
    ("rope_extra_key", _v5(rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                            "factor": 2.0, "attention_factor": 0.5}),
     checkpoint.UnsupportedConfigError, "rope_parameters has attention_factor=0.5"),
    ("partial_rotary_v5", _v5(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                               "partial_rotary_factor": 0.5}),
     checkpoint.UnsupportedConfigError, "rope_parameters.partial_rotary_factor=0.5"),
    ("partial_rotary_top", _v5(partial_rotary_factor=0.25), checkpoint.UnsupportedConfigError,
     "partial_rotary_factor=0.25 is not supported"),
    ("dynamic_other_length", _v5(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                  "factor": 2.0,
                                                  "original_max_position_embeddings": 64}),
     checkpoint.UnsupportedConfigError, "original_max_position_embeddings=64 differs from "
     "max_position_embeddings=128"),
    ("llama3_missing_key", _v5(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                                "factor": 8.0}),
     checkpoint.CheckpointError, "rope_type='llama3' is missing ['low_freq_factor', "
     "'high_freq_factor']"),
    ("llama3_bad_factors", _v5(rope_parameters={**LLAMA3, "rope_theta": 5e5,
                                                "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     checkpoint.CheckpointError, "high_freq_factor > low_freq_factor"),
    ("rope_not_object", _v5(rope_parameters=DROP, rope_scaling="linear"),
     checkpoint.CheckpointError, "rope_scaling='linear' must be an object or null"),
    ("theta_disagrees", _v5(rope_theta=5e5), checkpoint.CheckpointError,
     "rope_theta=500000.0 and rope_parameters.rope_theta=10000.0 disagree"),
    ("scaling_formats_disagree", _v5(rope_scaling={"rope_type": "linear", "factor": 2.0}),
     checkpoint.CheckpointError, "rope_scaling={'rope_type': 'linear', 'factor': 2.0} and "
     "rope_parameters="),
    ("type_keys_disagree", _v5(rope_parameters={"rope_type": "linear", "type": "dynamic",
                                                "factor": 2.0}),
     checkpoint.CheckpointError, "rope_parameters.rope_type='linear' and "
     "rope_parameters.type='dynamic' disagree"),
    ("hidden_act", _v5(hidden_act="quick_gelu"), checkpoint.UnsupportedConfigError,
     "hidden_act='quick_gelu' is not supported"),
    ("dtype_float64", _v5(dtype="float64"), checkpoint.UnsupportedConfigError,
     "dtype='float64' is not supported"),
    ("torch_dtype_int8", {**HF_CONFIG, "torch_dtype": "int8"}, checkpoint.UnsupportedConfigError,
     "torch_dtype='int8' is not supported"),
    ("dtypes_disagree", _v5(torch_dtype="bfloat16"), checkpoint.CheckpointError,
     "dtype='float32' and torch_dtype='bfloat16' disagree"),
    ("quantized", _v5(quantization_config={"quant_method": "gptq", "bits": 4}),
     checkpoint.UnsupportedConfigError, "quantization_config={'quant_method': 'gptq'"),
    ("pruned_heads", _v5(pruned_heads={"0": [1]}), checkpoint.UnsupportedConfigError,
     "pruned_heads={'0': [1]} is not supported"),
    ("encoder_decoder", _v5(is_encoder_decoder=True), checkpoint.UnsupportedConfigError,
     "is_encoder_decoder=True is not supported"),
    ("unknown_field", _v5(sliding_window=64), checkpoint.UnsupportedConfigError,
     "unknown field sliding_window=64"),
    ("layers_zero", _v5(num_hidden_layers=0), checkpoint.CheckpointError,
     "num_hidden_layers=0 must be a positive integer"),
    ("layers_negative", _v5(num_hidden_layers=-1), checkpoint.CheckpointError,
     "num_hidden_layers=-1 must be a positive integer"),
    ("layers_string", _v5(num_hidden_layers="2"), checkpoint.CheckpointError,
     "num_hidden_layers='2' must be a positive integer"),
    ("layers_float", _v5(num_hidden_layers=2.0), checkpoint.CheckpointError,
     "num_hidden_layers=2.0 must be a positive integer"),
    ("heads_bool", _v5(num_attention_heads=True), checkpoint.CheckpointError,
     "num_attention_heads=True must be a positive integer"),
    ("eps_negative", _v5(rms_norm_eps=-1), checkpoint.CheckpointError,
     "rms_norm_eps=-1 must be a finite number > 0"),
    ("eps_string", _v5(rms_norm_eps="1e-5"), checkpoint.CheckpointError,
     "rms_norm_eps='1e-5' must be a finite number > 0"),
    ("theta_negative", _v5(rope_parameters={"rope_type": "default", "rope_theta": -5.0}),
     checkpoint.CheckpointError, "rope_theta=-5.0 must be a finite number > 0"),
    ("max_pos_zero", _v5(max_position_embeddings=0), checkpoint.CheckpointError,
     "max_position_embeddings=0 must be a positive integer"),
    ("head_dim_odd", _v5(head_dim=7), checkpoint.CheckpointError, "head_dim must be even"),
    ("kv_heads_not_dividing", _v5(num_key_value_heads=3), checkpoint.CheckpointError,
     "num_heads (4) must be a multiple of num_kv_heads (3)"),
    ("tie_string", _v5(tie_word_embeddings="true"), checkpoint.CheckpointError,
     "tie_word_embeddings='true' must be true or false"),
    ("bias_int", _v5(attention_bias=1), checkpoint.CheckpointError,
     "attention_bias=1 must be true or false"),
    ("mlp_bias_null", _v5(mlp_bias=None), checkpoint.CheckpointError,
     "mlp_bias=None must be true or false"),
    ("missing_vocab", _v5(vocab_size=DROP), checkpoint.CheckpointError,
     "missing required field 'vocab_size'"),
    ("missing_model_type", _v5(model_type=DROP), checkpoint.CheckpointError,
     "missing required field 'model_type'"),
    ("null_hidden", _v5(hidden_size=None), checkpoint.CheckpointError,
     "hidden_size=None is required and must be a positive integer"),
]


@pytest.mark.parametrize("hf,error,match", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_configs_name_field_and_value(hf, error, match):
  with pytest.raises(error, match=re.escape(match)):
    checkpoint.config_from_hf(hf)


def test_refusal_names_the_config_file_and_precedes_tensor_reads(tmp_path):
  _write(str(tmp_path), _meta_weights(), config=_v5(rope_parameters={
      "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), shards=1)
  os.remove(tmp_path / "model-00001-of-00001.safetensors")  # never reached
  with pytest.raises(checkpoint.UnsupportedConfigError,
                     match=re.escape(f"{tmp_path / 'config.json'}: rope_parameters.rope_type='yarn'")):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_unknown_field_can_be_vouched_for():
  cfg = checkpoint.config_from_hf(_v5(sliding_window=None, my_note="x"),
                                  ignore_config_fields=("sliding_window", "my_note"))
  assert cfg.num_layers == 2


ACCEPTED = [
    # (id, config, expected LlamaConfig fields)
    ("v4_defaults", HF_CONFIG, dict(rope_theta=10000.0, rope_scaling=None, dtype="float32")),
    ("v5_theta", _v5(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
     dict(rope_theta=5e5, rope_scaling=None)),
    ("v4_theta_in_both", {**HF_CONFIG, "rope_theta": 5e5,
                          "rope_scaling": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}},
     dict(rope_theta=5e5, rope_scaling=rope.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))),
    ("v5_llama3", _v5(rope_parameters={**LLAMA3, "rope_theta": 5e5}),
     dict(rope_theta=5e5, rope_scaling=rope.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))),
    ("llama3_top_level_original", _v5(original_max_position_embeddings=4096, rope_parameters={
        **LLAMA3, "rope_theta": 5e5, "original_max_position_embeddings": 4096}),
     dict(rope_scaling=rope.RopeScaling("llama3", 8.0, 1.0, 4.0, 4096))),
    ("llama3_original_defaults_to_max_pos", _v5(rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0}),
     dict(rope_scaling=rope.RopeScaling("llama3", 8.0, 1.0, 4.0, 128))),
    ("v4_legacy_type_key", {**HF_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}},
     dict(rope_scaling=rope.RopeScaling("linear", 2.0))),
    ("v4_dynamic", {**HF_CONFIG, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     dict(rope_scaling=rope.RopeScaling("dynamic", 2.0, original_max_position_embeddings=128))),
    ("v5_dtype_bf16", _v5(dtype="bfloat16"), dict(dtype="bfloat16", param_dtype="bfloat16")),
    ("v4_torch_dtype_fp16", {**HF_CONFIG, "torch_dtype": "float16"}, dict(dtype="float16")),
    ("both_dtype_keys_agree", _v5(dtype="bfloat16", torch_dtype="bfloat16"), dict(dtype="bfloat16")),
    ("biases_act_headdim", _v5(attention_bias=True, mlp_bias=True, hidden_act="gelu", head_dim=16),
     dict(attention_bias=True, mlp_bias=True, hidden_act="gelu", head_dim=16)),
    ("kv_heads_default", _v5(num_key_value_heads=None), dict(num_kv_heads=4)),
    ("harmless_fields", _v5(pretraining_tp=2, use_cache=False, temperature=0.6, pruned_heads={},
                            is_encoder_decoder=False, partial_rotary_factor=1.0,
                            quantization_config=None), dict(num_layers=2)),
]


@pytest.mark.parametrize("hf,expected", [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted_configs(hf, expected):
  cfg = checkpoint.config_from_hf(hf)
  for field, value in expected.items():
    assert getattr(cfg, field) == value, field


def test_config_roundtrip():
  cfg = llama.tiny(rope_theta=5e5, rope_scaling=rope.RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
                   attention_bias=True, mlp_bias=True, hidden_act="gelu_new",
                   tie_word_embeddings=True, dtype="bfloat16", param_dtype="bfloat16")
  assert checkpoint.config_from_hf(checkpoint.config_to_hf(cfg)) == cfg


# ----------------------------------------------------------------------------- tensors
def test_missing_tensors_are_all_named(tmp_path):
  w = _meta_weights()
  del w["model.layers.1.mlp.up_proj.weight"], w["lm_head.weight"]
  _write(str(tmp_path), w, shards=1)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"missing .*lm_head.weight, model.layers.1.mlp.up_proj.weight"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_shape_mismatch_names_tensor_file_and_shapes(tmp_path):
  w = _meta_weights()
  w["model.norm.weight"] = w["model.norm.weight"][:-1]
  _write(str(tmp_path), w, shards=1)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"model-00001-of-00001.safetensors: tensor 'model.norm.weight' has "
                           r"shape \(31,\), expected \(32,\)"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_head_counts_must_agree_with_the_tensors(tmp_path):
  """k_proj holds 2 KV heads; a config claiming 1 (MQA) is refused, not silently mis-sliced."""
  _write(str(tmp_path), _meta_weights(), config={**HF_CONFIG, "num_key_value_heads": 1}, shards=1)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(16, 32\), "
                           r"expected \(8, 32\)"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_more_layers_than_config_is_an_error(tmp_path):
  """A 2-layer checkpoint whose config says 1 layer used to load as a 1-layer model."""
  _write(str(tmp_path), _meta_weights(), config={**HF_CONFIG, "num_hidden_layers": 1})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"9 tensor\(s\) .* not used by the model: model.layers.1.input_layernorm"
                           r".*num_hidden_layers=1; the files have layers up to 1"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_extra_tensors_error_or_warning(tmp_path):
  w = _meta_weights()
  w["model.vision_tower.weight"] = np.zeros((2, 2), np.float32)
  _write(str(tmp_path), w)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"1 tensor\(s\) .* not used by the model: model.vision_tower.weight; "
                           r"pass allow_extra_tensors=True"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  with pytest.warns(UserWarning, match="model.vision_tower.weight"):
    model = checkpoint.load_hf_checkpoint(str(tmp_path), allow_extra_tensors=True)
  assert model.config.num_layers == 2


@pytest.mark.parametrize("dtype,name", [(np.int32, "I32"), (np.bool_, "BOOL"), (np.float64, "F64"),
                                        (np.int8, "I8")])
def test_non_float_tensors_refused_unless_cast(tmp_path, dtype, name):
  w = _meta_weights()
  w["model.norm.weight"] = (w["model.norm.weight"] > 1).astype(dtype)
  _write(str(tmp_path), w, shards=1)
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"tensor 'model.norm.weight' has dtype {name}; expected F32, F16 or BF16 "
                           r"\(pass cast_tensors=True"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  model = checkpoint.load_hf_checkpoint(str(tmp_path), cast_tensors=True)
  np.testing.assert_array_equal(np.asarray(model.norm.weight.get_value()),
                                w["model.norm.weight"].astype(np.float32))


def test_fp16_and_bf16_tensors_load_into_the_model_dtype(tmp_path):
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  w = _meta_weights()
  w["model.norm.weight"] = w["model.norm.weight"].astype(np.float16)
  w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
  _write(str(tmp_path), w, shards=1)
  model = checkpoint.load_hf_checkpoint(str(tmp_path))
  assert model.norm.weight.get_value().dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(model.norm.weight.get_value()),
                                w["model.norm.weight"].astype(np.float32))


def test_duplicate_tensor_across_shards(tmp_path):
  w = _meta_weights()
  _write(str(tmp_path), w, shards=1)
  save_file({"model.norm.weight": w["model.norm.weight"] * 2}, str(tmp_path / "extra.safetensors"))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"tensor 'model.norm.weight' is in two files: .*extra.safetensors and "
                           r".*model-00001-of-00001.safetensors"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_corrupt_config_json_names_the_file(tmp_path):
  _write(str(tmp_path), _meta_weights(), shards=1)
  (tmp_path / "config.json").write_text('{"vocab_size": 61,')
  with pytest.raises(checkpoint.CheckpointError,
                     match=re.escape(f"{tmp_path / 'config.json'}: not valid JSON")):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(checkpoint.CheckpointError, match="expected a JSON object, got list"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
  _write(str(tmp_path), _meta_weights(), shards=2)
  bad = tmp_path / "model-00002-of-00002.safetensors"
  data = bad.read_bytes()
  bad.write_bytes({"truncate_data": data[: len(data) - 100], "truncate_header": data[:20],
                   "garbage": b"not a safetensors file at all"}[damage])
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(bad))):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_index_selects_files(tmp_path):
  """With model.safetensors.index.json only the files it names are read (as transformers does):
  a stray consolidated file is ignored; a wrong or corrupt index is an error naming it."""
  w = _meta_weights()
  _write(str(tmp_path), w, shards=2)
  names = sorted(w)
  weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(names)}
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  save_file({"model.norm.weight": w["model.norm.weight"]}, str(tmp_path / "consolidated.safetensors"))
  checkpoint.load_hf_checkpoint(str(tmp_path))  # the stray file is not read
  wrong = dict(weight_map, **{"model.norm.weight": "model-00001-of-00002.safetensors"
                              if weight_map["model.norm.weight"].startswith("model-00002")
                              else "model-00002-of-00002.safetensors"})
  index.write_text(json.dumps({"weight_map": wrong}))
  with pytest.raises(checkpoint.CheckpointError, match=r"index.json: maps tensor 'model.norm.weight'"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  index.write_text(json.dumps({"weight_map": dict(weight_map, x="model-00009-of-00009.safetensors")}))
  with pytest.raises(checkpoint.CheckpointError, match=r"names 'model-00009-of-00009.safetensors', "
                                                       r"which does not exist"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  partial = {k: v for k, v in weight_map.items() if k != "lm_head.weight"}
  index.write_text(json.dumps({"weight_map": partial}))
  with pytest.raises(checkpoint.CheckpointError, match=r"does not list tensor\(s\) \['lm_head.weight'\]"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
  index.write_text("{")
  with pytest.raises(checkpoint.CheckpointError, match="index.json: not valid JSON"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_tied_checkpoint_with_lm_head(tmp_path):
  """Tied embeddings: an lm_head.weight equal to the embedding is accepted; a different one is an
  error (transformers would silently replace it by the embedding)."""
  w = _meta_weights()
  cfg = {**HF_CONFIG, "tie_word_embeddings": True}
  w["lm_head.weight"] = w["model.embed_tokens.weight"].copy()
  _write(str(tmp_path), w, config=cfg, shards=1)
  model = checkpoint.load_hf_checkpoint(str(tmp_path))
  assert not hasattr(model, "lm_head")
  w["lm_head.weight"] = w["lm_head.weight"] + 1
  _write(str(tmp_path), w, config=cfg, shards=1)
  with pytest.raises(checkpoint.CheckpointError, match="'lm_head.weight' differs from"):
    checkpoint.load_hf_checkpoint(str(tmp_path))


def test_saved_rope_buffers_are_checked(tmp_path):
  """Older transformers saved `rotary_emb.inv_freq`; they are accepted when they match the
  config's RoPE and refused when they do not (e.g. a wrong rope_theta in config.json)."""
  w = _meta_weights()
  inv = rope.inverse_frequencies(8, 10000.0)
  for i in range(2):
    w[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv
  _write(str(tmp_path), w, shards=1)
  checkpoint.load_hf_checkpoint(str(tmp_path))
  _write(str(tmp_path), w, config={**HF_CONFIG, "rope_theta": 500000.0}, shards=1)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"'model.layers.0.self_attn.rotary_emb.inv_freq' holds RoPE frequencies "
                           r"that do not match rope_theta=500000.0"):
    checkpoint.load_hf_checkpoint(str(tmp_path))
