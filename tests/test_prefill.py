"""Prefill attention over the chunk pool (pallas_kernels/prefill.py), the shared-prefix planner
(chunkattn_jax/prefill_sharing.py) and the layer's prefill dispatch.

Every implementation (Pallas interpret mode, the blocked XLA path, the layer's dense reference) is
compared with a float64 dense causal attention assembled per sequence from the tree
(`tree.chunk_path` / `tree.length`) and the pool, on trees with cached prefixes, suffixes of 1,
c-1, c, c+1 and 3c+5 tokens, shuffled pool slots, GQA 1/4/8 and each dtype. Padding rows and tokens
must write nothing: output buffers are poisoned with NaN first.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chunkattn_jax import layers
from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.prefill_sharing import SharingCost, plan_prefill_sharing
from chunkattn_jax.prefix_tree import PrefixTree
from configs import prefill_resources as prefill_resources_config
from dense_oracle import dense_attention, sequence_kv
from experiments import kernel_resources
from kernel_cases import GQA, TOL
from pallas_kernels import deviceless
from pallas_kernels import prefill as pf
from test_deviceless import OPTIN_SMEM, require_sm90_toolchain
from test_lowering import lower_for_cuda

S_ = jax.ShapeDtypeStruct
I32 = jnp.int32


# --------------------------------------------------------------------------------------------
# Cases: a prefill batch on a tree with cached prefixes.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
  tree: PrefixTree
  seq_ids: list  # None for the padding row
  q: jax.Array  # [S, T, h, d]
  k_pool: jax.Array
  v_pool: jax.Array
  positions: np.ndarray  # [S, T]
  chunk_paths: np.ndarray  # [S, Pc]
  num_tokens: np.ndarray  # [S]
  c: int

  @property
  def args(self):
    return (self.q, self.k_pool, self.v_pool, jnp.asarray(self.positions),
            jnp.asarray(self.chunk_paths), jnp.asarray(self.num_tokens))

  def valid(self):
    """bool [S, T, 1, 1]: the real (non-padding) tokens."""
    t = self.positions.shape[1]
    return (np.arange(t)[None, :] < self.num_tokens[:, None])[:, :, None, None]


def make_case(rng, *, c=16, g=1, d=64, dtype=jnp.float32, n_chunks=64, seed=0, extra_t=3):
  """Sequences alive in the tree hold two system prompts' chunks; the batch's prompts reuse them
  (cached prefixes of 0, c and 2c tokens) with suffixes of 1, c-1, c, c+1 and 3c+5 tokens; one
  padding row (no tokens) and `extra_t` padding tokens on every row."""
  tree = PrefixTree(ChunkPool(n_chunks, seed=seed), c)
  tok = lambda n: [int(t) for t in rng.integers(0, 1000, n)]
  sys_a, sys_b = tok(2 * c), tok(c)
  tree.insert(sys_a + tok(3))  # alive: their full chunks are what the batch finds cached
  tree.insert(sys_b + tok(c + 2))
  prompts = [sys_a + tok(1), sys_a + tok(c - 1), sys_b + tok(c), tok(c + 1), sys_a + tok(3 * c + 5)]
  res = [tree.insert(p, min_new_tokens=1) for p in prompts]
  tree.check_invariants()
  assert [r.num_cached for r in res] == [2 * c, 2 * c, c, 0, 2 * c]
  S = len(prompts) + 1
  T = max(len(p) - r.num_cached for p, r in zip(prompts, res)) + extra_t
  Pc = max(len(tree.chunk_path(r.seq_id)) for r in res) + 1
  positions = np.zeros((S, T), np.int32)
  paths = np.zeros((S, Pc), np.int32)  # padding: slot 0, never read
  num_tokens = np.zeros(S, np.int32)
  for i, (p, r) in enumerate(zip(prompts, res)):
    n = len(p) - r.num_cached
    positions[i, :n] = np.arange(r.num_cached, len(p))
    path = tree.chunk_path(r.seq_id)
    paths[i, :len(path)] = path
    num_tokens[i] = n
  h, h_kv = GQA[g]
  q = jnp.asarray(rng.normal(size=(S, T, h, d)), dtype)
  k_pool = jnp.asarray(rng.normal(size=(n_chunks, h_kv, c, d)), dtype)
  v_pool = jnp.asarray(rng.normal(size=(n_chunks, h_kv, c, d)), dtype)
  return Case(tree, [r.seq_id for r in res] + [None], q, k_pool, v_pool, positions, paths,
              num_tokens, c)


def dense_fp64(case, sm_scale=None):
  """[S, T, h, d] float64 causal attention of every valid token (NaN elsewhere), from the tree."""
  q = np.asarray(case.q.astype(jnp.float32))
  kp = np.asarray(case.k_pool.astype(jnp.float32))
  vp = np.asarray(case.v_pool.astype(jnp.float32))
  out = np.full(q.shape, np.nan)
  for s, seq in enumerate(case.seq_ids):
    if seq is None:
      continue
    k, v = sequence_kv(kp, vp, case.tree.chunk_path(seq), case.tree.length(seq))
    for t in range(case.num_tokens[s]):
      p = case.positions[s, t]
      out[s, t] = dense_attention(q[s, t], k[:p + 1], v[:p + 1], sm_scale)
  return out


def check(case, out, dtype, *, padding=None):
  """Valid tokens within TOL of fp64 dense and free of NaN; padding entries equal `padding`
  (NaN: untouched poison) unless None."""
  want = dense_fp64(case)
  out = np.asarray(jnp.asarray(out).astype(jnp.float32))
  valid = np.broadcast_to(case.valid(), out.shape)
  assert not np.isnan(out[valid]).any()
  np.testing.assert_allclose(out[valid], want[valid], atol=TOL[dtype], rtol=0)
  if padding is not None:
    np.testing.assert_array_equal(out[~valid], np.full((~valid).sum(), padding))


def poisoned(case):
  return jnp.full(case.q.shape, jnp.nan, case.q.dtype)


DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
DTYPE_IDS = ("f32", "f16", "bf16")
ALWAYS = SharingCost(overhead_bytes=-1e18)  # every shared run "pays": forces items in tests


# --------------------------------------------------------------------------------------------
# Numerics: every implementation against fp64 dense.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", (1, 4, 8))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_xla_and_reference_match_fp64_dense(rng, dtype, g):
  case = make_case(rng, g=g, dtype=dtype)
  check(case, pf.prefill_attention_xla(*case.args, poisoned(case)), dtype, padding=np.nan)
  check(case, pf.prefill_attention_xla(*case.args), dtype, padding=0.0)
  # Small blocks: several query blocks, tiles of one chunk, a partial last query block.
  check(case, pf.prefill_attention_xla(*case.args, block_q=8, block_kv=1), dtype, padding=0.0)
  q, kp, vp, pos, paths, _ = case.args
  check(case, layers.prefill_attention(q, pos, kp, vp, paths, impl="reference"), dtype)


@pytest.mark.parametrize("g", (1, 4, 8))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pallas_interpret_matches_fp64_dense(rng, dtype, g):
  case = make_case(rng, g=g, dtype=dtype)
  out = pf.prefill_attention(*case.args, out=poisoned(case), interpret=True)
  check(case, out, dtype, padding=np.nan)  # padding rows and tokens: nothing written


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 32), (16, 64)])
def test_pallas_interpret_tiles_within_and_across_chunks(rng, block_m, block_n):
  """Tiles of one chunk (block_n <= c: one slot per tile) and of several (block_n > c: a slot per
  key), with shared prefixes ending inside a tile, c = 16 and 32."""
  for c in (16, 32):
    case = make_case(rng, c=c, g=4, dtype=jnp.float32)
    config = pf.PrefillConfig(block_m=block_m, block_n=block_n)
    sharing = plan_prefill_sharing(case.positions, case.chunk_paths, case.num_tokens,
                                   chunk_size=c, cost=ALWAYS)
    out = pf.prefill_attention(*case.args, out=poisoned(case), config=config, interpret=True,
                               **sharing.kernel_kwargs())
    check(case, out, jnp.float32, padding=np.nan)


def test_kv_past_each_sequence_is_never_read(rng):
  """K/V past each sequence's last token (the unused tail of its last chunk: stale or unwritten in
  a real pool) set to NaN leaves every output finite and correct."""
  case = make_case(rng, g=1, dtype=jnp.float32)
  kp, vp = np.array(case.k_pool), np.array(case.v_pool)
  tails = 0
  for seq in case.seq_ids[:-1]:
    n = case.tree.length(seq)
    if n % case.c:
      last = case.tree.chunk_path(seq)[-1]
      kp[last, :, n % case.c:] = np.nan
      vp[last, :, n % case.c:] = np.nan
      tails += 1
  assert tails >= 3
  case = dataclasses.replace(case, k_pool=jnp.asarray(kp), v_pool=jnp.asarray(vp))
  check(case, pf.prefill_attention_xla(*case.args), jnp.float32)
  check(case, pf.prefill_attention_xla(*case.args, block_q=8, block_kv=1), jnp.float32)
  check(case, pf.prefill_attention(*case.args, interpret=True), jnp.float32)
  check(case, pf.prefill_attention(*case.args, interpret=True,
                                   config=pf.PrefillConfig(block_m=16, block_n=64)), jnp.float32)


# --------------------------------------------------------------------------------------------
# Shared-prefix pass and planner.
# --------------------------------------------------------------------------------------------
def test_planner_finds_the_cached_system_prompt(rng):
  case = make_case(rng, g=1)
  sharing = plan_prefill_sharing(case.positions, case.chunk_paths, case.num_tokens, chunk_size=16,
                                 cost=ALWAYS)
  assert sharing is not None and sharing.num_items == 1
  i = int(np.argmax(sharing.item_num_chunks))
  members = sorted(sharing.item_seqs[i, :sharing.item_num_seqs[i]].tolist())
  assert members == [0, 1, 4] and sharing.item_num_chunks[i] == 2  # sys_a's two chunks
  np.testing.assert_array_equal(sharing.seq_shared_chunks, [2, 2, 0, 0, 2, 0])
  pf.validate_prefill_arrays(case.positions, case.chunk_paths, case.num_tokens, n_chunks=64,
                             chunk_size=16, **sharing.kernel_kwargs())


def test_planner_shares_only_where_it_pays():
  """8 prompts with a 2048-token cached system prompt (c = 64) and 16 new tokens each: MHA blocks
  are a quarter full, packing saves 6 of 8 passes over the prefix; GQA 8 fills its blocks (8
  tokens x 8 heads) and long suffixes fill theirs: nothing to save."""
  c, L, S = 64, 32, 8
  paths = np.concatenate([np.tile(np.arange(L), (S, 1)), 100 + np.arange(S)[:, None]], 1)
  short = np.tile(L * c + np.arange(16), (S, 1))
  sharing = plan_prefill_sharing(short, paths, chunk_size=c)
  assert sharing.num_items == 1 and sharing.item_num_seqs[0] == S and sharing.item_num_chunks[0] == L
  assert plan_prefill_sharing(short, paths, chunk_size=c, cost=SharingCost(group_size=8)) is None
  long = np.tile(L * c + np.arange(64), (S, 1))
  assert plan_prefill_sharing(long, paths, chunk_size=c) is None
  # Short suffixes of a short prefix: the partials cost more than the chunk reads saved.
  assert plan_prefill_sharing(short - (L - 1) * c, paths[:, :2], chunk_size=c) is None


def test_planner_prefers_deeper_subgroups():
  """Four sequences share chunk 0; pairs of them share 40 more chunks: two items of 41 chunks
  beat one item of 1 chunk. A sequence whose new tokens start inside chunk 1 shares at most 1."""
  c, L = 16, 41
  paths = np.zeros((5, L + 2), np.int32)
  paths[:, 0] = 7
  paths[0:2, 1:L] = np.arange(100, 100 + L - 1)
  paths[2:4, 1:L] = np.arange(200, 200 + L - 1)
  paths[4, 1:] = 300 + np.arange(L + 1)
  positions = np.tile(L * c + np.arange(4), (5, 1)).astype(np.int32)
  positions[4] = c + 3 + np.arange(4)
  sharing = plan_prefill_sharing(positions, paths, chunk_size=c)
  items = sorted((sorted(sharing.item_seqs[i, :n].tolist()), int(sharing.item_num_chunks[i]))
                 for i, n in enumerate(sharing.item_num_seqs) if n)
  assert items == [([0, 1], L), ([2, 3], L)]
  np.testing.assert_array_equal(sharing.seq_shared_chunks, [L, L, L, L, 0])
  assert sharing.item_seqs.shape == (2, 5)  # capacity S // 2
  # Long suffixes fill their own blocks: no sharing.
  long_pos = np.tile(L * c + np.arange(64), (5, 1)).astype(np.int32)
  assert plan_prefill_sharing(long_pos, paths, chunk_size=c) is None


def test_sharing_cost_counts_blocks_and_partials():
  cost = SharingCost(group_size=1, head_dim=128, itemsize=2, block_m=64, overhead_bytes=0)
  # 4 sequences of 16 tokens: 4 blocks alone, 1 packed; 32 chunks of 64 keys saved 3 times.
  assert cost.blocks_alone([16] * 4) == 4 and cost.blocks_packed([16] * 4) == 1
  saved = 3 * 32 * 64 * 128 * 2 * 2
  assert cost.value([16] * 4, 32, 64) == saved - 4 * 16 * 129 * 8
  # Padding does not count: 3 sequences of 1, 15 and 53 tokens fill 2 blocks packed, 3 alone.
  assert cost.blocks_alone([1, 15, 53]) == 3 and cost.blocks_packed([1, 15, 53]) == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_shared_pass_matches_its_reference_and_writes_only_item_rows(rng, dtype):
  case = make_case(rng, g=4, dtype=dtype)
  sharing = plan_prefill_sharing(case.positions, case.chunk_paths, case.num_tokens, chunk_size=16,
                                 cost=ALWAYS)
  items = [jnp.asarray(x) for x in (sharing.item_seqs, sharing.item_num_seqs,
                                    sharing.item_num_chunks)]
  S, T, h, d = case.q.shape
  nan = (jnp.full((S, T, h, d), jnp.nan), jnp.full((S, T, h), jnp.nan))
  q, kp, vp, _, paths, num_tokens = case.args
  got = pf.shared_prefix(q, kp, vp, num_tokens, paths, *items, partials=nan, interpret=True)
  want = pf.shared_prefix_reference(q, kp, vp, num_tokens, paths, *items)
  for g_, w_ in zip(got, want):
    g_, w_ = np.asarray(g_), np.asarray(w_)
    np.testing.assert_array_equal(np.isnan(g_), np.isnan(w_))  # the same rows written
    np.testing.assert_allclose(g_[~np.isnan(w_)], w_[~np.isnan(w_)], atol=1e-4, rtol=1e-5)
  written = ~np.isnan(np.asarray(got[1]))[..., 0]  # [S, T]
  expect = (sharing.seq_shared_chunks[:, None] > 0) & np.squeeze(case.valid(), (2, 3))
  np.testing.assert_array_equal(written, expect)
  # The whole call with the items equals fp64 dense.
  out = pf.prefill_attention(*case.args, out=poisoned(case), interpret=True,
                             **sharing.kernel_kwargs())
  check(case, out, dtype, padding=np.nan)


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------
def test_validation_names_the_bad_field(rng):
  case = make_case(rng)
  kw = dict(n_chunks=64, chunk_size=16)
  ok = (case.positions, case.chunk_paths, case.num_tokens)
  pf.validate_prefill_arrays(*ok, **kw)
  bad_paths = case.chunk_paths.copy()
  bad_paths[1, 0] = 64
  with pytest.raises(pf.InvalidPrefillError, match="chunk_paths"):
    pf.validate_prefill_arrays(case.positions, bad_paths, case.num_tokens, **kw)
  bad_pos = case.positions.copy()
  bad_pos[3, 0] = case.chunk_paths.shape[1] * 16
  with pytest.raises(pf.InvalidPrefillError, match=r"positions\[3, 0\]"):
    pf.validate_prefill_arrays(bad_pos, case.chunk_paths, case.num_tokens, **kw)
  with pytest.raises(pf.InvalidPrefillError, match="num_tokens"):
    pf.validate_prefill_arrays(case.positions, case.chunk_paths, case.num_tokens + 100, **kw)
  sharing = plan_prefill_sharing(*ok, chunk_size=16, cost=ALWAYS)
  items = sharing.kernel_kwargs()
  too_long = dict(items, item_num_chunks=items["item_num_chunks"] * 2,
                  seq_shared_chunks=items["seq_shared_chunks"] * 2)
  with pytest.raises(pf.InvalidPrefillError, match="item 0"):
    pf.validate_prefill_arrays(*ok, **kw, **too_long)
  with pytest.raises(pf.InvalidPrefillError, match="seq_shared_chunks"):
    pf.validate_prefill_arrays(*ok, **kw, **dict(items, seq_shared_chunks=items["item_num_chunks"]
                                                 [:1].repeat(6)))
  # The layer checks concrete arrays before computing anything.
  q, kp, vp, pos, _, _ = case.args
  with pytest.raises(pf.InvalidPrefillError, match="chunk_paths"):
    layers.prefill_attention(q, pos, kp, vp, jnp.asarray(bad_paths), impl="xla")
  with pytest.raises(ValueError, match="unknown attention impl"):
    layers.prefill_attention(q, pos, kp, vp, jnp.asarray(case.chunk_paths), impl="cuda")


def test_config_and_shape_checks(rng):
  with pytest.raises(ValueError, match="block_m"):
    pf.PrefillConfig(block_m=48)
  with pytest.raises(ValueError, match="block_n"):
    pf.PrefillConfig(block_n=8)
  with pytest.raises(ValueError, match="num_warps"):
    pf.PrefillConfig(num_warps=3)
  with pytest.raises(ValueError, match="whole query group"):  # g = 32 > block_m = 16
    pf.prefill_attention(jnp.zeros((1, 4, 32, 64)), jnp.zeros((4, 1, 16, 64)),
                         jnp.zeros((4, 1, 16, 64)), jnp.zeros((1, 4), I32), jnp.zeros((1, 2), I32),
                         config=pf.PrefillConfig(block_m=16, block_n=16), interpret=True)
  case = make_case(rng, g=8)
  q, kp, vp, pos, paths, nt = case.args
  with pytest.raises(ValueError, match="positions"):
    pf.prefill_attention_xla(q, kp, vp, pos[:, :3], paths, nt)
  with pytest.raises(ValueError, match="all of item_seqs"):
    pf.prefill(q, kp, vp, pos, paths, nt, impl="xla", item_seqs=paths)
  with pytest.raises(ValueError, match="unknown prefill impl"):
    pf.prefill(q, kp, vp, pos, paths, nt, impl="cudnn")
  for d, c in ((96, 16), (64, 8)):
    with pytest.raises(ValueError, match="Pallas kernels support"):
      pf.prefill_attention(jnp.zeros((1, 4, 2, d)), jnp.zeros((4, 2, c, d)), jnp.zeros((4, 2, c, d)),
                           jnp.zeros((1, 4), I32), jnp.zeros((1, 2), I32), interpret=True)
  # The XLA path takes any d and c.
  out = pf.prefill_attention_xla(jnp.ones((1, 4, 2, 8)), jnp.ones((4, 2, 4, 8)),
                                 jnp.ones((4, 2, 4, 8)), jnp.arange(4, dtype=I32)[None],
                                 jnp.zeros((1, 1), I32))
  np.testing.assert_allclose(out, 1.0)


def test_default_config_heuristic():
  assert pf.PrefillConfig.default(d=128, g=1, dtype=jnp.bfloat16) == pf.PrefillConfig(64, 64, 4, 3)
  assert pf.PrefillConfig.default(d=256, g=4, dtype=jnp.float16) == pf.PrefillConfig(64, 32, 8, 3)
  assert pf.PrefillConfig.default(d=64, g=1, dtype=jnp.float32) == pf.PrefillConfig(16, 16, 8, 3)
  assert pf.PrefillConfig.default(d=64, g=32, dtype=jnp.float32).block_m == 32  # whole group


# --------------------------------------------------------------------------------------------
# The layer: impl dispatch, and memory of the XLA path at the 7B shape.
# --------------------------------------------------------------------------------------------
def test_layer_prefill_impls_agree(rng):
  """ChunkAttention's prefill through every impl (the Pallas one in interpret mode, with and
  without shared-prefix items) gives the same outputs and the same written pool."""
  case = make_case(rng, g=2, d=64)
  S, T = case.positions.shape
  D = 128
  x = jnp.asarray(rng.normal(size=(S, T, D)), jnp.float32)
  slots = np.full((S, T, 2), 64, np.int32)  # everything written already: drop the writes
  sharing = plan_prefill_sharing(case.positions, case.chunk_paths, case.num_tokens, chunk_size=16,
                                 cost=ALWAYS)
  inputs = layers.PrefillInputs(positions=jnp.asarray(case.positions), slots=jnp.asarray(slots),
                                chunk_paths=jnp.asarray(case.chunk_paths),
                                num_tokens=jnp.asarray(case.num_tokens))
  valid = np.squeeze(case.valid(), 3)
  outs = {}
  for impl in ("reference", "xla", "pallas_interpret"):
    layer = layers.ChunkAttention(D, 4, 2, 64, impl=impl, rngs=nnx.Rngs(0))
    for name, inp in ((impl, inputs),
                      (impl + "+sharing", dataclasses.replace(inputs, sharing=sharing))):
      y, kp, _ = layer(x, case.k_pool, case.v_pool, inp)
      np.testing.assert_array_equal(kp, case.k_pool)
      if impl != "reference":  # padding tokens and rows: zeros (no bias on the o projection)
        np.testing.assert_array_equal(np.asarray(y)[~np.broadcast_to(valid, y.shape)], 0.0)
      outs[name] = np.where(valid, np.asarray(y), 0.0)
  for name, y in outs.items():
    np.testing.assert_allclose(y, outs["reference"], atol=1e-5, err_msg=name)


def test_xla_path_memory_at_7b_shape():
  """One layer's prefill of a 4096-token prompt, h = 32, d = 128, c = 64, bf16, compiled for the
  CPU: the blocked path's temporary memory is <= 256 MiB; the dense reference's is > 4 GiB."""
  S, T, h, d, c = 1, 4096, 32, 128, 64
  n_chunks = T // c + 8
  args = (S_((S, T, h, d), jnp.bfloat16), S_((S, T), I32), S_((n_chunks, h, c, d), jnp.bfloat16),
          S_((n_chunks, h, c, d), jnp.bfloat16), S_((S, T // c), I32))

  def temp(impl):
    f = lambda q, pos, kp, vp, paths: layers.prefill_attention(q, pos, kp, vp, paths, impl=impl)
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

  assert temp("xla") <= 256 * 2 ** 20
  assert temp("reference") > 4 * 2 ** 30


# --------------------------------------------------------------------------------------------
# GPU: CUDA lowering on an abstract H100, and the sm_90a compile of every configuration.
# --------------------------------------------------------------------------------------------
GPU_GQA = {1: (32, 32), 4: (32, 8), 8: (32, 4)}  # g -> (h, h_kv)
CONFIGS = list(itertools.product((64, 128, 256), (16, 32, 64, 128), ("float16", "bfloat16",
                                                                        "float32"), (1, 4, 8)))
CONFIG_IDS = [f"d{d}-c{c}-{t}-g{g}" for d, c, t, g in CONFIGS]


def item_specs(S, I=2):
  return dict(item_seqs=S_((I, S), I32), item_num_seqs=S_((I,), I32),
              item_num_chunks=S_((I,), I32), seq_shared_chunks=S_((S,), I32))


@pytest.mark.parametrize("d,c,dtype,g", CONFIGS, ids=CONFIG_IDS)
def test_lowers_for_h100(d, c, dtype, g):
  h, h_kv = GPU_GQA[g]
  S, T, n = 2, 256, 512
  pool = S_((n, h_kv, c, d), dtype)
  base = (S_((S, T, h, d), dtype), pool, pool, S_((S, T), I32), S_((S, 2 * T // c), I32),
          S_((S,), I32))
  items = item_specs(S)

  def both(*args):  # with items (the shared pass, then the main kernel) and without (one kernel)
    return (pf.prefill_attention(*args[:6], **dict(zip(items, args[6:]))),
            pf.prefill_attention(*args[:6]))

  assert lower_for_cuda(both, *base, *items.values()).count("__gpu$xla.gpu.triton") == 3


def test_mqa_lowers_for_h100():
  S, T, n = 2, 128, 256
  for dtype in ("bfloat16", "float32"):
    pool = S_((n, 1, 64, 128), dtype)
    text = lower_for_cuda(pf.prefill_attention, S_((S, T, 32, 128), dtype), pool, pool,
                          S_((S, T), I32), S_((S, 8), I32), S_((S,), I32), **item_specs(S))
    assert text.count("__gpu$xla.gpu.triton") == 2




# Every d, c, dtype and g at least once; compiled on every run (the whole grid is `slow`).
REPRESENTATIVE = [(64, 16, "float16", 1), (128, 64, "bfloat16", 4), (256, 128, "float32", 8),
                  (128, 32, "float32", 1), (256, 16, "bfloat16", 1), (64, 128, "float32", 4),
                  (128, 128, "float16", 8)]


def compile_prefill(configs):
  require_sm90_toolchain()
  specs = kernel_resources.specs(prefill_resources_config.get_config())
  assert [(s["kwargs"]["d"], s["kwargs"]["c"], s["kwargs"]["dtype"], s["kwargs"]["g"])
          for s in specs] == CONFIGS
  specs = [s for s, cfg in zip(specs, CONFIGS) if cfg in configs]
  return specs, deviceless.compile_specs(specs)


def check_compiled(specs, reports):
  """Each spec compiles the call with shared-prefix items (shared pass + main kernel with merge)
  and without (main kernel alone): three kernels, all without spills, within the opt-in shared
  memory, on tensor cores (wgmma) for 16-bit inputs and CUDA cores (full fp32) for fp32, with at
  most 3 barriers per tile-loop iteration and the unmasked tile loop pipelined one tile ahead."""
  assert len(reports) == len(specs) > 0
  for spec, rep in zip(specs, reports):
    kw = spec["kwargs"]
    assert rep.error is None, (kw, rep.error)
    names = sorted(k.kernel.split("_g")[0] for k in rep.kernels)
    assert rep.num_gpu_kernels == 3 and names == ["prefill", "prefill_merge", "prefill_shared"], (
        kw, names)
    for k in rep.kernels:
      where = (kw, k.kernel)
      assert k.registers > 0, where  # ptxas ran on its PTX
      assert k.spill_bytes == 0, (where, k.spill_bytes)
      assert k.smem_bytes <= OPTIN_SMEM and k.ctas_per_sm() >= 1, where
      assert k.barriers_per_iteration <= 3, (where, k.loops)
      assert k.mma == ("fma" if kw["dtype"] == "float32" else "wgmma"), (where, k.mma)
      assert max(lp.tiles_in_flight for lp in k.loops) >= 1, (where, k.loops)


def test_sm90_representative_configurations():
  assert {x for cfg in REPRESENTATIVE for x in cfg} >= {64, 128, 256, 16, 32, "float16",
                                                        "bfloat16", "float32", 1, 4, 8}
  check_compiled(*compile_prefill(REPRESENTATIVE))


@pytest.mark.slow
def test_sm90_every_configuration_without_spills_within_shared_memory():
  specs, reports = compile_prefill(CONFIGS)
  assert len(reports) == 108
  check_compiled(specs, reports)


# --------------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere; scripts/device_check.sh runs it with `pytest -m gpu`).
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("g", (1, 4, 8))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c,d", [(16, 64), (64, 128), (32, 256)])
def test_compiled_kernels_match_fp64_dense(rng, c, d, dtype, g):
  """The compiled kernels, without and with the shared-prefix pass, at the interpret tolerances
  (fp32 at full precision, not TF32); padding rows and tokens untouched."""
  case = make_case(rng, c=c, g=g, d=d, dtype=dtype, n_chunks=128, seed=c + g)
  check(case, pf.prefill_attention(*case.args, out=poisoned(case)), dtype, padding=np.nan)
  sharing = plan_prefill_sharing(case.positions, case.chunk_paths, case.num_tokens, chunk_size=c,
                                 cost=ALWAYS)
  assert sharing is not None
  out = pf.prefill_attention(*case.args, out=poisoned(case), **sharing.kernel_kwargs())
  check(case, out, dtype, padding=np.nan)
