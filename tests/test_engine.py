"""The serving engine vs the same model with a dense per-request KV cache and no sharing; its
error contract and argument checks."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chunkattn_jax import dense_baseline, engine, llama
from chunkattn_jax.engine import Engine, EngineConfig
from chunkattn_jax.sampling import SamplingParams

V = 97
LOGIT_ATOL = 2e-4  # fp32 model, logits of magnitude ~5


@pytest.fixture(scope="module")
def model():
  return llama.Llama(llama.tiny(), impl="xla", rngs=nnx.Rngs(1))


def _prompts(seed=0):
  """Shared (same 21-token system prompt), partly shared (first 9 tokens), unrelated prompts."""
  rng = np.random.default_rng(seed)
  sys_p = rng.integers(0, V, 21).tolist()
  return [sys_p + rng.integers(0, V, 3).tolist(),
          sys_p + rng.integers(0, V, 6).tolist(),
          sys_p[:9] + rng.integers(0, V, 9).tolist(),
          rng.integers(0, V, 11).tolist(),
          list(sys_p)]  # a prompt that is exactly the shared prefix


def _dense(model, prompts, n):
  return [dense_baseline.generate(model, p, n) for p in prompts]


def _check(eng, rids, dense):
  for rid, (toks, logits) in zip(rids, dense):
    assert eng.result(rid) == toks
    got = np.stack(eng.request_info(rid)["logits"])
    np.testing.assert_allclose(got, np.stack(logits), atol=LOGIT_ATOL)
  eng.tree.check_invariants()


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_greedy_matches_dense(model, impl):
  m = model if impl == "xla" else llama.Llama(llama.tiny(), impl=impl, rngs=nnx.Rngs(1))
  prompts = _prompts()
  eng = Engine(m, EngineConfig(n_chunks=64, chunk_size=4, record_logits=True, pool_seed=3))
  rids = [eng.submit(p, 9) for p in prompts]
  list(eng.run())
  _check(eng, rids, _dense(model, prompts, 9))
  info = [eng.request_info(r) for r in rids]
  assert info[0]["num_cached"] == 0 and info[1]["num_cached"] == 20 and info[2]["num_cached"] == 8
  assert info[4]["num_cached"] == 20  # last token always recomputed for its logits
  assert eng.stats["prefill_tokens_cached"] == 48


def test_batched_prefill_waits_for_pending_shared_chunks(model):
  """Requests admitted together are prefilled in one call, except that a request whose matched
  prefix is still being computed by the current batch starts the next one."""
  rng = np.random.default_rng(7)
  sys_p = rng.integers(0, V, 12).tolist()
  prompts = [rng.integers(0, V, 5).tolist(), sys_p + [1, 2], rng.integers(0, V, 9).tolist(),
             sys_p + [3], rng.integers(0, V, 3).tolist()]
  eng = Engine(model, EngineConfig(n_chunks=64, chunk_size=4, record_logits=True))
  rids = [eng.submit(p, 4) for p in prompts]
  eng.step()
  # batch 1: prompts 0, 1, 2; prompt 3 reuses prompt 1's chunks -> batch 2: prompts 3, 4.
  assert eng.stats["prefill_calls"] == 2
  assert eng.request_info(rids[3])["num_cached"] == 12
  list(eng.run())
  _check(eng, rids, _dense(model, prompts, 4))
  small = Engine(model, EngineConfig(n_chunks=64, chunk_size=4, max_prefill_batch=1))
  for p in prompts:
    small.submit(p, 1)
  small.step()
  assert small.stats["prefill_calls"] == len(prompts)


def test_sharing_policy_plan_matches_dense(model):
  """A per-run policy instead of the threshold: long runs chunk-first, short ones sequence-first."""
  calls = []

  def policy(num_rows, num_chunks):
    calls.append((num_rows, num_chunks))
    return num_chunks >= 3
  prompts = _prompts()
  eng = Engine(model, EngineConfig(n_chunks=64, chunk_size=4, record_logits=True, policy=policy))
  rids = [eng.submit(p, 6) for p in prompts]
  list(eng.run())
  _check(eng, rids, _dense(model, prompts, 6))
  assert any(n >= 3 for _, n in calls) and any(n < 3 for _, n in calls)


def test_pallas_interpret_small(model):
  """Pallas kernels (interpret mode) need d >= 64 and c >= 16: one layer, d = 64, c = 16."""
  cfg = llama.tiny(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=64)
  m = llama.Llama(cfg, impl="pallas_interpret", rngs=nnx.Rngs(2))
  sys_p = list(range(10, 42))
  prompts = [sys_p + [1, 2], sys_p + [3], [5, 6, 7]]
  eng = Engine(m, EngineConfig(n_chunks=16, chunk_size=16, record_logits=True))
  rids = [eng.submit(p, 3) for p in prompts]
  list(eng.run())
  _check(eng, rids, _dense(m, prompts, 3))


def test_requests_arriving_mid_run_and_paged_plan(model):
  prompts = _prompts(seed=1)
  for threshold in (1, 1000):  # two-phase plan, then the paged plan (no shared compute)
    eng = Engine(model, EngineConfig(n_chunks=64, chunk_size=4, record_logits=True,
                                     threshold=threshold))
    rids = [eng.submit(prompts[0], 12)]
    for _ in range(3):
      eng.step()
    rids.append(eng.submit(prompts[1], 5))
    eng.step()
    rids += [eng.submit(p, 7) for p in prompts[2:]]
    list(eng.run())
    _check(eng, rids, [dense_baseline.generate(model, p, n)
                       for p, n in zip(prompts, (12, 5, 7, 7, 7))])


def test_pool_pressure_waits_and_preemption(model):
  """A pool far too small for all requests at once: admission waits, decode preempts and
  recomputes; every request still gets exactly the dense tokens."""
  prompts = _prompts(seed=2)
  eng = Engine(model, EngineConfig(n_chunks=14, chunk_size=4, record_logits=True, pool_seed=1))
  rids = [eng.submit(p, 14) for p in prompts]
  events = list(eng.run())
  assert eng.stats["preemptions"] > 0 and eng.stats["admission_waits"] > 0
  assert len(events) == 14 * len(prompts)
  dense = _dense(model, prompts, 14)
  for rid, (toks, logits) in zip(rids, dense):
    assert eng.result(rid) == toks
    assert eng.request_info(rid)["status"] == "finished"
  assert any(eng.request_info(r)["num_preemptions"] for r in rids)
  eng.tree.check_invariants()


def test_prefix_cache_kept_after_finish_and_evicted_lru(model):
  rng = np.random.default_rng(3)
  sys_a = rng.integers(0, V, 16).tolist()
  sys_b = rng.integers(0, V, 16).tolist()
  eng = Engine(model, EngineConfig(n_chunks=12, chunk_size=4, record_logits=True))
  r1 = eng.submit(sys_a + [1, 2], 3)
  list(eng.run())
  # r1's sequence ends at 18 prompt + 2 appended tokens = 5 full chunks, all kept cached.
  assert eng.tree.pool.num_used == 5 == eng.tree.num_cached_chunks
  r2 = eng.submit(sys_a + [5], 3)
  list(eng.run())
  assert eng.request_info(r2)["num_cached"] == 16
  r3 = eng.submit(sys_b + [7, 7, 7], 2)  # needs 5 chunks: fits next to the cached prefix
  list(eng.run())
  # r2 revived and re-cached sys_a's 4 chunks; r3 added 5 cached chunks: 10 of 12 slots.
  assert eng.stats["evictions"] == 0 and eng.tree.pool.num_used == 10
  assert int(eng.plans.plan().num_rows) == 0  # cached chunks are never plan rows
  r4 = eng.submit(rng.integers(0, V, 30).tolist(), 2)  # needs 8 chunks: evicts sys_a (LRU)
  list(eng.run())
  assert eng.stats["evictions"] >= 1
  for rid, p, n in ((r1, sys_a + [1, 2], 3), (r2, sys_a + [5], 3), (r3, sys_b + [7, 7, 7], 2)):
    assert eng.result(rid) == dense_baseline.generate(model, p, n)[0]
  assert len(eng.result(r4)) == 2
  eng.tree.check_invariants()


def test_sampling_reproducible_and_batch_independent(model):
  prompts = _prompts(seed=4)
  sp = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=123)
  alone = Engine(model, EngineConfig(n_chunks=64, chunk_size=4))
  a = alone.generate([prompts[1]], 10, sampling=sp)[0]
  crowd = Engine(model, EngineConfig(n_chunks=64, chunk_size=4))
  rids = [crowd.submit(p, 10, sampling=SamplingParams(temperature=1.0, seed=i))
          for i, p in enumerate(prompts)]
  rid = crowd.submit(prompts[1], 10, sampling=sp)
  list(crowd.run())
  assert crowd.result(rid) == a
  greedy = dense_baseline.generate(model, prompts[1], 10)[0]
  assert a != greedy  # sampling does sample
  top1 = alone.generate([prompts[1]], 10, sampling=SamplingParams(temperature=2.0, top_k=1))[0]
  assert top1 == greedy
  assert len({tuple(crowd.result(r)) for r in rids}) == len(rids)


def test_stop_ids_streaming_and_callbacks(model):
  prompts = _prompts(seed=5)
  full = dense_baseline.generate(model, prompts[0], 8)[0]
  eng = Engine(model, EngineConfig(n_chunks=64, chunk_size=4))
  seen = []
  stop = full[3]
  rid = eng.submit(prompts[0], 8, stop_ids=[stop], callback=seen.append)
  other = list(eng.stream(prompts[1], 4))
  list(eng.run())
  first_stop = full.index(stop)
  assert eng.result(rid) == full[: first_stop + 1]
  assert [e.token for e in seen] == eng.result(rid)
  assert seen[-1].finish_reason == "stop" and all(e.finish_reason is None for e in seen[:-1])
  assert other == dense_baseline.generate(model, prompts[1], 4)[0]


def test_context_limit(model):
  small = llama.Llama(llama.tiny(max_position_embeddings=20), rngs=nnx.Rngs(1))
  eng = Engine(small, EngineConfig(n_chunks=16, chunk_size=4))
  rid = eng.submit(list(range(15)), 50)
  list(eng.run())
  assert len(eng.result(rid)) == 5 and eng.request_info(rid)["finish_reason"] == "context"


def test_bad_requests_leave_running_requests_undisturbed(model):
  prompts = _prompts(seed=6)
  eng = Engine(model, EngineConfig(n_chunks=32, chunk_size=4, max_batch=4))
  rids = [eng.submit(p, 6) for p in prompts[:2]]
  eng.step()
  bad = [
      (dict(prompt=[]), ValueError, "prompt is empty"),
      (dict(prompt=[1, V]), ValueError, f"token id {V} outside"),
      (dict(prompt=[1, -3]), ValueError, "token id -3 outside"),
      (dict(prompt="hello"), ValueError, "hello"),
      (dict(prompt=[1.5, 2]), ValueError, "integer"),
      (dict(prompt=[1], max_new_tokens=0), ValueError, "max_new_tokens.*0"),
      (dict(prompt=[1], max_new_tokens=-2), ValueError, "-2"),
      (dict(prompt=list(range(90)) * 6), ValueError, "540 tokens, longer than the model's context 512"),
      (dict(prompt=[1] * 100, max_new_tokens=100), ValueError, "chunks"),
      (dict(prompt=[1], stop_ids=[V + 1]), ValueError, f"stop_ids has token id {V + 1}"),
      (dict(prompt=[1], sampling=SamplingParams), ValueError, "SamplingParams"),
  ]
  for kw, err, msg in bad:
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(err, match=msg):
      eng.submit(kw.pop("prompt"), **kw)
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  for call in (eng.result, eng.cancel, eng.request_info):
    with pytest.raises(KeyError, match="unknown request id 999"):
      call(999)
  list(eng.run())
  for rid, p in zip(rids, prompts):
    assert eng.result(rid) == dense_baseline.generate(model, p, 6)[0]


def test_cancel(model):
  eng = Engine(model, EngineConfig(n_chunks=32, chunk_size=4, cache_prefixes=False))
  a = eng.submit(list(range(9)), 20)
  b = eng.submit(list(range(5, 14)), 20)
  eng.step()
  eng.cancel(a)
  eng.cancel(b)
  assert not eng.has_work() and eng.tree.pool.num_used == 0
  assert eng.request_info(a)["finish_reason"] == "cancelled"


def test_demo_helper():
  rows = engine.demo(num_requests=3, max_new_tokens=4)
  assert all(r["match"] for r in rows)
  assert [r["cached_prompt_tokens"] for r in rows] == [0, 48, 48]


# ---------------------------------------------------------------------- chunked prefill
def _long_prompts(seed):
  """`_prompts` plus prompts longer than any budget below: one sharing the 21-token system prompt
  (46 tokens) and an unrelated one (30)."""
  rng = np.random.default_rng(100 + seed)
  prompts = _prompts(seed)
  return prompts + [prompts[0][:21] + rng.integers(0, V, 25).tolist(),
                    rng.integers(0, V, 30).tolist()]


def _serve(eng, prompts, n, arrivals, on_step=None):
  """Submits prompt i before step `arrivals[i]`, steps until done; checks the engine after every
  step and that no step computes more prompt tokens than the budget. Returns the request ids and
  each step's `last_step`."""
  rids, steps, budget = [None] * len(prompts), [], eng.config.max_prefill_tokens
  for step in range(1000):
    for i, t in enumerate(arrivals):
      if t == step:
        rids[i] = eng.submit(prompts[i], n)
    if not eng.has_work() and step > max(arrivals):
      return rids, steps
    events = eng.step()
    eng.check_consistency()
    steps.append(eng.last_step)
    assert budget is None or eng.last_step.prefill_tokens <= budget
    if on_step is not None:
      on_step(events)
  raise AssertionError("the engine did not finish")


