"""Text in and out: tokenizer loading, EOS ids, streaming decode, stop strings, the command.

The tokenizer is built here with the `tokenizers` library (a byte-level BPE trained on a few
sentences with accented letters, CJK and an emoji, so characters span several tokens); no network.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from chunkattn_jax import checkpoint, generate, llama, text
from chunkattn_jax.engine import Engine, EngineConfig, TokenEvent

CORPUS = ["the quick brown fox jumps over the lazy dog", "café naïve résumé 東京 🙂 ok",
          "hello world, hello chunk attention, shared prefixes"] * 20
VOCAB = 320  # the model's; the tokenizer has 300


def _train_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
  return tok


@pytest.fixture(scope="module")
def hf_tokenizer():
  return _train_tokenizer()


@pytest.fixture(scope="module")
def model():
  return llama.Llama(llama.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(11))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, hf_tokenizer):
  """A complete local checkpoint: config (eos 1), generation_config (eos [1, 7]), tokenizer."""
  path = tmp_path_factory.mktemp("ckpt")
  checkpoint.save_hf_checkpoint(model, str(path))
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 1, "bos_token_id": 0}))
  (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
  hf_tokenizer.save(str(path / "tokenizer.json"))
  return path


def _engine(model):
  return Engine(model, EngineConfig(n_chunks=64, chunk_size=4, max_batch=8))


# ----------------------------------------------------------------------------- tokenizer + EOS
def test_load_tokenizer_and_eos_ids(ckpt, hf_tokenizer):
  tok = text.load_tokenizer(str(ckpt))
  assert tok.eos_ids == (1, 7)  # config.json's, then generation_config.json's new ones
  assert tok.encode("hello world") == hf_tokenizer.encode("hello world").ids
  assert tok.encode("hello world")[0] == 0  # BOS from the tokenizer's post-processor
  assert tok.encode("hello", add_special_tokens=False)[0] != 0


def test_tokenizer_file_errors(tmp_path, ckpt):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    text.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(checkpoint.CheckpointError, match=r"tokenizer.json: not a readable tokenizer"):
    text.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text())
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"generation_config.json: eos_token_id=\['</s>'\] must be"):
    text.load_tokenizer(str(tmp_path))
  (tmp_path / "generation_config.json").write_text("{")
  with pytest.raises(checkpoint.CheckpointError, match="generation_config.json: not valid JSON"):
    text.load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- scripted engine
class ScriptedEngine:
  """The public surface of `Engine` that `TextGenerator` uses, emitting scripted tokens (one per
  request per step), so the text logic is tested on chosen token sequences."""

  def __init__(self, scripts, vocab_size=VOCAB):
    self.vocab_size = vocab_size
    self.scripts = list(scripts)
    self.reqs = {}

  def submit(self, prompt, max_new_tokens=16, *, stop_ids=(), sampling=None):
    rid = len(self.reqs)
    self.reqs[rid] = dict(prompt=list(prompt), script=self.scripts[rid], out=[], done=False,
                          stop=set(stop_ids), max_new=max_new_tokens)
    return rid

  def has_work(self):
    return any(not r["done"] for r in self.reqs.values())

  def step(self):
    events = []
    for rid, r in self.reqs.items():
      if r["done"]:
        continue
      tok = r["script"][len(r["out"])]
      r["out"].append(tok)
      reason = ("stop" if tok in r["stop"] else "length"
                if len(r["out"]) in (r["max_new"], len(r["script"])) else None)
      r["done"] = reason is not None
      events.append(TokenEvent(rid, tok, len(r["out"]) - 1, reason))
    return events

  def cancel(self, rid):
    assert not self.reqs[rid]["done"]
    self.reqs[rid]["done"] = True

  def result(self, rid):
    return list(self.reqs[rid]["out"])

  def request_info(self, rid):
    return {"status": "finished" if self.reqs[rid]["done"] else "running"}


def _ids(tok, s):
  return tok.encode(s, add_special_tokens=False).ids


def _run(gen, rid):
  events = [e for e in gen.run() if e.request_id == rid]
  return "".join(e.text for e in events), events


def test_stream_holds_split_characters_and_keeps_spaces(hf_tokenizer):
  body = " café 東京 🙂 ok"
  script = _ids(hf_tokenizer, body)
  assert len(script) > len(body.split())  # some characters span several byte tokens
  gen = text.TextGenerator(ScriptedEngine([script]), text.Tokenizer(hf_tokenizer))
  rid = gen.submit("hello", 100)
  streamed, events = _run(gen, rid)
  assert streamed == body == gen.text(rid)  # the leading space survives (decoded in context)
  assert all("\ufffd" not in e.text for e in events)
  assert any(e.text == "" for e in events)  # a byte token that completed no character yet
  assert events[-1].finish_reason == "length" and gen.finish_reason(rid) == "length"


def test_incomplete_character_is_flushed_at_the_end(hf_tokenizer):
  emoji = _ids(hf_tokenizer, "🙂")
  assert len(emoji) >= 2
  script = _ids(hf_tokenizer, " ok") + emoji[:-1]  # ends inside the emoji's bytes
  gen = text.TextGenerator(ScriptedEngine([script]), text.Tokenizer(hf_tokenizer))
  rid = gen.submit("hello", 100)
  streamed, _ = _run(gen, rid)
  assert streamed == gen.text(rid) == hf_tokenizer.decode(script)
  assert streamed.startswith(" ok") and streamed.endswith("\ufffd")


@pytest.mark.parametrize("stops,expected", [
    (["東京"], " café "),                # spans byte tokens
    (["fé 東", "ok"], " ca"),            # the earliest of several
    (["🙂 ok"], " café 東京 "),
    (["ok"], " café 東京 🙂 "),          # in the last token
    (["zzz"], " café 東京 🙂 ok"),       # never: all text, held-back tails flushed
    ("é", " caf"),                        # a single str
])
def test_stop_strings(hf_tokenizer, stops, expected):
  script = _ids(hf_tokenizer, " café 東京 🙂 ok") + _ids(hf_tokenizer, " more text")
  eng = ScriptedEngine([script])
  gen = text.TextGenerator(eng, text.Tokenizer(hf_tokenizer))
  rid = gen.submit("hello", 100, stop=stops)
  streamed, events = _run(gen, rid)
  found = stops != ["zzz"]
  if stops == ["zzz"]:
    expected += " more text"
  assert streamed == expected == gen.text(rid)
  assert gen.finish_reason(rid) == ("stop_string" if found else "length")
  if found:  # cancelled in the engine as soon as the stop string appeared
    assert len(eng.result(rid)) < len(script)
  assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)


def test_eos_ids_stop_and_are_not_printed(hf_tokenizer):
  eos = hf_tokenizer.token_to_id("</s>")
  script = _ids(hf_tokenizer, " ok") + [eos] + _ids(hf_tokenizer, " never")
  eng = ScriptedEngine([script])
  gen = text.TextGenerator(eng, text.Tokenizer(hf_tokenizer, eos_ids=(eos,)))
  rid = gen.submit("hello", 100)
  streamed, _ = _run(gen, rid)
  assert streamed == " ok" and gen.finish_reason(rid) == "stop"
  assert eng.reqs[rid]["stop"] == {eos}


def test_several_requests_interleave(hf_tokenizer):
  a, b = _ids(hf_tokenizer, " hello world"), _ids(hf_tokenizer, " the lazy dog jumps")
  gen = text.TextGenerator(ScriptedEngine([a, b]), text.Tokenizer(hf_tokenizer))
  assert gen.generate(["x", "y"], 100, stop=["dog"]) == [" hello world", " the lazy "]


def test_submit_validation_changes_nothing(hf_tokenizer):
  eng = ScriptedEngine([[5]])
  gen = text.TextGenerator(eng, text.Tokenizer(hf_tokenizer))
  with pytest.raises(TypeError, match="prompt must be a str, got int"):
    gen.submit(123)
  with pytest.raises(ValueError, match="stop strings must be non-empty str, got ''"):
    gen.submit("x", stop=["ok", ""])
  with pytest.raises(ValueError, match="stop strings must be non-empty str, got 3"):
    gen.submit("x", stop=[3])
  with pytest.raises(TypeError, match="callback must be callable"):
    gen.submit("x", callback=5)
  assert eng.reqs == {}
  with pytest.raises(ValueError, match="the tokenizer has 300 tokens but the model's vocab_size is 200"):
    text.TextGenerator(ScriptedEngine([], vocab_size=200), text.Tokenizer(hf_tokenizer))
  with pytest.raises(ValueError, match="eos_token_id 400 is outside the model's vocabulary"):
    text.TextGenerator(eng, text.Tokenizer(hf_tokenizer, eos_ids=(400,)))
  with pytest.raises(KeyError, match="unknown text request id 9"):
    gen.text(9)


# ----------------------------------------------------------------------------- the real engine
def test_engine_text_matches_token_generation(model, ckpt, hf_tokenizer):
  """Through the real engine: streamed text is the decode of the engine's greedy tokens, and
  requests sharing a prompt prefix share chunks."""
  tok = text.Tokenizer(hf_tokenizer)  # no EOS: run to max_new_tokens
  eng = _engine(model)
  gen = text.TextGenerator(eng, tok)
  prompts = ["hello world, hello chunk attention", "hello world, hello chunk attention, shared"]
  rids = [gen.submit(p, 12) for p in prompts]
  pieces = {r: [] for r in rids}
  for ev in gen.run():
    pieces[ev.request_id].append(ev.text)
  for rid, p in zip(rids, prompts):
    ids = tok.encode(p)
    whole = hf_tokenizer.decode(ids + eng.result(rid), skip_special_tokens=True)
    prefix = hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces[rid]) == gen.text(rid) == whole[len(prefix):]
    assert len(eng.result(rid)) == 12 and gen.finish_reason(rid) == "length"
  assert eng.request_info(rids[1])["num_cached"] > 0
  # A stop string taken from that text ends the request there, and the engine stops early.
  target = gen.text(rids[0])
  stop = target[len(target) // 2: len(target) // 2 + 3]
  assert stop and stop in target
  again = text.TextGenerator(_engine(model), tok)
  assert list(again.stream(prompts[0], 12, stop=[stop])) != []
  assert again.text(0) == target[: target.index(stop)]
  assert again.finish_reason(0) == "stop_string"


def test_engine_stops_at_generation_config_eos(model, ckpt):
  """EOS ids come from config.json and generation_config.json: make the 4th greedy token an EOS
  through generation_config.json and generation stops there."""
  tok = text.load_tokenizer(str(ckpt))
  free = text.Tokenizer(tok.tokenizer)
  baseline = text.TextGenerator(_engine(model), free)
  rid = baseline.submit("the quick brown fox", 10)
  list(baseline.run())
  tokens = baseline.engine.result(rid)
  eos = tokens[3]
  assert eos not in tokens[:3]
  gen = text.TextGenerator(_engine(model), text.Tokenizer(tok.tokenizer, eos_ids=(1, eos)))
  rid = gen.submit("the quick brown fox", 10)
  list(gen.run())
  assert gen.engine.result(rid) == tokens[:4] and gen.finish_reason(rid) == "stop"


# ----------------------------------------------------------------------------- the command
def test_generate_command(ckpt, model):
  out, err = io.StringIO(), io.StringIO()
  code = generate.main(["--checkpoint", str(ckpt), "--prompt", "hello world", "--max-new-tokens",
                        "8", "--chunk-size", "4"], stdout=out, stderr=err)
  assert code == 0, err.getvalue()
  gen = text.TextGenerator(_engine(model), text.load_tokenizer(str(ckpt)))
  rid = gen.submit("hello world", 8)
  list(gen.run())
  assert out.getvalue() == gen.text(rid) + "\n"
  log = err.getvalue().splitlines()
  assert log[0].startswith(f"[generate] loaded {ckpt}: 2 layers")
  n = len(gen.engine.result(rid))
  assert f"new tokens" in log[-1] and f"{n} new tokens" in log[-1]
  assert f"finish_reason={gen.finish_reason(rid)}" in log[-1]


@pytest.mark.parametrize("args,match", [
    (["--impl", "pallas"], "impl='pallas' cannot run this model: head_dim=16"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer, got 0"),
    (["--stop", ""], "stop strings must be non-empty"),
    (["--temperature", "-1"], "SamplingParams.temperature"),
])
def test_generate_command_errors(ckpt, args, match):
  out, err = io.StringIO(), io.StringIO()
  code = generate.main(["--checkpoint", str(ckpt), "--prompt", "hi"] + args, stdout=out,
                       stderr=err)
  assert code == 2 and out.getvalue() == ""
  assert err.getvalue().startswith("error: ") and match in err.getvalue()


def test_generate_module_entry_point(ckpt):
  """`python -m chunkattn_jax.generate` in a fresh process (what a user types)."""
  proc = subprocess.run(
      [sys.executable, "-m", "chunkattn_jax.generate", "--checkpoint", str(ckpt), "--prompt",
       "café", "--max-new-tokens", "4", "--chunk-size", "4", "--stop", "<<never>>"],
      capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert "[generate] loaded" in proc.stderr and "4 new tokens" in proc.stderr
  assert proc.stdout.endswith("\n")
