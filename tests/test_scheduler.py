"""The engine's host side alone (no model): admission, batching, commit and abort, stopping."""

import collections

import numpy as np

from chunkattn_jax.engine import EngineConfig
from chunkattn_jax.sampling import GREEDY
from chunkattn_jax.scheduler import Request, Scheduler

C = 4


def _scheduler(**kw):
  cfg = EngineConfig(**{"n_chunks": 16, "chunk_size": C, "max_prefill_batch": 2, **kw})
  return Scheduler(cfg, max_context=512, stats=collections.Counter())


def _add(s, rid, prompt, n=4):
  req = Request(rid, list(prompt), n, frozenset(), GREEDY, None)
  s.add(req)
  return req


def _commit(s, batch, token=7):
  return s.commit_prefill(batch, np.full(len(batch), token), None, now=0.0)


def test_admit_splits_batches_and_abort_puts_everything_back():
  s = _scheduler()
  system = list(range(8))
  finished = _add(s, 0, system + [50], n=1)
  _commit(s, s.plan_prefill()[0])  # finishes at once: `system`'s 2 chunks stay cached
  assert finished.status == "finished" and s.tree.num_cached_chunks == 2
  reqs = [_add(s, 1, [60, 61]), _add(s, 2, system + [51]), _add(s, 3, system + [52, 53]),
          _add(s, 4, [70] * 9)]
  cached_before = sorted(s.tree.cached_slots())
  batches = s.plan_prefill()
  # 1 and 2 (reviving the cached prefix) fit one batch; 3 reuses chunks 2 revived, which hold
  # K/V already: it could join, but the batch is full; 4 goes with it.
  assert [[e.request.rid for e in b] for b in batches] == [[1, 2], [3, 4]]
  assert [e.num_cached for b in batches for e in b] == [0, 8, 8, 0]
  s.abort_prefill(batches)
  assert [r.rid for r in s.waiting] == [1, 2, 3, 4] and not s.running
  assert all(r.status == "waiting" and r.seq_id is None for r in reqs)
  assert sorted(s.tree.cached_slots()) == cached_before  # the revived prefix is cached again
  assert len(s.tree) == 0 and s.tree.pool.num_used == 2
  s.check_consistency()
  assert [[e.request.rid for e in b] for b in s.plan_prefill()] == [[1, 2], [3, 4]]


def test_a_batch_never_reads_chunks_it_writes():
  s = _scheduler(max_prefill_batch=8)
  system = list(range(8))
  _add(s, 0, system + [1])
  _add(s, 1, system + [2])  # matches the chunks request 0 is about to compute
  _add(s, 2, [3, 4])
  batches = s.plan_prefill()
  assert [[e.request.rid for e in b] for b in batches] == [[0], [1, 2]]
  _commit(s, batches[0])
  s.abort_prefill(batches[1:])  # as if the second call failed after the first committed
  assert [r.rid for r in s.waiting] == [1, 2]
  s.check_consistency()


def test_abort_decode_takes_the_pending_tokens_back():
  s = _scheduler()
  reqs = [_add(s, i, list(range(i, i + 3 + i))) for i in range(3)]  # lengths 3, 4, 5
  for b in s.plan_prefill():
    _commit(s, b)
  s.check_consistency()
  lengths = [s.tree.length(r.seq_id) for r in reqs]
  version = s.tree.structure_version
  work = s.prepare_decode()
  assert [r.rid for r in work.requests] == [0, 1, 2]
  assert [s.tree.length(r.seq_id) for r in reqs] == [n + 1 for n in lengths]
  s.abort_decode(work)
  assert [s.tree.length(r.seq_id) for r in reqs] == lengths
  assert s.tree.structure_version > version  # cached plans are rebuilt
  s.check_consistency()
  work = s.prepare_decode()
  s.commit_decode(work, np.asarray([5, 6, 7]), None, now=1.0)
  assert [r.output for r in reqs] == [[7, 5], [7, 6], [7, 7]]
  s.check_consistency()


def test_pool_pressure_preempts_the_latest_admitted():
  s = _scheduler(n_chunks=4, cache_prefixes=False)
  a, b = _add(s, 0, list(range(7))), _add(s, 1, list(range(10, 17)))  # 2 chunks each
  for batch in s.plan_prefill():
    _commit(s, batch)
  work = s.prepare_decode()  # both tails fill up (8 tokens): no new chunk needed
  s.commit_decode(work, np.asarray([1, 2]), None, now=0.0)
  work = s.prepare_decode()  # each needs a third chunk: only one fits after preempting b
  assert [r.rid for r in work.requests] == [0] and b.status == "waiting"
  assert b.num_preemptions == 1 and s.stats["preemptions"] == 1
  s.abort_decode(work)
  s.check_consistency()
  assert a.status == "running" and s.tree.length(a.seq_id) == 8


def test_stop_keeps_only_delivered_tokens():
  s = _scheduler()
  req = _add(s, 0, [1, 2, 3], n=8)
  _commit(s, s.plan_prefill()[0])
  s.commit_decode(s.prepare_decode(), np.asarray([9]), None, now=0.0)
  req.num_delivered = 1  # the second token's event was not delivered yet
  s.stop(req, "cancelled", now=2.0)
  assert req.output == [7] and req.status == "finished" and req.finish_reason == "cancelled"
  assert len(s.tree) == 0 and s.tree.pool.num_used == 0
  waiting = _add(s, 1, [4, 5])
  s.stop(waiting, "cancelled", now=3.0)
  assert not s.waiting
  s.check_consistency()
