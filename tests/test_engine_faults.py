"""Fault injection: the engine under exceptions at random points, cancellations and pool pressure.

Each run serves a small workload (a shared system prompt, a prompt that is exactly that prefix, an
unrelated one; greedy and sampled requests) on the tiny model, with faults drawn from a seeded RNG:

* callbacks that raise (that request finishes with "error"), raise a BaseException (it propagates;
  the step's remaining events come with the next step), cancel a request (maybe their own) or
  submit a new one;
* the host-side sampling inputs raising (before the device call);
* the model step raising before the device call, after it (the donated pool is lost: everything is
  recomputed) or when its tokens are fetched (the step's new pool is kept);
* the sharing policy raising while the decode plan is built;
* a pool small enough that admission waits, cached prefixes are evicted and requests preempted;
* on odd seeds, chunked prefill (`max_prefill_tokens=5`): prompts are prefilled in pieces over
  several steps, so faults and preemptions also hit requests in the middle of their prefill.

After every step, failed or not, the engine is checked: tree invariants, every request in exactly
one place, the tree holding exactly each running request's prompt and output. At the end every
request finished; the events `step()` returned for it are its output, in order, each once, and its
callback saw the same events; a request that was neither cancelled nor failed has exactly the
tokens of an undisturbed (and unchunked) run, the others a prefix of them.
"""

import collections

import numpy as np
import pytest
from flax import nnx

from chunkattn_jax import llama
from chunkattn_jax.engine import Engine, EngineConfig
from chunkattn_jax.sampling import SamplingParams

V = 97
C = 4
NUM_RUNS = 100  # seeds; each run injects up to MAX_FAULTS faults
MAX_FAULTS = 8
# Every run uses the same pool (12 chunks: room for two or three of the requests at once) and plan
# capacities (R, P, K, I, M) covering all its plans, so the steps compile a few times in all:
# runs differ in their faults, not in their shapes.
N_CHUNKS = 12
PLAN_CAPS = (8, 8, 2, 8, 8)


class InjectedFault(Exception):
  pass


class Interrupt(BaseException):
  """Stands for KeyboardInterrupt (which pytest would treat as the user stopping the run)."""


class _PoisonedTokens:
  """A step result whose fetch fails, as an asynchronous device error surfaces on transfer."""

  def __array__(self, *args, **kwargs):
    raise InjectedFault("fetch")


class Faults:
  """Draws faults from a seeded RNG; at most `budget` in a run."""

  def __init__(self, rng, rate, budget):
    self.rng, self.rate, self.budget = rng, rate, budget
    self.count = collections.Counter()

  def hit(self, site: str, rate: float | None = None) -> bool:
    if self.budget and self.rng.random() < (self.rate if rate is None else rate):
      self.budget -= 1
      self.count[site] += 1
      return True
    return False

  def maybe_raise(self, site: str) -> None:
    if self.hit(site):
      raise InjectedFault(site)


@pytest.fixture(scope="module")
def model():
  return llama.Llama(llama.tiny(), impl="xla", rngs=nnx.Rngs(1))


def _workload(seed):
  """Requests (prompt, max_new_tokens, stop_ids, sampling) and spare prompts callbacks submit."""
  rng = np.random.default_rng(1000 + seed)
  system = rng.integers(0, V, 2 * C).tolist()
  prompts = [system + rng.integers(0, V, int(rng.integers(1, 6))).tolist() for _ in range(4)]
  prompts += [list(system), rng.integers(0, V, 9).tolist()]
  spare = [system + rng.integers(0, V, 3).tolist(), rng.integers(0, V, 5).tolist()]
  reqs = []
  for i, p in enumerate(prompts + spare):
    sampling = SamplingParams(temperature=0.8, top_k=20, seed=seed * 10 + i) if i % 2 else None
    reqs.append((p, int(rng.integers(3, 9)), (int(rng.integers(0, V)),) if i == 2 else (),
                 sampling))
  return reqs[: len(prompts)], reqs[len(prompts):]


def _config(policy=None, max_prefill_tokens=None):
  return EngineConfig(n_chunks=N_CHUNKS, chunk_size=C, max_batch=8, max_prefill_batch=4,
                      min_prefill_tokens=16, min_plan_capacities=PLAN_CAPS, policy=policy,
                      max_prefill_tokens=max_prefill_tokens)


_REFERENCES = {}


def _reference(model, key, reqs):
  """The tokens and finish reason of each request in an undisturbed run (cached per workload)."""
  if key in _REFERENCES:
    return _REFERENCES[key]
  eng = Engine(model, _config())
  rids = [eng.submit(p, n, stop_ids=s, sampling=sp) for p, n, s, sp in reqs]
  list(eng.run())
  _REFERENCES[key] = [(eng.result(r), eng.request_info(r)["finish_reason"]) for r in rids]
  return _REFERENCES[key]