_UNCHUNKED = {}


def _unchunked(model, cfg, prompts, n, arrivals):
  key = (cfg, tuple(map(tuple, prompts)), n, tuple(arrivals))
  if key not in _UNCHUNKED:
    eng = Engine(model, cfg)
    rids, _ = _serve(eng, prompts, n, arrivals)
    _UNCHUNKED[key] = [(eng.result(r), np.stack(eng.request_info(r)["logits"])) for r in rids]
  return _UNCHUNKED[key]


@pytest.mark.parametrize("budget", [3, 4, 10])
def test_chunked_prefill_equals_unchunked_under_preemption(model, budget):
  """Staggered arrivals, shared prefixes, prompts shorter and longer than the budget, pieces
  ending off chunk boundaries (3, 10 with c = 4), a pool small enough to preempt requests in the
  middle of their prefill: the same tokens (and logits) as the unchunked engine, and as a dense
  cache, with at most `budget` prompt tokens computed per step."""
  prompts = _long_prompts(seed=2)
  arrivals = [0, 0, 0, 4, 5, 5, 6]
  cfg = EngineConfig(n_chunks=17, chunk_size=4, record_logits=True, pool_seed=1)
  ref = _unchunked(model, cfg, prompts, 11, arrivals)
  eng = Engine(model, dataclasses.replace(cfg, max_prefill_tokens=budget))
  preempted_while_prefilling = []
  preempt = eng.scheduler.preempt

  def counting_preempt(req):
    preempted_while_prefilling.append(req.prefilling)
    preempt(req)
  eng.scheduler.preempt = counting_preempt
  rids, steps = _serve(eng, prompts, 11, arrivals)
  for rid, (toks, logits) in zip(rids, ref):
    assert eng.result(rid) == toks and len(toks) == 11  # nothing dropped
    assert eng.request_info(rid)["finish_reason"] == "length"
    np.testing.assert_allclose(np.stack(eng.request_info(rid)["logits"]), logits, atol=LOGIT_ATOL)
  for rid, p in zip(rids[-2:], prompts[-2:]):
    assert eng.result(rid) == dense_baseline.generate(model, p, 11)[0]
  assert any(s.num_prefilling for s in steps) and max(s.prefill_tokens for s in steps) == budget
  assert any(preempted_while_prefilling) and eng.stats["admission_waits"] > 0
  assert eng.stats["prefill_pieces"] > eng.stats["prefill_calls"] > len(prompts)
  assert eng.tree.pool.num_used == eng.tree.num_cached_chunks


