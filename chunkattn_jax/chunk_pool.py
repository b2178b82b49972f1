"""Host-side chunk pool: a fixed set of chunk slots, a free list and reference counts.

The pool only does bookkeeping; the K/V bytes live in device arrays indexed by the same slots
(`k_pool[slot, :, offset, :]`, see docs/design.md). One pool serves every layer.
"""

from __future__ import annotations

import numpy as np


class PoolExhaustedError(RuntimeError):
  """Raised when the pool has fewer free chunk slots than an operation needs.

  The operation that raised it allocated nothing: the pool and the tree are unchanged.
  """

  def __init__(self, needed: int, free: int, capacity: int):
    self.needed, self.free, self.capacity = needed, free, capacity
    super().__init__(
        f"chunk pool exhausted: needed {needed} chunk slot(s), {free} free of {capacity}")


class ChunkPool:
  """`capacity` chunk slots `0 .. capacity-1`, each free or held with a reference count >= 1.

  Args:
    capacity: number of chunk slots (`n_chunks`), >= 1.
    seed: if given, the free list starts in a random order (tests use it so nothing relies on
      slots being handed out in order); otherwise slots are handed out 0, 1, 2, ...
  """

  def __init__(self, capacity: int, *, seed: int | None = None):
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
      raise ValueError(f"pool capacity must be a positive integer, got {capacity!r}")
    self._capacity = int(capacity)
    order = np.arange(self._capacity - 1, -1, -1)  # a stack: pop() hands out slot 0 first
    if seed is not None:
      np.random.default_rng(seed).shuffle(order)
    self._free: list[int] = order.tolist()
    self._refcount = np.zeros(self._capacity, np.int64)

  @property
  def capacity(self) -> int:
    return self._capacity

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return self._capacity - len(self._free)

  def refcount(self, slot: int) -> int:
    self._check_slot(slot)
    return int(self._refcount[slot])

  def allocate(self, n: int) -> list[int]:
    """Takes `n` free slots, each with reference count 1; all or nothing."""
    if n < 0:
      raise ValueError(f"cannot allocate a negative number of chunks: {n}")
    if n > len(self._free):
      raise PoolExhaustedError(n, len(self._free), self._capacity)
    slots = [self._free.pop() for _ in range(n)]
    self._refcount[slots] = 1
    return slots

  def incref(self, slot: int) -> None:
    self._check_held(slot)
    self._refcount[slot] += 1

  def decref(self, slot: int) -> bool:
    """Drops one reference; returns True when that freed the slot."""
    self._check_held(slot)
    self._refcount[slot] -= 1
    if self._refcount[slot] == 0:
      self._free.append(slot)
      return True
    return False

  def snapshot(self) -> tuple:
    """A hashable copy of the whole state, for tests that check a failed call changed nothing."""
    return (tuple(self._free), tuple(self._refcount.tolist()))

  def _check_slot(self, slot: int) -> None:
    if not 0 <= slot < self._capacity:
      raise ValueError(f"chunk slot {slot} out of range [0, {self._capacity})")

  def _check_held(self, slot: int) -> None:
    self._check_slot(slot)
    if self._refcount[slot] == 0:
      raise ValueError(f"chunk slot {slot} is free")
