"""Rotary position embedding: the inverse-frequency schedules of Hugging Face Llama, and the rotation.

`inverse_frequencies(head_dim, theta, scaling)` returns the float32 `[d // 2]` frequencies exactly as
transformers computes them (`LlamaRotaryEmbedding.inv_freq`), step for step in float32, for the
RoPE types Llama checkpoints use:

* `default`: `1 / theta ** (2i / d)`;
* `linear`: the default frequencies divided by `factor` (positions interpolated);
* `dynamic` (NTK-aware): `theta` scaled by `(factor * L / L0 - (factor - 1)) ** (d / (d - 2))` for a
  sequence of length `L` beyond `L0 = max_position_embeddings`; HF computes the frequencies at
  `L = L0` (where the scale is 1) and recomputes them only past `L0`. The engine never runs past
  `max_position_embeddings`, so every position it computes uses the frequencies HF uses there;
* `llama3` (Llama 3.1+): wavelengths above `L_orig / low_freq_factor` divided by `factor`, those
  below `L_orig / high_freq_factor` kept, and a smooth interpolation in between.

Other RoPE types (yarn, longrope, ...) are not implemented; `RopeScaling` rejects them by name.
The rotation is the half-split ("rotate_half") convention of HF checkpoints (see `checkpoint.py`).
Tests compare every schedule with transformers' own numbers (tests/test_rope.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _check_positive(name, value, integer=False):
  kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
    what = "a positive integer" if integer else "a finite number > 0"
    raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A RoPE frequency schedule (Hugging Face's `rope_parameters` / `rope_scaling` without theta).

  Attributes:
    rope_type: one of `ROPE_TYPES`.
    factor: the scaling factor (`linear`, `dynamic`, `llama3`; > 0, 1 for `default`).
    low_freq_factor, high_freq_factor: `llama3` only (high > low > 0).
    original_max_position_embeddings: `llama3`: the pre-training context `L_orig`; `dynamic`: the
      context `L0` the factor is relative to (HF uses `max_position_embeddings`).
  """
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
    _check_positive("factor", self.factor)
    if self.rope_type == "default" and self.factor != 1.0:
      raise ValueError(f"rope_type='default' takes no factor, got factor={self.factor!r}")
    needs = {"llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "dynamic": ("original_max_position_embeddings",)}.get(self.rope_type, ())
    for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      value = getattr(self, name)
      if name in needs:
        if value is None:
          raise ValueError(f"rope_type={self.rope_type!r} needs {name}")
        _check_positive(name, value, integer=name == "original_max_position_embeddings")
      elif value is not None:
        raise ValueError(f"rope_type={self.rope_type!r} does not use {name}={value!r}")
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"llama3 RoPE needs high_freq_factor > low_freq_factor, got "
                       f"high_freq_factor={self.high_freq_factor!r}, "
                       f"low_freq_factor={self.low_freq_factor!r}")


DEFAULT = RopeScaling()


@functools.lru_cache(maxsize=None)
def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
  """float32 `[head_dim // 2]` RoPE inverse frequencies, computed as transformers computes them.

  Every operation is a float32 operation in HF's order (Python scalars enter as float32, as in
  torch), so the result equals transformers' `inv_freq` (tests allow one ulp for `**`, whose
  last bit differs between math libraries).
  """
  if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim <= 0 \
      or head_dim % 2:
    raise ValueError(f"RoPE needs a positive even head dim, got head_dim={head_dim!r}")
  _check_positive("rope_theta", theta)
  s = DEFAULT if scaling is None else scaling
  f32 = np.float32
  base = float(theta)
  if s.rope_type == "dynamic":
    # HF: seq_len defaults to max_position_embeddings (the scale below is then 1 up to rounding).
    l0 = s.original_max_position_embeddings
    base = base * ((s.factor * l0 / l0) - (s.factor - 1)) ** (head_dim / (head_dim - 2))
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
  # float32 power, correctly rounded (float64 pow of the float32 operands, then rounded).
  inv = (f32(1.0) / (np.float64(f32(base)) ** exponent.astype(np.float64)).astype(f32)).astype(f32)
  if s.rope_type == "linear":
    inv = inv / f32(s.factor)
  elif s.rope_type == "llama3":
    old = s.original_max_position_embeddings
    low_wavelen = old / s.low_freq_factor
    high_wavelen = old / s.high_freq_factor
    # torch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`; so do we.
    wavelen = (f32(1) / inv) * f32(2 * math.pi)
    scaled = np.where(wavelen > f32(low_wavelen), inv / f32(s.factor), inv)
    smooth = ((f32(1) / wavelen) * f32(old) - f32(s.low_freq_factor)) / f32(
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (f32(1) - smooth) * scaled / f32(s.factor) + smooth * scaled
    medium = ~(wavelen < f32(high_wavelen)) & ~(wavelen > f32(low_wavelen))
    inv = np.where(medium, smoothed, scaled)
  inv = np.asarray(inv, f32)
  inv.setflags(write=False)  # cached: shared by every caller
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding in the half-split ("rotate_half") convention, computed in float32.

  Pair `(x[i], x[i + d/2])` is rotated by the angle `positions * inv_freq[i]` (float32, as HF).

  Args:
    x: `[..., n, d]` (heads axis `n` just before `d`).
    positions: int `[...]` matching `x.shape[:-2]`.
    inv_freq: float32 `[d // 2]` from `inverse_frequencies`.

  Returns:
    `[..., n, d]` in `x.dtype`.
  """
  d = x.shape[-1]
  if inv_freq.shape != (d // 2,):
    raise ValueError(f"inv_freq must have shape ({d // 2},) for head dim {d}, got {inv_freq.shape}")
  angle = positions.astype(jnp.float32)[..., None, None] * jnp.asarray(inv_freq)  # [..., 1, d/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