def test_decode_is_interleaved_with_a_long_prefill(model):
  """While a 46-token prompt is prefilled 8 tokens a step, the running request gets a token every
  step; the long one gets none until its last piece. Unchunked, its admission step computes all
  46 tokens before anyone's next token."""
  prompts = _long_prompts(seed=3)
  short, long_ = prompts[3], prompts[5]  # unrelated: nothing of the long prompt is cached
  chunked = Engine(model, EngineConfig(n_chunks=64, chunk_size=4, max_prefill_tokens=8))
  a = chunked.submit(short, 12)
  first = [chunked.step(), chunked.step()]  # 11 tokens: pieces of 8 and 3, then a decodes
  assert [[e.request_id for e in ev] for ev in first] == [[], [a, a]]
  b = chunked.submit(long_, 4)
  per_step = []
  for _ in range(6):
    events = chunked.step()
    chunked.check_consistency()
    per_step.append(([e.request_id for e in events], chunked.last_step))
  # Pieces of 8, 8, 8, 8, 8, 6 tokens, a decode of `a` after each; b's first token comes from its
  # last piece, and b decodes in that same step.
  assert [ids for ids, _ in per_step] == [[a]] * 5 + [[b, a, b]]
  assert [st.prefill_tokens for _, st in per_step] == [8, 8, 8, 8, 8, 6]
  assert [st.num_prefilling for _, st in per_step] == [1, 1, 1, 1, 1, 0]
  assert [st.decode_rows for _, st in per_step] == [1, 1, 1, 1, 1, 2]
  info = chunked.request_info(b)
  assert info["status"] == "running" and not info["prefilling"]
  list(chunked.run())
  assert chunked.result(a) == dense_baseline.generate(model, short, 12)[0]
  assert chunked.result(b) == dense_baseline.generate(model, long_, 4)[0]
  unchunked = Engine(model, EngineConfig(n_chunks=64, chunk_size=4))
  a = unchunked.submit(short, 12)
  unchunked.step()
  unchunked.submit(long_, 4)
  unchunked.step()
  assert unchunked.last_step.prefill_tokens == len(long_)
  assert unchunked.last_step.prefill_pieces == 1 and unchunked.last_step.num_prefilling == 0
  assert unchunked.result(a) == chunked.result(a)[:3]


