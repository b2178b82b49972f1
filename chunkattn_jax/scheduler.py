"""The engine's host side: requests, their queues, admission, prefill pieces, preemption, release.

`Scheduler` owns the prefix tree and the decode plan builder and decides what runs; it never
touches the device (that is `model_runner.ModelRunner`). Every model call of an engine step is one
transaction over it:

1. plan: `plan_prefill()` picks this step's prefill pieces (the next piece of a prompt whose
   prefill is in progress, then newly admitted requests), puts their tokens in the tree and splits
   them into batches; `prepare_decode()` appends every decoding request's pending token (the last
   one it sampled);
2. the model runner computes the batch; nothing here changes meanwhile;
3. commit (`commit_prefill`, `commit_decode`: record progress and the sampled tokens, finish and
   release requests) or abort (`abort_prefill`, `abort_decode`: undo step 1, so the tree holds
   exactly the tokens whose K/V was computed). Cached prefixes evicted and requests preempted to
   make room in step 1 stay so: both leave every request's output unchanged.

Chunked prefill (`EngineConfig.max_prefill_tokens`): a step computes at most that many prefill
tokens in all; a context longer than what is left of the budget is computed in pieces over several
steps, each piece attending to the K/V of the earlier ones (its chunks, in the tree). The tree only
ever holds computed tokens (plus, between plan and commit, the tokens of the call being computed),
so another request can match a partly prefilled prompt's full chunks as cached: they are. A
request is *prefilling* until its last piece ran; the last piece's logits give its next token and
only then does it decode. Pieces go in admission order and a new request is admitted only with
budget left, so at most one request is prefilling between steps, and it is the latest admitted:
under pool pressure it is the first one preempted.

A request is in exactly one place: `waiting` (FIFO; preempted requests go back to its front),
`running` (a live tree sequence: prefilling, the tree holding the first `num_prefilled` tokens of
its prompt and output; or decoding, its pending token `output[-1]`), or finished.
`check_consistency()` verifies this against the tree.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from chunkattn_jax import sampling as sampling_lib
from chunkattn_jax.chunk_pool import ChunkPool, PoolExhaustedError
from chunkattn_jax.plan import PlanBuilder
from chunkattn_jax.prefix_tree import PrefixTree


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  """One generated token. `finish_reason` is set on a request's last token ("stop", "length",
  "context", or "error" when its callback raised) and None otherwise."""
  request_id: int
  token: int
  index: int
  finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
  """A submitted request and its progress."""
  rid: int
  prompt: list[int]
  max_new_tokens: int
  stop_ids: frozenset
  sampling: sampling_lib.SamplingParams
  callback: Callable | None
  output: list[int] = dataclasses.field(default_factory=list)
  logits: list = dataclasses.field(default_factory=list)
  status: str = "waiting"  # waiting | running | finished
  seq_id: int | None = None
  finish_reason: str | None = None
  error: Exception | None = None  # what the callback raised (finish_reason "error")
  num_delivered: int = 0  # events of this request whose callback ran (or that had none)
  num_preemptions: int = 0
  admitted_at: int = -1  # admission counter (preemption picks the latest)
  prefilling: bool = False  # admitted, its context (prompt + output) not fully computed yet
  num_prefilled: int = 0  # while prefilling: leading context tokens whose K/V is in the pool
  submit_time: float = 0.0
  first_token_time: float | None = None
  finish_time: float | None = None
  num_cached_at_admission: int = 0

  @property
  def num_tokens(self) -> int:
    return len(self.prompt) + len(self.output)


@dataclasses.dataclass(frozen=True)
class PrefillEntry:
  """One piece of a request's prefill: tokens `[num_cached, len(tokens))` of its context (prompt
  plus any tokens generated before a preemption), whose first `num_cached` tokens' K/V is already
  in the pool (matched in the prefix cache, or computed by the request's earlier pieces).

  Attributes:
    request: the request.
    tokens: its context up to the end of this piece.
    num_cached: where the piece starts (any position; a multiple of the chunk size for a first
      piece).
    slots: int32 `[len(tokens) - num_cached, 2]`: where the piece's K/V goes.
    chunk_path: the sequence's pool slots, root to leaf (covering `tokens`).
    first: the request was admitted with this piece (aborting it puts the request back in the
      queue; `num_cached` tokens were found in the prefix cache).
    last: the piece ends the context: its last token's logits give the request's next token.
  """
  request: Request
  tokens: list[int]
  num_cached: int
  slots: np.ndarray
  chunk_path: list[int]
  first: bool = True
  last: bool = True

  @property
  def num_new(self) -> int:
    return len(self.tokens) - self.num_cached


@dataclasses.dataclass(frozen=True)
class DecodeWork:
  """The running requests decoded in one step, with their pending tokens appended to the tree."""
  requests: list[Request]
  slots: np.ndarray  # int32 [len(requests), 2]: where each pending token's K/V goes


class Scheduler:
  """Host bookkeeping of an engine (see the module docstring).

  Args:
    config: the `EngineConfig` (already validated).
    fill: the plan's `GpuFill` (how far shared runs are split), or None.
    max_context: the model's context length (a request finishes when it reaches it).
    stats: counter to add statistics to (`admission_waits`, `evictions`, `preemptions`,
      `prefill_calls`, `prefill_pieces`, `prefill_tokens` (computed), `prefill_tokens_cached`
      (found in the prefix cache at admission), `decode_steps`, `decode_rows`).
  """

  def __init__(self, config, max_context: int, stats: collections.Counter, fill=None):
    self.config = config
    self.max_context = max_context
    self.stats = stats
    self.tree = PrefixTree(ChunkPool(config.n_chunks, seed=config.pool_seed), config.chunk_size)
    self.plans = PlanBuilder(self.tree, threshold=config.threshold, policy=config.policy,
                             max_chunks_per_item=config.max_chunks_per_item, fill=fill,
                             min_row_capacity=config.min_row_capacity)
    self.requests: dict[int, Request] = {}
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: dict[int, Request] = {}  # rid -> request, admission order
    self._by_seq: dict[int, Request] = {}
    self._admissions = itertools.count()

  def add(self, req: Request) -> None:
    self.requests[req.rid] = req
    self.waiting.append(req)

  # ------------------------------------------------------------------ prefill
  def plan_prefill(self) -> list[list[PrefillEntry]]:
    """Plans this step's prefill pieces and puts their tokens in the tree.

    Within the step's budget (`max_prefill_tokens` new tokens in all; unlimited when None):
    first the next piece of each prefilling request (admission order), then waiting requests
    (FIFO) while the batch has room and the pool can hold their whole context (cached prefixes
    are evicted for it; otherwise admission waits). A piece whose chunks do not fit preempts the
    latest admitted request (which may be its own).

    Returns the prefill batches, to run in order: at most `max_prefill_batch` pieces each, and a
    piece whose context includes chunks an earlier piece of the batch has yet to compute starts a
    new batch, so every prefill reads only K/V already written. On an exception nothing planned
    stays (see `abort_prefill`).
    """
    budget = self.config.max_prefill_tokens or float("inf")
    entries: list[PrefillEntry] = []
    try:
      for req in [r for r in self.running.values() if r.prefilling]:
        if budget <= 0:
          break
        entry = self._next_piece(req, budget)
        if entry is not None:
          entries.append(entry)
          budget -= entry.num_new
      while self.waiting and budget > 0 and len(self.running) < self.config.max_batch:
        entry = self._admit(self.waiting[0], budget)
        if entry is None:
          self.stats["admission_waits"] += 1
          break  # strict FIFO: wait for running requests to free chunks
        entries.append(entry)
        budget -= entry.num_new
    except BaseException:
      self.abort_prefill([entries])
      raise
    return self._split(entries)

  def _admit(self, req: Request, budget: float) -> PrefillEntry | None:
    """Admits the front waiting request with its first piece (at most `budget` new tokens);
    None, changing nothing, when the pool cannot hold its whole context."""
    context = req.prompt + req.output
    if not self.tree.can_insert(context, min_new_tokens=1):
      return None
    # The tokens found cached: full chunks, never the last token (its logits are needed).
    matched = self.tree.match_length(context[:-1]) if len(context) > 1 else 0
    end = int(min(len(context), matched + budget))
    evicted = self.tree.num_evictions
    try:
      res = self.tree.insert(context[:end], min_new_tokens=end - matched)
    finally:
      self.stats["evictions"] += self.tree.num_evictions - evicted
    assert res.num_cached == matched, (res.num_cached, matched)
    self.waiting.popleft()
    req.seq_id, req.status = res.seq_id, "running"
    req.prefilling, req.num_prefilled = True, matched
    req.admitted_at = next(self._admissions)
    self.running[req.rid] = req
    self._by_seq[res.seq_id] = req
    return PrefillEntry(req, context[:end], matched, res.slots, self.tree.chunk_path(res.seq_id),
                        first=True, last=end == len(context))

  def _next_piece(self, req: Request, budget: float) -> PrefillEntry | None:
    """Appends the next piece (at most `budget` tokens) of a prefilling request to the tree;
    None if the request had to be preempted for room."""
    context = req.prompt + req.output
    start = req.num_prefilled
    end = int(min(len(context), start + budget))
    while True:
      evicted = self.tree.num_evictions
      try:
        slots = self.tree.append(req.seq_id, context[start:end])
        break
      except PoolExhaustedError:
        # Never a request planned earlier in this step: those were admitted before `req`.
        victim = max(self.running.values(), key=lambda r: r.admitted_at)
        self.preempt(victim)
        if victim is req:
          return None
      finally:
        self.stats["evictions"] += self.tree.num_evictions - evicted
    return PrefillEntry(req, context[:end], start, slots, self.tree.chunk_path(req.seq_id),
                        first=False, last=end == len(context))

  def _split(self, entries: list[PrefillEntry]) -> list[list[PrefillEntry]]:
    c = self.config.chunk_size
    batches: list[list[PrefillEntry]] = []
    pending: set[int] = set()  # slots the current batch will write
    for e in entries:
      read = e.chunk_path[: e.num_cached // c]  # full chunks before the piece
      if (not batches or len(batches[-1]) == self.config.max_prefill_batch
          or pending.intersection(read)):
        batches.append([])
        pending = set()
      batches[-1].append(e)
      pending.update(int(x) for x in e.slots[:, 0])
    return batches

  def commit_prefill(self, batch: list[PrefillEntry], tokens: np.ndarray, logits, now: float
                     ) -> list[TokenEvent]:
    """Records each piece's progress and, for a request's last piece, its sampled next token;
    returns the events."""
    self.stats["prefill_calls"] += 1
    events = []
    for i, e in enumerate(batch):
      req = e.request
      self.stats["prefill_tokens"] += e.num_new
      self.stats["prefill_pieces"] += 1
      if e.first:
        self.stats["prefill_tokens_cached"] += e.num_cached
        req.num_cached_at_admission = e.num_cached
      req.num_prefilled = len(e.tokens)
      if e.last:
        req.prefilling, req.num_prefilled = False, 0
        events.append(self._record(req, int(tokens[i]), None if logits is None else logits[i],
                                   now))
    return events

  def abort_prefill(self, batches: list[list[PrefillEntry]]) -> None:
    """Undoes `plan_prefill` for batches that were not computed. A request admitted with its
    piece goes back to the front of the queue (in order): its new chunks never got K/V, so they
    are freed; the matched chunks (computed earlier) go back to the prefix cache if no one else
    holds them. A request that was already prefilling loses only this piece and keeps its earlier
    ones."""
    entries = [e for b in batches for e in b]
    for e in reversed(entries):  # later entries may hold chunks the earlier ones allocated
      req = e.request
      if not e.first:
        self.tree.truncate(req.seq_id, e.num_cached)
      elif e.num_cached:
        self.tree.truncate(req.seq_id, e.num_cached)
        self.tree.remove(req.seq_id, keep_cached=self.config.cache_prefixes)
        self._unadmit(req)
      else:
        self.tree.remove(req.seq_id, keep_cached=False)
        self._unadmit(req)

  def _unadmit(self, req: Request) -> None:
    self._forget_seq(req)
    req.status = "waiting"
    self.waiting.appendleft(req)

  # ------------------------------------------------------------------ decode
  def prepare_decode(self) -> DecodeWork | None:
    """Appends every decoding request's pending token to the tree; None if none decodes
    (prefilling requests do not).

    The tree evicts cached prefixes when it needs their slots; if that is not enough, the latest
    admitted requests (a prefilling one first: it is the latest) are preempted.
    """
    while True:
      reqs = [r for r in self.running.values() if not r.prefilling]
      if not reqs:
        return None
      evicted = self.tree.num_evictions
      try:
        slots = self.tree.append_tokens([r.seq_id for r in reqs], [r.output[-1] for r in reqs])
        return DecodeWork(reqs, slots)
      except PoolExhaustedError:
        self.preempt(max(self.running.values(), key=lambda r: r.admitted_at))
      finally:
        self.stats["evictions"] += self.tree.num_evictions - evicted

  def commit_decode(self, work: DecodeWork, tokens: np.ndarray, logits, now: float
                    ) -> list[TokenEvent]:
    """Records each request's sampled token (in `work.requests` order); returns the events."""
    self.stats["decode_steps"] += 1
    self.stats["decode_rows"] += len(work.requests)
    return [self._record(req, int(tokens[i]), None if logits is None else logits[i], now)
            for i, req in enumerate(work.requests)]

  def abort_decode(self, work: DecodeWork) -> None:
    """Undoes `prepare_decode`: takes the pending tokens (whose K/V was not computed) back off the
    tree. The requests stay running, their pending tokens unchanged."""
    for req in work.requests:
      self.tree.truncate(req.seq_id, req.num_tokens - 1)

  # ------------------------------------------------------------------ state changes
  def preempt(self, req: Request) -> None:
    """Frees a running request's sequence and puts it back at the front of the queue; it is
    recomputed later from its prompt and output, which continues unchanged."""
    self._release(req, cache=False)
    req.status = "waiting"
    req.num_preemptions += 1
    self.waiting.appendleft(req)
    self.stats["preemptions"] += 1

  def drop_all_kv(self) -> None:
    """After the device pool was lost: preempts every running request (latest first, so the queue
    keeps admission order) and evicts every cached chunk; everything is recomputed."""
    for req in sorted(self.running.values(), key=lambda r: r.admitted_at, reverse=True):
      self.preempt(req)
    self.tree.evict_cached()

  def stop(self, req: Request, reason: str, now: float, error: Exception | None = None) -> None:
    """Finishes a request early (cancelled, or its callback raised), whatever its status. Its
    output is cut back to the tokens already delivered."""
    if req.status == "waiting":
      self.waiting.remove(req)
    elif req.status == "running":
      self._release(req, cache=False)
    del req.output[req.num_delivered:]
    del req.logits[req.num_delivered:]
    req.status, req.finish_reason, req.error, req.finish_time = "finished", reason, error, now

  def _record(self, req: Request, token: int, logits, now: float) -> TokenEvent:
    """Appends a sampled token to a request; finishes (and releases) it on a stop id, its token
    budget or the context limit."""
    req.output.append(token)
    if logits is not None:
      req.logits.append(np.asarray(logits, np.float32))
    if req.first_token_time is None:
      req.first_token_time = now
    reason = None
    if token in req.stop_ids:
      reason = "stop"
    elif len(req.output) >= req.max_new_tokens:
      reason = "length"
    elif req.num_tokens >= self.max_context:
      reason = "context"
    if reason is not None:
      req.finish_reason, req.finish_time = reason, now
      self._release(req, cache=self.config.cache_prefixes)
      req.status = "finished"
    return TokenEvent(req.rid, token, len(req.output) - 1, reason)

  def _release(self, req: Request, cache: bool) -> None:
    """Removes a running request's sequence (keeping its full chunks cached if asked)."""
    self.tree.remove(req.seq_id, keep_cached=cache)
    self._forget_seq(req)

  def _forget_seq(self, req: Request) -> None:
    del self._by_seq[req.seq_id]
    del self.running[req.rid]
    req.seq_id = None
    req.prefilling, req.num_prefilled = False, 0  # a partial prefill is recomputed if admitted again

  # ------------------------------------------------------------------ checking
  def check_consistency(self) -> None:
    """Raises AssertionError unless every request is in exactly one place and the running ones
    are exactly the tree's sequences, each holding its prompt and output but the pending token."""
    self.tree.check_invariants()
    waiting_ids = [r.rid for r in self.waiting]
    assert len(set(waiting_ids)) == len(waiting_ids), "a request is queued twice"
    assert not set(waiting_ids) & set(self.running), "a request is both waiting and running"
    for rid, req in self.requests.items():
      assert req.rid == rid
      where = ("waiting" if rid in set(waiting_ids) else
               "running" if rid in self.running else "finished")
      assert req.status == where, f"request {rid} is {req.status} but {where}"
      assert (req.seq_id is not None) == (where == "running"), f"request {rid} seq_id"
      assert req.num_delivered <= len(req.output)
      if where != "finished":
        assert req.finish_reason is None and len(req.output) < req.max_new_tokens
      if where != "running":
        assert not req.prefilling and req.num_prefilled == 0, f"request {rid} prefill state"
    assert sorted(self._by_seq) == sorted(self.tree.seq_ids()), "tree sequences != running"
    for seq_id, req in self._by_seq.items():
      assert self.running.get(req.rid) is req and req.seq_id == seq_id
      context = req.prompt + req.output
      if req.prefilling:
        assert 0 < req.num_prefilled < len(context), f"request {req.rid}: num_prefilled"
        expected = context[: req.num_prefilled]
      else:
        assert req.num_prefilled == 0 and req.output, f"request {req.rid}: decoding without token"
        expected = context[:-1]
      assert self.tree.tokens(seq_id) == expected, (
          f"request {req.rid}: the tree holds other tokens than its computed prompt and output")
    prefilling = [r for r in self.running.values() if r.prefilling]
    assert len(prefilling) <= 1, "more than one request is prefilling between steps"
    if prefilling:
      assert prefilling[0] is max(self.running.values(), key=lambda r: r.admitted_at), (
          "the prefilling request is not the latest admitted")
