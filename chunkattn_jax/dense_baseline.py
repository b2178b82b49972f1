"""The no-sharing baseline: the same model over a dense per-request KV cache.

Each request owns `T_max` cache rows per layer (`kv_pool.DenseKVCache`, `[B, T_max, h_kv, d]`); no
prefix is shared in memory or compute. Tests use `generate` as the oracle for the engine; the
serving experiment times `DenseRunner.decode` against the chunked engine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chunkattn_jax import layers
from chunkattn_jax.plan import bucket


class DenseRunner:
  """Jitted prefill/decode of `model` over a `DenseKVCache` (cache donated).

  Args:
    model: a model called as `model(tokens, cache, inputs, *, logits_index=None)` (`llama.Llama`).
  """

  def __init__(self, model):
    self.model = model
    self._graphdef, self._state = nnx.split(model)

  def _prefill(self, *args):
    return _dense_prefill(self._graphdef, *args)

  def _decode(self, *args):
    return _dense_decode(self._graphdef, *args)

  def prefill(self, cache, prompts: list[list[int]]):
    """Prefills `B` prompts (padded to a power of two). Returns (float32 logits `[B, V]` of each
    prompt's last token, cache)."""
    b = cache.k[0].shape[0]
    t_cap = bucket(max(len(p) for p in prompts), 8)
    tokens = np.zeros((b, t_cap), np.int32)
    positions = np.full((b, t_cap), cache.max_len, np.int32)  # padding: dropped writes
    last = np.zeros(b, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
      positions[i, : len(p)] = np.arange(len(p))
      last[i] = len(p) - 1
    return self._prefill(self._state, cache, tokens, positions, last)

  def decode(self, cache, tokens, positions):
    """One decode step: tokens, positions int32 `[B]` -> (float32 logits `[B, V]`, cache)."""
    return self._decode(self._state, cache, jnp.asarray(tokens, jnp.int32),
                        jnp.asarray(positions, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _dense_prefill(graphdef, state, cache, tokens, positions, last):
  model = nnx.merge(graphdef, state)
  return model(tokens, cache, layers.DenseInputs(positions=positions), logits_index=last)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _dense_decode(graphdef, state, cache, tokens, positions):
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens[:, None], cache, layers.DenseInputs(positions=positions[:, None]))
  return logits[:, 0], cache


_RUNNERS: dict[int, tuple] = {}


def _runner(model) -> DenseRunner:
  hit = _RUNNERS.get(id(model))
  if hit is None or hit[0] is not model:
    hit = (model, DenseRunner(model))
    _RUNNERS[id(model)] = hit
  return hit[1]


def generate(model, prompt, max_new_tokens: int, stop_ids=()) -> tuple[list[int], list[np.ndarray]]:
  """Greedy generation for one request with its own dense cache.

  Returns:
    (generated token ids, float32 logits `[V]` that produced each of them).
  """
  runner = _runner(model)
  prompt = list(prompt)
  max_len = min(bucket(len(prompt) + max_new_tokens, 16), bucket(model.config.max_position_embeddings))
  cache = model.make_dense_cache(1, max_len)
  logits, cache = runner.prefill(cache, [prompt])
  out, all_logits = [], []
  pos = len(prompt)
  while True:
    row = np.asarray(logits[0], np.float32)
    tok = int(np.argmax(row))
    out.append(tok)
    all_logits.append(row)
    if tok in stop_ids or len(out) >= max_new_tokens or pos >= model.config.max_position_embeddings:
      return out, all_logits
    logits, cache = runner.decode(cache, [tok], [pos])
    pos += 1