def test_cancel_while_prefilling(model):
  """Cancelling a request in the middle of its prefill frees its chunks at once; the other request
  is unaffected."""
  prompts = _long_prompts(seed=4)
  eng = Engine(model, EngineConfig(n_chunks=64, chunk_size=4, max_prefill_tokens=8,
                                   cache_prefixes=False))
  a = eng.submit(prompts[3], 6)  # 11 tokens: pieces of 8 and 3
  b = eng.submit(prompts[6], 6)  # 30 tokens: 5 after a's last piece, then 8, 8, 8, 1
  eng.step()
  eng.step()
  eng.step()
  info = eng.request_info(b)
  assert info["status"] == "running" and info["prefilling"] and info["num_prefilled"] == 13
  used = eng.tree.pool.num_used
  eng.cancel(b)
  eng.check_consistency()
  assert eng.tree.pool.num_used == used - 4  # b's 13 tokens: 4 chunks
  assert eng.result(b) == [] and eng.request_info(b)["finish_reason"] == "cancelled"
  list(eng.run())
  assert eng.result(a) == dense_baseline.generate(model, prompts[3], 6)[0]
  assert eng.tree.pool.num_used == 0


@pytest.mark.parametrize("when", ["before", "after"])
def test_failed_piece_rolls_back_only_that_piece(model, when):
  """A prefill piece's model call raising before it ran: that piece is undone, the earlier ones
  stay and the request goes on prefilling; after it ran (the donated pool is lost): everything is
  recomputed. Either way the tokens are the unchunked engine's."""
  prompts = _long_prompts(seed=5)
  picked = [prompts[3], prompts[6]]  # 11 and 30 tokens
  ref = _reference(model, picked, 5)
  eng = Engine(model, dataclasses.replace(CFG, max_prefill_tokens=8))
  rids = [eng.submit(p, 5) for p in picked]
  eng.step()  # 8 tokens of prompt 0
  eng.step()  # its last 3, then 5 of prompt 1
  assert eng.request_info(rids[1])["num_prefilled"] == 5
  real = eng.runner.prefill_step

  def failing(*args):
    eng.runner.prefill_step = real
    if when == "after":
      real(*args)
    raise MemoryError("device out of memory")
  eng.runner.prefill_step = failing
  out = eng.result(rids[0])
  with pytest.raises(MemoryError):
    eng.step()
  eng.check_consistency()
  assert eng.result(rids[0]) == out
  info = eng.request_info(rids[1])
  if when == "before":
    assert info["status"] == "running" and info["prefilling"] and info["num_prefilled"] == 5
  else:
    assert info["status"] == "waiting" and eng.num_waiting() == 2 and eng.tree.pool.num_used == 0
  list(eng.run())
  assert [eng.result(r) for r in rids] == ref


