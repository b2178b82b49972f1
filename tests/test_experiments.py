"""The experiment runner runs each config end to end at shrunk sizes."""

import csv
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import quickstart, tree_overhead
from experiments.run import run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, "results.csv")) as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == len(results["rows"])
  assert {"jax", "device_kind", "date", "backend"} <= set(results["environment"])
  return results


def test_quickstart_shrunk(tmp_path, capsys):
  config = quickstart.get_config()
  config.batch, config.n_p, config.n_s = 3, 100, 64
  rows = run_experiment(config, str(tmp_path))
  results = read_results(tmp_path)
  assert results["config"]["batch"] == 3
  attention = [r for r in rows if r["part"] == "attention"]
  assert {r["impl"] for r in attention} >= {"reference", "xla"}
  assert all(r["max_abs_err"] <= config.tolerance for r in attention)
  assert any(r["shared_items"] > 0 for r in attention)
  engine = [r for r in rows if r["part"] == "engine"]
  assert len(engine) == config.engine_requests and all(r["tokens_match"] for r in engine)
  assert [r["cached_prompt_tokens"] > 0 for r in engine] == [False] + [True] * (len(engine) - 1)
  out = capsys.readouterr().out
  assert "less KV memory" in out and out.rstrip().splitlines()[-1].strip()


def test_tree_overhead_shrunk(tmp_path):
  config = tree_overhead.get_config()
  config.batches, config.n_s, config.n_priv, config.steps, config.plan_iters = (4, 8), 256, 40, 40, 2
  config.chunk_size = 16
  rows = run_experiment(config, str(tmp_path))
  read_results(tmp_path)
  assert {r["batch"] for r in rows} == {4, 8}
  assert all(r["us"] > 0 for r in rows)
  assert os.path.exists(tmp_path / "tree_overhead.png")


@pytest.mark.slow
def test_command_line_with_overrides(tmp_path):
  cmd = [sys.executable, "-m", "experiments.run", "--config", "configs/quickstart.py",
         "--config.batch=2", "--config.n_p=70", "--config.n_s=64", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert read_results(tmp_path)["config"]["n_p"] == 70
  bad = subprocess.run(cmd[:4] + ["--config.no_such_field=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert bad.returncode != 0 and "no_such_field" in bad.stderr


@pytest.mark.parametrize("name", ["table3", "fig3", "fig4"])
def test_kernel_benchmarks_on_cpu(tmp_path, name):
  """The paper's kernel benchmarks run end to end at their CPU sizes; each output was checked
  against the reference before timing (the experiment raises otherwise)."""
  config = importlib.import_module(f"configs.{name}").get_config()
  rows = run_experiment(config, str(tmp_path))
  read_results(tmp_path)
  timed = [r for r in rows if r.get("us") or r.get("tokens_per_s")]
  assert timed and {r["impl"] for r in timed} >= {"xla_two_phase", "naive"}
  assert all(np.isfinite(r.get("max_abs_err", 0.0)) for r in timed)


def test_serving_shrunk(tmp_path):
  config = importlib.import_module("configs.serving").get_config()
  config.batch, config.n_s, config.n_steps, config.warmup_steps = 4, 32, 2, 1
  config.num_requests, config.rates, config.n_c = 3, (50.0,), 3
  rows = run_experiment(config, str(tmp_path))
  read_results(tmp_path)
  assert {r["part"] for r in rows} == {"decode", "ttft", "poisson"}
  assert all(r.get("tokens_match", True) for r in rows)


def test_memory_shrunk(tmp_path):
  config = importlib.import_module("configs.memory").get_config()
  config.points, config.n_c = ((256, 0), (256, 256)), 16
  rows = run_experiment(config, str(tmp_path))
  read_results(tmp_path)
  shared = [r for r in rows if r.get("point") == "256/256"]
  assert shared and shared[0]["chunk_kv_gb"] < shared[0]["paged_kv_gb"]


def test_prefill_benchmark_on_cpu(tmp_path):
  """configs/prefill.py at its CPU sizes: every CPU implementation timed (outputs checked against
  the XLA path first), the 7B-shape memory compiled, the shared-prefix counts, a plot."""
  config = importlib.import_module("configs.prefill").get_config()
  rows = run_experiment(config, str(tmp_path))
  read_results(tmp_path)
  timed = [r for r in rows if r["part"] == "prefill" and r.get("us")]
  assert {r["impl"] for r in timed} == {"xla", "materialising", "naive"}
  assert all(r["tokens_per_s"] > 0 and r["max_abs_err"] <= 1e-4 for r in timed)
  assert {(r["T"], r["cached_tokens"], r["S"]) for r in timed} == set(config.cpu.points)
  memory = {(r["impl"], r["T"]): r["temp_mib"] for r in rows if r["part"] == "memory"}
  assert memory[("xla", 4096)] <= 256 < memory[("materialising", 4096)]
  counts = [r for r in rows if r["part"] == "sharing_counts"]
  assert len(counts) == 3 * 4 * 2 and any(r["shares"] for r in counts)
  assert all(r["kv_mib_shared"] <= r["kv_mib_alone"] for r in counts)
  assert os.path.exists(tmp_path / "prefill.png")
