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


# ---------------------------------------------------------------------- chunked prefill
def _prefill_step(s, token=7):
  """Plans and commits one step's prefill; returns its pieces (rid, start, end, last)."""
  pieces = []
  for batch in s.plan_prefill():
    pieces += [(e.request.rid, e.num_cached, len(e.tokens), e.last) for e in batch]
    _commit(s, batch, token)
  s.check_consistency()
  return pieces


def test_chunked_prefill_pieces_stay_within_the_budget():
  """A prompt longer than the budget is computed in pieces (starting off chunk boundaries too);
  the next piece of a prompt in progress goes first, and a waiting request is admitted only with
  budget left; no token is sampled before the last piece."""
  s = _scheduler(max_prefill_tokens=5, n_chunks=32)
  a = _add(s, 0, range(100, 112))  # 12 tokens: pieces of 5, 5, 2
  b = _add(s, 1, range(200, 203))
  assert _prefill_step(s) == [(0, 0, 5, False)]
  assert a.prefilling and a.num_prefilled == 5 and not a.output and b.status == "waiting"
  assert s.tree.tokens(a.seq_id) == list(range(100, 105))
  assert s.prepare_decode() is None  # nothing decodes while the only request is prefilling
  assert _prefill_step(s) == [(0, 5, 10, False)]
  assert _prefill_step(s) == [(0, 10, 12, True), (1, 0, 3, True)]
  assert a.output == [7] and b.output == [7] and not a.prefilling and a.num_prefilled == 0
  assert s.stats["prefill_tokens"] == 15 and s.stats["prefill_pieces"] == 4
  assert s.stats["prefill_calls"] == 3
  work = s.prepare_decode()
  assert [r.rid for r in work.requests] == [0, 1]


def test_a_piece_reading_chunks_pending_in_its_step_waits_for_the_next_call():
  """A request admitted in the step of another prompt's last piece matches that prompt's whole
  context (never recomputing it); the chunks the last piece fills are read only after it ran."""
  s = _scheduler(max_prefill_tokens=8, n_chunks=32)
  system = list(range(12))
  a = _add(s, 0, system + [50])  # pieces [0, 8) and [8, 13)
  assert _prefill_step(s) == [(0, 0, 8, False)]
  b = _add(s, 1, system + [60])
  batches = s.plan_prefill()  # a's last piece fills chunk 2, which b matches
  assert [[(e.request.rid, e.num_cached, len(e.tokens)) for e in bt] for bt in batches] == [
      [(0, 8, 13)], [(1, 12, 13)]]
  s.abort_prefill(batches)  # both calls failed: b queued again, a keeps its first piece
  assert [r.rid for r in s.waiting] == [1] and a.prefilling and a.num_prefilled == 8
  assert s.tree.tokens(a.seq_id) == system[:8]
  s.check_consistency()
  batches = s.plan_prefill()
  _commit(s, batches[0])
  s.abort_prefill(batches[1:])  # only b's call failed
  assert a.output == [7] and not a.prefilling and b.status == "waiting"
  s.check_consistency()
  assert _prefill_step(s) == [(1, 12, 13, True)]
  assert b.num_cached_at_admission == 12


def test_a_failed_piece_keeps_the_earlier_pieces():
  s = _scheduler(max_prefill_tokens=5)
  a = _add(s, 0, range(100, 112))
  _prefill_step(s)
  batches = s.plan_prefill()
  assert s.tree.length(a.seq_id) == 10
  s.abort_prefill(batches)
  assert a.status == "running" and a.prefilling and a.num_prefilled == 5
  assert s.tree.length(a.seq_id) == 5
  s.check_consistency()
  assert _prefill_step(s) == [(0, 5, 10, False)]


def test_pool_pressure_preempts_the_prefilling_request():
  """The prompt in progress is the latest admitted: a piece without room preempts it (it waits
  and is recomputed), and so does a decode step that needs a chunk."""
  s = _scheduler(n_chunks=6, max_prefill_tokens=8, cache_prefixes=False)
  d = _add(s, 0, range(10, 17))  # 7 tokens, 2 chunks
  _prefill_step(s, token=3)
  s.commit_decode(s.prepare_decode(), np.asarray([4]), None, now=0.0)  # 8 tokens
  a = _add(s, 1, range(20, 36))  # 16 tokens, 4 chunks: fits beside d's 2
  assert _prefill_step(s) == [(1, 0, 8, False)]
  s.commit_decode(s.prepare_decode(), np.asarray([5]), None, now=0.0)  # d takes a third chunk
  assert _prefill_step(s) == []  # a's second piece needs 2 chunks, 1 is free: a is preempted
  assert a.status == "waiting" and a.num_preemptions == 1 and not a.output
  assert s.stats["admission_waits"] == 1  # and cannot be admitted again yet
  assert d.output == [3, 4, 5] and s.tree.length(d.seq_id) == 9

  s = _scheduler(n_chunks=5, max_prefill_tokens=10, cache_prefixes=False)
  d = _add(s, 0, range(10, 18))  # 8 tokens: its pending token needs a third chunk
  _prefill_step(s)
  a = _add(s, 1, range(20, 32))  # 12 tokens: its first piece takes the last 3 chunks
  assert _prefill_step(s) == [(1, 0, 10, False)]
  work = s.prepare_decode()
  assert work.requests == [d] and a.status == "waiting" and a.num_preemptions == 1
  s.commit_decode(work, np.asarray([4]), None, now=0.0)
  s.check_consistency()


def test_pieces_evict_cached_prefixes_but_never_a_prefix_they_use():
  s = _scheduler(n_chunks=7, max_prefill_tokens=4)
  system = list(range(8))
  _add(s, 0, system + [50], n=1)
  while s.waiting or s.running:
    _prefill_step(s)
  _add(s, 1, range(100, 108), n=1)
  while s.waiting or s.running:
    _prefill_step(s)
  assert s.tree.num_cached_chunks == 4 and s.tree.pool.num_free == 3
  a = _add(s, 2, system + list(range(60, 76)))  # revives `system`, needs 4 new chunks
  system_slots = None
  while a.status == "waiting" or a.prefilling:
    _prefill_step(s)
    system_slots = system_slots or s.tree.chunk_path(a.seq_id)[:2]
    assert s.tree.chunk_path(a.seq_id)[:2] == system_slots
  assert a.num_cached_at_admission == 8 and s.stats["evictions"] == 1
  assert s.tree.tokens(a.seq_id) == a.prompt