# ---------------------------------------------------------------------- the error contract
# These use only the public API (the fault-injection suite, tests/test_engine_faults.py, covers the
# same ground at random points).
CFG = EngineConfig(n_chunks=32, chunk_size=4)


class _Interrupt(BaseException):
  """Stands for KeyboardInterrupt (which pytest would take as the user stopping the run)."""


def _reference(model, prompts, n):
  return Engine(model, CFG).generate(prompts, n)


@pytest.mark.parametrize("fail_at", [0, 2], ids=["at_prefill", "at_decode"])
def test_callback_error_finishes_only_its_request(model, fail_at):
  """A callback raising (on the prefill's token, or a decode step's) finishes that request with
  finish_reason "error"; the others are unaffected and nothing is appended twice."""
  prompts = _prompts(seed=8)[:3]
  ref = _reference(model, prompts, 6)
  eng = Engine(model, CFG)
  err = RuntimeError("client went away")

  def callback(ev):
    if ev.index == fail_at:
      raise err
  rids = [eng.submit(p, 6, callback=callback if i == 1 else None) for i, p in enumerate(prompts)]
  events = list(eng.run())
  info = eng.request_info(rids[1])
  assert info["status"] == "finished" and info["finish_reason"] == "error" and info["error"] is err
  assert eng.result(rids[1]) == ref[1][: fail_at + 1]
  mine = [e for e in events if e.request_id == rids[1]]
  assert [e.token for e in mine] == eng.result(rids[1]) and mine[-1].finish_reason == "error"
  for i in (0, 2):
    assert eng.result(rids[i]) == ref[i]
  assert len(events) == 12 + fail_at + 1
  eng.tree.check_invariants()
  assert eng.tree.pool.num_used == eng.tree.num_cached_chunks


