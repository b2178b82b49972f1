"""ChunkAttention: prefill with prefix reuse, decode over plans, dense mode, RoPE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chunkattn_jax import layers
from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.kv_pool import KVPool, pad_slots
from chunkattn_jax.plan import build_plan
from chunkattn_jax.prefix_tree import PrefixTree

D, H, H_KV, HD, C, N_CHUNKS = 32, 4, 2, 8, 4, 48


@pytest.fixture(scope="module")
def layer():
  return layers.ChunkAttention(D, H, H_KV, HD, rope_theta=500.0, impl="xla", rngs=nnx.Rngs(0))


def _x(n, seed):
  return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _dense(layer, x):
  """Full causal attention of one sequence through the dense-cache path: [T, D]."""
  t = x.shape[0]
  k = jnp.zeros((1, t, H_KV, HD))
  y, _, _ = layer(x[None], k, k, layers.DenseInputs(positions=jnp.arange(t)[None]))
  return np.asarray(y[0])


def _empty_pool():
  p = KVPool.create(1, N_CHUNKS, H_KV, C, HD)
  return p.k[0], p.v[0]


def _prefill(layer, kp, vp, tree, res, x_new, start):
  n = x_new.shape[0]
  path = np.asarray(tree.chunk_path(res.seq_id), np.int32)[None]
  inp = layers.PrefillInputs(positions=jnp.arange(start, start + n)[None],
                             slots=jnp.asarray(res.slots)[None], chunk_paths=jnp.asarray(path))
  y, kp, vp = layer(x_new[None], kp, vp, inp)
  return np.asarray(y[0]), kp, vp


def test_rope_half_split_rotation():
  x = np.random.default_rng(0).normal(size=(3, 2, 8)).astype(np.float32)
  pos = np.array([0, 1, 7])
  y = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), 100.0))
  np.testing.assert_allclose(y[0], x[0], rtol=1e-6)
  inv = 100.0 ** (-np.arange(0, 8, 2) / 8)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[:, None, None] * inv)
  np.testing.assert_allclose(y, np.concatenate([z.real, z.imag], -1), atol=1e-5)
  # Scores depend only on the position difference.
  q, k = jnp.asarray(x[:1, :1]), jnp.asarray(x[1:2, :1])
  s = lambda a, b: float(jnp.sum(layers.apply_rope(q, jnp.array([a]), 100.0)
                                 * layers.apply_rope(k, jnp.array([b]), 100.0)))
  assert abs(s(5, 3) - s(12, 10)) < 1e-4
  with pytest.raises(ValueError, match="even head dim"):
    layers.rope_frequencies(7, 10.0)


def test_prefill_with_prefix_reuse_equals_full_prefill(layer):
  """A second sequence that shares 3 full chunks computes only its suffix, and gets the outputs
  of a full prefill (and of the dense path)."""
  kp, vp = _empty_pool()
  tree = PrefixTree(ChunkPool(N_CHUNKS, seed=1), C)
  xa = _x(14, 0)
  xb = np.concatenate([xa[:12], _x(7, 1)])  # same first 12 tokens: 3 full chunks
  ta = list(range(14))
  tb = list(range(12)) + [90 + i for i in range(7)]
  ra = tree.insert(ta, min_new_tokens=1)
  ya, kp, vp = _prefill(layer, kp, vp, tree, ra, xa, 0)
  np.testing.assert_allclose(ya, _dense(layer, xa), atol=2e-5)
  rb = tree.insert(tb, min_new_tokens=1)
  assert rb.num_cached == 12 and rb.slots.shape == (7, 2)
  yb, kp, vp = _prefill(layer, kp, vp, tree, rb, xb[12:], 12)
  np.testing.assert_allclose(yb, _dense(layer, xb)[12:], atol=2e-5)
  # A fresh pool with the full prefill of b.
  kp2, vp2 = _empty_pool()
  tree2 = PrefixTree(ChunkPool(N_CHUNKS, seed=2), C)
  rb2 = tree2.insert(tb)
  yb2, _, _ = _prefill(layer, kp2, vp2, tree2, rb2, xb, 0)
  np.testing.assert_allclose(yb, yb2[12:], atol=2e-5)


def test_prefill_padding_and_dropped_writes(layer):
  """Padded prefill tokens (drop slot) leave the pool untouched and the real outputs unchanged."""
  kp, vp = _empty_pool()
  tree = PrefixTree(ChunkPool(N_CHUNKS, seed=3), C)
  x = _x(5, 3)
  res = tree.insert(list(range(5)))
  y_exact, kp1, _ = _prefill(layer, kp, vp, tree, res, x, 0)
  xp = np.concatenate([x, _x(3, 9)])
  slots = pad_slots(res.slots, 8, N_CHUNKS)[None]
  pos = np.concatenate([np.arange(5), np.zeros(3, int)])[None]
  path = np.asarray(tree.chunk_path(res.seq_id) + [0, 0], np.int32)[None]
  y, kp2, _ = layer(xp[None], kp, vp, layers.PrefillInputs(positions=pos, slots=slots,
                                                           chunk_paths=path))
  np.testing.assert_allclose(np.asarray(y[0, :5]), y_exact, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(kp1), np.asarray(kp2))


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_decode_over_plan_equals_dense(impl):
  """Rows sharing prefixes (shared, partly shared, unrelated) decode one token each; every row's
  output equals full dense attention over its sequence. Lengths off chunk boundaries."""
  lay = layers.ChunkAttention(D, H, H_KV, HD, rope_theta=500.0, impl=impl, rngs=nnx.Rngs(0))
  kp, vp = _empty_pool()
  tree = PrefixTree(ChunkPool(N_CHUNKS, seed=4), C)
  base = _x(50, 5)
  seqs = {}  # seq_id -> (token features)
  specs = [(0, 13), (0, 9), (0, 16), (20, 27)]  # rows 0-2 share a prefix; row 3 unrelated
  for i, (off, n) in enumerate(specs):
    x = base[off:off + n].copy()
    if i == 1:
      x[8:] = _x(1, 50)  # shares 2 chunks with row 0
    toks = list(range(off, off + n)) if i != 1 else list(range(8)) + [77]
    res = tree.insert(toks, min_new_tokens=1)
    start = res.num_cached
    _, kp, vp = _prefill(lay, kp, vp, tree, res, x[start:], start)
    seqs[res.seq_id] = x
  ids = list(seqs)
  new = _x(len(ids), 60)
  slots = tree.append_tokens(ids, [5] * len(ids))
  plan = build_plan(tree, threshold=1)
  assert plan.num_shared_items() > 0
  r_cap = plan.row_capacity
  rows = plan.rows_of(ids)
  x_rows = np.zeros((r_cap, D), np.float32)
  pos = np.zeros(r_cap, np.int32)
  sl = np.zeros((r_cap, 2), np.int32)
  sl[:, 0] = N_CHUNKS
  for j, sid in enumerate(ids):
    x_rows[rows[j]] = new[j]
    pos[rows[j]] = len(seqs[sid])
    sl[rows[j]] = slots[j]
  fn = jax.jit(lambda x, k, v, inp: lay(x, k, v, inp))
  y, _, _ = fn(x_rows, kp, vp, layers.DecodeInputs(positions=pos, slots=sl, plan=plan))
  for j, sid in enumerate(ids):
    full = np.concatenate([seqs[sid], new[j:j + 1]])
    np.testing.assert_allclose(np.asarray(y[rows[j]]), _dense(lay, full)[-1], atol=3e-5)


def test_validation_errors(layer):
  k = jnp.zeros((N_CHUNKS, H_KV, C, HD))
  with pytest.raises(ValueError, match="expected x"):
    layer(jnp.zeros((2, D + 1)), k, k, None)
  with pytest.raises(ValueError, match="prefill expects"):
    layer(jnp.zeros((2, D)), k, k, layers.PrefillInputs(jnp.zeros((2,), jnp.int32),
                                                        jnp.zeros((2, 2), jnp.int32),
                                                        jnp.zeros((1, 1), jnp.int32)))
  with pytest.raises(TypeError, match="unsupported attention inputs"):
    layer(jnp.zeros((2, D)), k, k, object())
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    layers.ChunkAttention(D, 3, 2, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown attention impl"):
    layers.ChunkAttention(D, 4, 2, 8, impl="cuda", rngs=nnx.Rngs(0))


def _prefill_case(seed=5):
  """One 6-token sequence inserted in a fresh tree: (x [1, 6, D], PrefillInputs as NumPy)."""
  tree = PrefixTree(ChunkPool(N_CHUNKS, seed=seed), C)
  res = tree.insert(list(range(6)))
  path = np.asarray(tree.chunk_path(res.seq_id), np.int32)[None]
  inputs = layers.PrefillInputs(positions=np.arange(6, dtype=np.int32)[None],
                                slots=res.slots[None].copy(), chunk_paths=path)
  return _x(6, seed)[None], inputs


def _with(inputs, field, fn):
  a = np.array(getattr(inputs, field))
  fn(a)
  return dataclasses.replace(inputs, **{field: a})


def test_prefill_inputs_are_checked(layer):
  """Host-side prefill inputs that would read or write the wrong pool memory are rejected (before:
  XLA clamped the gathers and wrapped negative scatter indices: finite, wrong outputs)."""
  kp, vp = _empty_pool()
  x, good = _prefill_case()
  layer(x, kp, vp, good)
  other = (int(good.chunk_paths[0, 0]) + 1) % N_CHUNKS
  path_outside = _with(good, "chunk_paths", lambda a: a.__setitem__((0, 1), N_CHUNKS))
  beyond_path = _with(good, "positions", lambda a: a.__setitem__((0, 5), 8))
  bad = [
      (_with(good, "slots", lambda a: a.__setitem__((0, 2, 0), N_CHUNKS + 1)), "outside|slots"),
      (_with(good, "slots", lambda a: a.__setitem__((0, 2, 0), -1)), r"slots\[0, 2\] = \(-1"),
      (_with(good, "slots", lambda a: a.__setitem__((0, 2, 1), C)), "offsets"),
      (_with(good, "slots", lambda a: a.__setitem__((0, 1, 0), other)), "is read from"),
      (_with(_with(good, "slots", lambda a: a.__setitem__((0, 1), a[0, 0])),
             "positions", lambda a: a.__setitem__((0, 1), 0)), "written by 2 tokens"),
      (beyond_path, "outside the chunk path"),
      (_with(good, "positions", lambda a: a.__setitem__((0, 0), -1)), "positions"),
      (path_outside, "outside the pool"),
      (_with(good, "chunk_paths", lambda a: a.__setitem__((0, 0), -3)), "outside the pool"),
      (dataclasses.replace(good, positions=good.positions.astype(np.float32)), "integer array"),
  ]
  for inputs, match in bad:
    with pytest.raises(ValueError, match=match):
      layer(x, kp, vp, inputs)
    # The off switch (the engine's, for the arrays it builds from its own tree) lets it through,
    # except a wrong dtype, which the attention paths refuse at trace time anyway.
    if match == "integer array":
      with pytest.raises(ValueError, match="int32"):
        layer(x, kp, vp, dataclasses.replace(inputs, check=False))
    else:
      layer(x, kp, vp, dataclasses.replace(inputs, check=False))
  with pytest.raises(ValueError, match="shape"):
    layer(x, kp, vp, dataclasses.replace(good, slots=good.slots[:, :, :1]))
  # prefill_attention itself checks what it reads.
  q = jnp.zeros((1, 6, H, HD))
  with pytest.raises(ValueError, match="outside the pool"):
    layers.prefill_attention(q, good.positions, kp, vp, path_outside.chunk_paths)
  with pytest.raises(ValueError, match="outside the chunk path"):
    layers.prefill_attention(q, beyond_path.positions, kp, vp, good.chunk_paths)
  layers.prefill_attention(q, beyond_path.positions, kp, vp, good.chunk_paths, check=False)


def test_input_checks_skip_traced_values(layer):
  """Inside jit nothing concrete is there to check: the caller checks the host arrays first."""
  kp, vp = _empty_pool()
  x, good = _prefill_case()
  bad = _with(good, "slots", lambda a: a.__setitem__((0, 2, 0), -1))
  jax.jit(lambda x, k, v, i: layer(x, k, v, i))(x, kp, vp, bad)
  with pytest.raises(ValueError, match="slots"):
    layers.check_prefill_inputs(bad.positions, bad.slots, bad.chunk_paths, n_chunks=N_CHUNKS,
                                chunk_size=C)
  assert layers.check_prefill_inputs(good.positions, good.slots, good.chunk_paths,
                                     n_chunks=N_CHUNKS, chunk_size=C)


def test_decode_inputs_are_checked(layer):
  kp, vp = _empty_pool()
  tree = PrefixTree(ChunkPool(N_CHUNKS, seed=6), C)
  ids = [tree.insert(list(range(k, k + 5))).seq_id for k in (0, 10)]
  slots = tree.append_tokens(ids, [1, 2])
  plan = build_plan(tree)
  rows = plan.rows_of(ids)
  pos = np.zeros(plan.row_capacity, np.int32)
  sl = np.zeros((plan.row_capacity, 2), np.int32)
  sl[:, 0] = N_CHUNKS
  pos[rows], sl[rows] = 5, slots
  x = jnp.zeros((plan.row_capacity, D))
  layer(x, kp, vp, layers.DecodeInputs(pos, sl, plan))
  for field, index, value, match in (("slots", (rows[0], 0), -1, "slots"),
                                     ("slots", (rows[1],), sl[rows[0]], "written by 2"),
                                     ("positions", (rows[1],), -2, "negative")):
    arrays = dict(positions=pos.copy(), slots=sl.copy())
    arrays[field][index] = value
    with pytest.raises(ValueError, match=match):
      layer(x, kp, vp, layers.DecodeInputs(plan=plan, **arrays))
    layer(x, kp, vp, layers.DecodeInputs(plan=plan, check=False, **arrays))
