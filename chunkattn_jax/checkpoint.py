"""Load (and save) Hugging Face-format Llama checkpoints from a local directory; no network.

A directory holds `config.json` and one or more `*.safetensors` files with HF's tensor names
(`model.layers.{i}.self_attn.q_proj.weight`, ...). Tensors are read with `safetensors` (numpy
backend, lazily per tensor) and placed on device, optionally sharded.

RoPE convention: Hugging Face's `LlamaAttention` rotates pairs `(x[i], x[i + d/2])` ("rotate_half").
Meta's original weights rotate interleaved pairs `(x[2i], x[2i+1])`; HF's conversion script permutes
the rows of `q_proj`/`k_proj` within each head so that the half-split rotation gives the same result.
`layers.apply_rope` uses the half-split convention, so HF tensors load unchanged. Weights in Meta's
interleaved layout must first go through `interleaved_to_half` (done by `load_hf_checkpoint(...,
rope_layout="interleaved")`).
"""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chunkattn_jax import llama as llama_lib


def config_from_hf(hf: dict, **overrides) -> llama_lib.LlamaConfig:
  """Maps an HF `config.json` dict to `LlamaConfig`; `overrides` win (e.g. dtype)."""
  scaling = hf.get("rope_scaling")
  if scaling:
    raise ValueError(f"rope_scaling={scaling!r} is not supported (plain RoPE only)")
  heads = hf["num_attention_heads"]
  dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(hf.get("torch_dtype"), "float32")
  kw = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim"), rope_theta=float(hf.get("rope_theta", 10000.0)),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", False)), dtype=dtype, param_dtype=dtype)
  kw.update(overrides)
  return llama_lib.LlamaConfig(**kw)


def config_to_hf(cfg: llama_lib.LlamaConfig) -> dict:
  """`LlamaConfig` -> an HF-style `config.json` dict."""
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.d_head, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
      hidden_act="silu", torch_dtype=cfg.param_dtype)


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
      if cfg.attention_bias and name != "o_proj":
        rows.append((p + f"self_attn.{name}.bias", ("layers", i, "self_attn", name, "bias"), False))
    for name in ("gate_proj", "up_proj", "down_proj"):
      rows.append((p + f"mlp.{name}.weight", ("layers", i, "mlp", name, "kernel"), True))
  return rows


def _variable(model, path):
  obj = model
  for key in path:
    obj = obj[key] if isinstance(key, int) else getattr(obj, key)
  return obj


def _open_tensors(path: str) -> dict:
  """{name: (file, key)} over every `*.safetensors` file in `path`."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path!r}")
  where = {}
  for f in files:
    with safe_open(f, framework="numpy") as fh:
      for key in fh.keys():
        where[key] = f
  return where


def load_hf_checkpoint(path: str, *, impl: str = "xla", mesh=None, dtype: str | None = None,
                       rope_layout: str = "half", **config_overrides) -> llama_lib.Llama:
  """Builds a `Llama` from a local HF-format directory (`config.json` + `*.safetensors`).

  Args:
    path: the directory.
    impl: decode attention implementation.
    mesh: optional mesh (axis `layers.MODEL_AXIS`); parameters are placed sharded on it.
    dtype: parameter and compute dtype (default: the checkpoint's `torch_dtype`, float32 if absent).
    rope_layout: "half" for HF checkpoints (default); "interleaved" for q/k in Meta's layout.
    **config_overrides: other `LlamaConfig` fields to override.

  Returns:
    The model with the checkpoint's weights (no random init is materialised).

  Raises:
    FileNotFoundError: missing config.json or safetensors files.
    ValueError: a missing tensor, a shape mismatch or an unsupported config.
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no config.json in {path!r}")
  with open(cfg_path) as f:
    hf = json.load(f)
  if dtype is not None:
    config_overrides.update(dtype=dtype, param_dtype=dtype)
  cfg = config_from_hf(hf, **config_overrides)
  if rope_layout not in ("half", "interleaved"):
    raise ValueError(f"rope_layout must be 'half' or 'interleaved', got {rope_layout!r}")
  model = nnx.eval_shape(lambda: llama_lib.Llama(cfg, impl=impl, mesh=mesh, rngs=nnx.Rngs(0)))
  where = _open_tensors(path)
  handles = {f: safe_open(f, framework="numpy") for f in set(where.values())}
  try:
    for name, attr, transpose in _param_table(cfg):
      if name not in where:
        raise ValueError(f"tensor {name!r} missing from the checkpoint in {path!r}")
      w = handles[where[name]].get_tensor(name)
      if rope_layout == "interleaved" and attr[-2] in ("q_proj", "k_proj"):
        heads = cfg.num_heads if attr[-2] == "q_proj" else cfg.num_kv_heads
        w = interleaved_to_half(w, heads) if w.ndim == 2 else interleaved_to_half(
            w[:, None], heads)[:, 0]
      if transpose:
        w = w.T
      var = _variable(model, attr)
      if tuple(w.shape) != tuple(var.get_value().shape):
        raise ValueError(f"tensor {name!r} has shape {w.shape}, expected {tuple(var.get_value().shape)}")
      arr = jnp.asarray(np.ascontiguousarray(w), dtype=var.get_value().dtype)
      if mesh is not None:
        from chunkattn_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
        arr = jax.device_put(arr, jax.sharding.NamedSharding(mesh, sharding_lib.spec_for_path(attr)))
      var.set_value(arr)
  finally:
    for h in handles.values():
      if hasattr(h, "__exit__"):
        h.__exit__(None, None, None)
  return model


def hf_state_dict(model: llama_lib.Llama) -> dict[str, np.ndarray]:
  """The model's parameters as `{HF name: numpy array}` (HF `[out, in]` orientation)."""
  out = {}
  for name, attr, transpose in _param_table(model.config):
    w = np.asarray(_variable(model, attr).get_value())
    out[name] = np.ascontiguousarray(w.T if transpose else w)
  return out


def save_hf_checkpoint(model: llama_lib.Llama, path: str) -> None:
  """Writes `config.json` and `model.safetensors` in HF format (for tests and examples)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(model.config), f, indent=2)
  save_file(hf_state_dict(model), os.path.join(path, "model.safetensors"))