def _inject_device_faults(eng, faults):
  runner = eng.runner

  def wrap(step):
    def faulty(*args):
      mode = faults.rng.choice(["before", "after", "fetch"])
      if faults.hit(f"model_{mode}"):
        if mode == "before":
          raise InjectedFault("before the model call")
        out = step(*args)
        if mode == "after":
          raise InjectedFault("after the model call (its donated pool is gone)")
        return (_PoisonedTokens(),) + tuple(out[1:])
      return step(*args)
    return faulty
  runner.prefill_step = wrap(runner.prefill_step)
  runner.decode_step = wrap(runner.decode_step)
  sampling_arrays = runner.sampling_arrays

  def faulty_sampling(rows, size):
    faults.maybe_raise("sampling")
    return sampling_arrays(rows, size)
  runner.sampling_arrays = faulty_sampling


def _run_with_faults(model, seed, reference, reqs, spare):
  rng = np.random.default_rng(seed)
  faults = Faults(rng, rate=0.08, budget=MAX_FAULTS)

  def policy(num_rows, num_chunks):
    del num_chunks
    faults.maybe_raise("policy")
    return num_rows > 1  # what threshold=1 decides

  # Odd seeds prefill in pieces of at most 5 tokens (off chunk boundaries; every prompt has 8-13):
  # their tokens must still be the unchunked reference's.
  eng = Engine(model, _config(policy, max_prefill_tokens=5 if seed % 2 else None))
  _inject_device_faults(eng, faults)
  seen = collections.defaultdict(list)   # rid -> events its callback got
  returned = collections.defaultdict(list)  # rid -> events step() returned
  expected = {}  # rid -> index into the reference
  rids = []
  spare_left = list(range(len(spare)))

  def submit(k, spec):
    p, n, s, sp = spec
    rid = eng.submit(p, n, stop_ids=s, sampling=sp, callback=callback)
    expected[rid] = k
    rids.append(rid)

  def callback(ev):
    seen[ev.request_id].append(ev)
    if faults.hit("callback_cancel", 0.03):
      eng.cancel(int(rng.choice(rids)))
    if spare_left and faults.hit("callback_submit", 0.03):
      k = spare_left.pop()
      submit(len(reqs) + k, spare[k])
    if faults.hit("callback_error", 0.03):
      raise InjectedFault("callback")
    if faults.hit("callback_interrupt", 0.01):
      raise Interrupt()

  for k, spec in enumerate(reqs[:4]):
    submit(k, spec)
  late = list(enumerate(reqs))[4:]
  failures = prefilling_steps = 0
  for step in range(400):
    if not eng.has_work() and not late:
      break
    if late and step % 2:  # the rest arrive while the first ones run
      submit(*late.pop(0))
    try:
      events = eng.step()
    except (InjectedFault, Interrupt):
      failures += 1
      events = []
    eng.check_consistency()
    budget = eng.config.max_prefill_tokens
    assert budget is None or eng.last_step.prefill_tokens <= budget, (seed, eng.last_step)
    prefilling_steps += eng.last_step.num_prefilling > 0
    for ev in events:
      returned[ev.request_id].append(ev)
  else:
    pytest.fail(f"seed {seed}: the engine did not finish in 400 steps")

  for rid in rids:
    info = eng.request_info(rid)
    out = eng.result(rid)
    ref_tokens, ref_reason = reference[expected[rid]]
    assert info["status"] == "finished", (seed, rid)
    evs = returned[rid]
    assert [e.index for e in evs] == list(range(len(out))), (seed, rid, "lost or repeated event")
    assert [e.token for e in evs] == out
    assert [(e.index, e.token) for e in seen[rid]] == [(e.index, e.token) for e in evs]
    if info["finish_reason"] in ("cancelled", "error"):
      assert out == ref_tokens[: len(out)], (seed, rid)
      assert (info["error"] is not None) == (info["finish_reason"] == "error")
      if info["finish_reason"] == "error":
        assert evs[-1].finish_reason == "error"
    else:
      assert (out, info["finish_reason"]) == (ref_tokens, ref_reason), (seed, rid)
      assert evs[-1].finish_reason == ref_reason
  assert eng.tree.pool.num_used == eng.tree.num_cached_chunks  # only the prefix cache is left
  return faults.count, failures, eng.stats + collections.Counter(
      steps_ending_prefilling=prefilling_steps)


def test_random_faults_over_many_seeds(model):
  totals, failures, preemptions, resets = collections.Counter(), 0, 0, 0
  chunked_prefilling_steps = 0
  for seed in range(NUM_RUNS):
    reqs, spare = _workload(seed % 16)
    reference = _reference(model, seed % 16, reqs + spare)
    count, n_failed, stats = _run_with_faults(model, seed, reference, reqs, spare)
    totals.update(count)
    failures += n_failed
    preemptions += stats["preemptions"]
    resets += stats["pool_resets"]
    if seed % 2:
      chunked_prefilling_steps += stats["steps_ending_prefilling"]
  print(f"\n{NUM_RUNS} runs, {sum(totals.values())} faults {dict(sorted(totals.items()))}, "
        f"{failures} failed steps, {preemptions} preemptions, {resets} pool resets")
  # Every kind of fault happened and the pool was under pressure.
  assert set(totals) == {"model_before", "model_after", "model_fetch", "sampling", "policy",
                         "callback_cancel", "callback_submit", "callback_error",
                         "callback_interrupt"}
  assert preemptions > 0 and resets > 0
  # The chunked runs did leave prompts part-prefilled between steps.
  assert chunked_prefilling_steps > 0

