"""Host-side chunk pool: a fixed set of chunk slots, a free list and reference counts.

The pool only does bookkeeping; the K/V bytes live in device arrays indexed by the same slots
(`k_pool[slot, :, offset, :]`, see docs/design.md). One pool serves every layer.
"""

from __future__ import annotations

import weakref

import numpy as np

from chunkattn_jax.checks import is_int


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
    if not is_int(capacity) or capacity < 1:
      raise ValueError(f"pool capacity must be a positive integer, got {capacity!r}")
    self._capacity = int(capacity)
    order = np.arange(self._capacity - 1, -1, -1)  # a stack: pop() hands out slot 0 first
    if seed is not None:
      np.random.default_rng(seed).shuffle(order)
    self._free: list[int] = order.tolist()
    self._refcount = np.zeros(self._capacity, np.int64)
    self._owner = None  # weak reference to the one PrefixTree managing these slots

  def claim(self, owner) -> None:
    """Makes `owner` (a `PrefixTree`) the only manager of this pool's slots.

    Two trees over one pool would hand out each other's slots, so a pool can be claimed once, and
    only while every slot is free (a tree must account for every slot in use).

    Raises:
      ValueError: another live owner holds the pool, or some slots are already in use.
    """
    current = self._owner() if self._owner is not None else None
    if current is not None and current is not owner:
      raise ValueError(f"this ChunkPool already belongs to another {type(current).__name__}; "
                       f"give each tree its own pool")
    if current is None and self.num_used:
      raise ValueError(f"a tree needs an empty ChunkPool, but {self.num_used} of its "
                       f"{self._capacity} slots are in use")
    self._owner = weakref.ref(owner)

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
    if not is_int(n):
      raise ValueError(f"allocate needs an integer count, got {n!r}")
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
    if not is_int(slot):
      raise ValueError(f"chunk slot must be an integer, got {slot!r}")
    if not 0 <= slot < self._capacity:
      raise ValueError(f"chunk slot {slot} out of range [0, {self._capacity})")

  def _check_held(self, slot: int) -> None:
    self._check_slot(slot)
    if self._refcount[slot] == 0:
      raise ValueError(f"chunk slot {slot} is free")
