"""Text in, text out: a checkpoint's Hugging Face tokenizer around an `Engine`.

    tokenizer = text.load_tokenizer("/models/llama")      # tokenizer.json + EOS ids
    gen = text.TextGenerator(engine, tokenizer)
    rid = gen.submit("The capital of France is", max_new_tokens=32, stop=["\\n\\n"])
    for event in gen.run():                               # or gen.stream(prompt), gen.generate([...])
      print(event.text, end="", flush=True)

The tokenizer is read from the checkpoint's `tokenizer.json` with the Hugging Face `tokenizers`
library (prompts are encoded with its post-processor, e.g. Llama's BOS). Generation stops at any
EOS id listed by `config.json` or `generation_config.json` (`eos_token_id`, an int or a list), at a
stop string, at `max_new_tokens` or at the model's context.

Streaming: each token's text comes from `tokenizers.decoders.DecodeStream` seeded with the prompt,
so a character split over several byte tokens is emitted once complete and a leading space is kept.
Text that could be the start of a stop string is held back until it is not; a request that hits a
stop string is cancelled in the engine and its text ends just before the stop string (which is not
part of the output). When a request finishes, any text still held (e.g. an incomplete character) is
flushed, so the concatenated events of a request equal `text(request_id)`.

This module drives the engine only through its public API (`submit`, `step`, `cancel`, `result`,
`has_work`); requests submitted to the engine directly still run, but their events are not returned
here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence

from chunkattn_jax import checkpoint as checkpoint_lib

TOKENIZER_NAME = "tokenizer.json"
GENERATION_CONFIG_NAME = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A `tokenizers.Tokenizer` and the EOS ids generation stops at."""
  tokenizer: object  # tokenizers.Tokenizer
  eos_ids: tuple[int, ...] = ()

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
    return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _eos_field(path: str, data: dict) -> list[int]:
  value = data.get("eos_token_id") if isinstance(data, dict) else None
  if value is None:
    return []
  ids = value if isinstance(value, list) else [value]
  for i in ids:
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
      raise checkpoint_lib.CheckpointError(
          f"{path}: eos_token_id={value!r} must be a non-negative integer or a list of them")
  return ids


def eos_ids(path: str) -> tuple[int, ...]:
  """The EOS ids of a checkpoint directory: `eos_token_id` of `config.json` and of
  `generation_config.json` (each an int or a list), in that order, without repeats."""
  out: list[int] = []
  for name in (checkpoint_lib.CONFIG_NAME, GENERATION_CONFIG_NAME):
    file = os.path.join(path, name)
    if os.path.exists(file):
      out += [i for i in _eos_field(file, checkpoint_lib.read_json(file)) if i not in out]
  return tuple(out)


