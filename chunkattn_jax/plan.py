"""The decode plan (the paper's "kernel context"): the prefix tree flattened into int32 arrays.

Format, capacities and the sharing/grouping rules are specified in docs/design.md section 3; the
kernels in `pallas_kernels/` are written against it. Capacities are padded to powers of two so a
jitted kernel recompiles only when a capacity crosses a power of two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn_jax.prefix_tree import PrefixTree

MIN_ROW_CAPACITY = 8

# policy(num_rows, num_chunks) -> True if a run of `num_chunks` chunks shared by `num_rows` rows
# should go through the chunk-first pass.
SharingPolicy = Callable[[int, int], bool]


def bucket(n: int, minimum: int = 1) -> int:
  """Smallest power of two >= max(n, minimum)."""
  n = max(int(n), minimum, 1)
  return 1 << (n - 1).bit_length()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """Kernel context for one decode step. All arrays int32; see docs/design.md for the fields.

  Shapes: R rows, I shared items, G chunks per item, P private chunks per row, K items per row.
  """

  num_rows: np.ndarray            # []
  row_seq_ids: np.ndarray         # [R]
  row_private_chunks: np.ndarray  # [R, P]
  row_private_len: np.ndarray     # [R]
  row_items: np.ndarray           # [R, K]
  row_num_items: np.ndarray       # [R]
  item_chunks: np.ndarray         # [I, G]
  item_num_chunks: np.ndarray     # [I]
  item_row_begin: np.ndarray      # [I]
  item_row_end: np.ndarray        # [I]
  item_partial_offset: np.ndarray  # [I]
  length_delta: np.ndarray        # []
  chunk_size: int = dataclasses.field(metadata=dict(static=True))
  partial_capacity: int = dataclasses.field(metadata=dict(static=True))
  # Largest `item_row_end - item_row_begin`, padded to a power of two: sizes the chunk-first grid.
  item_rows_capacity: int = dataclasses.field(metadata=dict(static=True), default=1)

  @property
  def row_capacity(self) -> int:
    return self.row_seq_ids.shape[0]

  @property
  def item_capacity(self) -> int:
    return self.item_chunks.shape[0]

  def private_lengths(self):
    """int32 [R]: tokens in each row's private chunks now (`row_private_len + length_delta` for
    live rows, 0 for spare rows). Works on NumPy and traced arrays."""
    xnp = np if isinstance(self.row_private_len, np.ndarray) else jnp
    live = xnp.arange(self.row_capacity) < self.num_rows
    return xnp.where(live, self.row_private_len + self.length_delta, 0).astype(np.int32)

  def num_shared_items(self) -> int:
    return int(np.count_nonzero(np.asarray(self.item_num_chunks)))

  def rows_of(self, seq_ids) -> np.ndarray:
    """int32 [len(seq_ids)]: the plan row of each sequence id."""
    index = {int(s): r for r, s in enumerate(np.asarray(self.row_seq_ids)[: int(self.num_rows)])}
    return np.asarray([index[int(s)] for s in seq_ids], np.int32)


def build_plan(tree: PrefixTree, *, threshold: int = 1, policy: SharingPolicy | None = None,
               max_chunks_per_item: int = 16, min_row_capacity: int = MIN_ROW_CAPACITY
               ) -> DecodePlan:
  """Flattens `tree` into a DecodePlan.

  Args:
    tree: the prefix tree.
    threshold: a chunk is shared (chunk-first) when more than `threshold` rows use it; a value
      >= the number of rows gives a plain paged plan. Ignored when `policy` is given.
    policy: optional `policy(num_rows, num_chunks) -> bool` deciding per run of chunks.
    max_chunks_per_item: `G`, the most chunks one shared work item (one chunk-first program per KV
      head) covers; a power of two.
    min_row_capacity: the smallest row capacity `R`.

  Returns:
    The plan; arrays int32 NumPy with capacities padded to powers of two.
  """
  if threshold < 1:
    raise ValueError(f"threshold must be >= 1 (a chunk used by one row is private), got {threshold}")
  g_cap = max_chunks_per_item
  if g_cap < 1 or g_cap & (g_cap - 1):
    raise ValueError(f"max_chunks_per_item must be a power of two, got {max_chunks_per_item}")
  c = tree.chunk_size

  def shared(count: int, run_len: int) -> bool:
    if count < 2:
      return False
    return policy(count, run_len) if policy is not None else count > threshold

  rows: list = []            # _Seq per row
  row_private: list = []     # pool slots per row
  row_items: list = []       # item indices per row
  row_shared_chunks: list = []  # shared chunk count per row
  items: list = []           # (slots, begin, end)
  priv_stack: list[int] = []
  item_stack: list[int] = []
  n_shared = 0

  # Explicit stack (paths may be thousands of chunks deep). Entries: a node to enter, or an int
  # tuple marker to undo what entering a run pushed.
  stack: list = [n for n in reversed(tree._iter_root_children()) if n.count]
  while stack:
    entry = stack.pop()
    if isinstance(entry, tuple):
      n_items, n_priv, n_sh = entry
      del item_stack[len(item_stack) - n_items:]
      del priv_stack[len(priv_stack) - n_priv:]
      n_shared -= n_sh
      continue
    node = entry
    if node.count == 1:
      # Fast path: one sequence below; the rest of its path is private.
      while not node.ending:
        node = next(ch for ch in node.children if ch.count)  # skip cached (count 0) chunks
      seq = node.ending[0]
      depth = entry.depth
      rows.append(seq)
      row_private.append(priv_stack + seq.slots[depth:])
      row_items.append(list(item_stack))
      row_shared_chunks.append(n_shared)
      continue
    run = [node]
    while not run[-1].ending:
      live = [ch for ch in run[-1].children if ch.count]
      if len(live) != 1:
        break
      run.append(live[0])
    begin = len(rows)
    if shared(node.count, len(run)):
      slots = [n.slot for n in run]
      for i in range(0, len(slots), g_cap):
        item_stack.append(len(items))
        items.append((slots[i:i + g_cap], begin, begin + node.count))
      marker = (-(-len(slots) // g_cap), 0, len(run))
      n_shared += len(run)
    else:
      priv_stack.extend(n.slot for n in run)
      marker = (0, len(run), 0)
    stack.append(marker)
    last = run[-1]
    stack.extend(ch for ch in reversed(last.children) if ch.count)
    for seq in last.ending:
      rows.append(seq)
      row_private.append(list(priv_stack))
      row_items.append(list(item_stack))
      row_shared_chunks.append(n_shared)

  b = len(rows)
  r_cap = bucket(b, min_row_capacity)
  p_cap = bucket(max((len(p) for p in row_private), default=1))
  k_cap = bucket(max((len(k) for k in row_items), default=1))
  i_cap = bucket(len(items))

  row_seq_ids = np.full(r_cap, -1, np.int32)
  row_private_chunks = np.zeros((r_cap, p_cap), np.int32)
  row_private_len = np.zeros(r_cap, np.int32)
  row_items_arr = np.zeros((r_cap, k_cap), np.int32)
  row_num_items = np.zeros(r_cap, np.int32)
  for r, (seq, priv, its, n_sh) in enumerate(zip(rows, row_private, row_items, row_shared_chunks)):
    row_seq_ids[r] = seq.seq_id
    row_private_chunks[r, :len(priv)] = priv
    row_private_len[r] = seq.length - c * n_sh
    row_items_arr[r, :len(its)] = its
    row_num_items[r] = len(its)

  item_chunks = np.zeros((i_cap, g_cap), np.int32)
  item_num_chunks = np.zeros(i_cap, np.int32)
  item_row_begin = np.zeros(i_cap, np.int32)
  item_row_end = np.zeros(i_cap, np.int32)
  item_partial_offset = np.zeros(i_cap, np.int32)
  offset = 0
  for i, (slots, begin, end) in enumerate(items):
    item_chunks[i, :len(slots)] = slots
    item_num_chunks[i] = len(slots)
    item_row_begin[i], item_row_end[i] = begin, end
    item_partial_offset[i] = offset
    offset += end - begin

  return DecodePlan(
      num_rows=np.asarray(b, np.int32), row_seq_ids=row_seq_ids,
      row_private_chunks=row_private_chunks, row_private_len=row_private_len,
      row_items=row_items_arr, row_num_items=row_num_items, item_chunks=item_chunks,
      item_num_chunks=item_num_chunks, item_row_begin=item_row_begin, item_row_end=item_row_end,
      item_partial_offset=item_partial_offset, length_delta=np.asarray(0, np.int32),
      chunk_size=c, partial_capacity=bucket(offset),
      item_rows_capacity=bucket(max((end - begin for _, begin, end in items), default=1)))


class PlanBuilder:
  """Caches a tree's plan: rebuilds only when the structure changes.

  Between rebuilds, if every row appended the same number of tokens, the cached plan is returned
  with `length_delta` set (one scalar); otherwise only `row_private_len` is re-read (O(b)).

  Args:
    tree: the prefix tree to follow.
    **plan_kwargs: forwarded to `build_plan` (threshold, policy, max_chunks_per_item, ...).
  """

  def __init__(self, tree: PrefixTree, **plan_kwargs):
    self.tree = tree
    self.plan_kwargs = plan_kwargs
    self._plan: DecodePlan | None = None
    self._key = None  # (structure_version, length_epoch) the cached lengths belong to
    self._base_delta = 0
    self.num_rebuilds = 0
    self.num_length_rereads = 0

  def plan(self) -> DecodePlan:
    t = self.tree
    if self._plan is None or self._key[0] != t.structure_version:
      self._plan = build_plan(t, **self.plan_kwargs)
      self.num_rebuilds += 1
    elif self._key[1] != t.length_epoch:
      self._plan = dataclasses.replace(self._plan, row_private_len=self._reread_lengths(),
                                       length_delta=np.asarray(0, np.int32))
      self.num_length_rereads += 1
    else:
      delta = t.uniform_delta - self._base_delta
      if delta != int(self._plan.length_delta):
        self._plan = dataclasses.replace(self._plan, length_delta=np.asarray(delta, np.int32))
      return self._plan
    self._key = (t.structure_version, t.length_epoch)
    self._base_delta = t.uniform_delta
    return self._plan

  def _reread_lengths(self) -> np.ndarray:
    p = self._plan
    b = int(p.num_rows)
    k = p.row_items.shape[1]
    in_row = np.arange(k)[None, :] < p.row_num_items[:, None]
    shared_tokens = p.chunk_size * (p.item_num_chunks[p.row_items] * in_row).sum(axis=1)
    lengths = np.asarray([self.tree.length(int(s)) for s in p.row_seq_ids[:b]], np.int64)
    out = np.zeros_like(p.row_private_len)
    out[:b] = lengths - shared_tokens[:b]
    return out
