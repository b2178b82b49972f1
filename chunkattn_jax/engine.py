"""Serving engine: a host loop with continuous batching over the prefix-shared chunk KV cache.

    engine = Engine(model, EngineConfig(n_chunks=512, chunk_size=16))
    rid = engine.submit(prompt_ids, max_new_tokens=32, stop_ids=(eos,))
    for event in engine.run():          # or engine.step() in your own loop, or engine.stream(...)
      print(event.request_id, event.token)

Each `step()`:
1. admits waiting requests (FIFO) while the batch has room and the pool can hold them: the prompt
   is inserted into the prefix tree and only its unmatched suffix is prefilled (the matched full
   chunks' K/V is read from the pool), up to `max_prefill_batch` requests per model call (a request
   whose matched chunks the current batch has yet to compute waits for the next call); the first
   token is sampled from the prefill logits;
2. decodes one token for every running request: the pending tokens are appended to the tree, the
   decode plan is refreshed (rebuilt only when the tree's structure changed), and one jitted step
   runs the model over the plan's rows (padded to the plan's row capacity, so the step recompiles
   only when a capacity crosses a power of two);
3. streams each new token (callbacks, events, `stream()`), finishes requests on a stop id,
   `max_new_tokens` or the context limit, and frees their sequences.

Pool pressure: admission waits when the prompt does not fit; a decode step that needs new chunks
first lets the tree evict cached prefixes (LRU), then preempts the most recently admitted running
request, which goes back to the front of the queue and is recomputed later from its prompt plus the
tokens it already produced (its output continues unchanged; sampling keys depend only on the
request).

Prefix cache: finished requests are removed from the tree with `keep_cached=True`, so their full
chunks (prompt and generated text) stay in the pool as cached chunks that later prompts match and
revive; the tree evicts them least recently used, leaves first, only when it needs their slots.
Cached chunks are never rows of the decode plan.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from chunkattn_jax import kernel_limits
from chunkattn_jax import kv_pool as kv_pool_lib
from chunkattn_jax import layers
from chunkattn_jax import sampling as sampling_lib
from chunkattn_jax.chunk_pool import ChunkPool, PoolExhaustedError
from chunkattn_jax.plan import PlanBuilder, bucket
from chunkattn_jax.prefix_tree import PrefixTree


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Engine knobs.

  Attributes:
    n_chunks: chunk slots in the KV pool.
    chunk_size: tokens per chunk `c` (a power of two).
    max_batch: most running requests (rows decoded per step).
    max_prefill_batch: most requests prefilled in one model call.
    threshold: plan sharing threshold (a chunk used by more rows goes through the chunk-first
      pass); a huge value gives the paged baseline (no shared compute, memory still shared).
    policy: optional per-run sharing decision `policy(num_rows, num_chunks) -> bool` replacing
      the threshold, e.g. `sharing_policy.CostModelPolicy.for_shapes(...)` on a GPU.
    max_chunks_per_item: `G` of the plan.
    min_row_capacity: smallest plan row capacity `R`.
    cache_prefixes: keep finished requests' full chunks cached (evicted LRU when space is needed).
    min_prefill_tokens: smallest prefill token bucket (prefill lengths are padded to powers of two).
    kv_dtype: pool dtype (None: the model's compute dtype).
    min_plan_capacities: smallest decode-plan capacities `(R, P, K, I, Q, M)` (powers of two;
      M = `item_rows_capacity`; 0 or missing: no minimum). The engine pads every plan up to the largest capacities seen so far, so the decode
      step compiles once per new maximum; benchmarks set this from a warm-up engine's
      `plan_capacities` so the timed run never compiles.
    record_logits: keep each generated token's logits (float32 numpy, for tests).
    pool_seed: shuffle the pool's free list (tests).
  """
  n_chunks: int = 1024
  chunk_size: int = 16
  max_batch: int = 32
  max_prefill_batch: int = 8
  threshold: int = 1
  policy: Callable[[int, int], bool] | None = None
  max_chunks_per_item: int = 16
  min_row_capacity: int = 8
  cache_prefixes: bool = True
  min_prefill_tokens: int = 16
  kv_dtype: str | None = None
  min_plan_capacities: tuple = ()
  record_logits: bool = False
  pool_seed: int | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  """One generated token. `finish_reason` is set on a request's last token ("stop", "length",
  "context") and None otherwise."""
  request_id: int
  token: int
  index: int
  finish_reason: str | None = None


