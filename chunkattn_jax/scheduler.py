"""The engine's host side: requests, their queues, admission, prefill batching, preemption, release.

`Scheduler` owns the prefix tree and the decode plan builder and decides what runs; it never
touches the device (that is `model_runner.ModelRunner`). Every model call of an engine step is one
transaction over it:

1. plan: `admit()` inserts waiting requests into the tree and splits them into prefill batches;
   `prepare_decode()` appends every running request's pending token (the last one it sampled);
2. the model runner computes the batch; nothing here changes meanwhile;
3. commit (`commit_prefill`, `commit_decode`: record the sampled tokens, finish and release
   requests) or abort (`abort_prefill`, `abort_decode`: undo step 1, so the tree holds exactly
   the tokens whose K/V was computed). Cached prefixes evicted and requests preempted to make
   room in step 1 stay so: both leave every request's output unchanged.

A request is in exactly one place: `waiting` (FIFO; preempted requests go back to its front),
`running` (a live tree sequence whose pending token is `output[-1]`), or finished.
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
  submit_time: float = 0.0
  first_token_time: float | None = None
  finish_time: float | None = None
  num_cached_at_admission: int = 0

  @property
  def num_tokens(self) -> int:
    return len(self.prompt) + len(self.output)


@dataclasses.dataclass(frozen=True)
class PrefillEntry:
  """One admitted request to prefill: its context (prompt plus any tokens generated before a
  preemption), of which the first `num_cached` tokens' K/V is already in the pool."""
  request: Request
  tokens: list[int]
  num_cached: int
  slots: np.ndarray  # int32 [len(tokens) - num_cached, 2]: where the new tokens' K/V goes
  chunk_path: list[int]


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
      `prefill_calls`, `prefill_tokens`, `prefill_tokens_cached`, `decode_steps`, `decode_rows`).
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
  def admit(self) -> list[list[PrefillEntry]]:
    """Admits waiting requests (FIFO) while the batch has room and the pool can hold them.

    Returns the prefill batches, to run in order: at most `max_prefill_batch` requests each, and a
    request whose matched prefix includes chunks an earlier request of the batch has yet to
    compute starts a new batch, so every prefill reads only K/V already written.
    """
    entries: list[PrefillEntry] = []
    try:
      while self.waiting and len(self.running) < self.config.max_batch:
        req = self.waiting[0]
        context = req.prompt + req.output
        res = self._insert_with_eviction(context)
        if res is None:
          self.stats["admission_waits"] += 1
          break  # strict FIFO: wait for running requests to free chunks
        self.waiting.popleft()
        req.seq_id, req.status = res.seq_id, "running"
        req.admitted_at = next(self._admissions)
        self.running[req.rid] = req
        self._by_seq[res.seq_id] = req
        entries.append(PrefillEntry(req, context, res.num_cached, res.slots,
                                    self.tree.chunk_path(res.seq_id)))
    except BaseException:
      self.abort_prefill([entries])
      raise
    return self._split(entries)

  def _split(self, entries: list[PrefillEntry]) -> list[list[PrefillEntry]]:
    c = self.config.chunk_size
    batches: list[list[PrefillEntry]] = []
    pending: set[int] = set()  # slots the current batch will write
    for e in entries:
      matched = e.chunk_path[: e.num_cached // c]
      if (not batches or len(batches[-1]) == self.config.max_prefill_batch
          or pending.intersection(matched)):
        batches.append([])
        pending = set()
      batches[-1].append(e)
      pending.update(int(x) for x in e.slots[:, 0])
    return batches

  def _insert_with_eviction(self, tokens):
    """Inserts (the tree evicts cached prefixes if it must); None when even that cannot fit."""
    evicted = self.tree.num_evictions
    try:
      return self.tree.insert(tokens, min_new_tokens=1)
    except PoolExhaustedError:
      return None
    finally:
      self.stats["evictions"] += self.tree.num_evictions - evicted

  def commit_prefill(self, batch: list[PrefillEntry], tokens: np.ndarray, logits, now: float
                     ) -> list[TokenEvent]:
    """Records each entry's sampled first (next) token; returns the events."""
    self.stats["prefill_calls"] += 1
    events = []
    for i, e in enumerate(batch):
      self.stats["prefill_tokens"] += len(e.tokens) - e.num_cached
      self.stats["prefill_tokens_cached"] += e.num_cached
      e.request.num_cached_at_admission = e.num_cached
      events.append(self._record(e.request, int(tokens[i]), None if logits is None else logits[i],
                                 now))
    return events

  def abort_prefill(self, batches: list[list[PrefillEntry]]) -> None:
    """Undoes `admit` for batches that were not computed: the requests go back to the front of
    the queue in their order. Their new chunks never got K/V, so they are freed; the matched
    chunks (computed earlier) go back to the prefix cache if no one else holds them."""
    entries = [e for b in batches for e in b]
    for e in reversed(entries):  # later entries may hold chunks the earlier ones allocated
      req = e.request
      if e.num_cached:
        self.tree.truncate(req.seq_id, e.num_cached)
        self.tree.remove(req.seq_id, keep_cached=self.config.cache_prefixes)
      else:
        self.tree.remove(req.seq_id, keep_cached=False)
      self._forget_seq(req)
      req.status = "waiting"
      self.waiting.appendleft(req)

  # ------------------------------------------------------------------ decode
  def prepare_decode(self) -> DecodeWork | None:
    """Appends every running request's pending token to the tree; None if nothing runs.

    The tree evicts cached prefixes when it needs their slots; if that is not enough, the latest
    admitted requests are preempted.
    """
    while self.running:
      reqs = list(self.running.values())
      evicted = self.tree.num_evictions
      try:
        slots = self.tree.append_tokens([r.seq_id for r in reqs], [r.output[-1] for r in reqs])
        return DecodeWork(reqs, slots)
      except PoolExhaustedError:
        self.preempt(max(reqs, key=lambda r: r.admitted_at))
      finally:
        self.stats["evictions"] += self.tree.num_evictions - evicted
    return None

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
    assert sorted(self._by_seq) == sorted(self.tree.seq_ids()), "tree sequences != running"
    for seq_id, req in self._by_seq.items():
      assert self.running.get(req.rid) is req and req.seq_id == seq_id
      assert self.tree.tokens(seq_id) == req.prompt + req.output[:-1], (
          f"request {req.rid}: the tree holds other tokens than its prompt and output")
