"""Property-based tests: random insert/append/truncate/remove sequences against a brute-force model.

The model keeps every sequence as a list of chunk ids with their tokens and parents, and checks
each prefix match of the tree against a scan over all live chunks: every chunk the tree reuses has
the same parent, is full and holds the same tokens, and where the tree stops matching no live chunk
could have extended the match. Model chunk ids are mapped to pool slots one-to-one.
"""

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from chunkattn_jax.chunk_pool import ChunkPool, PoolExhaustedError
from chunkattn_jax.plan import GpuFill, build_plan
from chunkattn_jax.prefix_tree import PrefixTree


class Model:
  def __init__(self, c):
    self.c = c
    self.chunk_tokens = {}   # model chunk id -> list of tokens
    self.chunk_parent = {}   # model chunk id -> parent id or None
    self.seqs = {}           # seq id -> list of model chunk ids
    self.slot_of = {}        # model chunk id -> pool slot
    self.cached = set()      # chunks kept by the prefix cache (no live sequence)
    self.next_id = 0

  def seq_chunks(self):
    return {cid for path in self.seqs.values() for cid in path}

  def live_chunks(self):
    return self.seq_chunks() | self.cached

  def remove(self, seq_id, keep):
    path = self.seqs.pop(seq_id)
    still_used = self.seq_chunks()
    for cid in path:
      if cid not in still_used:
        if keep and len(self.chunk_tokens[cid]) == self.c:
          self.cached.add(cid)
        else:  # freeing a chunk frees the cached chunks under it
          self.drop_cached_below(cid)

  def drop_cached_below(self, cid):
    for child in [x for x in self.cached if self.chunk_parent[x] == cid]:
      self.drop_cached_below(child)
      self.cached.discard(child)

  def sync_evictions(self, tree_cached_slots):
    """Drops the cached chunks the tree evicted; returns how many."""
    evicted = {cid for cid in self.cached if self.slot_of[cid] not in tree_cached_slots}
    self.cached -= evicted
    return len(evicted)

  def candidates(self, parent, key):
    return {cid for cid in self.live_chunks()
            if self.chunk_parent[cid] == parent and self.chunk_tokens[cid] == key}

  def new_chunk(self, tokens, parent, slot):
    assert slot not in {self.slot_of[c] for c in self.live_chunks()}, "slot handed out twice"
    cid = self.next_id
    self.next_id += 1
    self.chunk_tokens[cid], self.chunk_parent[cid], self.slot_of[cid] = list(tokens), parent, slot
    return cid

  def check_insert(self, tokens, seq_id, num_cached, tree_path):
    c = self.c
    assert num_cached % c == 0
    path, parent = [], None
    slot_to_id = {self.slot_of[cid]: cid for cid in self.live_chunks()}
    for k in range(num_cached // c):
      cid = slot_to_id.get(tree_path[k])
      assert cid in self.candidates(parent, tokens[k * c:(k + 1) * c]), "bad chunk reused"
      path.append(cid)
      self.cached.discard(cid)  # revived
      parent = cid
    if num_cached + c <= len(tokens):
      assert not self.candidates(parent, tokens[num_cached:num_cached + c]), "match stopped early"
    for k in range(num_cached // c, len(tree_path)):
      parent = self.new_chunk(tokens[k * c:(k + 1) * c], parent, tree_path[k])
      path.append(parent)
    self.seqs[seq_id] = path

  def append(self, seq_id, tokens, tree_path):
    path = self.seqs[seq_id]
    for tok in tokens:
      last = path[-1]
      if len(self.chunk_tokens[last]) < self.c:
        self.chunk_tokens[last].append(tok)
      else:
        path.append(self.new_chunk([tok], last, tree_path[len(path)]))

  def truncate(self, seq_id, length):
    """Returns False (and changes nothing) where the tree must refuse: a cut inside a shared chunk."""
    c = self.c
    path = self.seqs[seq_id]
    keep = -(-length // c)
    tail, tail_len = path[keep - 1], length - (keep - 1) * c
    cut = tail_len < len(self.chunk_tokens[tail])
    if cut and any(tail in p for s, p in self.seqs.items() if s != seq_id):
      return False
    self.seqs[seq_id] = path[:keep]
    still_used = self.seq_chunks()
    for cid in path[keep:]:
      if cid not in still_used:  # freed, never cached: the cut tokens were never computed
        self.drop_cached_below(cid)
    if cut:
      self.drop_cached_below(tail)
      del self.chunk_tokens[tail][tail_len:]
    return True

  def tokens(self, seq_id):
    return [t for cid in self.seqs[seq_id] for t in self.chunk_tokens[cid]]


def check_plan(tree, threshold, g, fill=None):
  plan = build_plan(tree, threshold=threshold, max_chunks_per_item=g, fill=fill)
  c = tree.chunk_size
  ids = tree.seq_ids()
  b = len(ids)
  assert int(plan.num_rows) == b and plan.row_seq_ids[:b].tolist() == ids
  assert (plan.row_seq_ids[b:] == -1).all()
  paths = [tree.chunk_path(s) for s in ids]
  users = {}
  for r, path in enumerate(paths):
    for slot in path:
      users.setdefault(slot, []).append(r)
  for slot, rows in users.items():  # depth-first order: the users of any chunk are contiguous
    assert rows == list(range(rows[0], rows[0] + len(rows)))
  covered = {}
  for i in range(plan.item_capacity):
    n = plan.item_num_chunks[i]
    if n == 0:
      continue
    chunks = plan.item_chunks[i, :n].tolist()
    begin, end = int(plan.item_row_begin[i]), int(plan.item_row_end[i])
    for slot in chunks:
      assert users[slot] == list(range(begin, end)), "item rows != rows using the chunk"
      assert len(users[slot]) > threshold
    for r in range(begin, end):  # every covered row lists the item at the item's slot
      k = int(plan.item_slot[i])
      assert k < plan.row_num_items[r] and plan.row_items[r, k] == i
      assert (r, k) not in covered, "two items share a partial slot of a row"
      covered[(r, k)] = i
  assert len(covered) == int(plan.row_num_items[:b].sum())
  lengths = plan.private_lengths()
  for r, (sid, path) in enumerate(zip(ids, paths)):
    items = plan.row_items[r, :plan.row_num_items[r]]
    shared = [s for i in items for s in plan.item_chunks[i, :plan.item_num_chunks[i]].tolist()]
    n_private = -(-int(lengths[r]) // c)
    private = plan.row_private_chunks[r, :n_private].tolist()
    assert sorted(shared + private) == sorted(path)
    assert set(shared) == {s for s in path if len(users[s]) > threshold}
    assert int(lengths[r]) == tree.length(sid) - c * len(shared)
    if private:  # only the last private chunk may be partial
      assert path.index(private[-1]) == len(path) - 1 or int(lengths[r]) % c == 0


vocab = st.integers(0, 2)


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), c=st.sampled_from([2, 4]), capacity=st.integers(6, 40),
       seed=st.integers(0, 10))
def test_random_operations_match_brute_force_model(data, c, capacity, seed):
  tree = PrefixTree(ChunkPool(capacity, seed=seed), c, keep_cached=data.draw(st.booleans()))
  model = Model(c)
  prefixes = [data.draw(st.lists(vocab, min_size=0, max_size=3 * c)) for _ in range(3)]
  for _ in range(data.draw(st.integers(1, 25))):
    op = data.draw(st.sampled_from(["insert", "insert", "append", "append_many", "truncate",
                                    "remove"]))
    live = tree.seq_ids()
    before = tree.snapshot()
    cached_before = set(model.cached)
    try:
      if op == "insert" or not live:
        tokens = data.draw(st.sampled_from(prefixes)) + data.draw(
            st.lists(vocab, min_size=1, max_size=2 * c))
        fits = tree.can_insert(tokens)
        r = tree.insert(tokens)
        assert fits
        revived = set(tree.chunk_path(r.seq_id)[:r.num_cached // c])
        model.cached -= {cid for cid in model.cached if model.slot_of[cid] not in
                         set(tree.cached_slots()) | revived}
        path = tree.chunk_path(r.seq_id)
        model.check_insert(tokens, r.seq_id, r.num_cached, path)
        assert r.slots.shape == (len(tokens) - r.num_cached, 2)
        for p, (slot, off) in zip(range(r.num_cached, len(tokens)), r.slots):
          assert slot == path[p // c] and off == p % c
      elif op == "append":
        sid = data.draw(st.sampled_from(live))
        toks = data.draw(st.lists(vocab, min_size=1, max_size=2 * c))
        old_len = tree.length(sid)
        slots = tree.append(sid, toks)
        model.sync_evictions(set(tree.cached_slots()))
        path = tree.chunk_path(sid)
        model.append(sid, toks, path)
        assert slots.tolist() == [[path[p // c], p % c] for p in range(old_len, old_len + len(toks))]
      elif op == "append_many":
        sids = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True))
        toks = data.draw(st.lists(vocab, min_size=len(sids), max_size=len(sids)))
        tree.append_tokens(sids, toks)
        model.sync_evictions(set(tree.cached_slots()))
        for sid, tok in zip(sids, toks):
          model.append(sid, [tok], tree.chunk_path(sid))
      elif op == "truncate":
        sid = data.draw(st.sampled_from(live))
        length = data.draw(st.integers(1, tree.length(sid)))
        old_tokens = tree.tokens(sid)
        if model.truncate(sid, length):
          tree.truncate(sid, length)
          assert tree.tokens(sid) == old_tokens[:length]
        else:
          with pytest.raises(ValueError, match="share"):
            tree.truncate(sid, length)
          assert tree.snapshot() == before
      else:
        sid = data.draw(st.sampled_from(live))
        keep = data.draw(st.sampled_from([None, True, False]))
        tree.remove(sid, keep_cached=keep)
        model.remove(sid, tree.keep_cached if keep is None else keep)
    except PoolExhaustedError:
      assert tree.snapshot() == before
      if op == "insert":
        assert not fits
    if model.cached < cached_before - model.seq_chunks() and op not in ("remove", "truncate"):
      assert tree.pool.num_free == 0, "evicted a cached chunk while free slots remained"
    assert {model.slot_of[cid] for cid in model.cached} == set(tree.cached_slots())
    tree.check_invariants()
    assert sorted(tree.seq_ids()) == sorted(model.seqs)
    live_chunks = model.live_chunks()
    assert tree.pool.num_used == len(live_chunks)
    assert tree.pool.num_free + tree.pool.num_used == capacity
    for sid, path in model.seqs.items():
      assert tree.tokens(sid) == model.tokens(sid)
      assert tree.chunk_path(sid) == [model.slot_of[cid] for cid in path]
    check_plan(tree, threshold=1, g=data.draw(st.sampled_from([1, 2, 16])))
    check_plan(tree, threshold=data.draw(st.integers(1, 4)), g=2)
    check_plan(tree, threshold=1, g=16, fill=GpuFill(
        num_kv_heads=data.draw(st.integers(1, 8)), num_sms=data.draw(st.integers(1, 40))))


@settings(max_examples=40, deadline=None)
@given(prompt=st.lists(vocab, min_size=1, max_size=20), c=st.sampled_from([2, 4]))
def test_identical_prompts_share_all_full_chunks(prompt, c):
  tree = PrefixTree(64, c)
  a = tree.insert(prompt)
  b = tree.insert(prompt)
  full = len(prompt) // c
  assert b.num_cached == full * c
  assert tree.chunk_path(a.seq_id)[:full] == tree.chunk_path(b.seq_id)[:full]
  if len(prompt) % c:
    assert tree.chunk_path(a.seq_id)[-1] != tree.chunk_path(b.seq_id)[-1]
