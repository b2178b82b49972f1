"""End-to-end serving: the chunk-cache engine vs the paged plan and a dense KV cache (paper Fig. 5).

Three parts (config.parts), one model with random weights (`config.model`: a `llama.CONFIGS` name;
Open-LLaMA-7B shape in bf16 on a GPU, a tiny model on the CPU):

* "decode": `batch` requests share an `n_s`-token system prompt plus `n_q` own tokens; after all
  are prefilled, `n_steps` decode steps are timed for the engine with the two-phase plan
  (threshold 1), the same engine with the paged plan (threshold huge: memory shared, compute not),
  and a dense per-request KV cache (no sharing). Engine times include the host work of a step
  (tree appends, plan refresh, sampling); every variant's tokens are checked against the engine's.
* "ttft": time to first token of one request whose system prompt is cached vs cold.
* "poisson": requests arrive as a Poisson process at each rate in `rates`; each is the system
  prompt + own tokens, `n_c` greedy tokens; reports the normalised latency (mean over requests of
  end-to-end latency / generated tokens, ms/token), throughput and peak KV bytes, for the
  two-phase and the paged plan.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chunkattn_jax import dense_baseline, llama
from chunkattn_jax.engine import Engine, EngineConfig
from chunkattn_jax.sharing_policy import CostModelPolicy
from experiments import common

PAGED_THRESHOLD = 1 << 30


def _model(config):
  cfg = llama.CONFIGS[config.model](dtype=config.dtype, param_dtype=config.dtype,
                                    max_position_embeddings=config.max_context)
  return llama.Llama(cfg, impl=config.impl, rngs=nnx.Rngs(config.seed))


def _engine(model, config, threshold, caps=()):
  policy = None
  if config.get("sharing_policy", "threshold") == "cost_model" and threshold < PAGED_THRESHOLD:
    mc = model.config
    policy = CostModelPolicy.for_shapes(
        num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.d_head,
        chunk_size=config.chunk_size, dtype_bytes=jnp.dtype(config.dtype).itemsize)
  return Engine(model, EngineConfig(
      n_chunks=config.n_chunks, chunk_size=config.chunk_size, max_batch=config.max_batch,
      threshold=threshold, policy=policy, cache_prefixes=True, min_plan_capacities=caps))


def _prompts(config, n, rng, system):
  v = config.vocab_limit
  return [system + rng.integers(0, v, config.n_q).tolist() for _ in range(n)]


def _decode_part(model, config, progress):
  rng = np.random.default_rng(config.seed)
  system = rng.integers(0, config.vocab_limit, config.n_s).tolist()
  prompts = _prompts(config, config.batch, rng, system)
  n_steps = config.n_steps
  rows, reference = [], None
  for name, threshold in (("chunk", 1), ("paged", PAGED_THRESHOLD)):
    for timed in (False, True):  # the untimed pass compiles every shape the timed pass meets
      eng = _engine(model, config, threshold)
      rids = [eng.submit(p, n_steps + config.warmup_steps + 2) for p in prompts]
      eng.step()  # admits and prefills everything, first decode step
      for _ in range(config.warmup_steps):
        eng.step()
      jax.block_until_ready(eng.pool.k[0])
      t0 = time.perf_counter()
      for _ in range(n_steps):
        eng.step()
      jax.block_until_ready(eng.pool.k[0])
      dt = (time.perf_counter() - t0) / n_steps
    toks = [eng.result(r)[: n_steps] for r in rids]
    reference = reference or toks
    rows.append(dict(part="decode", variant=name, batch=config.batch, n_s=config.n_s,
                     step_ms=dt * 1e3, tokens_per_s=config.batch / dt,
                     kv_mb=eng.kv_bytes_in_use() / 2**20, tokens_match=toks == reference))
    progress(len(rows), 3, f"decode {name}: {dt * 1e3:.2f} ms/step")
  # Dense per-request cache, batched, greedy on device.
  runner = dense_baseline.DenseRunner(model)
  max_len = config.n_s + config.n_q + n_steps + config.warmup_steps + 4
  cache = model.make_dense_cache(config.batch, max_len)
  logits, cache = runner.prefill(cache, prompts)
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  out = [np.asarray(tok)]
  pos = np.full(config.batch, len(prompts[0]), np.int32)
  def step(tok, cache, pos):
    logits, cache = runner.decode(cache, tok, pos)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache
  step(tok, cache.__class__(k=tuple(jnp.copy(a) for a in cache.k),
                            v=tuple(jnp.copy(a) for a in cache.v)), pos)  # compile
  for _ in range(config.warmup_steps + 1):
    tok, cache = step(tok, cache, pos)
    out.append(np.asarray(tok))
    pos += 1
  t0 = time.perf_counter()
  for _ in range(n_steps):
    tok, cache = step(tok, cache, pos)
    out.append(np.asarray(tok))  # the engine also brings tokens to the host every step
    pos += 1
  dt = (time.perf_counter() - t0) / n_steps
  dense_toks = np.stack(out, 1)[:, : n_steps].tolist()
  rows.append(dict(part="decode", variant="dense", batch=config.batch, n_s=config.n_s,
                   step_ms=dt * 1e3, tokens_per_s=config.batch / dt, kv_mb=cache.nbytes() / 2**20,
                   tokens_match=dense_toks == reference))
  progress(3, 3, f"decode dense: {dt * 1e3:.2f} ms/step")
  return rows


def _ttft_part(model, config, progress):
  rng = np.random.default_rng(config.seed + 1)
  eng = _engine(model, config, 1)
  rows = []
  for i, label in enumerate(("warmup", "cold", "cached", "cold", "cached")):
    if label in ("warmup", "cold"):
      system = rng.integers(0, config.vocab_limit, config.n_s).tolist()
    prompt = system + rng.integers(0, config.vocab_limit, config.n_q).tolist()
    t0 = time.perf_counter()
    rid = eng.submit(prompt, 1)
    eng.step()
    dt = time.perf_counter() - t0
    if label == "warmup":  # compiles the cold and the cached prefill shapes
      eng.submit(system + [1] * config.n_q, 1)
      list(eng.run())
      continue
    rows.append(dict(part="ttft", variant=label, n_s=config.n_s, ttft_ms=dt * 1e3,
                     cached_tokens=eng.request_info(rid)["num_cached"]))
    progress(i, 4, f"ttft {label}: {dt * 1e3:.2f} ms")
  return rows


def _poisson_loop(eng, prompts, arrivals, n_c):
  """Submits prompt i at `arrivals[i]` seconds (wall clock) while stepping the engine."""
  start = time.perf_counter()
  submitted, rids, peak = 0, [], 0
  while submitted < len(prompts) or eng.has_work():
    now = time.perf_counter() - start
    while submitted < len(prompts) and arrivals[submitted] <= now:
      rids.append((eng.submit(prompts[submitted], n_c), start + arrivals[submitted]))
      submitted += 1
    if eng.has_work():
      eng.step()
      peak = max(peak, eng.kv_bytes_in_use())
    elif submitted < len(prompts):
      time.sleep(max(0.0, min(arrivals[submitted] - now, 0.01)))
  return rids, peak, start


def _poisson_part(model, config, progress):
  rows = []
  total = len(config.rates) * 2
  for i, rate in enumerate(config.rates):
    for name, threshold in (("chunk", 1), ("paged", PAGED_THRESHOLD)):
      rng = np.random.default_rng(config.seed + 2)
      system = rng.integers(0, config.vocab_limit, config.n_s).tolist()
      prompts = _prompts(config, config.num_requests, rng, system)
      arrivals = np.cumsum(rng.exponential(1.0 / rate, config.num_requests))
      # The same arrival run twice: the first compiles the shapes the second (reported) meets.
      caps = ()
      for _ in range(2):
        eng = _engine(model, config, threshold, caps=caps)
        rids, peak, start = _poisson_loop(eng, prompts, arrivals, config.n_c)
        caps = eng.plan_capacities
      wall = time.perf_counter() - start
      lat = [(eng.request_info(r)["finish_time"] - t_arr) / len(eng.result(r)) for r, t_arr in rids]
      rows.append(dict(part="poisson", variant=name, rate=rate, num_requests=len(prompts),
                       norm_latency_ms_per_token=float(np.mean(lat) * 1e3),
                       throughput_tok_s=sum(len(eng.result(r)) for r, _ in rids) / wall,
                       peak_kv_mb=peak / 2**20, preemptions=eng.stats["preemptions"]))
      progress(2 * i + (name == "paged") + 1, total,
               f"poisson rate {rate} {name}: {rows[-1]['norm_latency_ms_per_token']:.2f} ms/token")
  return rows


def run(config, progress) -> list[dict]:
  model = _model(config)
  rows = []
  if "decode" in config.parts:
    rows += _decode_part(model, config, progress)
  if "ttft" in config.parts:
    rows += _ttft_part(model, config, progress)
  if "poisson" in config.parts:
    rows += _poisson_part(model, config, progress)
  return rows


def plot(rows, workdir) -> list[str]:
  pts = [r for r in rows if r["part"] == "poisson"]
  if not pts:
    return []
  fig, ax = common.subplots(figsize=(5, 3.5))
  for name in ("chunk", "paged"):
    rr = sorted((r for r in pts if r["variant"] == name), key=lambda r: r["rate"])
    ax.plot([r["rate"] for r in rr], [r["norm_latency_ms_per_token"] for r in rr], "o-",
            label={"chunk": "two-phase plan", "paged": "paged plan"}[name])
  ax.set_xlabel("request rate (requests/s)")
  ax.set_ylabel("normalised latency (ms/token)")
  ax.legend()
  return [common.save_figure(fig, workdir, "serving_latency.png")]
