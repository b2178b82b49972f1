"""Token sampling: greedy, temperature, top-k, top-p, per row, reproducible per request.

Every row carries its own parameters, so one jitted `sample` serves a batch mixing greedy and
sampled requests. The random key of a request's `n`-th generated token is
`fold_in(PRNGKey(seed), n)`: a request draws the same tokens whatever else is in the batch, and
after a preemption and recompute.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each next token.

  Attributes:
    temperature: 0 means greedy (argmax); > 0 divides the logits before sampling.
    top_k: keep the `top_k` most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    seed: the request's random seed.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not (np.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f"seed must be an integer, got {self.seed!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = SamplingParams()


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seeds: jax.Array, counters: jax.Array) -> jax.Array:
  """Picks one token per row (traceable).

  Args:
    logits: float `[R, V]`.
    temperature: float32 `[R]` (0: greedy).
    top_k: int32 `[R]` (0: no limit).
    top_p: float32 `[R]` (1: no limit).
    seeds: uint32/int32 `[R]` per-request seeds.
    counters: int32 `[R]` index of the token being generated within its request.

  Returns:
    int32 `[R]` token ids.
  """
  logits = logits.astype(jnp.float32)
  r, v = logits.shape
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  order = jnp.argsort(-logits, axis=-1)  # [R, V] token ids by decreasing logit
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  scaled = sorted_logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  rank = jnp.arange(v)[None, :]
  keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
  scaled = jnp.where(keep, scaled, -jnp.inf)
  probs = jax.nn.softmax(scaled, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  keep = keep & ((before < top_p[:, None]) | (rank == 0))
  scaled = jnp.where(keep, scaled, -jnp.inf)
  keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(
      seeds.astype(jnp.uint32), counters)
  pick = jax.vmap(jax.random.categorical)(keys, scaled)  # [R] index into the sorted order
  sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy_tok)
