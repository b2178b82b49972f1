"""Prefix tree of fixed-size token chunks: the host-side half of ChunkAttention's KV cache.

Sequences whose prompts start with the same full chunks share the same pool slots. One tree maps
token positions to pool slots for every layer. Invariants and the row order are stated in
docs/design.md section 2; `PrefixTree.check_invariants` verifies them.

Every mutating operation validates its whole input and reserves its pool slots before it changes
anything, so a call that raises leaves the tree and the pool exactly as they were.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from chunkattn_jax.checks import check_bool, is_int
from chunkattn_jax.chunk_pool import ChunkPool, PoolExhaustedError

MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 2, 256


class UnknownSequenceError(KeyError):
  """A sequence id that was never issued or has been removed."""

  def __str__(self) -> str:  # KeyError would print the repr of the message
    return str(self.args[0])


class _Node:
  """One chunk: up to `c` token ids stored in one pool slot."""

  __slots__ = ("slot", "tokens", "parent", "children", "full_children", "ending", "count", "depth")

  def __init__(self, slot: int, tokens: list[int], parent: _Node | None, depth: int):
    self.slot = slot
    self.tokens = tokens
    self.parent = parent
    self.children: list[_Node] = []  # insertion order == depth-first row order
    self.full_children: dict[tuple[int, ...], _Node] = {}  # prefix matching index
    self.ending: list[_Seq] = []  # sequences whose path ends here, in insertion order
    self.count = 0  # live sequences whose path contains this node (0: a cached chunk)
    self.depth = depth  # index of this node in its sequences' paths (-1 for the root)


class _Seq:
  __slots__ = ("seq_id", "path", "slots", "length")

  def __init__(self, seq_id: int, path: list[_Node], length: int):
    self.seq_id = seq_id
    self.path = path
    self.slots = [n.slot for n in path]  # kept in step with `path` for fast plan builds
    self.length = length


@dataclasses.dataclass(frozen=True)
class InsertResult:
  """What `PrefixTree.insert` did.

  Attributes:
    seq_id: the new sequence's id (stable for its lifetime).
    num_cached: leading tokens whose K/V is already in the pool (a multiple of the chunk size).
    slots: int32 [n - num_cached, 2]: (pool slot, offset in chunk) where the K/V of each new token,
      in order, must be written.
  """

  seq_id: int
  num_cached: int
  slots: np.ndarray


def _as_token_list(tokens, what: str) -> list[int]:
  """Validates a 1-D sequence of non-negative integer token ids; returns it as a list of int."""
  if isinstance(tokens, (str, bytes)):
    raise ValueError(f"{what}: tokens must be a sequence of integers, got a string {tokens!r}")
  try:
    arr = np.asarray(tokens)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what}: tokens must be a 1-D sequence of integers ({e})") from None
  if arr.ndim != 1:
    raise ValueError(f"{what}: tokens must be 1-D, got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{what}: empty token list")
  if arr.dtype.kind not in "iu" or any(isinstance(t, (bool, np.bool_)) for t in tokens):
    bad = next((t for t in tokens if isinstance(t, (bool, np.bool_))
                or not isinstance(t, (int, np.integer))), tokens)
    raise ValueError(f"{what}: tokens must be integers, got {bad!r} (dtype {arr.dtype})")
  if arr.min() < 0:
    raise ValueError(f"{what}: tokens must be non-negative, got {int(arr.min())}")
  return arr.tolist()


def check_chunk_size(chunk_size) -> int:
  """Validates a chunk size (a power of two in [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]); returns it."""
  if (not is_int(chunk_size)
      or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1)):
    raise ValueError(
        f"chunk_size must be a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}] "
        f"(the paper's experiments use 64), got {chunk_size!r}")
  return int(chunk_size)


def _check_min_new_tokens(min_new_tokens, n: int) -> None:
  if not is_int(min_new_tokens) or not 0 <= min_new_tokens <= n:
    raise ValueError(f"min_new_tokens must be an integer in [0, {n}], got {min_new_tokens!r}")


class PrefixTree:
  """A forest of token chunks shared by prefix; see docs/design.md section 2.

  Prefix cache: with `keep_cached=True` (per tree, or per `remove` call) the full chunks of a
  removed sequence stay in the tree as *cached* chunks (no live sequence; the tree holds their pool
  slot) so that a later insert with the same prefix reuses their K/V. Cached chunks are evicted
  least-recently-used, leaves first, whenever an insert or append needs more slots than are free;
  they never appear as plan rows.

  Args:
    pool: the ChunkPool whose slots hold the chunks (empty, and used by no other tree), or an
      int capacity to create one.
    chunk_size: tokens per chunk `c`, a power of two in [2, 256] (16..256 for the GPU kernels;
      tests use smaller powers of two to make golden shapes readable).
    keep_cached: default for `remove(..., keep_cached=)`.
  """

  def __init__(self, pool: ChunkPool | int, chunk_size: int, *, keep_cached: bool = False):
    self.chunk_size = check_chunk_size(chunk_size)
    keep_cached = check_bool(keep_cached, "keep_cached")
    pool = pool if isinstance(pool, ChunkPool) else ChunkPool(pool)
    pool.claim(self)  # raises (before any change) if another tree manages the pool
    self.pool = pool
    self.keep_cached = keep_cached
    # Cached (count 0) nodes in eviction order. A node enters when its last sequence leaves,
    # deepest first, so every node comes after all of its cached descendants: the front is always a
    # leaf.
    self._lru: collections.OrderedDict[int, _Node] = collections.OrderedDict()
    self.num_evictions = 0  # cached chunks evicted so far
    self._root = _Node(-1, [], None, -1)
    self._seqs: dict[int, _Seq] = {}
    self._next_id = 0
    self.structure_version = 0  # bumped when rows or chunk paths change
    # Plans cached between structure changes track lengths with one scalar: `uniform_delta` counts
    # the tokens appended to every live row equally; an append that touches only some rows, or
    # unequal counts, starts a new `length_epoch` (cached plans then re-read every row's length).
    self.length_epoch = 0
    self.uniform_delta = 0

  # ---------------------------------------------------------------- queries
  def __len__(self) -> int:
    return len(self._seqs)

  def __contains__(self, seq_id) -> bool:
    return is_int(seq_id) and seq_id in self._seqs

  def seq_ids(self) -> list[int]:
    """Live sequence ids in row (depth-first leaf) order."""
    out: list[int] = []
    stack = list(reversed(self._root.children))
    while stack:
      node = stack.pop()
      if node.count:  # cached subtrees hold no sequences
        out.extend(s.seq_id for s in node.ending)
        stack.extend(reversed(node.children))
    return out

  def tokens(self, seq_id: int) -> list[int]:
    seq = self._get(seq_id)
    return [t for node in seq.path for t in node.tokens]

  def length(self, seq_id: int) -> int:
    return self._get(seq_id).length

  def chunk_path(self, seq_id: int) -> list[int]:
    """Pool slots of the sequence's chunks, root to leaf."""
    return list(self._get(seq_id).slots)

  def num_shared_chunks(self, seq_id: int) -> int:
    """Chunks on the sequence's path that other live sequences also use."""
    return sum(1 for n in self._get(seq_id).path if n.count > 1)

  def match_length(self, tokens: Sequence[int]) -> int:
    """How many leading tokens of `tokens` an insert would find cached (no change to the tree)."""
    return self._match(_as_token_list(tokens, "match_length"))[1]

  def chunks_needed(self, num_tokens: int, num_cached: int = 0) -> int:
    c = self.chunk_size
    return -(-(num_tokens - num_cached) // c)

  @property
  def num_cached_chunks(self) -> int:
    """Chunks kept only by the prefix cache (evictable)."""
    return len(self._lru)

  @property
  def num_available_chunks(self) -> int:
    """Slots an insert or append can get: free slots plus evictable cached chunks."""
    return self.pool.num_free + len(self._lru)

  def can_insert(self, tokens: Sequence[int], *, min_new_tokens: int = 0) -> bool:
    """Whether `insert(tokens, min_new_tokens=...)` would find room (no change to the tree)."""
    toks = _as_token_list(tokens, "can_insert")
    _check_min_new_tokens(min_new_tokens, len(toks))
    node, num_cached = self._match(toks, len(toks) - min_new_tokens)
    reused = sum(1 for n in self._path_to(node) if n.count == 0)
    return self.chunks_needed(len(toks), num_cached) <= self.num_available_chunks - reused

  def cached_slots(self) -> list[int]:
    """Pool slots of cached chunks, least recently used first."""
    return [n.slot for n in self._lru.values()]

  def evict_cached(self, n: int | None = None) -> list[int]:
    """Evicts up to `n` (default all) cached chunks, least recently used first; returns the slots.

    Raises:
      ValueError: `n` is not None or a non-negative integer.
    """
    if n is not None and (not is_int(n) or n < 0):
      raise ValueError(f"evict_cached: n must be None or an integer >= 0, got {n!r}")
    n = len(self._lru) if n is None else min(int(n), len(self._lru))
    freed = []
    for _ in range(n):
      _, node = self._lru.popitem(last=False)
      assert not node.children, "LRU front must be a leaf"
      self.pool.decref(node.slot)
      self._unlink(node)
      freed.append(node.slot)
    self.num_evictions += n
    return freed

  # ---------------------------------------------------------------- mutations
  def insert(self, tokens: Sequence[int], *, min_new_tokens: int = 0) -> InsertResult:
    """Adds a sequence, sharing the longest matching run of full chunks.

    Args:
      tokens: the sequence's token ids (non-empty, non-negative integers).
      min_new_tokens: match at most `len(tokens) - min_new_tokens` tokens, so that a caller that
        needs the last prompt token's output (an engine's prefill) always has it computed.

    Returns:
      InsertResult(seq_id, num_cached, slots int32 [len(tokens) - num_cached, 2]).

    Raises:
      ValueError: malformed tokens or min_new_tokens.
      PoolExhaustedError: not enough free chunks for the unmatched tokens (nothing allocated).
    """
    toks = _as_token_list(tokens, "insert")
    _check_min_new_tokens(min_new_tokens, len(toks))
    node, num_cached = self._match(toks, len(toks) - min_new_tokens)
    c = self.chunk_size
    path = self._path_to(node)
    revived = [n for n in path if n.count == 0]  # cached chunks this insert brings back to life
    self._reserve(self.chunks_needed(len(toks), num_cached), exclude=revived)  # may raise
    for n in revived:
      del self._lru[id(n)]  # the cache's pool reference passes to the new sequence
    new_slots = self._allocate(self.chunks_needed(len(toks), num_cached))
    for n in path:
      if n.count:
        self.pool.incref(n.slot)
      n.count += 1
    parent = node
    for i, slot in enumerate(new_slots):
      chunk_tokens = toks[num_cached + i * c: num_cached + (i + 1) * c]
      child = _Node(slot, chunk_tokens, parent, parent.depth + 1)
      child.count = 1
      parent.children.append(child)
      if len(chunk_tokens) == c:
        parent.full_children[tuple(chunk_tokens)] = child  # key is free: matching stopped here
      path.append(child)
      parent = child
    seq = _Seq(self._next_id, path, len(toks))
    self._next_id += 1
    parent.ending.append(seq)
    self._seqs[seq.seq_id] = seq
    self._structure_changed()
    offsets = np.arange(num_cached, len(toks), dtype=np.int32)
    slots = np.stack([np.asarray(seq.slots, np.int32)[offsets // c], offsets % c], axis=1)
    return InsertResult(seq.seq_id, num_cached, slots.reshape(-1, 2))

  def append(self, seq_id: int, tokens: Sequence[int]) -> np.ndarray:
    """Appends tokens to one sequence; returns int32 [len(tokens), 2] (slot, offset)."""
    return self.append_many({seq_id: tokens})[seq_id]

  def append_many(self, new_tokens: Mapping[int, Sequence[int]]) -> dict[int, np.ndarray]:
    """Appends tokens to several sequences at once, all or nothing.

    Args:
      new_tokens: {seq_id: token ids}; each list non-empty; any number of tokens per sequence.

    Returns:
      {seq_id: int32 [len(tokens), 2]} (pool slot, offset in chunk) for each new token.
    """
    if not new_tokens:
      raise ValueError("append_many: no sequences given")
    seqs = [self._get(sid) for sid in new_tokens]
    lists = [_as_token_list(t, f"append to sequence {sid}") for sid, t in new_tokens.items()]
    self._reserve(sum(self._chunks_for_append(s, len(t)) for s, t in zip(seqs, lists)))
    out = {}
    for seq, toks in zip(seqs, lists):
      out[seq.seq_id] = np.asarray([self._append_one(seq, t) for t in toks], np.int32)
    self._note_appends([len(t) for t in lists], len(seqs))
    return out

  def append_tokens(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """Decode-step fast path: one token for each listed sequence.

    Args:
      seq_ids: [n] distinct live sequence ids.
      tokens: [n] one token id per sequence.

    Returns:
      int32 [n, 2]: (pool slot, offset in chunk) of each new token, in the order of `seq_ids`.
    """
    if len(seq_ids) != len(tokens):
      raise ValueError(f"append_tokens: {len(seq_ids)} sequence ids but {len(tokens)} tokens")
    if not seq_ids:
      raise ValueError("append_tokens: no sequences given")
    toks = _as_token_list(tokens, "append_tokens")
    seqs = [self._get(sid) for sid in seq_ids]
    if len(set(seq_ids)) != len(seq_ids):
      raise ValueError(f"append_tokens: repeated sequence ids in {list(seq_ids)}")
    c = self.chunk_size
    self._reserve(sum(1 for s in seqs if s.length % c == 0))
    slots, offsets = [], []
    for seq, tok in zip(seqs, toks):  # the hot path of every decode step: kept lean
      offset = seq.length % c
      if offset:
        tail = seq.path[-1]
        tail.tokens.append(tok)
        seq.length += 1
        if offset + 1 == c:
          tail.parent.full_children.setdefault(tuple(tail.tokens), tail)
        slots.append(tail.slot)
        offsets.append(offset)
      else:
        slot, offset = self._append_one(seq, tok)
        slots.append(slot)
        offsets.append(offset)
    self._note_appends([1] * len(seqs), len(seqs))
    return np.array([slots, offsets], np.int32).T

  def remove(self, seq_id: int, *, keep_cached: bool | None = None) -> list[int]:
    """Removes a sequence.

    Args:
      seq_id: a live sequence id.
      keep_cached: keep its full chunks that no live sequence uses as cached chunks (default: the
        tree's `keep_cached`). Partial chunks are always freed.

    Returns:
      The pool slots that were freed (those neither a live sequence nor the cache keeps).
    """
    seq = self._get(seq_id)
    keep = self.keep_cached if keep_cached is None else check_bool(keep_cached, "keep_cached")
    seq.path[-1].ending.remove(seq)
    freed = []
    for node in reversed(seq.path):  # deepest first: keeps the LRU's leaves-first order
      node.count -= 1
      if node.count == 0 and keep and len(node.tokens) == self.chunk_size:
        self._lru[id(node)] = node  # the pool reference passes to the cache
      elif node.count == 0:
        freed += self._free_cached_below(node)
        self.pool.decref(node.slot)
        freed.append(node.slot)
        self._unlink(node)
      else:
        self.pool.decref(node.slot)
    del self._seqs[seq_id]
    self._structure_changed()
    return freed

  def truncate(self, seq_id: int, length: int) -> list[int]:
    """Shortens a sequence to its first `length` tokens: the undo of an append (an engine step
    whose model call failed, rejected draft tokens).

    The removed tokens are treated as never computed: chunks that only this sequence used beyond
    `length` are freed, not cached, and so are cached chunks that extended the cut tail.

    Args:
      seq_id: a live sequence id.
      length: the new length, in `[1, length(seq_id)]`.

    Returns:
      The pool slots that were freed.

    Raises:
      ValueError: a bad `length`, or a cut inside a chunk other live sequences share (nothing
        changes).
    """
    seq = self._get(seq_id)
    if not is_int(length) or not 1 <= length <= seq.length:
      raise ValueError(f"truncate: length must be an integer in [1, {seq.length}] for sequence "
                       f"{seq_id}, got {length!r}")
    length = int(length)
    if length == seq.length:
      return []
    c = self.chunk_size
    keep = -(-length // c)  # chunks the shortened sequence spans
    tail = seq.path[keep - 1]
    tail_len = length - (keep - 1) * c
    cut_tail = tail_len < len(tail.tokens)
    if cut_tail and tail.count > 1:
      raise ValueError(f"truncate: length {length} of sequence {seq_id} cuts a chunk that "
                       f"{tail.count - 1} other live sequence(s) share")
    seq.path[-1].ending.remove(seq)
    freed = []
    for node in reversed(seq.path[keep:]):  # deepest first
      node.count -= 1
      self.pool.decref(node.slot)
      if node.count == 0:
        freed += self._free_cached_below(node)
        freed.append(node.slot)
        self._unlink(node)
    del seq.path[keep:]
    del seq.slots[keep:]
    if cut_tail:  # private now; whatever hung below it extended the removed tokens
      freed += self._free_cached_below(tail)
      self._unindex(tail)
      del tail.tokens[tail_len:]
    tail.ending.append(seq)
    seq.length = length
    self.length_epoch += 1
    self._structure_changed()
    return freed

  # ---------------------------------------------------------------- checking
  def snapshot(self) -> tuple:
    """A hashable copy of the whole state (tree, sequences, pool), for before/after comparisons."""
    nodes = []
    stack = [self._root]
    while stack:
      n = stack.pop()
      nodes.append((n.slot, tuple(n.tokens), n.count, tuple(s.seq_id for s in n.ending),
                    tuple(ch.slot for ch in n.children),
                    tuple(sorted((k, v.slot) for k, v in n.full_children.items()))))
      stack.extend(n.children)
    seqs = tuple((s.seq_id, tuple(s.slots), s.length) for s in self._seqs.values())
    lru = tuple(n.slot for n in self._lru.values())
    return (tuple(nodes), seqs, lru, self._next_id, self.structure_version, self.length_epoch, self.uniform_delta,
            self.pool.snapshot())

  def check_invariants(self) -> None:
    """Raises AssertionError if any invariant of docs/design.md section 2 is violated."""
    c = self.chunk_size
    counts: dict[int, int] = {}
    for seq in self._seqs.values():
      assert seq.slots == [n.slot for n in seq.path], "slots out of step with path"
      assert seq.length == sum(len(n.tokens) for n in seq.path), "length mismatch"
      assert seq.path[-1].ending.count(seq) == 1, "sequence not listed at its last node"
      prev = self._root
      for i, node in enumerate(seq.path):
        assert node.parent is prev and node.depth == i, "path is not a root-to-node chain"
        assert node in prev.children, "node missing from its parent's children"
        if i < len(seq.path) - 1:
          assert len(node.tokens) == c, "a non-last chunk of a sequence is not full"
        prev = node
        counts[id(node)] = counts.get(id(node), 0) + 1
    used = 0
    stack = list(self._root.children)
    while stack:
      node = stack.pop()
      used += 1
      assert node.count == counts.get(id(node), 0), "count != live sequences through node"
      if node.count == 0:
        assert id(node) in self._lru and len(node.tokens) == c, "a dead chunk is not cached"
        assert self.pool.refcount(node.slot) == 1, "a cached chunk's pool refcount is not 1"
      else:
        assert id(node) not in self._lru, "a live chunk is in the cache's LRU"
        assert self.pool.refcount(node.slot) == node.count, "pool refcount != node count"
      assert 1 <= len(node.tokens) <= c, "chunk size out of range"
      if len(node.tokens) < c:
        assert not node.children and node.count == 1, "a partial chunk is shared or has children"
      self._check_match_index(node)
      stack.extend(node.children)
    self._check_match_index(self._root)
    assert used == self.pool.num_used, f"{used} nodes but {self.pool.num_used} pool slots used"
    seen: set[int] = set()
    for node in self._lru.values():  # every node after its cached descendants
      assert all(id(ch) in seen for ch in node.children), "LRU order is not leaves first"
      seen.add(id(node))
    assert self.pool.num_used + self.pool.num_free == self.pool.capacity

  def _check_match_index(self, node: _Node) -> None:
    for key, child in node.full_children.items():
      assert child in node.children and tuple(child.tokens) == key, "stale match index"
    full_keys = {tuple(ch.tokens) for ch in node.children if len(ch.tokens) == self.chunk_size}
    assert full_keys == set(node.full_children), "a full chunk is missing from the match index"

  # ---------------------------------------------------------------- internals
  def _get(self, seq_id) -> _Seq:
    if not is_int(seq_id):  # True == 1 and 1.0 == 1 as dict keys: only real ints are ids
      raise UnknownSequenceError(
          f"unknown sequence id {seq_id!r}: sequence ids are integers, not "
          f"{type(seq_id).__name__}")
    try:
      return self._seqs[seq_id]
    except KeyError:
      raise UnknownSequenceError(
          f"unknown sequence id {seq_id!r} (never inserted or already removed)") from None

  def _match(self, toks: list[int], limit: int | None = None) -> tuple[_Node, int]:
    """Follows full children equal to the next chunk of `toks`, covering at most `limit` tokens."""
    c = self.chunk_size
    limit = len(toks) if limit is None else limit
    node, i = self._root, 0
    while i + c <= limit:
      child = node.full_children.get(tuple(toks[i:i + c]))
      if child is None:
        break
      node, i = child, i + c
    return node, i

  def _chunks_for_append(self, seq: _Seq, n: int) -> int:
    c = self.chunk_size
    return -(-(seq.length + n) // c) - -(-seq.length // c)

  def _reserve(self, n: int, exclude: Sequence[_Node] = ()) -> None:
    """Raises PoolExhaustedError unless `n` slots can be had from free slots plus evictable cached
    chunks (other than `exclude`, which the caller is about to reuse). Changes nothing."""
    available = self.pool.num_free + len(self._lru) - len(exclude)
    if n > available:
      raise PoolExhaustedError(n, available, self.pool.capacity)

  def _allocate(self, n: int) -> list[int]:
    """Allocates `n` slots, evicting cached chunks first if needed (after a `_reserve`)."""
    short = n - self.pool.num_free
    if short > 0:
      self.evict_cached(short)
    return self.pool.allocate(n)

  def _path_to(self, node: _Node) -> list[_Node]:
    path = []
    while node is not self._root:
      path.append(node)
      node = node.parent
    path.reverse()
    return path

  def _free_cached_below(self, node: _Node) -> list[int]:
    """Frees the cached chunks under a node that is being freed (all its descendants are cached)."""
    freed = []
    for child in list(node.children):
      if child.count == 0:
        freed += self._free_cached_below(child)
        del self._lru[id(child)]
        self.pool.decref(child.slot)
        freed.append(child.slot)
        self._unlink(child)
    return freed

  def _unlink(self, node: _Node) -> None:
    """Detaches a freed node from its parent (and from the match index)."""
    node.parent.children.remove(node)
    self._unindex(node)

  def _unindex(self, node: _Node) -> None:
    """Removes a node from its parent's match index (a node being freed or cut short)."""
    parent = node.parent
    key = tuple(node.tokens)
    if parent.full_children.get(key) is node:
      del parent.full_children[key]
      # A sibling that filled later with the same tokens becomes the one inserts match.
      twin = next((ch for ch in parent.children if ch is not node and tuple(ch.tokens) == key),
                  None)
      if twin is not None:
        parent.full_children[key] = twin

  def _append_one(self, seq: _Seq, token: int) -> tuple[int, int]:
    c = self.chunk_size
    offset = seq.length % c
    tail = seq.path[-1]
    if offset == 0:  # the last chunk is full (maybe shared): open a private one under it
      (slot,) = self._allocate(1)
      tail.ending.remove(seq)
      node = _Node(slot, [token], tail, tail.depth + 1)
      node.count = 1
      node.ending.append(seq)
      tail.children.append(node)
      seq.path.append(node)
      seq.slots.append(slot)
      self._structure_changed()
    else:  # the tail is partial, hence private: write in place
      node = tail
      node.tokens.append(token)
      if offset + 1 == c:  # now full: later inserts may share it
        node.parent.full_children.setdefault(tuple(node.tokens), node)
    seq.length += 1
    return node.slot, offset

  def _note_appends(self, counts: list[int], num_seqs: int) -> None:
    if num_seqs == len(self._seqs) and min(counts) == max(counts):
      self.uniform_delta += counts[0]
    else:
      self.length_epoch += 1

  def _structure_changed(self) -> None:
    self.structure_version += 1

  # Used by plan.py; not part of the public API.
  def _iter_root_children(self) -> Iterable[_Node]:
    return self._root.children
