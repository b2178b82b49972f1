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

from chunkattn_jax import checks


# Temperatures outside this range overflow or underflow float32 logits (0 means greedy).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6
INT32_MAX, UINT32_MAX = 2**31 - 1, 2**32 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each next token. Checked on construction (ValueError naming the field).

  Attributes:
    temperature: 0 means greedy (argmax); otherwise in `[MIN_TEMPERATURE, MAX_TEMPERATURE]`, the
      divisor of the logits before sampling.
    top_k: keep the `top_k` most likely tokens (0: all); an int32.
    top_p: keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all),
      in (0, 1].
    seed: the request's random seed, in `[0, 2**32)`.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    t = checks.check_real(self.temperature, "SamplingParams.temperature")
    if t != 0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
      raise ValueError(f"SamplingParams.temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, "
                       f"{MAX_TEMPERATURE}], got {self.temperature!r}")
    top_k = checks.check_int(self.top_k, "SamplingParams.top_k", min_value=0, max_value=INT32_MAX)
    top_p = checks.check_real(self.top_p, "SamplingParams.top_p")
    if not 0 < top_p <= 1:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
    seed = checks.check_int(self.seed, "SamplingParams.seed", min_value=0, max_value=UINT32_MAX)
    # Plain Python values: the per-row arrays are built from them every step.
    for name, value in (("temperature", t), ("top_k", top_k), ("top_p", top_p), ("seed", seed)):
      object.__setattr__(self, name, value)

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
