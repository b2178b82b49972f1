"""Writes the Hugging Face parity fixtures under tests/fixtures/hf/ (run by developers, not by CI).

Needs torch and transformers, which the tests do not. Each fixture is a tiny random-weight
`LlamaForCausalLM` saved by transformers' own `save_pretrained` (so `config.json` is in the
format of the transformers version that ran), plus `expected.npz` with what transformers computed:

  prompts [P, T_max] int32 (padded with -1), logits_<p> [T_p, V] float32 (every prompt position),
  greedy_<p> [N] int32 and greedy_logits_<p> [N, V] float32 (`generate`, greedy, no EOS stop),
  inv_freq [d/2] float32 (the model's RoPE inverse frequencies).

A fixture's config names its format: "v4" fixtures (top-level `rope_theta`, `rope_scaling`) are
written when this runs under transformers 4.x, "v5" fixtures (`rope_parameters`) under 5.x, so
both formats come from the library that writes them. Run it once per format:

  python3.11 -m venv /tmp/hf4 && /tmp/hf4/bin/pip install torch==2.13.0 'transformers==4.57.6'
  python3.11 -m venv /tmp/hf5 && /tmp/hf5/bin/pip install torch==2.13.0 'transformers==5.24.0'
  python3.11 -m venv /tmp/hf445 && /tmp/hf445/bin/pip install torch==2.13.0 'transformers==4.45.2'
  for v in hf445 hf4 hf5; do /tmp/$v/bin/python scripts/make_hf_fixtures.py; done

Weights are drawn at a useful scale (logits of order 1, not HF's 0.02 init) and rounded to the
storage dtype, and the reference runs in float32 on exactly those values. The prompts share a
prefix (so the engine test exercises prefix sharing); a prompt set is redrawn until every greedy
step's top-1 logit beats the runner-up by `MIN_MARGIN`, so 1e-4 errors cannot flip a token.
Under transformers 5 it also writes `activations.npz` (transformers' `ACT2FN[name]` on a grid, for
every activation the loader accepts) and `rope.npz` (`LlamaRotaryEmbedding.inv_freq` for real
model shapes: head_dim 64/128, several thetas, every supported RoPE type).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])
V4 = _VERSION < (5, 0)
# "v4_torch_dtype": transformers < 4.56 (writes `torch_dtype`); "v4": 4.56-4.57 (writes `dtype`,
# still `rope_theta` + `rope_scaling`); "v5": `rope_parameters`.
FORMAT = "v5" if not V4 else ("v4" if _VERSION >= (4, 56) else "v4_torch_dtype")
MIN_MARGIN = 2e-3
NUM_NEW = 6

# name: (format, storage dtype, config fields, rope settings). Rope settings are written as v4
# `rope_theta` + `rope_scaling` or as v5 `rope_parameters`, whichever the running version uses.
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=512)
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
FIXTURES = {
    # Llama-2 style: MHA, theta 10000, fp16.
    "llama2_mha_v4": ("v4_torch_dtype", "float16", dict(num_key_value_heads=4, rms_norm_eps=1e-6), (1e4, None)),
    # Llama-3.1 `llama3` scaling in the v4 layout (`rope_scaling` beside `rope_theta`).
    "llama31_scaling_v4": ("v4", "bfloat16", {}, (5e5, LLAMA3_SCALING)),
    # Linear scaling, written with the legacy "type" key.
    "linear_scaling_v4": ("v4", "float16", dict(num_key_value_heads=4), (1e4, {"type": "linear", "factor": 4.0})),
    # Dynamic NTK (within max_position_embeddings, where the engine runs).
    "dynamic_scaling_v4": ("v4", "float16", dict(max_position_embeddings=64),
                           (1e4, {"rope_type": "dynamic", "factor": 2.0})),
    # Llama-3 style: GQA 4/2, theta 500000, bf16.
    "llama3_gqa_v5": ("v5", "bfloat16", {}, (5e5, None)),
    # Llama-3.1 `llama3` scaling in the v5 layout (`rope_parameters`).
    "llama31_scaling_v5": ("v5", "bfloat16", {}, (5e5, LLAMA3_SCALING)),
    # Llama-3.2 style: tied embeddings, MQA, llama3 scaling, explicit head_dim != hidden / heads.
    "llama32_tied_v5": ("v5", "bfloat16", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                               head_dim=16), (5e5, LLAMA3_SCALING)),
    # Biases on q, k, v, o and the MLP; fp32.
    "bias_v5": ("v5", "float32", dict(attention_bias=True, mlp_bias=True, intermediate_size=32), (1e4, None)),
    # A non-SiLU activation.
    "gelu_tanh_v5": ("v5", "float16", dict(hidden_act="gelu_pytorch_tanh"), (1e4, None)),
}
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_config(fields: dict, rope) -> LlamaConfig:
  theta, scaling = rope
  kw = {**BASE, **fields}
  if V4:
    kw.update(rope_theta=theta, rope_scaling=dict(scaling) if scaling else None)
  else:
    params = {"rope_type": "default"} if scaling is None else dict(scaling)
    params["rope_type"] = params.pop("type", params.get("rope_type"))
    kw.update(rope_parameters={**params, "rope_theta": theta})
  return LlamaConfig(**kw)


def randomize(model: LlamaForCausalLM, storage, gen: torch.Generator) -> None:
  """Draws every parameter at a scale that gives order-1 logits, rounded to the storage dtype."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
      elif name.endswith("bias"):
        v = 0.1 * torch.randn(p.shape, generator=gen)
      elif "embed_tokens" in name:
        v = torch.randn(p.shape, generator=gen)
      else:
        v = torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1])
      p.copy_(v.to(storage).to(torch.float32))


