"""Decode attention over the chunk pool, driven by a `DecodePlan` (glue to `pallas_kernels`).

The kernel choice is data: `impl="pallas"` (GPU, Triton), `"pallas_interpret"` (CPU interpret
mode), `"xla"` (two-phase in plain XLA, the CPU default) or `"reference"` (dense gather per row).
"""

from __future__ import annotations

import jax

from chunkattn_jax.plan import DecodePlan
from pallas_kernels import two_phase_decode
from pallas_kernels.two_phase import IMPLS

__all__ = ["IMPLS", "decode_attention", "plan_kwargs"]


def plan_kwargs(plan: DecodePlan) -> dict:
  """The plan as the keyword arguments of `pallas_kernels.two_phase_decode`."""
  return dict(
      num_rows=plan.num_rows, row_private_chunks=plan.row_private_chunks,
      row_private_len=plan.row_private_len, row_items=plan.row_items,
      row_num_items=plan.row_num_items, item_chunks=plan.item_chunks,
      item_num_chunks=plan.item_num_chunks, item_row_begin=plan.item_row_begin,
      item_row_end=plan.item_row_end, item_partial_offset=plan.item_partial_offset,
      length_delta=plan.length_delta, partial_capacity=plan.partial_capacity,
      item_rows_capacity=plan.item_rows_capacity)


def decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, plan: DecodePlan, *,
                     impl: str = "xla", sm_scale: float | None = None, **knobs) -> jax.Array:
  """One decode step of attention for every plan row.

  Args:
    q: [R, h, d] queries in plan row order (R = plan.row_capacity), float16/bfloat16/float32.
    k_pool, v_pool: [n_chunks, h_kv, c, d] with c = plan.chunk_size; h % h_kv == 0.
    plan: the decode plan (NumPy or device arrays; it is a pytree, so it can be a jit argument).
    impl: "pallas" | "pallas_interpret" | "xla" | "reference".
    sm_scale: score scale, default 1/sqrt(d).
    **knobs: static kernel knobs forwarded to `two_phase_decode` (block_m, num_warps, ...).

  Returns:
    [R, h, d] in q.dtype; spare rows are zeros.
  """
  if k_pool.ndim != 4 or k_pool.shape[2] != plan.chunk_size:
    raise ValueError(f"k_pool must be [n_chunks, h_kv, {plan.chunk_size}, d]: {k_pool.shape=}")
  if q.ndim != 3 or q.shape[0] != plan.row_capacity:
    raise ValueError(f"q must be [{plan.row_capacity}, h, d] (plan rows): {q.shape=}")
  return two_phase_decode(q, k_pool, v_pool, **plan_kwargs(plan), impl=impl, sm_scale=sm_scale,
                          **knobs)
