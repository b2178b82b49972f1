"""chunkattn-jax: ChunkAttention (prefix-aware KV cache + two-phase decode attention) in JAX."""

from chunkattn_jax.chunk_pool import ChunkPool, PoolExhaustedError
from chunkattn_jax.plan import DecodePlan, GpuFill, PlanBuilder, build_plan
from chunkattn_jax.prefix_tree import InsertResult, PrefixTree, UnknownSequenceError
from chunkattn_jax.reference_attention import reference_decode_attention

__version__ = "0.1.0"

__all__ = [
    "ChunkPool", "DecodePlan", "GpuFill", "InsertResult", "PlanBuilder", "PoolExhaustedError",
    "PrefixTree", "UnknownSequenceError", "build_plan", "reference_decode_attention",
]
