"""Generate text from a local Hugging Face checkpoint on the command line.

    python -m chunkattn_jax.generate --checkpoint DIR --prompt "Once upon a time" [--max-new-tokens 64]

The generated text streams to stdout as it is decoded; progress goes to stderr: a line when the
checkpoint is loaded, then one line when generation ends (tokens, time, tokens/s, time to the first
token, why it stopped). The directory needs config.json, *.safetensors and tokenizer.json; EOS ids
come from config.json and generation_config.json. Bad input (an unsupported config, a kernel the
model cannot run, a bad argument) prints one `error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from chunkattn_jax import llama


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m chunkattn_jax.generate",
                              description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="local HF checkpoint directory")
  p.add_argument("--prompt", required=True, help="the prompt text")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--impl", default="xla", help="decode attention: xla | pallas | pallas_interpret "
                                               "| reference")
  p.add_argument("--dtype", choices=llama.DTYPES, default=None,
                 help="compute dtype (default: the checkpoint's)")
  p.add_argument("--chunk-size", type=int, default=16, help="tokens per KV chunk")
  p.add_argument("--no-special-tokens", action="store_true",
                 help="encode the prompt without the tokenizer's special tokens (e.g. BOS)")
  return p


def main(argv=None, stdout=None, stderr=None) -> int:
  """Runs the command; returns the exit status (0 ok, 2 bad input)."""
  from chunkattn_jax import checkpoint, text  # pylint: disable=import-outside-toplevel
  from chunkattn_jax.engine import Engine, EngineConfig  # pylint: disable=import-outside-toplevel
  from chunkattn_jax.sampling import SamplingParams  # pylint: disable=import-outside-toplevel
  out, err = stdout or sys.stdout, stderr or sys.stderr
  args = _parser().parse_args(argv)
  t0 = time.perf_counter()
  try:
    tokenizer = text.load_tokenizer(args.checkpoint)
    model = checkpoint.load_hf_checkpoint(args.checkpoint, impl=args.impl, dtype=args.dtype)
    cfg = model.config
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
    prompt_len = len(tokenizer.encode(args.prompt, not args.no_special_tokens))
    total = min(prompt_len + max(args.max_new_tokens, 1), cfg.max_position_embeddings + 1)
    n_chunks = max(4, -(-total // max(args.chunk_size, 1)) + 1)
    engine = Engine(model, EngineConfig(n_chunks=n_chunks, chunk_size=args.chunk_size,
                                        max_batch=1, max_prefill_batch=1))
    gen = text.TextGenerator(engine, tokenizer)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    rid = gen.submit(args.prompt, args.max_new_tokens, stop=args.stop, sampling=sampling,
                     add_special_tokens=not args.no_special_tokens)
  except (ValueError, TypeError, FileNotFoundError) as e:  # incl. checkpoint and kernel errors
    print(f"error: {e}", file=err, flush=True)
    return 2
  print(f"[generate] loaded {args.checkpoint}: {cfg.num_layers} layers, {cfg.num_heads}/"
        f"{cfg.num_kv_heads} heads x {cfg.d_head}, vocab {cfg.vocab_size}, {cfg.dtype}, "
        f"impl={args.impl} ({load_s:.1f} s)", file=err, flush=True)
  first = None
  for ev in gen.run():
    if first is None:
      first = time.perf_counter() - t1
    if ev.text:
      out.write(ev.text)
      out.flush()
  dt = time.perf_counter() - t1
  n = len(engine.result(rid))
  out.write("\n")
  out.flush()
  print(f"[generate] {prompt_len} prompt tokens, {n} new tokens in {dt:.2f} s "
        f"({n / dt:.1f} tokens/s, first token after {first or 0:.2f} s); "
        f"finish_reason={gen.finish_reason(rid)}", file=err, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
