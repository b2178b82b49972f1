"""Decode attention over the chunk pool, driven by a `DecodePlan` (glue to `pallas_kernels`).

The kernel choice is data: `impl="pallas"` (GPU, Triton), `"pallas_interpret"` (CPU interpret
mode), `"mosaic"` (Hopper, Pallas Mosaic GPU), `"mosaic_interpret"` (its CPU interpreter), `"xla"`
(two-phase in plain XLA, the CPU default) or `"reference"` (dense gather per row).
"""

from __future__ import annotations

import jax
import numpy as np

from chunkattn_jax.plan import DecodePlan
from pallas_kernels import InvalidPlanError, two_phase_decode, validate_plan_arrays
from pallas_kernels.two_phase import IMPLS

__all__ = ["IMPLS", "InvalidPlanError", "decode_attention", "plan_kwargs", "validate_plan"]

_ARRAYS = ("num_rows", "row_private_chunks", "row_private_len", "row_items", "row_num_items",
           "item_chunks", "item_num_chunks", "item_row_begin", "item_row_end", "item_slot",
           "length_delta")


def plan_kwargs(plan: DecodePlan) -> dict:
  """The plan as the keyword arguments of `pallas_kernels.two_phase_decode`."""
  return dict({name: getattr(plan, name) for name in _ARRAYS},
              item_rows_capacity=plan.item_rows_capacity)


def validate_plan(plan: DecodePlan, n_chunks: int, tokens_per_row: int = 1) -> None:
  """Eager value checks of `plan` against a pool of `n_chunks` slots (`InvalidPlanError`); with
  `tokens_per_row` T > 1, every live row must have at least T private tokens.

  Vectorised NumPy: a few tens of microseconds at b = 32, well under a plan build. Skipped (returns
  without checking) when the plan's arrays are tracers, i.e. inside `jax.jit`.
  """
  if any(isinstance(getattr(plan, name), jax.core.Tracer) for name in _ARRAYS):
    return
  validate_plan_arrays(**{name: np.asarray(getattr(plan, name)) for name in _ARRAYS},
                       n_chunks=n_chunks, chunk_size=plan.chunk_size,
                       item_rows_capacity=plan.item_rows_capacity, tokens_per_row=tokens_per_row)


def decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, plan: DecodePlan, *,
                     impl: str = "xla", sm_scale: float | None = None, validate: bool = True,
                     **knobs) -> jax.Array:
  """One decode step of attention for every plan row.

  Args:
    q: [R, h, d] queries in plan row order (R = plan.row_capacity), float16/bfloat16/float32; or
      [R, T, h, d]: T new tokens per row (speculative verification, a short chunked prefill),
      appended to the tree before the plan, so they are the last T of each row's private tokens;
      token t attends to the shared prefix, the private tokens before it and itself.
    k_pool, v_pool: [n_chunks, h_kv, c, d] with c = plan.chunk_size; h % h_kv == 0.
    plan: the decode plan (NumPy or device arrays; it is a pytree, so it can be a jit argument).
    impl: one of `IMPLS`: "pallas" | "pallas_interpret" | "mosaic" | "mosaic_interpret" | "xla" |
      "reference".
    sm_scale: score scale, default 1/sqrt(d).
    validate: check the plan's values first (`validate_plan`; raises `InvalidPlanError`). On by
      default because a malformed plan would read the wrong memory silently (gathers clamp); turn
      it off in a hot loop over plans from `PlanBuilder` (the engine does). Plans that are jit
      tracers cannot be checked and are not.
    **knobs: static kernel knobs forwarded to `two_phase_decode` (`chunk_first_config`,
      `sequence_first_config`, `mosaic_config`).

  Returns:
    q's shape and dtype; spare rows are zeros.
  """
  if k_pool.ndim != 4 or k_pool.shape[2] != plan.chunk_size:
    raise ValueError(f"k_pool must be [n_chunks, h_kv, {plan.chunk_size}, d]: {k_pool.shape=}")
  if q.ndim not in (3, 4) or q.shape[0] != plan.row_capacity:
    raise ValueError(f"q must be [{plan.row_capacity}, h, d] or [{plan.row_capacity}, T, h, d] "
                     f"(plan rows): {q.shape=}")
  if validate:
    validate_plan(plan, k_pool.shape[0], tokens_per_row=1 if q.ndim == 3 else q.shape[1])
  return two_phase_decode(q, k_pool, v_pool, **plan_kwargs(plan), impl=impl, sm_scale=sm_scale,
                          **knobs)
