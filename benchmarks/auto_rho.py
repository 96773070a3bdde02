"""``rho="auto"`` against a full grid of fixed radii, on five tasks.

  python -m benchmarks.auto_rho                 # the recorded run (resumable)
  python -m benchmarks.auto_rho --quick         # a smoke run on slices of the data

Tasks (:data:`TASKS`): the demo's digits CNN at 40% label noise; the same CNN on
MNIST-5k at 40% noise; a 784-512-512-10 MLP on Fashion-MNIST at 40% noise, trained
until SGD memorizes (40 epochs, no weight decay); a ResNet-style CNN with BatchNorm on
20,000 Fashion-MNIST images with clean labels (4 epochs; the full set cost 3 hours of the
grid's budget alone); the byte-level LM in one pass. Each task trains SGD (or
AdamW for the LM), SAM at every radius of :data:`GRID` and SAM with ``rho="auto"``, 3 seeds.

Per task (``auto_rho.json``, mapping ``tasks``): final test accuracy per radius (mean over
seeds), the grid's best radius, the regret of ``auto`` against it and the regret of the
default 0.05 (points below the best radius's mean final accuracy), the runs of ``auto`` at
chance level (``stalls``), and the step-time ratio of ``auto`` to fixed-radius SAM
(``cost_ratio``, from ``benchmarks/step_cost.py``'s interleaved timing).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from .lab.lm import ByteLM
from .lab.methods import Spec
from .lab.store import Store, jsonable, run_all
from .lab.tasks import MLP, ImageTask, ResNet, demo_cnn

HERE = os.path.dirname(os.path.abspath(__file__))
GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
DEFAULT_RHO = 0.05
SEEDS = (0, 1, 2)
CHANCE = {"byte_lm": None}  # classification tasks: 10 classes


def tasks(quick: bool = False) -> dict:
  limit = 3000 if quick else None
  short = (lambda e: 2) if quick else (lambda e: e)
  return {
      "digits_cnn_noise40": ImageTask("digits_cnn_noise40", "digits", demo_cnn, noise=0.4, lr=0.05,
                                      weight_decay=0.0, batch=64, epochs=short(25)),
      "mnist5k_cnn_noise40": ImageTask("mnist5k_cnn_noise40", "mnist5k", demo_cnn, noise=0.4,
                                       lr=0.05,
                                       weight_decay=0.0, batch=64, epochs=short(10),
                                       limit=limit and 1000),
      "fmnist_mlp_noise40": ImageTask("fmnist_mlp_noise40", "fashion_mnist", MLP, noise=0.4,
                                      lr=0.05, weight_decay=0.0, batch=128, epochs=short(40),
                                      val=500 if quick else 5000, loop="scan", limit=limit),
      "fmnist20k_cnn_clean": ImageTask("fmnist20k_cnn_clean", "fashion_mnist", ResNet, noise=0.0,
                                       lr=0.1, weight_decay=5e-4, batch=128, epochs=short(4),
                                       val=5000 if not quick else 500, limit=limit or 20000),
      "byte_lm": ByteLM("byte_lm", steps=40 if quick else 1200, epochs=2 if quick else 4),
  }


def specs(task: str, with_auto: bool) -> list[str]:
  base = "adamw" if task == "byte_lm" else "sgd"
  return [base] + [f"sam@{r:g}" for r in GRID] + (["sam@auto"] if with_auto else [])


def plan(store: Store, all_tasks: dict, with_auto: bool, seeds=SEEDS, measure: tuple = ()):
  rows = []
  for seed in seeds:   # every task's seed 0 first: a first look at the whole grid early
    for name, task in all_tasks.items():
      for text in specs(name, with_auto):
        spec = Spec.parse(text)
        rows.append((name, str(spec), seed, task.units(spec),
                     lambda tick, t=task, s=spec, k=seed, n=name: t.run(s, k, tick,
                                                                        measure=n in measure)))
  return rows


def measure_cost(all_tasks: dict, reps: int = 9, block: int = 10, log=print) -> dict:
  """Step time of ``rho="auto"`` against fixed-radius SAM on each task's own step (model,
  batch size, closures): interleaved blocks of ``block`` warm jitted steps, ``reps`` times;
  the median of the per-repetition ratios."""
  out = {}
  for name, task in all_tasks.items():
    live = {}
    for text in (f"sam@{DEFAULT_RHO:g}", "sam@auto"):
      step, state, _ = task.timing_step(Spec.parse(text))
      state = step(state, 0)[0]   # compile
      jax.block_until_ready(state)
      live[text] = [step, state]
    seconds = {t: [] for t in live}
    for r in range(reps):
      for text, (step, state) in live.items():
        t0 = time.perf_counter()
        for i in range(block):
          state = step(state, 1 + r * block + i)[0]
        jax.block_until_ready(state)
        seconds[text].append((time.perf_counter() - t0) / block)
        live[text][1] = state
    fixed, auto = (np.asarray(seconds[t]) for t in live)
    out[name] = {"cost_ratio": float(np.median(auto / fixed)),
                 "step_ms_fixed": 1e3 * float(np.median(fixed)),
                 "step_ms_auto": 1e3 * float(np.median(auto)), "reps": reps, "block": block}
    log(f"{name:22} auto/fixed step time {out[name]['cost_ratio']:.3f} "
        f"({out[name]['step_ms_auto']:.2f} vs {out[name]['step_ms_fixed']:.2f} ms)")
  return out


MEASURED = ("fmnist_mlp_noise40",)   # the final solutions' calibration, corruption, sharpness


def trial(store: Store, all_tasks: dict, texts: list[str], seeds) -> None:
  """Runs candidate rules (specs such as ``sam@auto+signal=relgrad+target=0.3``) and prints
  each one's regret against the stored grid of the same seeds: how the rules that lost
  were measured."""
  rows = []
  for seed in seeds:
    for name, task in all_tasks.items():
      for text in texts:
        spec = Spec.parse(text)
        rows.append((name, str(spec), seed, task.units(spec),
                     lambda tick, t=task, s=spec, k=seed, n=name: t.run(s, k, tick,
                                                                        measure=n in MEASURED)))
  results = run_all(store, rows)
  store = Store(os.path.join(HERE, "runs"))   # the grid
  for name in all_tasks:
    grid = {}
    for text in specs(name, False)[1:]:
      found = [store.get(name, text, s) for s in seeds]
      if all(f is not None for f in found):
        grid[text] = float(np.mean([100 * f["final"] for f in found]))
    best = max(grid.values()) if grid else float("nan")
    for text in texts:
      runs = [results[(name, str(Spec.parse(text)), s)] for s in seeds]
      final = float(np.mean([100 * r["final"] for r in runs]))
      rho = [np.mean(r["curves"]["rho"]) for r in runs if "rho" in r["curves"]]
      print(f"{name:22} {text:45} final {final:6.2f} regret {best - final:+6.2f} "
            f"mean rho {np.mean(rho) if rho else float('nan'):.3f}")


def summarize(results: dict, all_tasks: dict, with_auto: bool, cost: dict | None = None) -> dict:
  out = {}
  for name in all_tasks:
    # the seeds whose every run finished: a task summarized on fewer seeds says so
    seeds = [s for s in SEEDS if all((name, str(Spec.parse(t)), s) in results
                                     for t in specs(name, with_auto))]
    if not seeds:
      continue
    finals = {}
    for text in specs(name, with_auto):
      finals[text] = [100 * results[(name, str(Spec.parse(text)), s)]["final"] for s in seeds]
    grid = {t: v for t, v in finals.items() if t.startswith("sam@") and t != "sam@auto"}
    if not grid:
      continue
    mean = {t: float(np.mean(v)) for t, v in finals.items()}
    best = max(grid, key=lambda t: mean[t])
    entry = {"seeds": seeds,
             "final": {t: {"mean": mean[t], "per_seed": v} for t, v in finals.items()},
             "best_rho": float(best.split("@")[1]), "best": mean[best],
             "regret_default": mean[best] - mean[f"sam@{DEFAULT_RHO:g}"]}
    if "sam@auto" in finals:
      auto = finals["sam@auto"]
      entry["regret"] = mean[best] - mean["sam@auto"]
      entry["regret_per_seed"] = [b - a for b, a in zip(
          finals[best], auto, strict=True)]
      chance = 100.0 / 10 if CHANCE.get(name, 10) else None
      entry["stalls"] = 0 if chance is None else int(sum(a < 1.5 * chance for a in auto))
      rhos = [results[(name, "sam@auto", s)]["curves"].get("rho") for s in seeds]
      if all(r is not None for r in rhos):
        entry["auto_rho_per_epoch"] = np.mean(np.asarray(rhos), 0).tolist()
    if cost and name in cost:
      entry["cost_ratio"] = cost[name]
    out[name] = entry
  return out


TITLES = {"digits_cnn_noise40": "digits CNN, 40% noise",
          "mnist5k_cnn_noise40": "MNIST-5k CNN, 40% noise",
          "fmnist_mlp_noise40": "Fashion-MNIST MLP, 40% noise",
          "fmnist20k_cnn_clean": "Fashion-MNIST-20k CNN, clean", "byte_lm": "byte LM, one pass"}
DOC_TABLE = os.path.join(os.path.dirname(HERE), "docs", "_generated", "auto_rho.md")


SHORT = {"digits_cnn_noise40": "digits, 40% noise", "mnist5k_cnn_noise40": "MNIST-5k, 40% noise",
         "fmnist_mlp_noise40": "F-MNIST MLP, 40% noise",
         "fmnist20k_cnn_clean": "F-MNIST-20k, clean", "byte_lm": "byte LM, one pass"}


def markdown(summary: dict) -> str:
  """The docs' table of ``auto_rho.json``: per task, the baseline, the grid's best radius, the
  default and ``auto`` (mean final test accuracy over the seeds, %), the regrets, the stalls
  and the step-time ratio; then the mean and worst regret. ``tests/test_auto_rho_benchmark.py``
  checks that the committed page is this function of the committed JSON."""
  rows = ["| task (seeds) | base | best fixed ρ | ρ = 0.05 | auto | regret: auto, 0.05 "
          "| stalls | time auto / fixed |",
          "|---|---|---|---|---|---|---|---|"]
  regrets, defaults = [], []
  for name, e in summary["tasks"].items():
    base = "adamw" if name == "byte_lm" else "sgd"
    f = e["final"]
    cost = f"{e['cost_ratio']:.2f}" if "cost_ratio" in e else "–"
    auto = f"{f['sam@auto']['mean']:.2f}" if "sam@auto" in f else "–"
    regret = f"{e['regret']:+.2f}" if "regret" in e else "–"
    if "regret" in e:
      regrets.append(e["regret"])
    defaults.append(e["regret_default"])
    rows.append(f"| {SHORT.get(name, name)} ({len(e['seeds'])}) | {f[base]['mean']:.2f} "
                f"| {e['best']:.2f} ({e['best_rho']:g}) | {f['sam@0.05']['mean']:.2f} "
                f"| {auto} | {regret}, {e['regret_default']:+.2f} | {e.get('stalls', '–')} "
                f"| {cost} |")
  out = "\n".join(rows) + "\n"
  if regrets:
    out += (f"\nFinal test accuracy %, mean over the seeds; base: SGD (AdamW for the LM). Mean "
            f"regret of `auto` {np.mean(regrets):.2f} points (worst {max(regrets):.2f}); of the "
            f"default ρ = 0.05 {np.mean(defaults):.2f} points (worst {max(defaults):.2f}). "
            "Regret: points below the grid's best radius (negative: better than every fixed "
            "radius).\n")
  return out


TRIALS = os.path.join(HERE, "runs_trials")
TRIALS_TABLE = os.path.join(os.path.dirname(HERE), "docs", "_generated", "auto_rho_trials.md")


def trials_markdown(trials: Store, grid: Store, seed: int = 0) -> str:
  """The rules tried on seed 0 (``--trial``, stored under ``runs_trials``): each rule's final
  test accuracy and its regret against the best radius of the same seed's grid, per task."""
  names = [n for n in TITLES if os.path.isdir(os.path.join(trials.root, n))]
  rules = sorted({r for n in names for r in os.listdir(os.path.join(trials.root, n))})
  best = {}
  for n in names:
    finals = [grid.get(n, f"sam@{r:g}", seed) for r in GRID]
    best[n] = max(100 * f["final"] for f in finals if f is not None)
  rows = ["| rule (`radius.AutoRho` options) | " + " | ".join(SHORT[n] for n in names) + " |",
          "|---|" + "---|" * len(names)]
  for rule in rules:
    cells = []
    for n in names:
      run = trials.get(n, rule, seed)
      cells.append("–" if run is None else
                   f"{100 * run['final']:.2f} ({best[n] - 100 * run['final']:+.2f})")
    options = rule.split("+", 1)[1].replace("+", ", ") if "+" in rule else rule
    rows.append(f"| {options} | " + " | ".join(cells) + " |")
  return ("\n".join(rows) + "\n\nFinal test accuracy % of seed 0, in brackets the regret against "
          "the best fixed radius of seed 0's grid.\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.auto_rho", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="slices of the data, 2 epochs")
  parser.add_argument("--grid-only", action="store_true",
                      help="the fixed radii and the baseline only")
  parser.add_argument("--only", default=None, help="comma-separated task names")
  parser.add_argument("--store", default=None, help="folder of the finished runs")
  parser.add_argument("--trial", action="append", default=None,
                      help="a candidate rule's spec (repeatable); prints its regret")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (--trial)")
  parser.add_argument("--cost", action="store_true",
                      help="the step-time ratio of auto to fixed-radius SAM only "
                           "(auto_rho_cost.json)")
  parser.add_argument("--summarize", action="store_true",
                      help="write auto_rho.json from the stored runs only (the seeds whose "
                           "every run finished), training nothing")
  args = parser.parse_args(argv)
  root = args.store or os.path.join(HERE, "runs" if not args.quick else "runs_quick")
  store = Store(root)
  all_tasks = tasks(args.quick)
  if args.only:
    all_tasks = {k: v for k, v in all_tasks.items() if k in args.only.split(",")}
  cost_path = os.path.join(root if args.quick else HERE, "auto_rho_cost.json")
  if args.cost:
    os.makedirs(os.path.dirname(cost_path), exist_ok=True)
    with open(cost_path, "w") as f:
      json.dump(measure_cost(all_tasks, reps=3 if args.quick else 9), f, indent=1)
    print(f"wrote {cost_path}")
    return 0
  if args.trial:
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0]
    trial(store, all_tasks, args.trial, seeds)
    return 0
  with_auto = not args.grid_only
  rows = plan(store, all_tasks, with_auto, measure=MEASURED)
  if args.summarize:   # what is stored, no training
    results = {(t, sp, k): r for t, sp, k, _, _ in rows if (r := store.get(t, sp, k)) is not None}
  else:
    results = run_all(store, rows)
  cost = None
  if os.path.exists(cost_path):
    with open(cost_path) as f:
      cost = {k: v["cost_ratio"] for k, v in json.load(f).items()}
  summary = {"grid": list(GRID), "default_rho": DEFAULT_RHO, "seeds": list(SEEDS),
             "tasks": summarize(results, all_tasks, with_auto, cost)}
  path = os.path.join(root if args.quick else HERE, "auto_rho.json")
  with open(path, "w") as f:
    json.dump(jsonable(summary), f, indent=1)
  print(f"wrote {path}")
  if not args.quick:
    with open(TRIALS_TABLE, "w") as f:
      f.write(trials_markdown(Store(TRIALS), store))
  table = os.path.join(root, "auto_rho.md") if args.quick else DOC_TABLE
  os.makedirs(os.path.dirname(table), exist_ok=True)
  with open(table, "w") as f:
    f.write(markdown(jsonable(summary)))
  print(f"wrote {table}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