def test_stream_raises_when_its_callback_failed(model):
  prompt = _prompts(seed=8)[0]
  ref = _reference(model, [prompt], 6)[0]
  eng = Engine(model, CFG)
  err = ValueError("bad client")

  def callback(ev):
    if ev.index == 2:
      raise err
  got = []
  with pytest.raises(engine.RequestError, match="bad client") as info:
    for tok in eng.stream(prompt, 6, callback=callback):
      got.append(tok)
  assert info.value.__cause__ is err and got == ref[:3]
  with pytest.raises(TypeError, match="clock"):
    Engine(model, CFG, clock=5)


def test_interrupted_step_then_run_again(model):
  """A BaseException from a callback propagates; running again delivers the rest of that step's
  events once and every request gets exactly its undisturbed tokens (before: the other requests'
  pending tokens were appended to the tree a second time)."""
  prompts = _prompts(seed=10)[:3]
  ref = _reference(model, prompts, 6)
  eng = Engine(model, CFG)
  seen = []

  def callback(ev):
    seen.append(ev)
    if ev.index == 2 and len(seen) == 3:
      raise _Interrupt()
  rids = [eng.submit(p, 6, callback=callback if i == 0 else None) for i, p in enumerate(prompts)]
  events = []
  with pytest.raises(_Interrupt):
    for ev in eng.run():
      events.append(ev)
  eng.tree.check_invariants()
  events += list(eng.run())
  assert [eng.result(r) for r in rids] == ref
  for rid in rids:
    assert [e.index for e in events if e.request_id == rid] == list(range(6))
  assert [e.token for e in seen] == ref[0]
  eng.tree.check_invariants()


@pytest.mark.parametrize("cancel_at", [2, 5], ids=["mid", "last_token"])
def test_cancel_from_a_callback_emits_nothing_more(model, cancel_at):
  """A's callback cancels B in a step that also produced a token for B (at `cancel_at`, B's last
  token in the second case): B's undelivered token is dropped (before: it was still emitted, and
  on its last token the engine raised UnknownSequenceError)."""
  prompts = _prompts(seed=9)[:2]
  ref = _reference(model, prompts, 6)
  eng = Engine(model, CFG)
  rids = []

  def callback(ev):
    if ev.index == cancel_at:
      eng.cancel(rids[1])
  rids += [eng.submit(prompts[0], 6, callback=callback), eng.submit(prompts[1], 6)]
  events = list(eng.run())
  b_events = [e for e in events if e.request_id == rids[1]]
  assert [e.index for e in b_events] == list(range(cancel_at))
  assert eng.result(rids[1]) == ref[1][:cancel_at]
  assert eng.request_info(rids[1])["finish_reason"] == "cancelled"
  assert eng.result(rids[0]) == ref[0]
  eng.tree.check_invariants()


