"""Random decode-attention cases shared by the kernel tests: multi-level trees, shuffled pool
slots, lengths off chunk boundaries, and an fp64 dense attention written for the tests only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.plan import GpuFill, PlanBuilder
from chunkattn_jax.prefix_tree import PrefixTree
from dense_oracle import dense_attention, sequence_kv
from pallas_kernels import empty_partials

# Absolute tolerances on outputs (|out| <~ 1: softmax averages of unit normals), per input dtype,
# against an fp64 dense attention of the same (rounded) inputs. bf16/fp16 error comes from the
# probabilities being rounded to the input dtype before the P.V product (fp32 accumulation).
TOL = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}
GQA = {1: (2, 2), 2: (4, 2), 4: (8, 2), 8: (8, 1)}  # g -> (h, h_kv)


def split(programs: int) -> dict:
  """Plan kwargs that split shared runs until the chunk-first pass has `programs` programs per KV
  head (at these test sizes every item has one row block, so about that many items)."""
  return dict(fill=GpuFill(num_kv_heads=1, num_sms=programs, programs_per_sm=1))


@dataclasses.dataclass
class Case:
  tree: PrefixTree
  plan: object
  q: jax.Array
  k_pool: jax.Array
  v_pool: jax.Array
  g: int


def build_tree(rng, c, seed=0, n_chunks=256):
  """Multi-level tree: two system prompts, few-shot blocks under the first, lengths off chunk
  boundaries (3, c-1, c, c+1, 8c+1 in the spirit of 3, 63, 64, 65, 513 at c = 64), two identical
  prompts ending at a shared full chunk, and an unshared short sequence."""
  tree = PrefixTree(ChunkPool(n_chunks, seed=seed), c)
  tok = lambda n: [int(t) for t in rng.integers(0, 1000, n)]
  sys_a, sys_b = tok(2 * c), tok(c + 5)
  shot_1, shot_2 = tok(c), tok(2 * c)
  prompts = [
      sys_a + shot_1 + tok(3),
      sys_a + shot_1 + tok(c - 1),
      sys_a + shot_1 + tok(c),
      sys_a + shot_2 + tok(c + 1),
      sys_a + shot_2 + tok(1),
      sys_a + tok(8 * c + 1),
      sys_a + shot_1,  # ends exactly at a shared full chunk ...
      sys_a + shot_1,  # ... twice: no private tokens at all
      sys_b + tok(2),
      sys_b + tok(c - 1),
      tok(3),
  ]
  for p in prompts:
    tree.insert(p)
  tree.check_invariants()
  return tree


def make_case(rng, *, c=16, g=1, d=64, dtype=jnp.float32, seed=0, plan_kwargs_=None,
              append=0, length_delta=0, n_chunks=256):
  """A random case. `append` decode steps go through the tree (and PlanBuilder); `length_delta`
  re-expresses the same plan with lengths moved into `length_delta` (as a cached plan would)."""
  tree = build_tree(rng, c, seed=seed, n_chunks=n_chunks)
  builder = PlanBuilder(tree, **(plan_kwargs_ or {}))
  builder.plan()
  for _ in range(append):  # uniform decode steps: the cached plan carries length_delta
    tree.append_many({s: [int(rng.integers(0, 1000))] for s in tree.seq_ids()})
  plan = builder.plan()
  if length_delta:
    live = np.arange(plan.row_capacity) < int(plan.num_rows)
    plan = dataclasses.replace(
        plan, row_private_len=np.where(live, plan.row_private_len - length_delta, 0).astype(np.int32),
        length_delta=np.asarray(length_delta + int(plan.length_delta), np.int32))
  h, h_kv = GQA[g]
  q = jnp.asarray(rng.normal(size=(plan.row_capacity, h, d)), dtype)
  k_pool = jnp.asarray(rng.normal(size=(n_chunks, h_kv, c, d)), dtype)
  v_pool = jnp.asarray(rng.normal(size=(n_chunks, h_kv, c, d)), dtype)
  return Case(tree, plan, q, k_pool, v_pool, g)


def dense_rows(case, sm_scale=None):
  """Per-row dense attention over each live sequence's tokens read chunk by chunk from the pool
  (tree.chunk_path / tree.length, not the plan). Returns ([b, h, d] fp64, b)."""
  q = np.asarray(case.q.astype(jnp.float32))
  kp = np.asarray(case.k_pool.astype(jnp.float32))
  vp = np.asarray(case.v_pool.astype(jnp.float32))
  b = int(case.plan.num_rows)
  out = []
  for r in range(b):
    seq = int(case.plan.row_seq_ids[r])
    k, v = sequence_kv(kp, vp, case.tree.chunk_path(seq), case.tree.length(seq))
    out.append(dense_attention(q[r], k, v, sm_scale))
  return np.stack(out), b


def dense_rows_multi(case, q):
  """Like `dense_rows` for q [R, T, h, d]: the row's last T tokens are its new ones; token t sees
  every token of the sequence up to and including itself. Returns ([b, T, h, d] fp64, b)."""
  q = np.asarray(q.astype(jnp.float32))
  kp = np.asarray(case.k_pool.astype(jnp.float32))
  vp = np.asarray(case.v_pool.astype(jnp.float32))
  b = int(case.plan.num_rows)
  T = q.shape[1]
  out = np.zeros((b,) + q.shape[1:])
  for r in range(b):
    seq = int(case.plan.row_seq_ids[r])
    n = case.tree.length(seq)
    k, v = sequence_kv(kp, vp, case.tree.chunk_path(seq), n)
    for t in range(T):
      upto = n - (T - 1 - t)
      out[r, t] = dense_attention(q[r, t], k[:upto], v[:upto])
  return out, b


def check_against_dense(case, out, dtype):
  want, b = dense_rows(case)
  out = np.asarray(out.astype(jnp.float32))
  assert not np.isnan(out[:b]).any()
  np.testing.assert_allclose(out[:b], want, atol=TOL[dtype], rtol=0)
  np.testing.assert_array_equal(out[b:], 0.0)  # spare rows: zeros


def poisoned_partials(case, T=1):
  """NaN-filled partial buffers for the case's plan (T new tokens per row): entries no live item
  writes stay NaN."""
  R, h, d = case.q.shape
  h_kv = case.k_pool.shape[1]
  return empty_partials(R, h_kv, h // h_kv, d, case.plan.items_per_row, fill=jnp.nan, T=T)
