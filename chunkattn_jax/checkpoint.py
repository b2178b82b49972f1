"""Load (and save) Hugging Face-format Llama checkpoints from a local directory; no network.

A directory holds `config.json` and one or more `*.safetensors` files with HF's tensor names
(`model.layers.{i}.self_attn.q_proj.weight`, ...), optionally with `model.safetensors.index.json`
naming the files (then only those are read, as transformers does). Tensors are read with
`safetensors` (numpy backend, lazily per tensor) and placed on device, optionally sharded.

Faithful or refused. `config_from_hf` reads both config formats: transformers 4 (`rope_theta`,
`rope_scaling`, `torch_dtype` or `dtype`) and transformers 5 (`rope_parameters`, `dtype`). Every
field that changes the model's outputs is implemented as transformers implements it (RoPE theta and
scaling `default` / `linear` / `dynamic` / `llama3`, biases on q, k, v, o and the MLP, the
activation, RMSNorm epsilon, tied embeddings, head_dim, dtype) or refused with
`UnsupportedConfigError` naming the field and its value; fields known not to change outputs
(token ids, `use_cache`, ...) are skipped, and any other field is refused too (pass its name in
`ignore_config_fields` to vouch for it). Fields are type- and range-checked; a required field that
is missing is named. The tests compare loaded models with transformers' own logits and greedy
tokens on fixtures it wrote (tests/test_checkpoint.py, scripts/make_hf_fixtures.py).

Strict tensors. Floating tensors must be float32, float16 or bfloat16 (others only with
`cast_tensors=True`); every tensor in the files must be used (`allow_extra_tensors=True` turns the
error into a warning), so a checkpoint with more layers than its config fails; missing tensors,
wrong shapes and a tensor present in two files are errors. Every error names the file and the
field or tensor. Errors raise before anything is placed on a device.

RoPE convention: Hugging Face's `LlamaAttention` rotates pairs `(x[i], x[i + d/2])` ("rotate_half").
Meta's original weights rotate interleaved pairs `(x[2i], x[2i+1])`; HF's conversion script permutes
the rows of `q_proj`/`k_proj` within each head so that the half-split rotation gives the same result.
`layers.apply_rope` uses the half-split convention, so HF tensors load unchanged. Weights in Meta's
interleaved layout must first go through `interleaved_to_half` (done by `load_hf_checkpoint(...,
rope_layout="interleaved")`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chunkattn_jax import kernel_limits
from chunkattn_jax import llama as llama_lib
from chunkattn_jax import rope as rope_lib

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be loaded as it is; the message names file and field/tensor."""


class UnsupportedConfigError(CheckpointError):
  """A config field whose value this library does not implement (it would change the outputs)."""


# Fields that do not change the model's outputs: token ids (generation stops, not the math),
# bookkeeping, training-only settings and legacy generation defaults.
IGNORED_FIELDS = frozenset({
    "transformers_version", "_name_or_path", "_commit_hash", "use_cache", "initializer_range",
    "attention_dropout",  # dropout is off at inference
    "pretraining_tp",  # transformers 4 split the projections into this many slices: same math
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "tokenizer_class", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "id2label", "label2id", "finetuning_task", "problem_type",
    "task_specific_params", "prefix", "_attn_implementation_autoset", "_attn_implementation",
    "chunk_size_feed_forward", "is_decoder", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})
# Fields accepted only at these values (anything else changes the architecture).
INERT_VALUES = {"is_encoder_decoder": (False,), "add_cross_attention": (False,),
                "tie_encoder_decoder": (False,), "pruned_heads": ({},),
                "cross_attention_hidden_size": (None,), "partial_rotary_factor": (1, 1.0),
                "quantization_config": (None,)}
REQUIRED_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                   "num_hidden_layers", "num_attention_heads")
_ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}


# ----------------------------------------------------------------------------- config
_REQUIRED = object()


