"""m-sharpness (``group_size=m``) against SAM on the whole batch and SGD, at 40% label noise.

  python -m benchmarks.msharpness [--task mnist5k_cnn_noise40] [--m 32,8] [--rho 0.05]

Each run is one of :mod:`benchmarks.auto_rho`'s tasks and shares its store
(``benchmarks/runs``): SGD and SAM at ρ on the whole batch (m = B) are the grid's own runs;
this script adds ``sam@ρ+m=32`` and ``sam@ρ+m=8`` (the linen step with ``subset=True``:
BatchNorm statistics from the clean full-batch pass, one dropout mask for every group), 3
seeds, and writes ``benchmarks/msharpness.json`` and the docs' table
(``docs/_generated/msharpness.md``): final test accuracy and the fit of the noisy training
labels (the share of corrupted examples predicted with their wrong label); the step time per
m is :mod:`benchmarks.group_cost`'s.

Foret et al. (2021, Section 4) and Andriushchenko & Flammarion (ICML 2022) find smaller m
generalizes better; Baek et al. (ICLR 2024) credit most of SAM's robustness to label noise to
the per-example (small-m) perturbation on CIFAR-10.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from . import auto_rho
from .lab.methods import Spec
from .lab.store import Store, jsonable, run_all

HERE = os.path.dirname(os.path.abspath(__file__))
DOC_TABLE = os.path.join(os.path.dirname(HERE), "docs", "_generated", "msharpness.md")


def summarize(results: dict, task: str, texts: list[str], seeds) -> dict:
  out = {}
  for text in texts:
    runs = [results[(task, str(Spec.parse(text)), s)] for s in seeds]
    final = [100 * r["final"] for r in runs]
    fit = [100 * r["noisy_fit"] for r in runs if "noisy_fit" in r]
    out[text] = {"final_mean": float(np.mean(final)), "final_std": float(np.std(final)),
                 "per_seed": final, "noisy_fit_mean": float(np.mean(fit)) if fit else None,
                 "seconds_mean": float(np.mean([r["train_seconds"] for r in runs]))}
  return out


def markdown(summary: dict) -> str:
  """The scaling guide's table of ``msharpness.json`` (``tests/test_auto_rho_benchmark.py``
  checks the committed page against the committed file). No time column: the runs come from
  different invocations on a shared machine; ``benchmarks/group_cost.py`` measures the cost."""
  rows = ["| method | final test % (mean ± std) | per seed | noisy-label fit % |",
          "|---|---|---|---|"]
  for text, e in summary["methods"].items():
    fit = "–" if e["noisy_fit_mean"] is None else f"{e['noisy_fit_mean']:.1f}"
    seeds = ", ".join(f"{v:.1f}" for v in e["per_seed"])
    rows.append(f"| `{text}` | {e['final_mean']:.2f} ± {e['final_std']:.2f} | {seeds} | {fit} |")
  return ("\n".join(rows) + f"\n\n{auto_rho.TITLES.get(summary['task'], summary['task'])}, "
          f"{len(summary['seeds'])} seeds; `+m=` is `group_size`, without it the whole batch "
          f"of {summary['batch']}. Noisy-label fit: the share of the corrupted training "
          "examples predicted with their wrong label.\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.msharpness", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--task", default="mnist5k_cnn_noise40")
  parser.add_argument("--m", default="32,8")
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--summarize", action="store_true",
                      help="rewrite the JSON and the table from the stored runs, training nothing")
  args = parser.parse_args(argv)
  task = auto_rho.tasks(args.quick)[args.task]
  seeds = [int(s) for s in args.seeds.split(",")]
  base = "adamw" if args.task == "byte_lm" else "sgd"
  texts = [base, f"sam@{args.rho:g}"] + [f"sam@{args.rho:g}+m={m}" for m in args.m.split(",")]
  store = Store(os.path.join(HERE, "runs_quick" if args.quick else "runs"))
  rows = []
  for seed in seeds:
    for text in texts:
      spec = Spec.parse(text)
      rows.append((args.task, str(spec), seed, task.units(spec),
                   lambda tick, s=spec, k=seed: task.run(s, k, tick)))
  if args.summarize:
    results = {(t, sp, k): store.get(t, sp, k) for t, sp, k, _, _ in rows}
  else:
    results = run_all(store, rows)
  summary = {"task": args.task, "seeds": seeds, "rho": args.rho, "batch": task.batch,
             "methods": summarize(results, args.task, texts, seeds)}
  path = os.path.join(store.root if args.quick else HERE, "msharpness.json")
  with open(path, "w") as f:
    json.dump(jsonable(summary), f, indent=1)
  table = os.path.join(store.root, "msharpness.md") if args.quick else DOC_TABLE
  os.makedirs(os.path.dirname(table), exist_ok=True)
  with open(table, "w") as f:
    f.write(markdown(jsonable(summary)))
  print(markdown(jsonable(summary)))
  print(f"wrote {path} and {table}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