def load_tokenizer(path: str) -> Tokenizer:
  """The tokenizer of a checkpoint directory (`tokenizer.json`) with its EOS ids (`eos_ids`).

  Raises:
    FileNotFoundError: no tokenizer.json.
    CheckpointError: an unreadable tokenizer.json or a malformed eos_token_id (names the file).
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  file = os.path.join(path, TOKENIZER_NAME)
  if not os.path.exists(file):
    raise FileNotFoundError(f"no {TOKENIZER_NAME} in {path!r}")
  try:
    tok = tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a plain Exception for bad files
    raise checkpoint_lib.CheckpointError(f"{file}: not a readable tokenizer ({e})") from None
  return Tokenizer(tok, eos_ids(path))


@dataclasses.dataclass(frozen=True)
class TextEvent:
  """New text of one request. `text` may be empty (a token that completes nothing printable yet,
  or text held back as a possible stop string); `token` is None for the final flush.
  `finish_reason` is set on a request's last event: "stop" (an EOS or stop id), "stop_string",
  "length", "context" or "cancelled"."""
  request_id: int
  text: str
  token: int | None
  finish_reason: str | None = None


@dataclasses.dataclass
class _TextRequest:
  rid: int
  prompt_ids: list[int]
  stops: tuple[str, ...]
  decoder: object  # tokenizers.decoders.DecodeStream
  callback: Callable[[TextEvent], None] | None
  decoded: str = ""  # all text decoded so far
  sent: int = 0  # characters of `decoded` already emitted
  finish_reason: str | None = None


class TextGenerator:
  """Generates text from text prompts on an `Engine` (see the module docstring).

  Args:
    engine: an `engine.Engine` over a model whose vocabulary covers the tokenizer's.
    tokenizer: a `Tokenizer` (e.g. `load_tokenizer(checkpoint_dir)`).
  """

  def __init__(self, engine, tokenizer: Tokenizer):
    if not isinstance(tokenizer, Tokenizer):
      raise TypeError(f"tokenizer must be a text.Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size > engine.vocab_size:
      raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                       f"vocab_size is {engine.vocab_size}")
    bad = [i for i in tokenizer.eos_ids if i >= engine.vocab_size]
    if bad:
      raise ValueError(f"eos_token_id {bad[0]} is outside the model's vocabulary "
                       f"[0, {engine.vocab_size})")
    self.engine = engine
    self.tokenizer = tokenizer
    self._requests: dict[int, _TextRequest] = {}

  # ------------------------------------------------------------------ public API
  def submit(self, prompt: str, max_new_tokens: int = 64, *, stop: str | Sequence[str] = (),
             stop_ids: Sequence[int] = (), sampling=None, add_special_tokens: bool = True,
             callback: Callable[[TextEvent], None] | None = None) -> int:
    """Queues a text prompt; returns its request id. Validates before any state changes.

    Args:
      prompt: the text (encoded with the tokenizer's special tokens unless `add_special_tokens`
        is False).
      max_new_tokens: > 0.
      stop: stop strings (a str or a sequence of non-empty str); the output ends before the
        first one generated.
      stop_ids: token ids to stop at, besides the tokenizer's EOS ids.
      sampling: `sampling.SamplingParams` (default greedy).
      callback: called with each `TextEvent` of this request.

    Raises:
      TypeError / ValueError: a bad argument (named), including any the engine rejects.
    """
    from tokenizers.decoders import DecodeStream  # pylint: disable=import-outside-toplevel
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
      if not isinstance(s, str) or not s:
        raise ValueError(f"stop strings must be non-empty str, got {s!r}")
    if callback is not None and not callable(callback):
      raise TypeError(f"callback must be callable, got {callback!r}")
    ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    if isinstance(stop_ids, (str, bytes)):
      raise ValueError(f"stop_ids must be a sequence of token ids, got {stop_ids!r}")
    all_stop_ids = list(self.tokenizer.eos_ids) + [i for i in stop_ids
                                                   if i not in self.tokenizer.eos_ids]
    rid = self.engine.submit(ids, max_new_tokens, stop_ids=all_stop_ids, sampling=sampling)
    self._requests[rid] = _TextRequest(rid, ids, stops,
                                       DecodeStream(ids=ids, skip_special_tokens=True), callback)
    return rid

  def step(self) -> list[TextEvent]:
    """One engine step; returns the text events of this generator's requests."""
    events: list[TextEvent] = []
    for ev in self.engine.step():
      req = self._requests.get(ev.request_id)
      if req is None or req.finish_reason is not None:
        continue  # not ours, or already ended by a stop string earlier in this step
      self._on_token(req, ev.token, ev.finish_reason, events)
    return events

  def has_work(self) -> bool:
    return self.engine.has_work()

  def run(self, max_steps: int | None = None) -> Iterator[TextEvent]:
    """Steps until the engine has no work (or `max_steps`), yielding text as it comes."""
    steps = 0
    while self.engine.has_work() and (max_steps is None or steps < max_steps):
      yield from self.step()
      steps += 1

  def stream(self, prompt: str, max_new_tokens: int = 64, **kw) -> Iterator[str]:
    """Submits a prompt and yields its text as it is generated (other requests progress too)."""
    rid = self.submit(prompt, max_new_tokens, **kw)
    while self._requests[rid].finish_reason is None:
      for ev in self.step():
        if ev.request_id == rid and ev.text:
          yield ev.text

  def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, **kw) -> list[str]:
    """Submits every prompt, runs to completion, returns each one's text."""
    rids = [self.submit(p, max_new_tokens, **kw) for p in prompts]
    for _ in self.run():
      pass
    return [self.text(r) for r in rids]

  def text(self, request_id: int) -> str:
    """The text generated so far (a finished request: its whole output, without stop strings)."""
    req = self._get(request_id)
    return req.decoded if req.finish_reason is not None else req.decoded[:req.sent]

  def finish_reason(self, request_id: int) -> str | None:
    return self._get(request_id).finish_reason

  def cancel(self, request_id: int) -> None:
    """Cancels a request; its text so far stays available."""
    req = self._get(request_id)
    if req.finish_reason is None:
      self._cancel_in_engine(request_id)
      req.decoded = req.decoded[:req.sent]
      req.finish_reason = "cancelled"

  # ------------------------------------------------------------------ internals
  def _get(self, request_id) -> _TextRequest:
    try:
      return self._requests[request_id]
    except (KeyError, TypeError):
      raise KeyError(f"unknown text request id {request_id!r}") from None

  def _cancel_in_engine(self, rid) -> None:
    if self.engine.request_info(rid)["status"] != "finished":
      self.engine.cancel(rid)

  def _emit(self, req, text, token, reason, events):
    ev = TextEvent(req.rid, text, token, reason)
    events.append(ev)
    if req.callback is not None:
      req.callback(ev)

  def _find_stop(self, req) -> int:
    """Index in `req.decoded` of the earliest stop string at or after `req.sent` (-1: none).
    A stop string never starts before `sent`: a possible start is held back (`_held`)."""
    hits = [i for i in (req.decoded.find(s, req.sent) for s in req.stops) if i >= 0]
    return min(hits) if hits else -1

  @staticmethod
  def _held(req) -> int:
    """Length of the longest suffix of the unsent text that is a proper prefix of a stop string."""
    tail = req.decoded[req.sent:]
    best = 0
    for s in req.stops:
      for n in range(min(len(s) - 1, len(tail)), best, -1):
        if tail.endswith(s[:n]):
          best = n
          break
    return best

  def _on_token(self, req, token, engine_reason, events):
    req.decoded += req.decoder.step(self.tokenizer.tokenizer, token) or ""
    if engine_reason is not None:
      self._complete_text(req)
    cut = self._find_stop(req)
    if cut >= 0:
      if engine_reason is None:
        self._cancel_in_engine(req.rid)
      req.decoded = req.decoded[:cut]
      reason = "stop_string"
    elif engine_reason is not None:
      reason = engine_reason
    else:
      end = len(req.decoded) - self._held(req)
      self._emit(req, req.decoded[req.sent:end], token, None, events)
      req.sent = end
      return
    req.finish_reason = reason
    self._emit(req, req.decoded[req.sent:], token, reason, events)
    req.sent = len(req.decoded)

  def _complete_text(self, req) -> None:
    """On the last token: the whole output decoded at once, so text the stream still held (an
    incomplete character at the end) is not lost."""
    output = self.engine.result(req.rid)
    prefix = self.tokenizer.decode(req.prompt_ids)
    whole = self.tokenizer.decode(req.prompt_ids + output)
    full = whole[len(prefix):] if whole.startswith(prefix) else self.tokenizer.decode(output)
    if full.startswith(req.decoded):
      req.decoded = full