class _Fields:
  """Typed reads of a config dict; errors name the source file and the field."""

  def __init__(self, hf: dict, source: str):
    if not isinstance(hf, dict):
      raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    self.hf, self.source = hf, source

  def error(self, field, msg, unsupported=False):
    cls = UnsupportedConfigError if unsupported else CheckpointError
    return cls(f"{self.source}: {field}={self.hf.get(field, '<missing>')!r} {msg}")

  def required(self, field):
    if field not in self.hf:
      raise CheckpointError(f"{self.source}: missing required field {field!r}")
    return self.hf[field]

  def int(self, field, default=_REQUIRED):
    """A positive integer; null or absent gives `default` (an error if there is none)."""
    value = self.hf.get(field)
    if value is None:
      if default is _REQUIRED:
        raise self.error(field, "is required and must be a positive integer")
      return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise self.error(field, "must be a positive integer")
    return value

  def number(self, field, default, where=None):
    value = self.hf.get(field, default) if where is None else where.get(field, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        or value <= 0):
      raise CheckpointError(f"{self.source}: {field}={value!r} must be a finite number > 0")
    return float(value)

  def bool(self, field, default=False):
    value = self.hf.get(field, default)
    if not isinstance(value, bool):
      raise self.error(field, "must be true or false")
    return value


def _rope_from_hf(f: _Fields, max_pos: int) -> tuple[float, rope_lib.RopeScaling | None]:
  """RoPE theta and scaling from either format (transformers 4: `rope_theta` + `rope_scaling`;
  5: `rope_parameters` holding `rope_theta` too), resolved as transformers resolves them."""
  hf, src = f.hf, f.source
  v4, v5 = hf.get("rope_scaling"), hf.get("rope_parameters")
  for name, value in (("rope_scaling", v4), ("rope_parameters", v5)):
    if value is not None and not isinstance(value, dict):
      raise CheckpointError(f"{src}: {name}={value!r} must be an object or null")
  if v4 and v5 and any(v4.get(k, v5.get(k)) != v5.get(k, v4.get(k)) for k in {**v4, **v5}):
    raise CheckpointError(f"{src}: rope_scaling={v4!r} and rope_parameters={v5!r} disagree")
  field = "rope_scaling" if v4 else "rope_parameters"
  params = dict(v4 or v5 or {})
  theta = f.number("rope_theta", 10000.0)
  if "rope_theta" in params:
    inner = f.number("rope_theta", None, where=params)
    if "rope_theta" in hf and inner != theta:
      raise CheckpointError(f"{src}: rope_theta={hf['rope_theta']!r} and "
                            f"{field}.rope_theta={params['rope_theta']!r} disagree")
    theta = inner
  params.pop("rope_theta", None)
  rope_type = params.pop("rope_type", None)
  legacy = params.pop("type", None)
  if rope_type is not None and legacy is not None and rope_type != legacy:
    raise CheckpointError(f"{src}: {field}.rope_type={rope_type!r} and {field}.type={legacy!r} "
                          "disagree")
  rope_type = rope_type or legacy or "default"
  if rope_type not in _ROPE_KEYS:
    raise UnsupportedConfigError(
        f"{src}: {field}.rope_type={rope_type!r} is not supported (supported: "
        f"{tuple(_ROPE_KEYS)}); loading it would compute different outputs than transformers")
  partial = params.pop("partial_rotary_factor", 1.0)
  if isinstance(partial, bool) or partial != 1.0:
    raise UnsupportedConfigError(f"{src}: {field}.partial_rotary_factor={partial!r} is not "
                                 "supported (RoPE on the whole head only)")
  if rope_type == "llama3" and "original_max_position_embeddings" in hf:
    # transformers gives a top-level original_max_position_embeddings priority for llama3.
    top = hf["original_max_position_embeddings"]
    if "original_max_position_embeddings" in params and params[
        "original_max_position_embeddings"] != top:
      raise CheckpointError(f"{src}: original_max_position_embeddings={top!r} and "
                            f"{field}.original_max_position_embeddings="
                            f"{params['original_max_position_embeddings']!r} disagree")
    params["original_max_position_embeddings"] = top
  elif rope_type == "llama3":
    params.setdefault("original_max_position_embeddings", max_pos)  # transformers' fallback
  if rope_type == "dynamic":
    orig = params.pop("original_max_position_embeddings", max_pos)
    if orig != max_pos:
      raise UnsupportedConfigError(
          f"{src}: {field}.original_max_position_embeddings={orig!r} differs from "
          f"max_position_embeddings={max_pos}; transformers' dynamic RoPE uses the latter")
  allowed = _ROPE_KEYS[rope_type]
  extra = sorted(set(params) - set(allowed))
  if extra:
    raise UnsupportedConfigError(
        f"{src}: {field} has {', '.join(f'{k}={params[k]!r}' for k in extra)}, which "
        f"rope_type={rope_type!r} does not use here (supported keys: {allowed})")
  missing = [k for k in allowed if k not in params]
  if missing:
    raise CheckpointError(f"{src}: {field} with rope_type={rope_type!r} is missing {missing}")
  if rope_type == "default":
    return theta, None
  kw = dict(params)
  if rope_type == "dynamic":
    kw["original_max_position_embeddings"] = max_pos
  try:
    return theta, rope_lib.RopeScaling(rope_type, **kw)
  except ValueError as e:
    raise CheckpointError(f"{src}: {field}={v4 or v5!r}: {e}") from None


