"""Pallas (Triton backend) kernels for two-phase decode attention on a paged chunk pool.

Plain arrays in and out; this package imports nothing from `chunkattn_jax`.
"""

from pallas_kernels.chunk_first import (ChunkFirstConfig, chunk_first, chunk_first_reference,
                                        empty_partials)
from pallas_kernels.mosaic_decode import (MosaicConfig, mosaic_chunk_first,
                                          mosaic_sequence_first)
from pallas_kernels.sequence_first import (SequenceFirstConfig, sequence_first,
                                           sequence_first_reference)
from pallas_kernels.two_phase import (IMPLS, InvalidPlanError, two_phase_decode,
                                      validate_plan_arrays)

__all__ = [
    "IMPLS", "ChunkFirstConfig", "InvalidPlanError", "MosaicConfig", "SequenceFirstConfig",
    "chunk_first", "chunk_first_reference", "empty_partials", "mosaic_chunk_first",
    "mosaic_sequence_first", "sequence_first", "sequence_first_reference",
    "two_phase_decode", "validate_plan_arrays",
]