def test_engine_calls_from_a_callback_raise(model):
  """step / run / stream / generate from a callback raise ReentrantCallError and change nothing
  (before: the nested step ran and changed the other requests' outputs)."""
  prompts = _prompts(seed=11)[:2]
  ref = _reference(model, prompts, 3)
  eng = Engine(model, CFG)
  outcomes = []

  def callback(ev):
    del ev
    for call in (eng.step, lambda: list(eng.run()), lambda: list(eng.stream(prompts[1], 2)),
                 lambda: eng.generate([prompts[1]], 2)):
      try:
        call()
        outcomes.append(None)
      except RuntimeError as e:
        outcomes.append(e)
  rids = [eng.submit(prompts[0], 3, callback=callback), eng.submit(prompts[1], 3)]
  list(eng.run())
  assert len(outcomes) == 4 * 3
  assert all(isinstance(e, engine.ReentrantCallError) for e in outcomes), outcomes
  assert "inside a step" in str(outcomes[0])
  assert [eng.result(r) for r in rids] == ref
  with pytest.raises(KeyError):  # the refused stream / generate submitted nothing
    eng.result(rids[1] + 1)


@pytest.mark.parametrize("how", ["raises", "reenters"])
def test_policy_error_rolls_the_decode_step_back(model, how):
  """User code running inside a step (here the sharing policy) raising, or calling back into the
  engine (ReentrantCallError): the step is rolled back and a later run() gives the undisturbed
  tokens (before: the pending tokens stayed appended to the tree and were appended again)."""
  prompts = _prompts(seed=12)[:3]
  ref = _reference(model, prompts, 5)
  fail = []

  def policy(num_rows, num_chunks):
    del num_chunks
    if fail:
      fail.pop()
      if how == "raises":
        raise ValueError("policy failed")
      eng.submit([1, 2, 3], 2)  # not allowed while a step computes
    return num_rows > 1
  eng = Engine(model, dataclasses.replace(CFG, policy=policy))
  rids = [eng.submit(p, 5) for p in prompts]
  eng.step()
  eng.submit(prompts[0][:5], 1)  # a structure change: the next plan is rebuilt, calling policy
  fail.append(True)
  with pytest.raises(ValueError if how == "raises" else RuntimeError,
                     match="policy failed" if how == "raises" else "while a step computes"):
    eng.step()
  assert [len(eng.result(r)) for r in rids] == [2, 2, 2]
  assert eng.num_waiting() == 0
  eng.tree.check_invariants()
  list(eng.run())
  assert [eng.result(r) for r in rids] == ref


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_failed_model_call_rolls_the_step_back(model, phase, when):
  """The jitted model call raising before it ran (the pool intact) or after (its donated pool is
  gone: every request is recomputed): the step is rolled back and a later run() gives the
  undisturbed tokens."""
  prompts = _prompts(seed=13)
  ref = _reference(model, prompts, 5)
  eng = Engine(model, CFG)
  rids = [eng.submit(p, 5) for p in prompts[:3]]
  eng.step()
  eng.step()
  rids += [eng.submit(p, 5) for p in prompts[3:]]
  name = f"{phase}_step"
  real = getattr(eng.runner, name)

  def failing(*args):
    setattr(eng.runner, name, real)  # fails once
    if when == "after":
      real(*args)
    raise MemoryError("device out of memory")
  setattr(eng.runner, name, failing)
  before = [eng.result(r) for r in rids]
  with pytest.raises(MemoryError):
    eng.step()
  eng.check_consistency()
  if phase == "prefill":  # the failed batch is queued again, nothing else changed
    assert [eng.result(r) for r in rids] == before
  assert eng.stats["pool_resets"] == (when == "after")
  if when == "after":  # every request is queued to be recomputed, nothing is cached
    assert eng.num_waiting() == 5 and eng.tree.pool.num_used == 0
  else:
    assert eng.num_waiting() == (2 if phase == "prefill" else 0)
  list(eng.run())
  assert [eng.result(r) for r in rids] == ref
  eng.check_consistency()


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("field, value, match", [
    ("max_batch", 0, "max_batch"), ("max_batch", True, "max_batch"),
    ("threshold", 0, "threshold"), ("threshold", 1.5, "threshold"),
    ("max_chunks_per_item", 3, "max_chunks_per_item must be a power of two"),
    ("max_chunks_per_item", 0, "max_chunks_per_item"),
    ("kv_dtype", "int8", "kv_dtype"), ("kv_dtype", "float64", "kv_dtype"),
    ("kv_dtype", "bogus", "kv_dtype"),
    ("n_chunks", 0, "n_chunks"), ("chunk_size", 6, "chunk_size"), ("chunk_size", 512, "chunk_size"),
    ("max_prefill_batch", 0, "max_prefill_batch"), ("min_row_capacity", 0, "min_row_capacity"),
    ("min_prefill_tokens", -4, "min_prefill_tokens"), ("cache_prefixes", 1, "cache_prefixes"),
    ("record_logits", "yes", "record_logits"), ("pool_seed", -1, "pool_seed"),
    ("min_plan_capacities", (8, 3), "power of two"), ("min_plan_capacities", (8,) * 6, "at most"),
    ("min_plan_capacities", 8, "tuple"),
    ("max_prefill_tokens", 0, r"max_prefill_tokens .*got 0"),
    ("max_prefill_tokens", -8, r"max_prefill_tokens .*got -8"),
    ("max_prefill_tokens", 2.0, r"max_prefill_tokens .*got 2\.0"),
    ("max_prefill_tokens", "8", r"max_prefill_tokens .*got '8'"),
    ("max_prefill_tokens", True, r"max_prefill_tokens .*got True"),
])
def test_engine_config_rejects_bad_values(field, value, match):
  """Checked at construction (before: max_batch=0 made run() spin forever; threshold=0, a
  non-power-of-two G or kv_dtype="int8" failed only at the first decode, after the tree
  changed)."""
  with pytest.raises(ValueError, match=match):
    EngineConfig(**{field: value})


