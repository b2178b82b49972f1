"""Kernel limits are checked when a model is loaded or an engine is built, not at the first decode."""

import json
import os
import re

import pytest
from flax import nnx

from chunkattn_jax import checkpoint, kernel_limits, llama
from chunkattn_jax.engine import Engine, EngineConfig
from pallas_kernels import _common


@pytest.mark.parametrize("impl", ["pallas", "pallas_interpret"])
@pytest.mark.parametrize("kw,match", [
    (dict(head_dim=32), "head_dim=32 (the Pallas kernels support (64, 128, 256))"),
    (dict(head_dim=48), "head_dim=48"),
    (dict(head_dim=64, chunk_size=8), "chunk_size=8 (the Pallas kernels support (16, 32, 64, 128))"),
    (dict(head_dim=32, chunk_size=8), "head_dim=32 (the Pallas kernels support (64, 128, 256)); "
                                      "chunk_size=8"),
])
def test_pallas_limits_name_the_value_and_the_alternative(impl, kw, match):
  with pytest.raises(kernel_limits.KernelLimitError, match=re.escape(match)) as e:
    kernel_limits.check(impl, **kw)
  assert f"impl={impl!r} cannot run this model" in str(e.value)
  assert "impl='xla' runs any head dim and chunk size" in str(e.value)
  if kw["head_dim"] in _common.PALLAS_HEAD_DIMS:
    assert "or keep impl" in str(e.value)


def test_supported_settings_pass():
  for d in _common.PALLAS_HEAD_DIMS:
    for c in _common.PALLAS_CHUNK_SIZES:
      for dtype in _common.SUPPORTED_DTYPES:
        kernel_limits.check("pallas", head_dim=d, chunk_size=c, dtype=dtype, kv_dtype=dtype)
  for impl in ("xla", "reference"):
    kernel_limits.check(impl, head_dim=16, chunk_size=4, dtype="float32")
    kernel_limits.check(impl, head_dim=48, chunk_size=8)


@pytest.mark.parametrize("kw,match", [
    (dict(impl="xla", head_dim=16, dtype="int8"), "dtype='int8' is not supported by any attention impl"),
    (dict(impl="xla", head_dim=16, dtype="float32", kv_dtype="float64"), "kv_dtype='float64'"),
    (dict(impl="xla", head_dim=16, dtype="float32", kv_dtype="bfloat16"),
     "kv_dtype='bfloat16' differs from the model's compute dtype 'float32'"),
    (dict(impl="triton", head_dim=64), "unknown attention impl 'triton'"),
])
def test_dtype_and_impl_errors(kw, match):
  with pytest.raises(kernel_limits.KernelLimitError, match=re.escape(match)):
    kernel_limits.check(**kw)


def _model(impl, head_dim, **kw):
  cfg = llama.tiny(num_heads=2, num_kv_heads=1, hidden_size=64, head_dim=head_dim, num_layers=1,
                   **kw)
  return llama.Llama(cfg, impl=impl, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl,head_dim,config,match", [
    ("pallas", 16, EngineConfig(n_chunks=8, chunk_size=16), "head_dim=16"),
    ("pallas_interpret", 32, EngineConfig(n_chunks=8, chunk_size=16), "head_dim=32"),
    ("pallas", 64, EngineConfig(n_chunks=8, chunk_size=8), "chunk_size=8"),
    ("xla", 16, EngineConfig(n_chunks=8, chunk_size=4, kv_dtype="bfloat16"),
     "kv_dtype='bfloat16' differs from the model's compute dtype 'float32'"),
])
def test_engine_refuses_at_construction(impl, head_dim, config, match):
  """These used to construct and fail at the first decode step, after prefill changed the tree."""
  with pytest.raises(kernel_limits.KernelLimitError, match=re.escape(match)):
    Engine(_model(impl, head_dim), config)


def test_unsupported_kv_dtype_is_refused_by_the_config():
  with pytest.raises(ValueError, match="kv_dtype"):
    EngineConfig(n_chunks=8, chunk_size=4, kv_dtype="int8")


def test_engine_accepts_what_the_kernels_run():
  eng = Engine(_model("pallas_interpret", 64), EngineConfig(n_chunks=8, chunk_size=16))
  assert eng.num_waiting() == 0
  bf16 = _model("xla", 16, dtype="bfloat16", param_dtype="bfloat16")
  Engine(bf16, EngineConfig(n_chunks=8, chunk_size=4, kv_dtype="bfloat16"))


def test_load_refuses_before_reading_tensors(tmp_path):
  model = _model("xla", 32)
  checkpoint.save_hf_checkpoint(model, str(tmp_path))
  os.remove(tmp_path / "model.safetensors")  # never reached
  with pytest.raises(kernel_limits.KernelLimitError,
                     match=re.escape("impl='pallas' cannot run this model: head_dim=32")) as e:
    checkpoint.load_hf_checkpoint(str(tmp_path), impl="pallas")
  assert "load the model with impl='xla'" in str(e.value)
  with pytest.raises(FileNotFoundError, match="safetensors"):
    checkpoint.load_hf_checkpoint(str(tmp_path), impl="xla")  # xla gets as far as the tensors
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["head_dim"] == 32
