"""Shared-prefix prefill: which sequences of one prefill call read which cached chunks together.

When several sequences of a prefill call start with the same cached chunks (a system prompt in
the tree's prefix cache), the Pallas prefill can attend all their new tokens to those chunks in
common row blocks (`pallas_kernels.prefill`, shared pass): each chunk's K/V is then read once per
block of `block_m` query rows of *all* the sequences, instead of once per block of each sequence.
This pays only where a sequence's own blocks are mostly empty, i.e. short suffixes with small
query groups (`T * g < block_m`): a 64-row block of one sequence with 16 new tokens and MHA is a
quarter full, and packing four such sequences into one block reads the prefix and runs its
products once instead of four times. The price is a second kernel and one fp32 partial state per
(new token, query head), written and read back.

`plan_prefill_sharing` decides per group of sequences with a byte count (per KV head):

* saved: `(blocks_alone - blocks_packed) * L * c * d * 2 * itemsize` of K/V, where `blocks_alone =
  sum_s ceil(num_tokens[s] / (block_m / g))` and `blocks_packed = ceil(sum_s num_tokens[s] * g /
  block_m)` (the shared pass packs the valid tokens of the item's sequences back to back);
* cost: `sum_s num_tokens[s] * g * (d + 1) * 4 * 2` partial bytes, plus `overhead_bytes` for the
  extra launch.

It shares iff saved > cost (FLOPs on the shared chunks shrink by the same factor as the blocks).
Groups are found on the paths themselves: sequences whose paths start with the same slot share a
tree node, so their longest common prefix is shared; a group whose members diverge early is
compared against its subgroups (split at the first differing chunk), and the better is kept. Only
chunks that precede every new token of the group qualify (cached chunks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["item_seqs", "item_num_seqs", "item_num_chunks",
                                "seq_shared_chunks"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PrefillSharing:
  """Shared-prefix work items of one prefill call (a pytree of int32 arrays).

  Attributes:
    item_seqs: `[I, M]` the sequences of item `i` are `item_seqs[i, :item_num_seqs[i]]`.
    item_num_seqs: `[I]`.
    item_num_chunks: `[I]` `L`, the item's chunks: the first `L` of each of its sequences' paths
      (0 = spare item).
    seq_shared_chunks: `[S]` `L` of the sequence's item, 0 if it is in none.
  """
  item_seqs: Any
  item_num_seqs: Any
  item_num_chunks: Any
  seq_shared_chunks: Any

  @property
  def num_items(self) -> int:
    return int(np.count_nonzero(np.asarray(self.item_num_chunks)))

  def kernel_kwargs(self) -> dict:
    """The keyword arguments of `pallas_kernels.prefill.prefill_attention`."""
    return dict(item_seqs=self.item_seqs, item_num_seqs=self.item_num_seqs,
                item_num_chunks=self.item_num_chunks, seq_shared_chunks=self.seq_shared_chunks)


@dataclasses.dataclass(frozen=True)
class SharingCost:
  """The shapes the byte count needs (per KV head).

  Attributes:
    group_size: g, query heads per KV head.
    head_dim: d.
    itemsize: bytes per K/V element (2 for fp16/bf16).
    block_m: query rows per program of the Pallas kernels (`PrefillConfig.block_m`).
    overhead_bytes: the extra launch and dependency, in bytes of memory traffic (default: ~2 us
      at 3.35 TB/s, spread over 32 KV heads).
  """
  group_size: int = 1
  head_dim: int = 128
  itemsize: int = 2
  block_m: int = 64
  overhead_bytes: float = 2e-6 * 3.35e12 / 32

  def blocks_alone(self, num_tokens) -> int:
    block_t = max(1, self.block_m // self.group_size)
    return int(sum(math.ceil(int(n) / block_t) for n in num_tokens))

  def blocks_packed(self, num_tokens) -> int:
    return math.ceil(sum(int(n) for n in num_tokens) * self.group_size / self.block_m)

  def value(self, num_tokens, num_chunks: int, chunk_size: int) -> float:
    """Bytes saved minus bytes added by sharing `num_chunks` chunks among sequences with
    `num_tokens` new tokens each."""
    saved_blocks = self.blocks_alone(num_tokens) - self.blocks_packed(num_tokens)
    saved = saved_blocks * num_chunks * chunk_size * self.head_dim * 2 * self.itemsize
    cost = (sum(int(n) for n in num_tokens) * self.group_size * (self.head_dim + 1) * 8
            + self.overhead_bytes)
    return saved - cost


def plan_prefill_sharing(positions, chunk_paths, num_tokens=None, *, chunk_size: int,
                         cost: SharingCost = SharingCost(), item_capacity: int | None = None
                         ) -> PrefillSharing | None:
  """Shared-prefix items for one prefill call, or None when sharing does not pay anywhere.

  Args:
    positions: int `[S, T]` positions of the new tokens (as `PrefillInputs`).
    chunk_paths: int `[S, Pc]` each sequence's pool slots, root to leaf.
    num_tokens: int `[S]` valid new tokens per sequence (default `T`); sequences with none take
      no part.
    chunk_size: c.
    cost: the byte count's shapes (`SharingCost`).
    item_capacity: pad the item arrays to this many items (default `max(1, S // 2)`, the most
      there can be), so jitted shapes depend only on `S`.

  Returns:
    `PrefillSharing` (NumPy int32 arrays) or None.
  """
  chunk_paths, positions = np.asarray(chunk_paths), np.asarray(positions, np.int64)
  S, T = positions.shape
  num_tokens = np.full(S, T) if num_tokens is None else np.asarray(num_tokens)
  valid = np.arange(T)[None, :] < num_tokens[:, None]
  first_pos = np.where(valid, positions, np.iinfo(np.int64).max).min(axis=1)
  # Chunks entirely before the sequence's first new token (cached), within the path.
  cached = np.where(num_tokens > 0, np.minimum(first_pos // chunk_size, chunk_paths.shape[1]), 0)

  def best(members: list[int], depth: int) -> tuple[float, list[tuple[list[int], int]]]:
    """The best items among `members`, whose paths agree on chunks [0, depth)."""
    limit = int(cached[members].min())
    paths = chunk_paths[members, :limit]
    same = (paths == paths[:1]).all(axis=0)
    L = depth + int(np.argmin(same[depth:])) if not same[depth:].all() else limit
    own = cost.value(num_tokens[members], L, chunk_size) if L > 0 else -math.inf
    parent = (own, [(members, L)]) if own > 0 else (0.0, [])
    # Subgroups: split at chunk L by slot (members whose cached prefix ends at L stay out).
    groups: dict[int, list[int]] = {}
    for s in members:
      if cached[s] > L:
        groups.setdefault(int(chunk_paths[s, L]), []).append(s)
    value, items = 0.0, []
    for sub in groups.values():
      if len(sub) >= 2 and sub != members:
        v, it = best(sub, L + 1)
        value, items = value + v, items + it
    return max(parent, (value, items), key=lambda x: x[0])

  groups: dict[int, list[int]] = {}
  for s in range(S):
    if cached[s] >= 1:
      groups.setdefault(int(chunk_paths[s, 0]), []).append(s)
  items = []
  for members in groups.values():
    if len(members) >= 2:
      items += best(members, 1)[1]
  if not items:
    return None
  cap = max(1, S // 2) if item_capacity is None else item_capacity
  if len(items) > cap:
    raise ValueError(f"{len(items)} shared-prefix items exceed item_capacity={cap}")
  item_seqs = np.zeros((cap, S), np.int32)
  item_num_seqs = np.zeros(cap, np.int32)
  item_num_chunks = np.zeros(cap, np.int32)
  seq_shared = np.zeros(S, np.int32)
  for i, (members, L) in enumerate(items):
    item_seqs[i, :len(members)] = members
    item_num_seqs[i] = len(members)
    item_num_chunks[i] = L
    seq_shared[members] = L
  return PrefillSharing(item_seqs, item_num_seqs, item_num_chunks, seq_shared)
