"""Pallas (Triton backend) kernels for two-phase decode attention on a paged chunk pool.

Plain arrays in and out; this package imports nothing from `chunkattn_jax`.
"""

from pallas_kernels.chunk_first import (ChunkFirstConfig, chunk_first, chunk_first_reference,
                                        empty_partials)
from pallas_kernels.sequence_first import (SequenceFirstConfig, sequence_first,
                                           sequence_first_reference)
from pallas_kernels.two_phase import (IMPLS, InvalidPlanError, two_phase_decode,
                                      validate_plan_arrays)

__all__ = [
    "IMPLS", "ChunkFirstConfig", "InvalidPlanError", "SequenceFirstConfig", "chunk_first",
    "chunk_first_reference", "empty_partials", "sequence_first", "sequence_first_reference",
    "two_phase_decode", "validate_plan_arrays",
]
