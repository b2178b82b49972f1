"""Llama-family decoder (RMSNorm, RoPE, gated MLP, GQA) on the chunked prefix-shared KV cache.

`Llama(config, impl=..., rngs=...)` maps token ids plus a cache (`KVPool` for prefill/decode,
`DenseKVCache` for the dense baseline) and the matching layer inputs (`layers.PrefillInputs`,
`layers.DecodeInputs`, `layers.DenseInputs`) to logits and the updated cache. Configs:
`tiny()` (tests), `open_llama_7b()` / `llama2_7b()` (32 x 32 heads x 128, the paper's model shape),
`llama3_8b()` (GQA with 8 KV heads, RoPE theta 500000, vocab 128256).

The math follows transformers' `LlamaForCausalLM` for every field of `LlamaConfig`: RoPE theta and
scaling (`rope.py`), biases on q, k, v and o (`attention_bias`) and on the MLP (`mlp_bias`), the
MLP activation (`ACTIVATIONS`), RMSNorm epsilon, tied embeddings, an explicit head_dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from chunkattn_jax import layers
from chunkattn_jax import rope as rope_lib
from chunkattn_jax.kv_pool import DenseKVCache, KVPool

# HF `hidden_act` names -> functions, each checked against transformers' `ACT2FN` on a grid
# (tests/test_llama.py). "gelu" is the exact (erf) GELU; "gelu_new" and "gelu_pytorch_tanh" are
# the tanh approximation.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Model hyperparameters (names follow Hugging Face's LlamaConfig where they exist).

  `attention_bias` puts biases on q, k, v and o (as HF); `mlp_bias` on gate, up and down;
  `hidden_act` is a key of `ACTIVATIONS`; `rope_scaling` a `rope.RopeScaling` (None: plain RoPE;
  a `dynamic` schedule's `original_max_position_embeddings` must equal `max_position_embeddings`,
  as HF computes it from that). Every field is type- and range-checked at construction.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  rope_scaling: rope_lib.RopeScaling | None = None
  dtype: str = "float32"        # computation dtype
  param_dtype: str = "float32"  # parameter dtype

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      _check_int(name, getattr(self, name))
    if self.head_dim is not None:
      _check_int("head_dim", self.head_dim)
      if self.head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
    for name in ("rope_theta", "rms_norm_eps"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
          or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; supported: "
                       f"{tuple(ACTIVATIONS)}")
    for name in ("dtype", "param_dtype"):
      try:
        ok = jnp.dtype(getattr(self, name)).name in DTYPES
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    if self.rope_scaling is not None:
      if not isinstance(self.rope_scaling, rope_lib.RopeScaling):
        raise ValueError(f"rope_scaling must be a rope.RopeScaling or None, got "
                         f"{self.rope_scaling!r}")
      if (self.rope_scaling.rope_type == "dynamic" and
          self.rope_scaling.original_max_position_embeddings != self.max_position_embeddings):
        raise ValueError(
            "dynamic RoPE scaling is relative to max_position_embeddings="
            f"{self.max_position_embeddings}, got original_max_position_embeddings="
            f"{self.rope_scaling.original_max_position_embeddings}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
    rope_lib.inverse_frequencies(self.d_head, float(self.rope_theta), self.rope_scaling)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")

  @property
  def d_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)


def _check_int(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def tiny(**kw) -> LlamaConfig:
  """A tiny model for tests: 2 layers, 4 query heads over 2 KV heads, d = 16, vocab 97."""
  base = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
              max_position_embeddings=512)
  base.update(kw)
  return LlamaConfig(**base)


def open_llama_7b(**kw) -> LlamaConfig:
  """Open-LLaMA 7B / LLaMA-1 7B shape: the paper's end-to-end model (MHA, 32 x 128)."""
  return LlamaConfig(**{**dict(rms_norm_eps=1e-6, max_position_embeddings=2048), **kw})


def llama2_7b(**kw) -> LlamaConfig:
  """Llama-2 7B shape (MHA 32 x 128, context 4096)."""
  return LlamaConfig(**{**dict(rms_norm_eps=1e-5, max_position_embeddings=4096), **kw})


def llama3_8b(**kw) -> LlamaConfig:
  """Llama-3 8B shape: GQA 32 query / 8 KV heads, RoPE theta 500000, vocab 128256."""
  return LlamaConfig(**{**dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                               rms_norm_eps=1e-5, max_position_embeddings=8192), **kw})