def _dtype_from_hf(f: _Fields) -> str:
  names = [n for n in ("dtype", "torch_dtype") if f.hf.get(n) is not None]
  values = {f.hf[n] for n in names}
  if len(values) > 1:
    raise CheckpointError(f"{f.source}: dtype={f.hf['dtype']!r} and "
                          f"torch_dtype={f.hf['torch_dtype']!r} disagree")
  if not names:
    return "float32"  # transformers' default when the config names none
  value = f.hf[names[0]]
  if value not in llama_lib.DTYPES:
    raise UnsupportedConfigError(f"{f.source}: {names[0]}={value!r} is not supported "
                                 f"(supported: {llama_lib.DTYPES})")
  return value


def config_from_hf(hf: dict, *, source: str = CONFIG_NAME, ignore_config_fields=(),
                   **overrides) -> llama_lib.LlamaConfig:
  """Maps an HF `config.json` dict (transformers 4 or 5 format) to `LlamaConfig`.

  Args:
    hf: the parsed config.
    source: how errors name the config (its path).
    ignore_config_fields: field names to skip although they are not known to be harmless (you
      vouch that they do not change the outputs).
    **overrides: `LlamaConfig` fields that win over the config (e.g. dtype).

  Raises:
    CheckpointError: a missing required field, a wrongly typed or out-of-range value, or two
      fields that disagree.
    UnsupportedConfigError: a field value the model does not implement (named, with its value).
  """
  f = _Fields(hf, source)
  for name in REQUIRED_FIELDS:
    f.required(name)
  if hf["model_type"] != "llama":
    raise f.error("model_type", "is not supported (only 'llama')", unsupported=True)
  archs = hf.get("architectures")
  if archs is not None and archs != ["LlamaForCausalLM"]:
    raise f.error("architectures", "is not supported (only ['LlamaForCausalLM'])",
                  unsupported=True)
  understood = set(REQUIRED_FIELDS) | {
      "architectures", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
      "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
      "mlp_bias", "tie_word_embeddings", "dtype", "torch_dtype", "original_max_position_embeddings"}
  for name, value in hf.items():
    if name in understood or name in IGNORED_FIELDS or name in ignore_config_fields:
      continue
    if name in INERT_VALUES:
      if not any(value == v and type(value) is type(v) for v in INERT_VALUES[name]):
        raise f.error(name, f"is not supported (only {INERT_VALUES[name][0]!r})", unsupported=True)
      continue
    raise UnsupportedConfigError(
        f"{source}: unknown field {name}={value!r}; it may change the model's outputs, so the "
        f"checkpoint is refused (pass ignore_config_fields=({name!r},) if it does not)")
  heads = f.int("num_attention_heads")
  max_pos = f.int("max_position_embeddings", 2048)
  head_dim = f.int("head_dim", None)
  act = hf.get("hidden_act", "silu")
  if act not in llama_lib.ACTIVATIONS:
    raise f.error("hidden_act", f"is not supported (supported: {tuple(llama_lib.ACTIVATIONS)})",
                  unsupported=True)
  theta, scaling = _rope_from_hf(f, max_pos)
  dtype = _dtype_from_hf(f)
  kw = dict(
      vocab_size=f.int("vocab_size"), hidden_size=f.int("hidden_size"),
      intermediate_size=f.int("intermediate_size"), num_layers=f.int("num_hidden_layers"),
      num_heads=heads, num_kv_heads=f.int("num_key_value_heads", heads), head_dim=head_dim,
      rope_theta=theta, rope_scaling=scaling, rms_norm_eps=f.number("rms_norm_eps", 1e-6),
      max_position_embeddings=max_pos, tie_word_embeddings=f.bool("tie_word_embeddings"),
      attention_bias=f.bool("attention_bias"), mlp_bias=f.bool("mlp_bias"), hidden_act=act,
      dtype=dtype, param_dtype=dtype)
  kw.update(overrides)
  try:
    return llama_lib.LlamaConfig(**kw)
  except ValueError as e:  # cross-field checks (heads divide, even head dim, ...)
    raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: llama_lib.LlamaConfig) -> dict:
  """`LlamaConfig` -> an HF `config.json` dict in the transformers 5 format."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope = {"rope_type": s.rope_type, "rope_theta": cfg.rope_theta, "factor": s.factor}
    if s.rope_type == "llama3":
      rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                  original_max_position_embeddings=s.original_max_position_embeddings)
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.d_head, rope_parameters=rope,
      rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
      mlp_bias=cfg.mlp_bias, hidden_act=cfg.hidden_act, dtype=jnp.dtype(cfg.param_dtype).name)


def read_json(path: str) -> dict:
  """A JSON file as a dict; errors name the file."""
  try:
    with open(path, encoding="utf-8") as fh:
      return json.load(fh)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path}: not UTF-8 text ({e})") from None


def read_config(path: str, **kw) -> llama_lib.LlamaConfig:
  """`config_from_hf` of `path/config.json` (FileNotFoundError if absent)."""
  cfg_path = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}")
  return config_from_hf(read_json(cfg_path), source=cfg_path, **kw)


# ----------------------------------------------------------------------------- tensors
def interleaved_to_half(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Permutes q/k projection rows from Meta's interleaved RoPE layout to the half-split layout.

  Args:
    w: `[num_heads * d, D]` (HF `[out, in]` orientation), rows of head `j` at `j*d .. (j+1)*d`.
    num_heads: heads in `w` (query heads for q, KV heads for k).

  Returns:
    `[num_heads * d, D]` where, within each head, rows `(2i, 2i+1)` moved to `(i, i + d/2)`.
  """
  out, inp = w.shape
  d = out // num_heads
  return w.reshape(num_heads, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _param_table(cfg: llama_lib.LlamaConfig) -> list[tuple[str, tuple, bool]]:
  """(HF name, attribute path in `Llama`, transpose?) for every parameter."""
  rows = [("model.embed_tokens.weight", ("embed_tokens", "embedding"), False),
          ("model.norm.weight", ("norm", "weight"), False)]
  if not cfg.tie_word_embeddings:
    rows.append(("lm_head.weight", ("lm_head", "kernel"), True))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    rows += [(p + "input_layernorm.weight", ("layers", i, "input_layernorm", "weight"), False),
             (p + "post_attention_layernorm.weight",
              ("layers", i, "post_attention_layernorm", "weight"), False)]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      rows.append((p + f"self_attn.{name}.weight", ("layers", i, "self_attn", name, "kernel"), True))
      if cfg.attention_bias:
        rows.append((p + f"self_attn.{name}.bias", ("layers", i, "self_attn", name, "bias"), False))
    for name in ("gate_proj", "up_proj", "down_proj"):
      rows.append((p + f"mlp.{name}.weight", ("layers", i, "mlp", name, "kernel"), True))
      if cfg.mlp_bias:
        rows.append((p + f"mlp.{name}.bias", ("layers", i, "mlp", name, "bias"), False))
  return rows


def _variable(model, path):
  obj = model
  for key in path:
    obj = obj[key] if isinstance(key, int) else getattr(obj, key)
  return obj


class _TensorFiles:
  """Every tensor of a checkpoint directory: {name: file}, opened lazily; errors name the file."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._safe_open = safe_open
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
      files, weight_map = self._from_index(path, index)
    else:
      files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
      weight_map = None
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    self.where: dict[str, str] = {}
    self.handles = {}
    for fname in files:
      fh = self._open(fname)
      for key in fh.keys():
        if key in self.where:
          raise CheckpointError(f"tensor {key!r} is in two files: {self.where[key]} and {fname}")
        self.where[key] = fname
    if weight_map is not None:
      for key, fname in weight_map.items():
        if self.where.get(key) != fname:
          raise CheckpointError(f"{index}: maps tensor {key!r} to {fname}, but "
                                + (f"it is in {self.where[key]}" if key in self.where
                                   else "no file listed there holds it"))
      unlisted = sorted(set(self.where) - set(weight_map))
      if unlisted:
        raise CheckpointError(f"{index}: does not list tensor(s) {unlisted[:8]} found in "
                              f"{self.where[unlisted[0]]}")

  @staticmethod
  def _from_index(path, index):
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise CheckpointError(f"{index}: expected an object with a 'weight_map' of tensor -> file")
    weight_map = {k: os.path.join(path, v) for k, v in weight_map.items()}
    files = sorted(set(weight_map.values()))
    for fname in files:
      if not os.path.exists(fname):
        raise CheckpointError(f"{index}: names {os.path.basename(fname)!r}, which does not exist")
    return files, weight_map

  def _open(self, fname):
    try:
      fh = self._safe_open(fname, framework="numpy")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CheckpointError(f"{fname}: not a readable safetensors file ({e})") from None
    self.handles[fname] = fh
    return fh

  def dtype(self, name: str) -> str:
    return self.handles[self.where[name]].get_slice(name).get_dtype()

  def shape(self, name: str) -> tuple:
    return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    fname = self.where[name]
    try:
      return self.handles[fname].get_tensor(name)
    except Exception as e:  # a truncated file fails here, when the data is read
      raise CheckpointError(f"{fname}: cannot read tensor {name!r} ({e})") from None

  def close(self):
    for h in self.handles.values():
      if hasattr(h, "__exit__"):
        h.__exit__(None, None, None)


def _natural_key(name: str) -> list:
  """Sort key putting layer 2 before layer 10 (errors name the first bad tensor in that order)."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _summary(names, limit=8) -> str:
  names = sorted(names, key=_natural_key)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


_INV_FREQ = re.compile(r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq")


def _check_inv_freq_buffers(files: _TensorFiles, cfg, names) -> None:
  """Old transformers saved RoPE frequencies as `...rotary_emb.inv_freq`; they must match ours
  (or, for linear/dynamic scaling, which older versions applied to the positions, the unscaled ones)."""
  ours = rope_lib.inverse_frequencies(cfg.d_head, float(cfg.rope_theta), cfg.rope_scaling)
  plain = rope_lib.inverse_frequencies(cfg.d_head, float(cfg.rope_theta))
  for name in sorted(names, key=_natural_key):  # a set: check in a reproducible order
    w = np.asarray(files.get(name), np.float32)
    if not any(w.shape == f.shape and np.allclose(w, f, rtol=1e-5, atol=0) for f in (ours, plain)):
      raise CheckpointError(f"{files.where[name]}: tensor {name!r} holds RoPE frequencies that do "
                            f"not match rope_theta={cfg.rope_theta} and the config's scaling")


def load_hf_checkpoint(path: str, *, impl: str = "xla", mesh=None, dtype: str | None = None,
                       rope_layout: str = "half", allow_extra_tensors: bool = False,
                       cast_tensors: bool = False, ignore_config_fields=(),
                       **config_overrides) -> llama_lib.Llama:
  """Builds a `Llama` from a local HF-format directory (`config.json` + `*.safetensors`).

  Args:
    path: the directory.
    impl: decode attention implementation; its kernel limits (head dim, dtype) are checked first.
    mesh: optional mesh (axis `layers.MODEL_AXIS`); parameters are placed sharded on it.
    dtype: parameter and compute dtype (default: the checkpoint's `dtype` / `torch_dtype`,
      float32 if absent). Tensors stored in another float dtype are converted.
    rope_layout: "half" for HF checkpoints (default); "interleaved" for q/k in Meta's layout.
    allow_extra_tensors: warn about tensors the model does not use instead of raising.
    cast_tensors: convert tensors stored in dtypes other than float32/float16/bfloat16 (float64,
      integers, ...) instead of raising.
    ignore_config_fields: unknown config fields to skip (see `config_from_hf`).
    **config_overrides: other `LlamaConfig` fields to override.

  Returns:
    The model with the checkpoint's weights (no random init is materialised).

  Raises:
    FileNotFoundError: missing config.json or safetensors files.
    UnsupportedConfigError: a config value the model does not implement (named, with its value).
    CheckpointError: anything else wrong with the directory (named file and field or tensor):
      a missing, unused, duplicated or misshapen tensor, a non-float tensor, corrupt JSON or
      safetensors, a missing or invalid config field.
    kernel_limits.KernelLimitError: `impl` cannot run the model (the message names the impl that can).
  """
  if rope_layout not in ("half", "interleaved"):
    raise ValueError(f"rope_layout must be 'half' or 'interleaved', got {rope_layout!r}")
  if dtype is not None:
    config_overrides.update(dtype=dtype, param_dtype=dtype)
  cfg = read_config(path, ignore_config_fields=ignore_config_fields, **config_overrides)
  kernel_limits.check(impl, head_dim=cfg.d_head, dtype=cfg.dtype)
  files = _TensorFiles(path)
  try:
    table = _param_table(cfg)
    wanted = {name for name, _, _ in table}
    missing = wanted - set(files.where)
    if missing:
      raise CheckpointError(f"tensor(s) missing from the checkpoint in {path!r}: "
                            f"{_summary(missing)}")
    extra = set(files.where) - wanted
    tied_head = "lm_head.weight" if cfg.tie_word_embeddings and "lm_head.weight" in extra else None
    inv_freqs = {n for n in extra if _INV_FREQ.fullmatch(n)
                 and int(_INV_FREQ.fullmatch(n).group(1)) < cfg.num_layers}
    extra -= inv_freqs | {tied_head}
    if extra:
      layers_in_files = {int(m.group(1)) for n in files.where
                         if (m := re.match(r"model\.layers\.(\d+)\.", n))}
      hint = (f" (config.json has num_hidden_layers={cfg.num_layers}; the files have layers up "
              f"to {max(layers_in_files)})" if layers_in_files and
              max(layers_in_files) >= cfg.num_layers else "")
      msg = (f"{len(extra)} tensor(s) in {path!r} not used by the model: {_summary(extra)}{hint}")
      if not allow_extra_tensors:
        raise CheckpointError(msg + "; pass allow_extra_tensors=True to load anyway")
      warnings.warn(msg, stacklevel=2)
    for name in wanted | ({tied_head} - {None}) | inv_freqs:
      stored = files.dtype(name)
      if stored not in FLOAT_DTYPES and not cast_tensors:
        raise CheckpointError(f"{files.where[name]}: tensor {name!r} has dtype {stored}; expected "
                              f"F32, F16 or BF16 (pass cast_tensors=True to convert it)")
    model = nnx.eval_shape(lambda: llama_lib.Llama(cfg, impl=impl, mesh=mesh, rngs=nnx.Rngs(0)))
    for name, attr, transpose in table:  # shapes first: no device work for a bad checkpoint
      var = _variable(model, attr)
      shape = files.shape(name)
      expected = tuple(var.get_value().shape)
      if tuple(reversed(shape) if transpose else shape) != expected:
        want = tuple(reversed(expected)) if transpose else expected
        raise CheckpointError(f"{files.where[name]}: tensor {name!r} has shape {shape}, expected "
                              f"{want} for this config")
    if tied_head is not None:
      if not np.array_equal(files.get(tied_head), files.get("model.embed_tokens.weight")):
        raise CheckpointError(f"{files.where[tied_head]}: tie_word_embeddings is true but "
                              f"'lm_head.weight' differs from 'model.embed_tokens.weight'")
    _check_inv_freq_buffers(files, cfg, inv_freqs)
    for name, attr, transpose in table:
      w = files.get(name)
      if rope_layout == "interleaved" and attr[-2] in ("q_proj", "k_proj"):
        heads = cfg.num_heads if attr[-2] == "q_proj" else cfg.num_kv_heads
        w = interleaved_to_half(w, heads) if w.ndim == 2 else interleaved_to_half(
            w[:, None], heads)[:, 0]
      if transpose:
        w = w.T
      var = _variable(model, attr)
      arr = jnp.asarray(np.ascontiguousarray(w), dtype=var.get_value().dtype)
      if mesh is not None:
        from chunkattn_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
        arr = jax.device_put(arr, jax.sharding.NamedSharding(mesh, sharding_lib.spec_for_path(attr)))
      var.set_value(arr)
  finally:
    files.close()
  return model


def hf_state_dict(model: llama_lib.Llama) -> dict[str, np.ndarray]:
  """The model's parameters as `{HF name: numpy array}` (HF `[out, in]` orientation)."""
  out = {}
  for name, attr, transpose in _param_table(model.config):
    w = np.asarray(_variable(model, attr).get_value())
    out[name] = np.ascontiguousarray(w.T if transpose else w)
  return out


def save_hf_checkpoint(model: llama_lib.Llama, path: str) -> None:
  """Writes `config.json` (transformers 5 format) and `model.safetensors` (for tests and examples)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(config_to_hf(model.config), f, indent=2)
  save_file(hf_state_dict(model), os.path.join(path, "model.safetensors"))
