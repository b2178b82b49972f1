"""Serving engine: a host loop with continuous batching over the prefix-shared chunk KV cache.

    engine = Engine(model, EngineConfig(n_chunks=512, chunk_size=16))
    rid = engine.submit(prompt_ids, max_new_tokens=32, stop_ids=(eos,))
    for event in engine.run():          # or engine.step() in your own loop, or engine.stream(...)
      print(event.request_id, event.token)

Each `step()`:
1. prefills: admits waiting requests (FIFO) while the batch has room and the pool can hold them:
   the prompt is inserted into the prefix tree and only its unmatched suffix is prefilled (the
   matched full chunks' K/V is read from the pool), up to `max_prefill_batch` requests per model
   call (a request whose matched chunks the current batch has yet to compute waits for the next
   call); the first token is sampled from the prefill logits. With `max_prefill_tokens` (chunked
   prefill) the step computes at most that many prompt tokens: a longer prompt is prefilled in
   pieces over several steps (the next piece of a prompt in progress goes first), and its first
   token comes from its last piece;
2. decodes one token for every running request whose prefill is complete: the pending tokens are
   appended to the tree, the decode plan is refreshed (rebuilt only when the tree's structure
   changed), and one jitted step runs the model over the plan's rows (padded to the plan's row
   capacity, so the step recompiles only when a capacity crosses a power of two);
3. finishes requests on a stop id, `max_new_tokens` or the context limit and frees their
   sequences; then delivers each new token (callbacks, the returned events, `stream()`).
   `last_step` says what the step computed.

The host bookkeeping is `scheduler.Scheduler`'s, the device calls `model_runner.ModelRunner`'s.
Each model call is a transaction: the scheduler plans it (tree inserts / appends), the runner
computes it, and only then is it committed (tokens recorded); if anything raises before the
commit, the plan is undone. Callbacks run after every commit of the step. The error contract
(docs/serving.md, "Errors"):

* a model call, the sharing policy or the clock raising propagates out of `step()` with that call
  rolled back: the tree holds exactly the tokens whose K/V is in the pool and every request keeps
  its output (cache evictions and preemptions made for room stay; both are safe). If the device
  pool itself was lost, every request is recomputed. A later `run()` gives the same tokens as an
  undisturbed run; tokens committed before the failure are delivered by the next step;
* a callback raising an `Exception` finishes that request with `finish_reason="error"` (the
  exception in `request_info(rid)["error"]`); its event is returned with that reason, and the
  other requests continue. A `BaseException` (KeyboardInterrupt) propagates at once; events not
  yet delivered are delivered by the next step;
* after `cancel(rid)` returns, the request emits nothing: undelivered tokens are dropped from its
  output;
* `step`, `run`, `stream` and `generate` from a callback (or from the policy or clock), and
  `submit` / `cancel` from the policy or clock, raise `ReentrantCallError` before changing anything.

Pool pressure: admission waits when the prompt does not fit; a decode step or a prefill piece that
needs new chunks first lets the tree evict cached prefixes (LRU), then preempts the most recently
admitted running request (a request still prefilling is always the latest), which goes back to the
front of the queue and is recomputed later from its prompt plus the tokens it already produced (its
output continues unchanged; sampling keys depend only on the request).

Prefix cache: finished requests are removed from the tree with `keep_cached=True`, so their full
chunks (prompt and generated text) stay in the pool as cached chunks that later prompts match and
revive; the tree evicts them least recently used, leaves first, only when it needs their slots.
Cached chunks are never rows of the decode plan.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chunkattn_jax import checks
from chunkattn_jax import kernel_limits
from chunkattn_jax import sampling as sampling_lib
from chunkattn_jax.plan import GpuFill
from chunkattn_jax.model_runner import PLAN_CAPACITY_NAMES, ModelRunner
from chunkattn_jax.prefix_tree import check_chunk_size
from chunkattn_jax.scheduler import Request, Scheduler, TokenEvent

__all__ = ["Engine", "EngineConfig", "ReentrantCallError", "RequestError", "StepStats", "TokenEvent",
           "demo"]

KV_DTYPES = ("float16", "bfloat16", "float32")


class ReentrantCallError(RuntimeError):
  """An engine method was called from inside a step (a callback, the sharing policy, the clock)
  where it cannot run safely. Nothing changed."""


class RequestError(RuntimeError):
  """`stream()`'s request failed: its callback raised (the cause)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Engine knobs, checked on construction (ValueError naming the field; TypeError for a policy
  that is not callable).

  Attributes:
    n_chunks: chunk slots in the KV pool (>= 1).
    chunk_size: tokens per chunk `c` (a power of two in [2, 256]).
    max_batch: most running requests (rows decoded per step), >= 1.
    max_prefill_batch: most requests prefilled in one model call, >= 1.
    threshold: plan sharing threshold, >= 1 (a chunk used by more rows goes through the
      chunk-first pass); a huge value gives the paged baseline (no shared compute, memory still
      shared).
    policy: optional per-run sharing decision `policy(num_rows, num_chunks) -> bool` replacing
      the threshold, e.g. `sharing_policy.CostModelPolicy.for_shapes(...)` on a GPU.
    max_chunks_per_item: `G` of the plan (a power of two).
    fill: how far `build_plan` splits shared runs (`plan.GpuFill`); default: the policy's, else,
      on a GPU backend, two chunk-first programs per SM of an H100 for the model's head counts
      (on a CPU runs are not split: nothing to fill).
    min_row_capacity: smallest plan row capacity `R` (>= 1).
    cache_prefixes: keep finished requests' full chunks cached (evicted LRU when space is needed).
    min_prefill_tokens: smallest prefill token bucket (prefill lengths are padded to powers of
      two), >= 1.
    max_prefill_tokens: chunked prefill: the most prompt tokens a step computes, over all its
      prefill pieces (tokens found in the prefix cache do not count); a longer prompt is
      prefilled in pieces over several steps, each followed by the step's decode of the running
      requests, so one long prompt delays the others' next token by at most this many tokens of
      compute (SGLang's `chunked_prefill_size`; vLLM's `max_num_batched_tokens` counts the decode
      tokens too). None (default): unchunked, every admitted prompt is prefilled in its step.
      >= 1; a multiple of `chunk_size` keeps pieces on chunk boundaries (any value is exact).
    kv_dtype: pool dtype, one of `KV_DTYPES` (None: the model's compute dtype); stored as its name.
    min_plan_capacities: smallest decode-plan capacities `(R, P, K, I, M)` (powers of two, see
      `plan.plan_capacities`; 0 or missing: no minimum). The engine pads every plan up to the
      largest capacities seen so far, so the decode step compiles once per new maximum;
      benchmarks set this from a warm-up engine's `plan_capacities` so the timed run never
      compiles.
    record_logits: keep each generated token's logits (float32 numpy, for tests).
    pool_seed: shuffle the pool's free list (tests); None or an integer >= 0.
  """
  n_chunks: int = 1024
  chunk_size: int = 16
  max_batch: int = 32
  max_prefill_batch: int = 8
  threshold: int = 1
  policy: Callable[[int, int], bool] | None = None
  max_chunks_per_item: int = 16
  fill: GpuFill | None = None
  min_row_capacity: int = 8
  cache_prefixes: bool = True
  min_prefill_tokens: int = 16
  max_prefill_tokens: int | None = None
  kv_dtype: str | None = None
  min_plan_capacities: tuple = ()
  record_logits: bool = False
  pool_seed: int | None = None

  def __post_init__(self):
    f = lambda name: f"EngineConfig.{name}"  # pylint: disable=unnecessary-lambda-assignment
    for name in ("n_chunks", "max_batch", "max_prefill_batch", "threshold", "min_row_capacity",
                 "min_prefill_tokens"):
      checks.check_int(getattr(self, name), f(name), min_value=1)
    try:
      check_chunk_size(self.chunk_size)
    except ValueError as e:
      raise ValueError(f"{f('chunk_size')}: {e}") from None
    if self.max_prefill_tokens is not None:
      object.__setattr__(self, "max_prefill_tokens",
                         checks.check_int(self.max_prefill_tokens, f("max_prefill_tokens"),
                                          min_value=1))
    checks.check_callable(self.policy, f("policy"))
    checks.check_power_of_two(self.max_chunks_per_item, f("max_chunks_per_item"))
    if self.fill is not None and not isinstance(self.fill, GpuFill):
      raise ValueError(f"{f('fill')} must be None or a plan.GpuFill, got {self.fill!r}")
    for name in ("cache_prefixes", "record_logits"):
      checks.check_bool(getattr(self, name), f(name))
    if self.pool_seed is not None:
      checks.check_int(self.pool_seed, f("pool_seed"), min_value=0)
    if self.kv_dtype is not None:
      try:
        name = jnp.dtype(self.kv_dtype).name
      except TypeError:
        name = None
      if name not in KV_DTYPES:
        raise ValueError(f"{f('kv_dtype')} must be None or one of {KV_DTYPES}, "
                         f"got {self.kv_dtype!r}")
      object.__setattr__(self, "kv_dtype", name)
    caps = self.min_plan_capacities
    if not isinstance(caps, (tuple, list)) or len(caps) > len(PLAN_CAPACITY_NAMES):
      raise ValueError(f"{f('min_plan_capacities')} must be a tuple of at most "
                       f"{len(PLAN_CAPACITY_NAMES)} capacities {PLAN_CAPACITY_NAMES}, got {caps!r}")
    for name, cap in zip(PLAN_CAPACITY_NAMES, caps):
      if checks.check_int(cap, f"{f('min_plan_capacities')} {name}", min_value=0):
        checks.check_power_of_two(cap, f"{f('min_plan_capacities')} {name}")
    object.__setattr__(self, "min_plan_capacities", tuple(int(c) for c in caps))


@dataclasses.dataclass(frozen=True)
class StepStats:
  """What one `step()` computed (`Engine.last_step`); a failed step counts what it committed.

  Attributes:
    prefill_tokens: prompt tokens computed (at most `max_prefill_tokens`).
    prefill_pieces: prefill pieces computed (one per request prefilled, whole or in part).
    prefill_calls: prefill model calls.
    decode_rows: requests decoded (0: no decode step ran).
    num_prefilling: requests whose prefill is still in progress after the step.
  """
  prefill_tokens: int = 0
  prefill_pieces: int = 0
  prefill_calls: int = 0
  decode_rows: int = 0
  num_prefilling: int = 0


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

  Attributes:
    scheduler: the host side (`scheduler.Scheduler`): tree, plans, requests and queues.
    runner: the device side (`model_runner.ModelRunner`): KV pool and jitted steps.
    tree, plans, pool: the scheduler's tree and plan builder, the runner's KV pool.
    stats: counters (admission waits, evictions, preemptions, pool resets, prefill / decode calls
      and tokens).
    last_step: `StepStats` of the latest `step()`.
  """

  def __init__(self, model, config: EngineConfig = EngineConfig(), *, pool_sharding=None,
               clock: Callable[[], float] | None = None):
    if not isinstance(config, EngineConfig):
      raise TypeError(f"config must be an EngineConfig, got {config!r}")
    checks.check_callable(clock, "clock")
    kernel_limits.check_engine(model, config)  # before any state: head_dim, chunk size, dtypes
    self.config = config
    self.model = model
    self.vocab_size = model.config.vocab_size
    self.max_context = model.config.max_position_embeddings
    if pool_sharding is None and getattr(model, "mesh", None) is not None:
      from chunkattn_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
      pool_sharding = sharding_lib.pool_sharding(model.mesh)
    self.stats = collections.Counter()
    self.clock = clock or time.perf_counter
    fill = config.fill or getattr(config.policy, "fill", None)
    if fill is None and jax.default_backend() == "gpu":  # give the chunk-first pass 2 CTAs per SM
      fill = GpuFill(num_kv_heads=model.config.num_kv_heads,
                     group_size=model.config.num_heads // model.config.num_kv_heads)
    self.scheduler = Scheduler(config, self.max_context, self.stats, fill=fill)
    self.runner = ModelRunner(model, config, pool_sharding)
    self.tree = self.scheduler.tree
    self.plans = self.scheduler.plans
    self._ids = itertools.count()
    self._outbox: collections.deque[TokenEvent] = collections.deque()  # committed, not delivered
    self._delivered: list[TokenEvent] = []  # delivered (callback run), not yet returned by step()
    self._phase: str | None = None  # "compute" (plan, model call, commit) | "deliver" | None
    self._commit_time = 0.0  # clock of the last commit: the finish time of a failed callback
    self.last_step = StepStats()

  @property
  def pool(self):
    """The device KV pool (`KVPool`)."""
    return self.runner.pool

  # ------------------------------------------------------------------ public API
  def submit(self, prompt: Sequence[int], max_new_tokens: int = 16, *, stop_ids: Sequence[int] = (),
             sampling: sampling_lib.SamplingParams | None = None,
             callback: Callable[[TokenEvent], None] | None = None) -> int:
    """Queues a request; returns its id. Validates everything before touching any state; may be
    called from a callback.

    Args:
      prompt: token ids (a non-empty sequence or 1-D integer array of ints in
        `[0, vocab_size)`; bools, floats, strings and mappings are rejected), at most the model's
        context.
      max_new_tokens: > 0.
      stop_ids: generation stops after emitting one of these tokens (it is part of the output);
        a sequence or set of token ids.
      sampling: `SamplingParams` (default greedy).
      callback: called with each `TokenEvent` of this request after the step that produced it
        committed; if it raises an `Exception`, the request finishes with
        `finish_reason="error"` (see the module docstring).

    Raises:
      ValueError: any invalid argument (the message names the offending value).
      TypeError: a callback that is not callable.
      ReentrantCallError: called from the sharing policy or the clock during a step.
    """
    self._check_not_computing("submit")
    prompt = self._check_tokens(prompt, "prompt")
    if len(prompt) > self.max_context:
      raise ValueError(f"prompt has {len(prompt)} tokens, longer than the model's context "
                       f"{self.max_context}")
    if not checks.is_int(max_new_tokens) or max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    stop = self._check_tokens(stop_ids, "stop_ids", allow_empty=True, allow_set=True)
    sampling = sampling_lib.GREEDY if sampling is None else sampling
    if not isinstance(sampling, sampling_lib.SamplingParams):
      raise ValueError(f"sampling must be a SamplingParams, got {sampling!r}")
    checks.check_callable(callback, "callback")
    total = min(len(prompt) + int(max_new_tokens), self.max_context + 1)
    need = -(-total // self.config.chunk_size)
    if need > self.config.n_chunks:
      raise ValueError(f"request needs up to {need} chunks ({len(prompt)} prompt + {max_new_tokens} "
                       f"new tokens) but the pool has only {self.config.n_chunks}")
    now = self.clock()
    rid = next(self._ids)
    self.scheduler.add(Request(rid, prompt, int(max_new_tokens), frozenset(stop), sampling,
                               callback, submit_time=now))
    return rid

  def step(self) -> list[TokenEvent]:
    """One engine iteration (prefill pieces, then one decode step); returns the new tokens,
    after running their callbacks. Raises what a model call raised, with the engine consistent
    (see the module docstring), and `ReentrantCallError` when called from inside a step."""
    with self._phase_of_step():
      before = self.stats.copy()
      try:
        self._prefill()
        self._decode()
      finally:
        self.last_step = self._step_stats(before)
      self._phase = "deliver"
      self._deliver()
    events, self._delivered = self._delivered, []
    return events

  def has_work(self) -> bool:
    return bool(self.scheduler.waiting or self.scheduler.running or self._outbox
                or self._delivered)

  def run(self, max_steps: int | None = None) -> Iterator[TokenEvent]:
    """Steps until every request finished (or `max_steps`), yielding tokens as they come."""
    self._check_idle("run")
    for i in itertools.count():
      if not self.has_work() or (max_steps is not None and i >= max_steps):
        return
      yield from self.step()

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16,
               **kw) -> list[list[int]]:
    """Submits every prompt, runs to completion, returns each request's generated tokens."""
    self._check_idle("generate")
    rids = [self.submit(p, max_new_tokens, **kw) for p in prompts]
    for _ in self.run():
      pass
    return [self.result(r) for r in rids]

  def stream(self, prompt: Sequence[int], max_new_tokens: int = 16, **kw) -> Iterator[int]:
    """Submits a request and yields its tokens as they are generated (driving the engine; other
    requests progress too). Raises `RequestError` if the request's callback raised."""
    self._check_idle("stream")
    rid = self.submit(prompt, max_new_tokens, **kw)
    req = self.scheduler.requests[rid]
    while req.status != "finished" or self._undelivered(rid):
      for ev in self.step():
        if ev.request_id == rid:
          yield ev.token
    if req.error is not None:
      raise RequestError(f"request {rid} failed: its callback raised {req.error!r}") from req.error

  def result(self, request_id: int) -> list[int]:
    """The tokens generated so far for a request. Raises KeyError for an unknown id."""
    return list(self._get(request_id).output)

  def request_info(self, request_id: int) -> dict:
    """Status, finish reason (and the callback's exception if it is "error"), timings and cache
    statistics of a request. A "running" request is `prefilling` until its whole prompt (and,
    after a preemption, its output) is computed; `num_prefilled` tokens of it are, meanwhile."""
    r = self._get(request_id)
    return dict(status=r.status, prefilling=r.prefilling, num_prefilled=r.num_prefilled,
                finish_reason=r.finish_reason, error=r.error,
                num_generated=len(r.output), prompt_len=len(r.prompt),
                num_preemptions=r.num_preemptions, num_cached=r.num_cached_at_admission,
                submit_time=r.submit_time, first_token_time=r.first_token_time,
                finish_time=r.finish_time, logits=r.logits)

  def cancel(self, request_id: int) -> None:
    """Stops a request (waiting or running) and frees its sequence; once it returns the request
    emits nothing more (tokens generated but not yet delivered are dropped from its output). A
    request whose last event was delivered is left as it is. May be called from a callback.
    Raises KeyError if unknown."""
    self._check_not_computing("cancel")
    req = self._get(request_id)
    if req.status == "finished" and not any(ev.request_id == req.rid for ev in self._outbox):
      return  # every event already went to its callback
    self._stop(req, "cancelled")

  def num_running(self) -> int:
    """Admitted requests (decoding, or prefilling a prompt in pieces)."""
    return len(self.scheduler.running)

  def num_waiting(self) -> int:
    return len(self.scheduler.waiting)

  @property
  def plan_capacities(self) -> tuple:
    """The largest decode-plan capacities `(R, P, K, I, M)` used so far."""
    return self.runner.plan_capacities

  def kv_bytes_in_use(self) -> int:
    """Bytes of the chunks currently held (running sequences and cached prefixes)."""
    return self.tree.pool.num_used * self.pool.nbytes_per_chunk()

  def check_consistency(self) -> None:
    """Raises AssertionError unless the tree, the queues and every request agree (tests)."""
    self.scheduler.check_consistency()
    for ev in list(self._outbox) + self._delivered:
      assert ev.request_id in self.scheduler.requests

  # ------------------------------------------------------------------ the step transaction
  def _prefill(self) -> None:
    batches = self.scheduler.plan_prefill()
    for i, batch in enumerate(batches):
      resets = self.runner.num_pool_resets
      try:
        now = self.clock()
        tokens, logits = self.runner.prefill(batch)
      except BaseException:
        self.scheduler.abort_prefill(batches[i:])
        self._after_failure(resets)
        raise
      self._outbox.extend(self.scheduler.commit_prefill(batch, tokens, logits, now))
      self._commit_time = now

  def _decode(self) -> None:
    work = self.scheduler.prepare_decode()
    if work is None:
      return
    resets = self.runner.num_pool_resets
    try:
      now = self.clock()
      plan = self.plans.plan()
      tokens, logits = self.runner.decode(work, plan)
    except BaseException:
      self.scheduler.abort_decode(work)
      self._after_failure(resets)
      raise
    self._outbox.extend(self.scheduler.commit_decode(work, tokens, logits, now))
    self._commit_time = now

  def _step_stats(self, before: collections.Counter) -> StepStats:
    delta = lambda key: self.stats[key] - before[key]  # pylint: disable=unnecessary-lambda-assignment
    return StepStats(prefill_tokens=delta("prefill_tokens"), prefill_pieces=delta("prefill_pieces"),
                     prefill_calls=delta("prefill_calls"), decode_rows=delta("decode_rows"),
                     num_prefilling=sum(r.prefilling for r in self.scheduler.running.values()))

  def _after_failure(self, resets_before: int) -> None:
    if self.runner.num_pool_resets != resets_before:  # every chunk's K/V is gone
      self.scheduler.drop_all_kv()
      self.stats["pool_resets"] += 1

  def _deliver(self) -> None:
    """Runs the callbacks of committed events in order, moving them to `_delivered`."""
    while self._outbox:
      ev = self._outbox.popleft()
      req = self.scheduler.requests[ev.request_id]
      req.num_delivered += 1
      if req.callback is not None:
        try:
          req.callback(ev)
        except Exception as e:  # pylint: disable=broad-except
          ev = dataclasses.replace(ev, finish_reason="error")
          self._stop(req, "error", error=e, now=self._commit_time)
        except BaseException:
          self._delivered.append(ev)
          raise
      self._delivered.append(ev)

  def _stop(self, req: Request, reason: str, error: Exception | None = None,
            now: float | None = None) -> None:
    now = self.clock() if now is None else now
    self.scheduler.stop(req, reason, now, error)
    if any(ev.request_id == req.rid for ev in self._outbox):
      self._outbox = collections.deque(ev for ev in self._outbox if ev.request_id != req.rid)

  def _undelivered(self, rid: int) -> bool:
    """Whether some event of the request has not been returned by `step()` yet."""
    return any(ev.request_id == rid for ev in itertools.chain(self._outbox, self._delivered))

  # ------------------------------------------------------------------ re-entrancy
  @contextlib.contextmanager
  def _phase_of_step(self):
    self._check_idle("step")
    self._phase = "compute"
    try:
      yield
    finally:
      self._phase = None

  def _check_idle(self, what: str) -> None:
    if self._phase is not None:
      raise ReentrantCallError(
          f"Engine.{what}() called from inside a step (from a callback, the sharing policy or "
          f"the clock); call it after step() returns")

  def _check_not_computing(self, what: str) -> None:
    if self._phase == "compute":
      raise ReentrantCallError(
          f"Engine.{what}() called while a step computes (from the sharing policy or the "
          f"clock); it may be called from callbacks or between steps")

  # ------------------------------------------------------------------ validation
  def _check_tokens(self, tokens, what: str, allow_empty: bool = False,
                    allow_set: bool = False) -> list[int]:
    """A list of token ids in `[0, vocab_size)`; ValueError for anything else (nothing is
    converted: bools, floats, strings, mappings and nested lists are rejected)."""
    if isinstance(tokens, (set, frozenset)) and allow_set:
      tokens = list(tokens)  # a set of stop ids: order does not matter
    if isinstance(tokens, (str, bytes, bytearray, Mapping, set, frozenset)):
      raise ValueError(f"{what} must be a sequence of token ids, got {type(tokens).__name__} "
                       f"{tokens!r:.80}")
    if isinstance(tokens, Sequence):
      values = list(tokens)
      bad = [t for t in values if not checks.is_int(t)]
      if bad:
        raise ValueError(f"{what} must hold integer token ids, got {bad[0]!r} "
                         f"({type(bad[0]).__name__})")
      arr = np.asarray(values, np.int64)
    elif hasattr(tokens, "__array__"):  # NumPy / JAX arrays
      arr = np.asarray(tokens)
      if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 1-D integer array of token ids, got shape "
                         f"{arr.shape} dtype {arr.dtype}")
    else:
      raise ValueError(f"{what} must be a sequence of token ids, got {type(tokens).__name__} "
                       f"{tokens!r:.80}")
    if arr.size == 0:
      if allow_empty:
        return []
      raise ValueError(f"{what} is empty")
    bad = arr[(arr < 0) | (arr >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"{what} has token id {int(bad[0])} outside [0, {self.vocab_size})")
    return arr.tolist()

  def _get(self, request_id) -> Request:
    if not checks.is_int(request_id) or request_id not in self.scheduler.requests:
      raise KeyError(f"unknown request id {request_id!r}")
    return self.scheduler.requests[request_id]


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
