"""What each decode-attention implementation can run, checked before any state exists.

The Pallas kernels (`impl="pallas"`, and `"pallas_interpret"`, which runs the same kernels on the
CPU) support the head dims `PALLAS_HEAD_DIMS` and chunk sizes `PALLAS_CHUNK_SIZES` of
`pallas_kernels._common`; every implementation needs a query and KV dtype in `SUPPORTED_DTYPES`,
and the same dtype for both (the kernels read q and the pool in one dtype). `"xla"` and
`"reference"` take any head dim and chunk size.

`load_hf_checkpoint(impl=...)` calls `check` with the model's head dim and dtype; `Engine(...)`
calls `check_engine` with the chunk size and KV dtype too. Either raises `KernelLimitError`, which
names the value, the limit, and the `impl` that can run the model instead, so a model the kernels
cannot run never reaches its first decode step.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from chunkattn_jax import layers
from pallas_kernels import _common
from pallas_kernels.two_phase import IMPLS

PALLAS_IMPLS = ("pallas", "pallas_interpret")
# Implementations without the Pallas shape limits, in the order we suggest them.
UNRESTRICTED_IMPLS = ("xla", "reference")


class KernelLimitError(ValueError):
  """The chosen attention implementation cannot run this model or cache configuration."""


def _dtype_name(dtype) -> str | None:
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    return None


def check(impl: str, *, head_dim: int, dtype=None, kv_dtype=None, chunk_size: int | None = None
          ) -> None:
  """Raises `KernelLimitError` unless `impl` can run attention with these settings.

  Args:
    impl: one of `attention.IMPLS`.
    head_dim: `d`.
    dtype: the query (model compute) dtype, or None to skip.
    kv_dtype: the KV pool dtype (None: the same as `dtype`).
    chunk_size: tokens per chunk `c`, or None when not known yet (checked again by the engine).
  """
  if impl not in IMPLS:
    raise KernelLimitError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
  supported = tuple(d.name for d in _common.SUPPORTED_DTYPES)
  for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype)):
    if value is not None and _dtype_name(value) not in supported:
      raise KernelLimitError(f"{name}={value!r} is not supported by any attention impl; "
                             f"supported: {supported}")
  if dtype is not None and kv_dtype is not None and _dtype_name(dtype) != _dtype_name(kv_dtype):
    raise KernelLimitError(
        f"kv_dtype={_dtype_name(kv_dtype)!r} differs from the model's compute dtype "
        f"{_dtype_name(dtype)!r}; decode attention reads queries and the KV pool in one dtype "
        f"(leave kv_dtype unset, or load the model with dtype={_dtype_name(kv_dtype)!r})")
  if impl not in PALLAS_IMPLS:
    return
  problems = []
  if head_dim not in _common.PALLAS_HEAD_DIMS:
    problems.append(f"head_dim={head_dim} (the Pallas kernels support {_common.PALLAS_HEAD_DIMS})")
  if chunk_size is not None and chunk_size not in _common.PALLAS_CHUNK_SIZES:
    problems.append(f"chunk_size={chunk_size} (the Pallas kernels support "
                    f"{_common.PALLAS_CHUNK_SIZES})")
  if problems:
    other = ("" if head_dim not in _common.PALLAS_HEAD_DIMS else
             f", or keep impl={impl!r} with a chunk_size in {_common.PALLAS_CHUNK_SIZES}")
    raise KernelLimitError(
        f"impl={impl!r} cannot run this model: {'; '.join(problems)}. impl='xla' runs any head "
        f"dim and chunk size: load the model with impl='xla'{other}")


def attention_layers(model) -> list[layers.ChunkAttention]:
  """The `layers.ChunkAttention` modules of an nnx model."""
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, layers.ChunkAttention)]


def check_engine(model, config) -> None:
  """`check` for every attention layer of `model` with an `EngineConfig`'s chunk size and KV dtype
  (`config.kv_dtype`; None: the pool takes the model's compute dtype)."""
  for layer in attention_layers(model):
    q_dtype = layer.q_proj.dtype or layer.q_proj.param_dtype
    check(layer.impl, head_dim=layer.head_dim, dtype=q_dtype, kv_dtype=config.kv_dtype,
          chunk_size=config.chunk_size)
