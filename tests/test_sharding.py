"""Sharded (KV heads over 2 and 4 host devices) equals unsharded.

`--xla_force_host_platform_device_count` must be set before JAX initialises, so the check runs in a
subprocess and the other tests keep their single-device setup.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from chunkattn_jax import sharding

_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from chunkattn_jax import checkpoint, engine, llama, sharding, layers
    assert jax.device_count() == 8, jax.devices()
    cfg = llama.tiny(num_heads=8, num_kv_heads=4, head_dim=8)
    rng = np.random.default_rng(0)
    sys_p = rng.integers(0, 97, 21).tolist()
    prompts = [sys_p + rng.integers(0, 97, k).tolist() for k in (1, 5)] + [rng.integers(0, 97, 7).tolist()]
    ckpt = tempfile.mkdtemp()
    checkpoint.save_hf_checkpoint(llama.Llama(cfg, rngs=nnx.Rngs(1)), ckpt)
    results = {}
    for n in (1, 2, 4):
      mesh = sharding.make_mesh(n) if n > 1 else None
      model = checkpoint.load_hf_checkpoint(ckpt, impl="xla", mesh=mesh)
      if n > 1:
        spec = model.layers[0].self_attn.k_proj.kernel.get_value().sharding.spec
        assert spec == jax.sharding.PartitionSpec(None, "model"), spec
      eng = engine.Engine(model, engine.EngineConfig(n_chunks=32, chunk_size=4, record_logits=True))
      if n > 1:
        assert len(eng.pool.k[0].sharding.device_set) == n
      rids = [eng.submit(p, 6) for p in prompts]
      list(eng.run())
      results[n] = [(eng.result(r), np.stack(eng.request_info(r)["logits"])) for r in rids]
    # shard_model on a freshly built model (no checkpoint) and the dense path.
    m = llama.Llama(cfg, rngs=nnx.Rngs(1))
    sharding.shard_model(m, sharding.make_mesh(4))
    cache = m.make_dense_cache(1, 16, sharding=sharding.dense_cache_sharding(m.mesh))
    toks = jnp.asarray(prompts[2])[None]
    dense_logits, _ = m(toks, cache, layers.DenseInputs(positions=jnp.arange(7)[None]))
    for n in (2, 4):
      for (t1, l1), (tn, ln) in zip(results[1], results[n]):
        assert t1 == tn, (n, t1, tn)
        np.testing.assert_allclose(l1, ln, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dense_logits[0, -1]), results[1][2][1][0], atol=1e-4)
    try:
      sharding.shard_model(llama.Llama(llama.tiny(), rngs=nnx.Rngs(0)), sharding.make_mesh(4))
      raise AssertionError("expected ValueError")
    except ValueError as e:
      assert "num_kv_heads=2" in str(e)
    print("SHARDING_OK")
""")


def test_sharded_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-W", "error", "-c", _SCRIPT], env=env, cwd=root,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0 and "SHARDING_OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]


def test_partition_rules():
  assert sharding.spec_for_path(("layers", 0, "self_attn", "q_proj", "kernel")) == P(None, "model")
  assert sharding.spec_for_path(("layers", 0, "self_attn", "q_proj", "bias")) == P("model")
  assert sharding.spec_for_path(("layers", 3, "self_attn", "o_proj", "kernel")) == P("model", None)
  assert sharding.spec_for_path(("layers", 3, "mlp", "down_proj", "kernel")) == P("model", None)
  assert sharding.spec_for_path(("layers", 3, "mlp", "up_proj", "kernel")) == P(None, "model")
  assert sharding.spec_for_path(("embed_tokens", "embedding")) == P()
  assert sharding.spec_for_path(("norm", "weight")) == P()
  with pytest.raises(ValueError, match="only"):
    sharding.make_mesh(10 ** 6)