def greedy(model, prompt: list[int]):
  model.generation_config.eos_token_id = None  # never stop early
  model.generation_config.pad_token_id = 0
  out = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW, do_sample=False,
                       min_new_tokens=NUM_NEW, output_logits=True, return_dict_in_generate=True)
  tokens = out.sequences[0, len(prompt):].numpy().astype(np.int32)
  logits = torch.stack(out.logits, 1)[0].float().numpy()
  # The same steps without a KV cache: a full forward over the growing sequence.
  seq = list(prompt)
  for t, row in zip(tokens, logits):
    full = model(torch.tensor([seq])).logits[0, -1].float().numpy()
    assert np.abs(full - row).max() < 1e-4, np.abs(full - row).max()
    seq.append(int(t))
  return tokens, logits


def margin_ok(logits: np.ndarray) -> bool:
  top = np.sort(logits, axis=-1)
  return bool(np.all(top[..., -1] - top[..., -2] > MIN_MARGIN))


def write_fixture(out_dir: str, name: str, spec, seed: int) -> dict:
  _, storage, fields, rope = spec
  config = make_config(fields, rope)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(config).eval()
  randomize(model, TORCH_DTYPES[storage], torch.Generator().manual_seed(seed))
  model.float()
  rng = np.random.default_rng(seed)
  v = config.vocab_size
  with torch.no_grad():
    for attempt in range(100):
      shared = rng.integers(3, v, 9).tolist()
      prompts = [shared + rng.integers(3, v, n).tolist() for n in (3, 1, 5)]
      prompts.append(rng.integers(3, v, 4).tolist())  # no shared prefix
      results = []
      for p in prompts:
        logits = model(torch.tensor([p])).logits[0].float().numpy()
        toks, step_logits = greedy(model, p)
        results.append((logits, toks, step_logits))
      if all(margin_ok(r[2]) and margin_ok(r[0][-1]) for r in results):
        break
    else:
      raise RuntimeError(f"{name}: no prompt set with greedy margins > {MIN_MARGIN}")
    inv_freq = model.model.rotary_emb.inv_freq.float().numpy()
    assert float(model.model.rotary_emb.attention_scaling) == 1.0
  path = os.path.join(out_dir, name)
  shutil.rmtree(path, ignore_errors=True)
  model.to(TORCH_DTYPES[storage]).save_pretrained(path, safe_serialization=True)
  for extra in ("generation_config.json",):  # not part of the fixture (tests write their own)
    if os.path.exists(os.path.join(path, extra)):
      os.remove(os.path.join(path, extra))
  t_max = max(len(p) for p in prompts)
  arrays = dict(prompts=np.array([p + [-1] * (t_max - len(p)) for p in prompts], np.int32),
                inv_freq=inv_freq)
  for i, (logits, toks, step_logits) in enumerate(results):
    arrays[f"logits_{i}"] = logits.astype(np.float32)
    arrays[f"greedy_{i}"] = toks
    arrays[f"greedy_logits_{i}"] = step_logits.astype(np.float32)
  np.savez_compressed(os.path.join(path, "expected.npz"), **arrays)
  meta = dict(transformers=transformers.__version__, torch=torch.__version__, format=FORMAT,
              storage_dtype=storage, seed=seed, prompt_attempts=attempt + 1, min_margin=MIN_MARGIN)
  with open(os.path.join(path, "fixture.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def write_activations(out_dir: str) -> None:
  from transformers.activations import ACT2FN  # pylint: disable=import-outside-toplevel
  x = torch.linspace(-8.0, 8.0, 161, dtype=torch.float32)
  arrays = {"x": x.numpy()}
  for name in ACTIVATIONS:
    arrays[name] = ACT2FN[name](x).numpy()
  np.savez_compressed(os.path.join(out_dir, "activations.npz"), **arrays)


# (name, head_dim, theta, max_position_embeddings, rope settings or None)
ROPE_CASES = [
    ("llama2", 128, 1e4, 4096, None),
    ("llama3", 128, 5e5, 8192, None),
    ("theta1e6_d64", 64, 1e6, 4096, None),
    ("linear2", 128, 1e4, 8192, {"rope_type": "linear", "factor": 2.0}),
    ("linear1p5_d64", 64, 1e4, 4096, {"rope_type": "linear", "factor": 1.5}),
    ("dynamic2", 128, 1e4, 4096, {"rope_type": "dynamic", "factor": 2.0}),
    ("dynamic1p7_l1000", 64, 1e4, 1000, {"rope_type": "dynamic", "factor": 1.7}),
    ("llama31", 128, 5e5, 131072, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
    ("llama32", 64, 5e5, 131072, dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=8192)),
    ("llama3_odd", 128, 1e4, 4096, dict(rope_type="llama3", factor=3.0, low_freq_factor=1.5,
                                        high_freq_factor=6.0, original_max_position_embeddings=1000)),
]


def write_rope_table(out_dir: str) -> None:
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # pylint: disable=import-outside-toplevel
  arrays = {}
  for name, d, theta, mpe, scaling in ROPE_CASES:
    params = {"rope_type": "default"} if scaling is None else dict(scaling)
    config = LlamaConfig(hidden_size=d * 4, num_attention_heads=4, max_position_embeddings=mpe,
                         rope_parameters={**params, "rope_theta": theta})
    emb = LlamaRotaryEmbedding(config)
    assert float(emb.attention_scaling) == 1.0
    arrays[name] = emb.inv_freq.float().numpy()
    arrays[name + "_case"] = np.array(json.dumps(dict(head_dim=d, theta=theta,
                                                      max_position_embeddings=mpe,
                                                      scaling=scaling)))
  np.savez_compressed(os.path.join(out_dir, "rope.npz"), **arrays)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                    "fixtures", "hf"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.set_num_threads(1)
  for i, (name, spec) in enumerate(sorted(FIXTURES.items())):
    if spec[0] != FORMAT:
      continue
    meta = write_fixture(args.out, name, spec, seed=1000 + i)
    size = sum(os.path.getsize(os.path.join(args.out, name, f))
               for f in os.listdir(os.path.join(args.out, name)))
    print(f"{name}: {size / 1024:.1f} KiB, {meta}")
  if not V4:
    write_activations(args.out)
    write_rope_table(args.out)


if __name__ == "__main__":
  main()
