r"""Runs one experiment from a config file and writes its results.

  python -m experiments.run --config configs/quickstart.py [--config.field=value ...] \
      [--workdir runs/quickstart]

The config's `experiment` field names a module `experiments/<experiment>.py` with
`run(config, progress) -> list[dict]` and optionally `plot(rows, workdir) -> list[str]`.
Writes `<workdir>/results.json` ({"environment", "config", "rows"}), `<workdir>/results.csv`,
any plots, and prints the summary table (`config.summary_columns`) last.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output directory (default: runs/<experiment>).")


def write_results(workdir: str, config, rows: list[dict], env: dict) -> tuple[str, str]:
  os.makedirs(workdir, exist_ok=True)
  json_path = os.path.join(workdir, "results.json")
  with open(json_path, "w") as f:
    json.dump({"environment": env, "config": config.to_dict(), "rows": rows}, f, indent=1,
              default=str)
  csv_path = os.path.join(workdir, "results.csv")
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  return json_path, csv_path


def run_experiment(config, workdir: str, progress=None) -> list[dict]:
  """Library-style entry point (tests call it): runs, writes, plots; returns the rows."""
  module = importlib.import_module(f"experiments.{config.experiment}")
  env = common.environment()
  progress = progress or common.Progress()
  print(f"experiment {config.experiment} on {env['backend']} ({env['device_kind']}), "
        f"jax {env['jax']}; writing to {workdir}", file=sys.stderr, flush=True)
  rows = module.run(config, progress)
  if not rows:
    raise RuntimeError(f"experiment {config.experiment} produced no rows")
  paths = list(write_results(workdir, config, rows, env))
  if hasattr(module, "plot") and config.get("plot", True):
    paths += module.plot(rows, workdir)
  if hasattr(module, "summary"):
    print(module.summary(rows, config))
  for p in paths:
    print(f"wrote {p}")
  print()
  print(common.format_table(rows, list(config.summary_columns)))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep jax's backend probing out of the output
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.experiment)
  run_experiment(config, workdir)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