CONFIGS = {"tiny": tiny, "open_llama_7b": open_llama_7b, "llama2_7b": llama2_7b,
           "llama3_8b": llama3_8b}


class RMSNorm(nnx.Module):
  """`x / rms(x) * weight`, statistics in float32. x `[..., D]` -> `[..., D]` (x.dtype)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class GatedMLP(nnx.Module):
  """`down(act(gate(x)) * up(x))` (SwiGLU for `act="silu"`); x `[..., D]` -> `[..., D]`;
  intermediate split over the mesh."""

  def __init__(self, dim: int, hidden: int, *, act: str = "silu", use_bias: bool = False, dtype,
               param_dtype, rngs: nnx.Rngs):
    if act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={act!r} is not supported; supported: {tuple(ACTIVATIONS)}")
    self.act = act
    lin = functools.partial(nnx.Linear, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)
    self.gate_proj = lin(dim, hidden)
    self.up_proj = lin(dim, hidden)
    self.down_proj = lin(hidden, dim)

  def __call__(self, x):
    return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


SwiGLU = GatedMLP  # the name before activations other than SiLU were supported


class DecoderLayer(nnx.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

  def __init__(self, cfg: LlamaConfig, *, impl: str, mesh, rngs: nnx.Rngs):
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdtype)
    self.self_attn = layers.ChunkAttention(
        cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.d_head, rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling, impl=impl, use_bias=cfg.attention_bias,
        use_output_bias=cfg.attention_bias, dtype=dtype, param_dtype=pdtype, mesh=mesh, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdtype)
    self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act,
                        use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=pdtype, rngs=rngs)

  def __call__(self, x, k_cache, v_cache, inputs):
    h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), k_cache, v_cache, inputs)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class Llama(nnx.Module):
  """Llama-family causal LM over an explicit KV cache.

  Args:
    config: `LlamaConfig`.
    impl: decode attention implementation (`layers.IMPLS`).
    mesh: optional mesh with axis `layers.MODEL_AXIS` (KV-head / tensor parallelism).
    rngs: `nnx.Rngs` for the random initialisation (checkpoint loading overwrites it).
  """

  def __init__(self, config: LlamaConfig, *, impl: str = "xla", mesh=None, rngs: nnx.Rngs):
    self.config = config
    self.impl = impl
    self.mesh = mesh
    pdtype, dtype = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=pdtype,
        embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, impl=impl, mesh=mesh, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pdtype)
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Linear(
          config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
          rngs=rngs)

  def make_pool(self, n_chunks: int, chunk_size: int, *, dtype=None, sharding=None) -> KVPool:
    """A zero KV pool for this model: `L` layers of `[n_chunks, h_kv, c, d]`."""
    cfg = self.config
    return KVPool.create(cfg.num_layers, n_chunks, cfg.num_kv_heads, chunk_size, cfg.d_head,
                         dtype=jnp.dtype(dtype or cfg.dtype), sharding=sharding)

  def make_dense_cache(self, batch: int, max_len: int, *, dtype=None, sharding=None) -> DenseKVCache:
    """A zero dense cache: `L` layers of `[B, T_max, h_kv, d]`."""
    cfg = self.config
    return DenseKVCache.create(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.d_head,
                               dtype=jnp.dtype(dtype or cfg.dtype), sharding=sharding)

  def logits(self, h):
    """Final hidden states `[..., D]` -> float32 logits `[..., V]`."""
    h = self.norm(h)
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(h).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def __call__(self, tokens, cache, inputs, *, logits_index=None):
    """Runs the model on new tokens.

    Args:
      tokens: int32 `[S, T]` (prefill), `[R]` (decode) or `[B, T]` (dense).
      cache: `KVPool` (prefill / decode) or `DenseKVCache` (dense).
      inputs: `layers.PrefillInputs`, `layers.DecodeInputs` or `layers.DenseInputs`.
      logits_index: optional int32 `[S]`: return only the logits of token `logits_index[s]` of
        each sequence (prefill/dense), e.g. its last prompt token.

    Returns:
      `(logits, cache)`: float32 logits `tokens.shape + [V]` (or `[S, V]` with `logits_index`)
      and the cache with the new tokens' K/V written in every layer.
    """
    x = self.embed_tokens(tokens)
    ks, vs = list(cache.k), list(cache.v)
    for i, layer in enumerate(self.layers):
      x, ks[i], vs[i] = layer(x, ks[i], vs[i], inputs)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
    return self.logits(x), type(cache)(k=tuple(ks), v=tuple(vs))
