"""Tensor parallelism over KV heads with `jax.sharding`.

One mesh axis, `layers.MODEL_AXIS` ("model"), of size `N` dividing `h_kv`:
* q/k/v projection kernels `[D, heads * d]` are split on their output axis (device `i` holds KV
  heads `i*h_kv/N ..` and the query heads of those groups, which are contiguous), o_proj `[h*d, D]`
  on its input axis; the SwiGLU gate/up kernels on their output axis, down on its input axis;
  embeddings, norms and the LM head are replicated;
* every KV pool layer `[n_chunks, h_kv, c, d]` is split on `h_kv`, so each device stores and reads
  only its heads' K/V;
* attention runs under `shard_map` (see `layers.ChunkAttention(mesh=...)`): each device runs the
  decode kernel (Pallas or XLA) on its heads with the replicated plan; no communication inside
  attention. XLA inserts the all-reduces after o_proj and down_proj.

The host side (tree, plan, engine loop) is replicated: every process runs the same loop on the same
requests and builds the same plan (see docs/serving.md for multi-host use).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chunkattn_jax.layers import MODEL_AXIS

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
  """A 1-D mesh with axis `MODEL_AXIS` over `devices` (default the first `num_devices` devices)."""
  if devices is None:
    devices = jax.devices()
    if num_devices is not None:
      if num_devices > len(devices):
        raise ValueError(f"asked for {num_devices} devices, only {len(devices)} available")
      devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (MODEL_AXIS,))


def spec_for_path(path) -> P:
  """PartitionSpec of a parameter given its attribute path (e.g. `("layers", 0, "self_attn",
  "q_proj", "kernel")`)."""
  names = [str(p) for p in path]
  owner, leaf = (names[-2], names[-1]) if len(names) >= 2 else ("", names[-1])
  if owner in _COLUMN:
    return P(None, MODEL_AXIS) if leaf == "kernel" else P(MODEL_AXIS)
  if owner in _ROW and leaf == "kernel":
    return P(MODEL_AXIS, None)
  return P()


def pool_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of each KV pool layer `[n_chunks, h_kv, c, d]`: split on `h_kv`."""
  return NamedSharding(mesh, P(None, MODEL_AXIS, None, None))


def dense_cache_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of each dense cache layer `[B, T_max, h_kv, d]`: split on `h_kv`."""
  return NamedSharding(mesh, P(None, None, MODEL_AXIS, None))


def check_divisible(config, mesh: Mesh) -> None:
  n = mesh.shape[MODEL_AXIS]
  if config.num_kv_heads % n:
    raise ValueError(f"num_kv_heads={config.num_kv_heads} is not divisible by the mesh's "
                     f"{MODEL_AXIS!r} axis of size {n}")
  if config.intermediate_size % n:
    raise ValueError(f"intermediate_size={config.intermediate_size} is not divisible by {n}")


def shard_model(model, mesh: Mesh):
  """Places `model`'s parameters on `mesh` (in place) and switches its attention layers to
  `shard_map` over that mesh. Returns the model."""
  if hasattr(model, "config"):
    check_divisible(model.config, mesh)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec_for_path(path))))
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(node, "mesh"):
      node.mesh = mesh
  return model
