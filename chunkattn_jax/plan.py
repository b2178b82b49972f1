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

  Shapes: R rows, I shared items, G chunks per item, P private chunks per row, K items (partial
  slots) per row. I may be 0 (no shared items: the paged plan); then no chunk-first pass runs.
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
  item_slot: np.ndarray           # [I]
  length_delta: np.ndarray        # []
  chunk_size: int = dataclasses.field(metadata=dict(static=True))
  # Largest `item_row_end - item_row_begin`, padded to a power of two: sizes the chunk-first grid.
  item_rows_capacity: int = dataclasses.field(metadata=dict(static=True), default=1)

  @property
  def row_capacity(self) -> int:
    return self.row_seq_ids.shape[0]

  @property
  def item_capacity(self) -> int:
    return self.item_chunks.shape[0]

  @property
  def items_per_row(self) -> int:
    """K: partial slots per row."""
    return self.row_items.shape[1]

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


@dataclasses.dataclass(frozen=True)
class GpuFill:
  """How many chunk-first programs fill the GPU, and how many programs one shared item gets.

  The chunk-first pass runs one program per (item, KV head, block of `block_m` query rows), so an
  item covering `rows` rows gets `num_kv_heads * ceil(rows * group_size / block_m)` programs.
  `build_plan(fill=...)` splits shared runs until the plan has `programs_per_sm * num_sms`
  programs (where it has enough shared chunks). Defaults: an H100 SXM (132 SMs; the H200 too).
  """

  num_kv_heads: int
  group_size: int = 1
  block_m: int = 64
  num_sms: int = 132
  programs_per_sm: int = 2

  def __post_init__(self):
    for name in ("num_kv_heads", "group_size", "block_m", "num_sms", "programs_per_sm"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"GpuFill.{name} must be an int >= 1: {v!r}")

  @property
  def min_programs(self) -> int:
    return self.programs_per_sm * self.num_sms

  def programs_per_item(self, num_rows: int) -> int:
    return self.num_kv_heads * -(-num_rows * self.group_size // self.block_m)


def split_run(num_chunks: int, num_pieces: int) -> list[int]:
  """Sizes of `num_pieces` consecutive pieces of a run of `num_chunks`, as equal as possible."""
  base, extra = divmod(num_chunks, num_pieces)
  return [base + (p < extra) for p in range(num_pieces)]


def build_plan(tree: PrefixTree, *, threshold: int = 1, policy: SharingPolicy | None = None,
               max_chunks_per_item: int = 16, fill: GpuFill | None = None,
               min_row_capacity: int = MIN_ROW_CAPACITY) -> DecodePlan:
  """Flattens `tree` into a DecodePlan.

  Args:
    tree: the prefix tree.
    threshold: a chunk is shared (chunk-first) when more than `threshold` rows use it; a value
      >= the number of rows gives a plain paged plan. Ignored when `policy` is given.
    policy: optional `policy(num_rows, num_chunks) -> bool` deciding per run of chunks.
    max_chunks_per_item: `G`, the most chunks one shared work item (one chunk-first program per KV
      head) covers; a power of two.
    fill: split shared runs (each in proportion to its share of the chunk-first work) until the
      chunk-first pass has `fill.min_programs` programs, where there are enough shared chunks.
      Default: the policy's `fill` attribute if it has one (`CostModelPolicy` does); without
      one, runs are cut only at G chunks.
    min_row_capacity: the smallest row capacity `R`.

  Returns:
    The plan; arrays int32 NumPy with capacities padded to powers of two (I may be 0).
  """
  if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 1:
    raise ValueError(f"threshold must be an int >= 1 (a chunk used by one row is private): "
                     f"{threshold=}")
  g_cap = max_chunks_per_item
  if (isinstance(g_cap, bool) or not isinstance(g_cap, (int, np.integer)) or g_cap < 1
      or g_cap & (g_cap - 1)):
    raise ValueError(f"max_chunks_per_item must be a power of two >= 1: {max_chunks_per_item=}")
  if fill is None:
    fill = getattr(policy, "fill", None)
  if fill is not None and not isinstance(fill, GpuFill):
    raise ValueError(f"fill must be a GpuFill: {fill!r}")
  c = tree.chunk_size

  def shared(count: int, run_len: int) -> bool:
    if count < 2:
      return False
    return policy(count, run_len) if policy is not None else count > threshold

  rows: list = []              # _Seq per row
  row_private: list = []       # pool slots per row
  row_run: list[int] = []      # innermost shared run covering the row (-1: none)
  row_shared_chunks: list = []  # shared chunk count per row
  runs: list = []              # (slots, begin, end, parent run)
  priv_stack: list[int] = []
  run_stack: list[int] = []
  n_shared = 0

  # Explicit stack (paths may be thousands of chunks deep). Entries: a node to enter, or an int
  # tuple marker to undo what entering a run pushed.
  stack: list = [n for n in reversed(tree._iter_root_children()) if n.count]
  while stack:
    entry = stack.pop()
    if isinstance(entry, tuple):
      n_runs, n_priv, n_sh = entry
      del run_stack[len(run_stack) - n_runs:]
      del priv_stack[len(priv_stack) - n_priv:]
      n_shared -= n_sh
      continue
    node = entry
    if node.count == 1:
      # Fast path: one sequence below; the rest of its path is private.
      while not node.ending:
        node = next(ch for ch in node.children if ch.count)  # skip cached (count 0) chunks
      seq = node.ending[0]
      rows.append(seq)
      row_private.append(priv_stack + seq.slots[entry.depth:])
      row_run.append(run_stack[-1] if run_stack else -1)
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
      runs.append(([n.slot for n in run], begin, begin + node.count,
                   run_stack[-1] if run_stack else -1))
      run_stack.append(len(runs) - 1)
      marker = (1, 0, len(run))
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
      row_run.append(run_stack[-1] if run_stack else -1)
      row_shared_chunks.append(n_shared)

  # Cut every run into items: at most G chunks each, and (with `fill`) into
  # ceil(min_programs * L / W) pieces, W = sum over runs of L * programs_per_item(rows): every
  # run's share of the programs follows its share of the work, and the plan reaches min_programs
  # programs where it has the chunks. An item's slot (its position in the item list of each row
  # it covers) is the same for all its rows.
  work = sum(len(slots) * fill.programs_per_item(end - begin)
             for slots, begin, end, _ in runs) if fill else 0
  items: list = []  # (slots, begin, end, slot)
  run_first_item: list[int] = []
  run_num_items: list[int] = []
  run_end_slot: list[int] = []  # slots used by the run and its ancestors
  for slots, begin, end, parent in runs:
    n = len(slots)
    pieces = -(-n // g_cap)
    if fill:
      pieces = min(n, max(pieces, -(-fill.min_programs * n // work)))
    first_slot = run_end_slot[parent] if parent >= 0 else 0
    run_first_item.append(len(items))
    run_num_items.append(pieces)
    run_end_slot.append(first_slot + pieces)
    at = 0
    for p, size in enumerate(split_run(n, pieces)):
      items.append((slots[at:at + size], begin, end, first_slot + p))
      at += size

  b = len(rows)
  r_cap = bucket(b, min_row_capacity)
  p_cap = bucket(max((len(p) for p in row_private), default=1))
  k_cap = bucket(max((run_end_slot[r] for r in row_run if r >= 0), default=1))
  i_cap = bucket(len(items)) if items else 0

  row_seq_ids = np.full(r_cap, -1, np.int32)
  row_private_chunks = np.zeros((r_cap, p_cap), np.int32)
  row_private_len = np.zeros(r_cap, np.int32)
  row_items = np.zeros((r_cap, k_cap), np.int32)
  row_num_items = np.zeros(r_cap, np.int32)
  for r, (seq, priv, run, n_sh) in enumerate(zip(rows, row_private, row_run, row_shared_chunks)):
    row_seq_ids[r] = seq.seq_id
    row_private_chunks[r, :len(priv)] = priv
    row_private_len[r] = seq.length - c * n_sh
    if run >= 0:
      row_num_items[r] = run_end_slot[run]
      while run >= 0:  # the run's items, then its ancestors' (slots are global positions)
        first, count = run_first_item[run], run_num_items[run]
        slot0 = run_end_slot[run] - count
        row_items[r, slot0:slot0 + count] = np.arange(first, first + count)
        run = runs[run][3]

  item_chunks = np.zeros((i_cap, g_cap), np.int32)
  item_num_chunks = np.zeros(i_cap, np.int32)
  item_row_begin = np.zeros(i_cap, np.int32)
  item_row_end = np.zeros(i_cap, np.int32)
  item_slot = np.zeros(i_cap, np.int32)
  for i, (slots, begin, end, slot) in enumerate(items):
    item_chunks[i, :len(slots)] = slots
    item_num_chunks[i] = len(slots)
    item_row_begin[i], item_row_end[i] = begin, end
    item_slot[i] = slot

  return DecodePlan(
      num_rows=np.asarray(b, np.int32), row_seq_ids=row_seq_ids,
      row_private_chunks=row_private_chunks, row_private_len=row_private_len,
      row_items=row_items, row_num_items=row_num_items, item_chunks=item_chunks,
      item_num_chunks=item_num_chunks, item_row_begin=item_row_begin, item_row_end=item_row_end,
      item_slot=item_slot, length_delta=np.asarray(0, np.int32), chunk_size=c,
      item_rows_capacity=bucket(max((end - begin for _, begin, end, _ in items), default=1)))


def plan_capacities(plan: DecodePlan) -> tuple[int, int, int, int, int]:
  """The plan's capacities `(R, P, K, I, M)`: rows, private chunks per row, items per row, items,
  `item_rows_capacity`. Two plans with equal capacities (and G) have equal array shapes."""
  return (plan.row_capacity, plan.row_private_chunks.shape[1], plan.items_per_row,
          plan.item_capacity, plan.item_rows_capacity)


def pad_plan(plan: DecodePlan, capacities) -> DecodePlan:
  """The same plan with capacities raised to `capacities` `(R, P, K, I, M)` (each entry at least
  the plan's own; powers of two; shorter tuples leave the rest as they are). Spare entries are
  inert (spare rows, spare items, unused slots), so attention over the padded plan is unchanged;
  a jitted step over padded plans recompiles only when a capacity exceeds every earlier one."""
  have = plan_capacities(plan)
  want = tuple(capacities) + have[len(tuple(capacities)):]
  for name, a, b in zip(("R", "P", "K", "I", "M"), have, want):
    if b < a or not (b == 0 or b & (b - 1) == 0):
      raise ValueError(f"capacity {name}={b} must be a power of two >= the plan's {a}")
  if want == have:
    return plan
  r, p, k, i, m = want

  def pad(a, shape, fill=0):
    out = np.full(shape, fill, np.int32)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out

  return dataclasses.replace(
      plan, row_seq_ids=pad(plan.row_seq_ids, (r,), -1),
      row_private_chunks=pad(plan.row_private_chunks, (r, p)),
      row_private_len=pad(plan.row_private_len, (r,)),
      row_items=pad(plan.row_items, (r, k)), row_num_items=pad(plan.row_num_items, (r,)),
      item_chunks=pad(plan.item_chunks, (i, plan.item_chunks.shape[1])),
      item_num_chunks=pad(plan.item_num_chunks, (i,)),
      item_row_begin=pad(plan.item_row_begin, (i,)), item_row_end=pad(plan.item_row_end, (i,)),
      item_slot=pad(plan.item_slot, (i,)), item_rows_capacity=m)


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
    shared_tokens = np.zeros(p.row_capacity, np.int64)
    if p.item_capacity:
      in_row = np.arange(p.items_per_row)[None, :] < p.row_num_items[:, None]
      shared_tokens = p.chunk_size * (p.item_num_chunks[p.row_items] * in_row).sum(axis=1)
    lengths = np.asarray([self.tree.length(int(s)) for s in p.row_seq_ids[:b]], np.int64)
    out = np.zeros_like(p.row_private_len)
    out[:b] = lengths - shared_tokens[:b]
    return out
