"""Peak KV memory: the prefix-shared chunk cache vs a per-request paged and a dense cache (Table 4).

For each (n_p, n_s) point, `batch` requests whose prompts share their first `n_s` tokens are
inserted into a `PrefixTree` and each decodes `n_c` tokens (one append per request per step, as the
engine does); the peak number of chunks in use times the bytes of one chunk at the model shape
(`config.model`, `config.dtype`) is the chunk cache's peak KV memory. Baselines, same requests:
paged without sharing (`ceil((n_p + n_c) / c)` chunks per request, vLLM 0.2.7-style) and a dense
cache (`max_len = n_p + n_c` rows per request). With `config.check_engine`, a shrunk run of the real
engine (tiny model) confirms its measured peak equals this count.
"""

from __future__ import annotations

import numpy as np

from chunkattn_jax import llama
from chunkattn_jax.chunk_pool import ChunkPool
from chunkattn_jax.prefix_tree import PrefixTree
from experiments import common


def kv_bytes_per_token(cfg: llama.LlamaConfig, dtype: str) -> int:
  """K plus V bytes of one token over all layers."""
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.d_head * np.dtype(dtype).itemsize


def peak_chunks(batch: int, n_p: int, n_s: int, n_c: int, c: int, seed: int = 0) -> int:
  """Peak chunks in use when `batch` prompts sharing `n_s` of `n_p` tokens each decode `n_c`."""
  rng = np.random.default_rng(seed)
  per = -(-(n_p + n_c) // c)
  tree = PrefixTree(ChunkPool(batch * per + 1), c)
  system = rng.integers(0, 32000, n_s).tolist()
  ids = [tree.insert(system + rng.integers(0, 32000, n_p - n_s).tolist()).seq_id
         for _ in range(batch)]
  peak = tree.pool.num_used
  for _ in range(n_c):
    tree.append_tokens(ids, rng.integers(0, 32000, batch).tolist())
    peak = max(peak, tree.pool.num_used)
  return peak


def _check_engine(config) -> dict:
  """Runs the engine (tiny model) on a shrunk point and compares its peak with `peak_chunks`."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from chunkattn_jax.engine import Engine, EngineConfig  # pylint: disable=import-outside-toplevel
  b, n_p, n_s, n_c, c = 4, 40, 32, 6, 8
  model = llama.Llama(llama.tiny(), rngs=nnx.Rngs(0))
  eng = Engine(model, EngineConfig(n_chunks=64, chunk_size=c, cache_prefixes=False))
  rng = np.random.default_rng(0)
  system = rng.integers(0, 97, n_s).tolist()
  for _ in range(b):
    eng.submit(system + rng.integers(0, 97, n_p - n_s).tolist(), n_c + 1)
  peak = 0
  while eng.has_work():
    eng.step()
    peak = max(peak, eng.tree.pool.num_used)
  return dict(point="engine_check", batch=b, n_p=n_p, n_s=n_s, n_c=n_c,
              engine_peak_chunks=peak, simulated_peak_chunks=peak_chunks(b, n_p, n_s, n_c, c),
              match=peak == peak_chunks(b, n_p, n_s, n_c, c))


def run(config, progress) -> list[dict]:
  cfg = llama.CONFIGS[config.model]()
  per_tok = kv_bytes_per_token(cfg, config.dtype)
  c = config.chunk_size
  gb = 1e9
  rows = []
  points = list(config.points)
  for i, (n_p, n_s) in enumerate(points):
    b, n_c = config.batch, config.n_c
    chunks = peak_chunks(b, n_p, n_s, n_c, c, seed=config.seed)
    paged = b * -(-(n_p + n_c) // c)
    dense_tokens = b * (n_p + n_c)
    row = dict(point=f"{n_p}/{n_s}", batch=b, n_p=n_p, n_s=n_s, n_c=n_c,
               chunk_kv_gb=chunks * c * per_tok / gb, paged_kv_gb=paged * c * per_tok / gb,
               dense_kv_gb=dense_tokens * per_tok / gb, peak_chunks=chunks)
    row["saving_vs_paged"] = 1 - row["chunk_kv_gb"] / row["paged_kv_gb"]
    rows.append(row)
    progress(i + 1, len(points), f"n_p={n_p} n_s={n_s}: {row['chunk_kv_gb']:.2f} GB "
             f"vs paged {row['paged_kv_gb']:.2f} GB")
  if config.check_engine:
    rows.append(_check_engine(config))
  return rows


def plot(rows, workdir) -> list[str]:
  pts = [r for r in rows if "chunk_kv_gb" in r]
  if not pts:
    return []
  x = np.arange(len(pts))
  fig, ax = common.subplots(figsize=(6, 3.5))
  for j, (key, label) in enumerate((("dense_kv_gb", "dense"), ("paged_kv_gb", "paged"),
                                    ("chunk_kv_gb", "chunk (prefix tree)"))):
    ax.bar(x + (j - 1) * 0.27, [r[key] for r in pts], 0.27, label=label)
  ax.set_xticks(x, [r["point"] for r in pts])
  ax.set_xlabel("n_p / n_s")
  ax.set_ylabel("peak KV memory (GB)")
  ax.legend()
  return [common.save_figure(fig, workdir, "memory.png")]
