"""Cost model deciding, per run of shared chunks, chunk-first (phase 1) vs sequence-first.

`build_plan(tree, policy=CostModelPolicy(...))` calls the policy once per run of consecutive chunks
with the same row range as `policy(num_rows, num_chunks) -> bool` (True = chunk-first), and takes
its `fill` (`plan.GpuFill`: two chunk-first programs per SM) to split shared runs.

Model (decode attention is bandwidth bound; times in microseconds, per decode step, one layer):

* Sequence-first: every row's program reads the run's K/V itself, in the well-parallelised phase 2:
  ``t_seq = num_rows * h_kv * kv_bytes(num_chunks) / bandwidth``.
* Chunk-first: the run's K/V is read once, split into ``pieces`` items (the plan cuts a run at
  ``G`` chunks and splits it further until the pass has two programs per SM; assume this run
  alone is split that far), each read by ``h_kv * ceil(rows * g / 64)`` programs (one per KV head
  and 64-row block); the phase cannot finish before one
  program has streamed its ``ceil(num_chunks / pieces)`` chunks at the bandwidth one SM can pull
  (``sm_bandwidth_ratio * bandwidth / num_sms``); each (row, query head, piece) then writes and
  phase 2 reads back one fp32 partial (``d + 1`` floats: output and log-sum-exp); plus a fixed
  cost per run for the extra program wave and merge latency:
  ``t_chunk = max(h_kv * kv_bytes(num_chunks) / bandwidth, kv_bytes(ceil(num_chunks / pieces)) /
  sm_bandwidth) + 2 * num_rows * g * h_kv * (d + 1) * 4 * pieces / bandwidth + overhead_us``.
* Chunk-first iff ``t_chunk < t_seq``.

What it captures: the saving grows with the sharing degree (num_rows) and the run length; GQA
(``g`` query heads per KV head) makes the partial traffic g times larger while the K/V saving is
unchanged, so high GQA ratios need more sharing; splitting a run fills the GPU but costs partial
traffic, which short runs shared by few rows cannot repay; ``num_sms`` sets how fast a single
chunk-first program can go relative to the whole GPU. The constants are defaults for an H100-class
GPU, not tuned on hardware (no GPU was measured when this was written).

`threshold` keeps the paper's rule for experiments: when set, a run is chunk-first iff
``num_rows > threshold`` (``threshold >= b`` gives the paged baseline).
"""

from __future__ import annotations

import dataclasses
import math

from chunkattn_jax.plan import GpuFill


@dataclasses.dataclass(frozen=True)
class CostModelPolicy:
  """`policy(num_rows, num_chunks) -> bool` for `build_plan`; see the module docstring.

  Attributes:
    group_size: g = h // h_kv, query heads per KV head.
    num_kv_heads: h_kv.
    head_dim: d.
    chunk_size: c.
    dtype_bytes: bytes per K/V element (2 for fp16/bf16).
    num_sms: streaming multiprocessors of the GPU (132 on H100 SXM).
    bandwidth_gbps: achievable HBM read bandwidth, GB/s.
    sm_bandwidth_ratio: how many times its fair share (bandwidth / num_sms) one SM can stream.
    max_chunks_per_item: G, as passed to build_plan.
    overhead_us: fixed cost of sending one run through chunk-first.
    threshold: if set, ignore the model and share iff num_rows > threshold.
  """

  group_size: int = 1
  num_kv_heads: int = 32
  head_dim: int = 128
  chunk_size: int = 64
  dtype_bytes: int = 2
  num_sms: int = 132
  bandwidth_gbps: float = 3350.0
  sm_bandwidth_ratio: float = 4.0
  max_chunks_per_item: int = 16
  overhead_us: float = 2.0
  threshold: int | None = None

  def __post_init__(self):
    for name in ("group_size", "num_kv_heads", "head_dim", "chunk_size", "dtype_bytes", "num_sms",
                 "max_chunks_per_item"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1: {getattr(self, name)=}")
    for name in ("bandwidth_gbps", "sm_bandwidth_ratio"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0: {getattr(self, name)=}")
    if self.overhead_us < 0:
      raise ValueError(f"overhead_us must be >= 0: {self.overhead_us=}")
    if self.threshold is not None and self.threshold < 1:
      raise ValueError(f"threshold must be >= 1: {self.threshold=}")

  @classmethod
  def for_shapes(cls, *, num_heads: int, num_kv_heads: int, head_dim: int, chunk_size: int,
                 dtype_bytes: int = 2, **kwargs) -> "CostModelPolicy":
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads must be a multiple of num_kv_heads: {num_heads=} {num_kv_heads=}")
    return cls(group_size=num_heads // num_kv_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
               chunk_size=chunk_size, dtype_bytes=dtype_bytes, **kwargs)

  @property
  def fill(self) -> GpuFill:
    """`build_plan`'s split target: two chunk-first programs per SM."""
    return GpuFill(num_kv_heads=self.num_kv_heads, group_size=self.group_size,
                   num_sms=self.num_sms)

  def pieces(self, num_rows: int, num_chunks: int) -> int:
    """Items a run is cut into when it alone is split to fill the GPU."""
    fill = self.fill
    want = -(-fill.min_programs // fill.programs_per_item(num_rows))
    return min(num_chunks, max(-(-num_chunks // self.max_chunks_per_item), want))

  def _kv_bytes(self, num_chunks: int) -> float:
    """K and V bytes of `num_chunks` chunks for one KV head."""
    return 2.0 * num_chunks * self.chunk_size * self.head_dim * self.dtype_bytes

  def estimate_us(self, num_rows: int, num_chunks: int) -> tuple[float, float]:
    """(t_chunk_first, t_sequence_first) in microseconds for one run."""
    bw = self.bandwidth_gbps * 1e3  # bytes per microsecond
    sm_bw = self.sm_bandwidth_ratio * bw / self.num_sms
    pieces = self.pieces(num_rows, num_chunks)
    t_seq = num_rows * self.num_kv_heads * self._kv_bytes(num_chunks) / bw
    t_read = max(self.num_kv_heads * self._kv_bytes(num_chunks) / bw,
                 self._kv_bytes(math.ceil(num_chunks / pieces)) / sm_bw)
    partial_bytes = (2.0 * num_rows * self.group_size * self.num_kv_heads * (self.head_dim + 1)
                     * 4 * pieces)
    t_chunk = t_read + partial_bytes / bw + self.overhead_us
    return t_chunk, t_seq

  def __call__(self, num_rows: int, num_chunks: int) -> bool:
    if num_rows < 2 or num_chunks < 1:
      return False
    if self.threshold is not None:
      return num_rows > self.threshold
    t_chunk, t_seq = self.estimate_us(num_rows, num_chunks)
    return t_chunk < t_seq