@dataclasses.dataclass
class _Request:
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
  num_preemptions: int = 0
  admitted_at: int = -1  # admission counter (preemption picks the latest)
  submit_time: float = 0.0
  first_token_time: float | None = None
  finish_time: float | None = None
  num_cached_at_admission: int = 0

  @property
  def num_tokens(self) -> int:
    return len(self.prompt) + len(self.output)


class Engine:
  """Continuous-batching generation over a prefix tree + chunk pool + `KVPool`.

  Args:
    model: an nnx model called as `model(tokens, pool, inputs, *, logits_index=None) ->
      (logits, pool)` with `model.config.vocab_size`, `model.config.max_position_embeddings` and
      `model.make_pool(n_chunks, chunk_size, dtype=...)` (e.g. `llama.Llama`).
    config: `EngineConfig`.
    pool_sharding: optional sharding of the KV pool arrays (default: `sharding.pool_sharding` of
      `model.mesh` when the model was sharded, else unsharded).
    clock: time source for the latency statistics (default `time.perf_counter`).
  """

  def __init__(self, model, config: EngineConfig = EngineConfig(), *, pool_sharding=None,
               clock: Callable[[], float] | None = None):
    import time  # pylint: disable=import-outside-toplevel
    kernel_limits.check_engine(model, config)  # before any state: head_dim, chunk size, dtypes
    self.config = config
    self.model = model
    self.vocab_size = model.config.vocab_size
    self.max_context = model.config.max_position_embeddings
    self.tree = PrefixTree(ChunkPool(config.n_chunks, seed=config.pool_seed), config.chunk_size)
    self.plans = PlanBuilder(self.tree, threshold=config.threshold, policy=config.policy,
                             max_chunks_per_item=config.max_chunks_per_item,
                             min_row_capacity=config.min_row_capacity)
    if pool_sharding is None and getattr(model, "mesh", None) is not None:
      from chunkattn_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
      pool_sharding = sharding_lib.pool_sharding(model.mesh)
    self.pool = model.make_pool(config.n_chunks, config.chunk_size, dtype=config.kv_dtype,
                                sharding=pool_sharding)
    self.clock = clock or time.perf_counter
    self._graphdef, self._state = nnx.split(model)
    self._requests: dict[int, _Request] = {}
    self._waiting: collections.deque[_Request] = collections.deque()
    self._running: dict[int, _Request] = {}  # rid -> request, admission order
    self._by_seq: dict[int, _Request] = {}
    self._plan_caps = tuple(config.min_plan_capacities)
    self._path_cap = 0
    self._ids = itertools.count()
    self._admissions = itertools.count()
    self.stats = collections.Counter()

  # ------------------------------------------------------------------ public API
  def submit(self, prompt: Sequence[int], max_new_tokens: int = 16, *, stop_ids: Sequence[int] = (),
             sampling: sampling_lib.SamplingParams | None = None,
             callback: Callable[[TokenEvent], None] | None = None) -> int:
    """Queues a request; returns its id. Validates everything before touching any state.

    Args:
      prompt: token ids (non-empty, each in `[0, vocab_size)`), at most the model's context.
      max_new_tokens: > 0.
      stop_ids: generation stops after emitting one of these tokens (it is part of the output).
      sampling: `SamplingParams` (default greedy).
      callback: called with each `TokenEvent` of this request as it is produced.

    Raises:
      ValueError: any invalid argument (the message names the offending value).
    """
    prompt = self._check_tokens(prompt, "prompt")
    if len(prompt) > self.max_context:
      raise ValueError(f"prompt has {len(prompt)} tokens, longer than the model's context "
                       f"{self.max_context}")
    if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens <= 0):
      raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    stop = self._check_tokens(stop_ids, "stop_ids", allow_empty=True)
    sampling = sampling_lib.GREEDY if sampling is None else sampling
    if not isinstance(sampling, sampling_lib.SamplingParams):
      raise ValueError(f"sampling must be a SamplingParams, got {sampling!r}")
    total = min(len(prompt) + int(max_new_tokens), self.max_context + 1)
    need = -(-total // self.config.chunk_size)
    if need > self.config.n_chunks:
      raise ValueError(f"request needs up to {need} chunks ({len(prompt)} prompt + {max_new_tokens} "
                       f"new tokens) but the pool has only {self.config.n_chunks}")
    rid = next(self._ids)
    req = _Request(rid, prompt, int(max_new_tokens), frozenset(stop), sampling, callback,
                   submit_time=self.clock())
    self._requests[rid] = req
    self._waiting.append(req)
    return rid

  def step(self) -> list[TokenEvent]:
    """One engine iteration (admit + prefill, then one decode step); returns the new tokens."""
    events: list[TokenEvent] = []
    self._admit(events)
    if self._running:
      self._decode(events)
    return events

  def has_work(self) -> bool:
    return bool(self._waiting or self._running)

  def run(self, max_steps: int | None = None) -> Iterator[TokenEvent]:
    """Steps until every request finished (or `max_steps`), yielding tokens as they come."""
    for i in itertools.count():
      if not self.has_work() or (max_steps is not None and i >= max_steps):
        return
      yield from self.step()

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16,
               **kw) -> list[list[int]]:
    """Submits every prompt, runs to completion, returns each request's generated tokens."""
    rids = [self.submit(p, max_new_tokens, **kw) for p in prompts]
    for _ in self.run():
      pass
    return [self.result(r) for r in rids]

  def stream(self, prompt: Sequence[int], max_new_tokens: int = 16, **kw) -> Iterator[int]:
    """Submits a request and yields its tokens as they are generated (driving the engine; other
    requests progress too)."""
    rid = self.submit(prompt, max_new_tokens, **kw)
    while True:
      req = self._requests[rid]
      if req.status == "finished":
        return
      for ev in self.step():
        if ev.request_id == rid:
          yield ev.token

  def result(self, request_id: int) -> list[int]:
    """The tokens generated so far for a request. Raises KeyError for an unknown id."""
    return list(self._get(request_id).output)

  def request_info(self, request_id: int) -> dict:
    """Status, finish reason, timings and cache statistics of a request."""
    r = self._get(request_id)
    return dict(status=r.status, finish_reason=r.finish_reason, num_generated=len(r.output),
                prompt_len=len(r.prompt), num_preemptions=r.num_preemptions,
                num_cached=r.num_cached_at_admission, submit_time=r.submit_time,
                first_token_time=r.first_token_time, finish_time=r.finish_time,
                logits=r.logits)

  def cancel(self, request_id: int) -> None:
    """Stops a request (waiting or running) and frees its sequence. KeyError if unknown."""
    req = self._get(request_id)
    if req.status == "waiting":
      self._waiting.remove(req)
    elif req.status == "running":
      self._release(req, cache=False)
    req.status, req.finish_reason = "finished", req.finish_reason or "cancelled"

  def num_running(self) -> int:
    return len(self._running)

  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def plan_capacities(self) -> tuple:
    """The largest decode-plan capacities `(R, P, K, I, Q, M)` used so far."""
    return self._plan_caps

  def kv_bytes_in_use(self) -> int:
    """Bytes of the chunks currently held (running sequences and cached prefixes)."""
    return self.tree.pool.num_used * self.pool.nbytes_per_chunk()

  # ------------------------------------------------------------------ validation
  def _check_tokens(self, tokens, what: str, allow_empty: bool = False) -> list[int]:
    if isinstance(tokens, (str, bytes)):
      raise ValueError(f"{what} must be a sequence of token ids, got {tokens!r}")
    try:
      arr = np.asarray(list(tokens))
    except TypeError:
      raise ValueError(f"{what} must be a sequence of token ids, got {tokens!r}") from None
    if arr.size == 0:
      if allow_empty:
        return []
      raise ValueError(f"{what} is empty")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
      raise ValueError(f"{what} must be a 1-D sequence of integer token ids, got {tokens!r}")
    bad = arr[(arr < 0) | (arr >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"{what} has token id {int(bad[0])} outside [0, {self.vocab_size})")
    return arr.tolist()

  def _get(self, request_id) -> _Request:
    try:
      return self._requests[request_id]
    except (KeyError, TypeError):
      raise KeyError(f"unknown request id {request_id!r}") from None

  # ------------------------------------------------------------------ jitted model steps
  def _prefill_fn(self, *args):
    return _prefill_step(self._graphdef, *args)

  def _decode_fn(self, *args):
    return _decode_step(self._graphdef, *args)

  @staticmethod
  def _sampling_arrays(reqs: Sequence[_Request | None], size: int):
    temp = np.zeros(size, np.float32)
    top_k = np.zeros(size, np.int32)
    top_p = np.ones(size, np.float32)
    seeds = np.zeros(size, np.uint32)
    counters = np.zeros(size, np.int32)
    for i, r in enumerate(reqs):
      if r is not None:
        s = r.sampling
        temp[i], top_k[i], top_p[i] = s.temperature, s.top_k, s.top_p
        seeds[i], counters[i] = s.seed & 0xFFFFFFFF, len(r.output)
    return temp, top_k, top_p, seeds, counters

  # ------------------------------------------------------------------ admission and prefill
  def _admit(self, events: list[TokenEvent]) -> None:
    """Admits waiting requests (FIFO) and prefills them, several per model call.

    A request whose matched prefix includes chunks that an earlier request of the same batch has
    yet to compute starts a new batch, so every prefill reads only K/V already written.
    """
    batch: list[tuple[_Request, list[int], object]] = []
    pending: set[int] = set()  # slots the current batch will write
    c = self.config.chunk_size
    while self._waiting and len(self._running) < self.config.max_batch:
      req = self._waiting[0]
      context = req.prompt + req.output
      res = self._insert_with_eviction(context)
      if res is None:
        self.stats["admission_waits"] += 1
        break  # strict FIFO: wait for running requests to free chunks
      self._waiting.popleft()
      req.seq_id, req.status = res.seq_id, "running"
      req.admitted_at = next(self._admissions)
      req.num_cached_at_admission = res.num_cached
      self._running[req.rid] = req
      self._by_seq[res.seq_id] = req
      matched = self.tree.chunk_path(res.seq_id)[: res.num_cached // c]
      if batch and (len(batch) == self.config.max_prefill_batch or pending.intersection(matched)):
        self._prefill(batch, events)
        batch, pending = [], set()
      batch.append((req, context, res))
      pending.update(int(x) for x in res.slots[:, 0])
    if batch:
      self._prefill(batch, events)

  def _insert_with_eviction(self, tokens):
    """Inserts (the tree evicts cached prefixes if it must); None when even that cannot fit."""
    evicted = self.tree.num_evictions
    try:
      return self.tree.insert(tokens, min_new_tokens=1)
    except PoolExhaustedError:
      return None
    finally:
      self.stats["evictions"] += self.tree.num_evictions - evicted

  def _prefill(self, batch: list[tuple[_Request, list[int], object]], events) -> None:
    """One model call computing the unmatched suffix of every (request, context, insert result);
    samples each request's next token. Sequences are padded to powers of two (sequences and
    tokens) so few shapes compile; padding sequences repeat the first one with writes dropped."""
    drop = self.pool.drop_slot
    s_cap = bucket(len(batch))
    t_cap = bucket(max(len(ctx) - res.num_cached for _, ctx, res in batch),
                   self.config.min_prefill_tokens)
    paths = [self.tree.chunk_path(req.seq_id) for req, _, _ in batch]
    self._path_cap = max(bucket(max(len(p) for p in paths), 4), self._path_cap)
    tokens = np.zeros((s_cap, t_cap), np.int32)
    positions = np.zeros((s_cap, t_cap), np.int32)
    slots = np.zeros((s_cap, t_cap, 2), np.int32)
    slots[..., 0] = drop
    chunk_paths = np.zeros((s_cap, self._path_cap), np.int32)
    last = np.zeros(s_cap, np.int32)
    for i in range(s_cap):
      src = i if i < len(batch) else 0
      _, context, res = batch[src]
      start, n = res.num_cached, len(context)  # tokens [start, n) are computed
      tokens[i, : n - start] = context[start:]
      positions[i, : n - start] = np.arange(start, n)
      if i == src:  # padding sequences keep the dropped slots
        slots[i] = kv_pool_lib.pad_slots(res.slots, t_cap, drop)
      chunk_paths[i, : len(paths[src])] = paths[src]
      last[i] = n - start - 1
    inputs = layers.PrefillInputs(positions=positions, slots=slots, chunk_paths=chunk_paths)
    reqs = [req for req, _, _ in batch]
    samp = self._sampling_arrays(reqs + [None] * (s_cap - len(batch)), s_cap)
    tok, logits, self.pool = self._prefill_fn(self._state, self.pool, tokens, inputs, last, *samp)
    tok = np.asarray(tok)
    logits = np.asarray(logits) if self.config.record_logits else None
    self.stats["prefill_calls"] += 1
    for i, (req, context, res) in enumerate(batch):
      self.stats["prefill_tokens"] += len(context) - res.num_cached
      self.stats["prefill_tokens_cached"] += res.num_cached
      self._emit(req, int(tok[i]), None if logits is None else logits[i], events)

  # ------------------------------------------------------------------ decode
  def _decode(self, events: list[TokenEvent]) -> None:
    reqs = self._append_pending()
    if not reqs:
      return
    plan = self._pad_plan(self.plans.plan())
    r_cap = plan.row_capacity
    row_ids = np.asarray(plan.row_seq_ids)
    tokens = np.zeros(r_cap, np.int32)
    positions = np.zeros(r_cap, np.int32)
    slots = np.zeros((r_cap, 2), np.int32)
    slots[:, 0] = self.pool.drop_slot
    row_reqs: list[_Request | None] = [None] * r_cap
    for r in range(int(plan.num_rows)):
      req = self._by_seq.get(int(row_ids[r]))
      if req is None or req.rid not in reqs:
        continue  # not a running request (cannot happen: every tree sequence is one)
      row_reqs[r] = req
      tokens[r] = req.output[-1]
      positions[r] = req.num_tokens - 1
      slots[r] = reqs[req.rid]
    samp = self._sampling_arrays(row_reqs, r_cap)
    inputs = layers.DecodeInputs(positions=positions, slots=slots, plan=plan)
    tok, logits, self.pool = self._decode_fn(self._state, self.pool, tokens, inputs, *samp)
    tok = np.asarray(tok)
    logits = np.asarray(logits) if self.config.record_logits else None
    self.stats["decode_steps"] += 1
    self.stats["decode_rows"] += len(reqs)
    for r, req in enumerate(row_reqs):
      if req is not None:
        self._emit(req, int(tok[r]), None if logits is None else logits[r], events)

  def _pad_plan(self, plan):
    """Pads the plan's capacities up to their high-water marks (never shrinking), so the jitted
    step recompiles only when a capacity exceeds every earlier one. Spare entries are inert."""
    caps = (plan.row_capacity, plan.row_private_chunks.shape[1], plan.row_items.shape[1],
            plan.item_capacity, plan.partial_capacity, plan.item_rows_capacity)
    prev = tuple(self._plan_caps) + (0,) * (len(caps) - len(self._plan_caps))
    hw = self._plan_caps = tuple(max(a, b) for a, b in zip(caps, prev))
    if hw == caps:
      return plan
    r, p_, k, i, q, m = hw
    def pad(a, shape, fill=0):
      out = np.full(shape, fill, np.int32)
      out[tuple(slice(0, n) for n in a.shape)] = a
      return out
    return dataclasses.replace(
        plan, row_seq_ids=pad(plan.row_seq_ids, (r,), -1),
        row_private_chunks=pad(plan.row_private_chunks, (r, p_)),
        row_private_len=pad(plan.row_private_len, (r,)),
        row_items=pad(plan.row_items, (r, k)), row_num_items=pad(plan.row_num_items, (r,)),
        item_chunks=pad(plan.item_chunks, (i, plan.item_chunks.shape[1])),
        item_num_chunks=pad(plan.item_num_chunks, (i,)),
        item_row_begin=pad(plan.item_row_begin, (i,)), item_row_end=pad(plan.item_row_end, (i,)),
        item_partial_offset=pad(plan.item_partial_offset, (i,)), partial_capacity=q,
        item_rows_capacity=m)

  def _append_pending(self) -> dict[int, np.ndarray]:
    """Appends every running request's last sampled token to the tree; returns {rid: slot [2]}.

    The tree evicts cached prefixes when it needs their slots; if that is not enough, the latest
    admitted requests are preempted.
    """
    while self._running:
      reqs = list(self._running.values())
      evicted = self.tree.num_evictions
      try:
        slots = self.tree.append_tokens([r.seq_id for r in reqs], [r.output[-1] for r in reqs])
        return {r.rid: s for r, s in zip(reqs, slots)}
      except PoolExhaustedError:
        self._preempt(max(reqs, key=lambda r: r.admitted_at))
      finally:
        self.stats["evictions"] += self.tree.num_evictions - evicted
    return {}

  def _preempt(self, req: _Request) -> None:
    self._release(req, cache=False)
    req.status = "waiting"
    req.num_preemptions += 1
    self._waiting.appendleft(req)
    self.stats["preemptions"] += 1

  # ------------------------------------------------------------------ finishing and caching
  def _emit(self, req: _Request, token: int, logits, events) -> None:
    req.output.append(token)
    if logits is not None:
      req.logits.append(np.asarray(logits, np.float32))
    if req.first_token_time is None:
      req.first_token_time = self.clock()
    reason = None
    if token in req.stop_ids:
      reason = "stop"
    elif len(req.output) >= req.max_new_tokens:
      reason = "length"
    elif req.num_tokens >= self.max_context:
      reason = "context"
    ev = TokenEvent(req.rid, token, len(req.output) - 1, reason)
    if reason is not None:
      req.finish_reason, req.finish_time = reason, self.clock()
      self._release(req, cache=self.config.cache_prefixes)
      req.status = "finished"
    events.append(ev)
    if req.callback is not None:
      req.callback(ev)

  def _release(self, req: _Request, cache: bool) -> None:
    """Removes a running request's sequence (keeping its full chunks cached if asked)."""
    self.tree.remove(req.seq_id, keep_cached=cache)
    del self._by_seq[req.seq_id]
    del self._running[req.rid]
    req.seq_id = None


# Module-level jitted steps (the graph definition is static), so engines over the same model share
# compiled executables. The pool (argument 2) is donated: it is updated in place.
@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill_step(graphdef, state, pool, tokens, inputs, last, temp, top_k, top_p, seeds, counters):
  model = nnx.merge(graphdef, state)
  logits, pool = model(tokens, pool, inputs, logits_index=last)
  return sampling_lib.sample(logits, temp, top_k, top_p, seeds, counters), logits, pool


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode_step(graphdef, state, pool, tokens, inputs, temp, top_k, top_p, seeds, counters):
  model = nnx.merge(graphdef, state)
  logits, pool = model(tokens, pool, inputs)
  return sampling_lib.sample(logits, temp, top_k, top_p, seeds, counters), logits, pool


def demo(num_requests: int = 4, system_prompt_len: int = 48, question_len: int = 6,
         max_new_tokens: int = 8, chunk_size: int = 16, seed: int = 0,
         impl: str = "xla") -> list[dict]:
  """Generates with the tiny random model for requests sharing a system prompt (quickstart).

  Returns one row per request: its prompt length, how many prompt tokens were found cached at
  admission (prefill skipped them), the tokens generated, and the same tokens from a dense
  per-request cache (`dense_tokens`), which must be equal.
  """
  from chunkattn_jax import dense_baseline, llama  # pylint: disable=import-outside-toplevel
  model = llama.Llama(llama.tiny(), impl=impl, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  v = model.config.vocab_size
  system = rng.integers(0, v, system_prompt_len).tolist()
  prompts = [system + rng.integers(0, v, question_len).tolist() for _ in range(num_requests)]
  eng = Engine(model, EngineConfig(n_chunks=64, chunk_size=chunk_size, max_batch=8))
  rids = [eng.submit(p, max_new_tokens) for p in prompts]
  for _ in eng.run():
    pass
  rows = []
  for rid, p in zip(rids, prompts):
    info = eng.request_info(rid)
    dense, _ = dense_baseline.generate(model, p, max_new_tokens)
    rows.append(dict(request=rid, prompt_len=len(p), cached_prompt_tokens=info["num_cached"],
                     tokens=eng.result(rid), dense_tokens=dense,
                     match=eng.result(rid) == dense))
  return rows