def test_engine_config_types_and_normalisation():
  with pytest.raises(TypeError, match="policy"):
    EngineConfig(policy=5)
  assert EngineConfig(kv_dtype=jnp.bfloat16).kv_dtype == "bfloat16"
  assert EngineConfig(min_plan_capacities=[8, np.int64(4)]).min_plan_capacities == (8, 4)
  assert type(EngineConfig(max_prefill_tokens=np.int64(8)).max_prefill_tokens) is int
  with pytest.raises(TypeError, match="EngineConfig"):
    Engine(None, config=dict(n_chunks=8))


def test_submit_rejects_values_it_would_convert(model):
  """Bools, floats, mappings, sets, nested lists and iterators are not token ids (before: [1, True]
  and {1: 2} were silently converted); a callback must be callable. Nothing is queued."""
  eng = Engine(model, CFG)
  bad = [
      (dict(prompt=[1, True]), ValueError, "True"),
      (dict(prompt={1: 2}), ValueError, "dict"),
      (dict(prompt={1, 2}), ValueError, "set"),
      (dict(prompt=[1, 2.0]), ValueError, "2.0"),
      (dict(prompt=np.array([1.0, 2.0])), ValueError, "float"),
      (dict(prompt=np.array([True])), ValueError, "bool"),
      (dict(prompt=[[1, 2]]), ValueError, "integer"),
      (dict(prompt=iter([1, 2])), ValueError, "sequence"),
      (dict(prompt=5), ValueError, "sequence"),
      (dict(prompt=[1], callback=5), TypeError, "callback"),
      (dict(prompt=[1], max_new_tokens=True), ValueError, "max_new_tokens"),
      (dict(prompt=[1], max_new_tokens=2.0), ValueError, "max_new_tokens"),
      (dict(prompt=[1], stop_ids=[True]), ValueError, "True"),
      (dict(prompt=[1], stop_ids={3: 4}), ValueError, "dict"),
  ]
  for kw, err, msg in bad:
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(err, match=msg):
      eng.submit(kw.pop("prompt"), **kw)
  assert not eng.has_work() and eng.num_waiting() == 0
  for bad_id in (True, 0.0, "0", None):
    with pytest.raises(KeyError, match="unknown request id"):
      eng.result(bad_id)
  # Accepted forms: lists, tuples, ranges, integer arrays; a set of stop ids.
  rids = [eng.submit(np.array([1, 2], np.int64), 2), eng.submit(range(3), 2),
          eng.submit((1, 2), 2, stop_ids={5, np.int32(6)})]
  assert eng.result(rids[0]) == [] and eng.num_waiting() == 3
