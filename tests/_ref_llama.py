"""An independent dense Llama forward in NumPy (float64) over HF-format weights, for tests."""

import math

import numpy as np

_ACTS = {"silu": lambda g: g / (1 + np.exp(-g)),
         "gelu": lambda g: 0.5 * g * (1 + np.vectorize(math.erf)(g / math.sqrt(2))),
         "relu": lambda g: np.maximum(g, 0)}


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, layout):
  """x [T, n, d]; layout "half" (HF rotate_half) or "interleaved" (Meta, complex pairs)."""
  d = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ang = pos[:, None, None] * inv  # [T, 1, d/2]
  if layout == "half":
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
  xc = x[..., 0::2] + 1j * x[..., 1::2]
  r = xc * np.exp(1j * ang)
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = r.real, r.imag
  return out


def forward(w: dict, cfg: dict, tokens, layout: str = "half") -> np.ndarray:
  """float64 logits [T, V] of one sequence. `w`: HF names -> arrays [out, in]; `cfg`: HF config."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  h, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  D = cfg["hidden_size"]
  d = cfg.get("head_dim") or D // h
  eps = cfg["rms_norm_eps"]
  rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps theta there
  assert rope.get("rope_type", "default") == "default" and not cfg.get("rope_scaling")
  theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
  act = _ACTS[cfg.get("hidden_act", "silu")]
  b = lambda name: w.get(name, 0)
  tokens = np.asarray(tokens)
  T = len(tokens)
  pos = np.arange(T, dtype=np.float64)
  x = w["model.embed_tokens.weight"][tokens]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    a = _rms(x, w[p + "input_layernorm.weight"], eps)
    q = (a @ w[p + "self_attn.q_proj.weight"].T + w.get(p + "self_attn.q_proj.bias", 0)).reshape(T, h, d)
    k = (a @ w[p + "self_attn.k_proj.weight"].T + w.get(p + "self_attn.k_proj.bias", 0)).reshape(T, hkv, d)
    v = (a @ w[p + "self_attn.v_proj.weight"].T + w.get(p + "self_attn.v_proj.bias", 0)).reshape(T, hkv, d)
    q, k = _rope(q, pos, theta, layout), _rope(k, pos, theta, layout)
    k = np.repeat(k, h // hkv, axis=1)
    v = np.repeat(v, h // hkv, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", s, v).reshape(T, h * d)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T + b(p + "self_attn.o_proj.bias")
    a = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
    g = a @ w[p + "mlp.gate_proj.weight"].T + b(p + "mlp.gate_proj.bias")
    u = a @ w[p + "mlp.up_proj.weight"].T + b(p + "mlp.up_proj.bias")
    x = x + (act(g) * u) @ w[p + "mlp.down_proj.weight"].T + b(p + "mlp.down_proj.bias")
  x = _rms(x, w["model.norm.weight"], eps)
  head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return x @ head.T
