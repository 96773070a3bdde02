"""When SAM helps, which variant, at what cost: one compute-matched study on Fashion-MNIST.

  python -m benchmarks.study               # the recorded run (resumable; about 5 hours on 2 cores)
  python -m benchmarks.study --quick       # a smoke run on slices of the data (minutes)
  python -m benchmarks.study --report      # only rewrite study.json from the finished runs
  python -m benchmarks.study --device      # on an accelerator: the CNN part, wider and longer

Fashion-MNIST's 60,000 training images with symmetric label noise (40%, and 0% for a
reference), 5,000 of them held out as a noisy validation split that makes every choice (a
radius, the epoch to keep), the clean 10,000-image test set; 3 seeds (the seed draws the
noise, the init, the batches).

* **The MLP in the memorization regime** (``fmnist_mlp_noise40``, the same runs as
  ``benchmarks/auto_rho.py``'s task): 784-512-512-10 ReLU without weight decay, SGD + momentum
  0.9, lr 0.05 cosine, batch 128, 40 epochs: SGD fits the noisy labels in the second half and
  its test accuracy falls well below its best epoch's.
* **Every method** on it: SGD and AdamW; SAM at its validation-chosen radius, at the default
  0.05 and with ``rho="auto"``; m-sharpness (``group_size`` 32: m = 8 costs 14 times SAM's
  step for this MLP on this CPU, see ``group_cost.json``; ``msharpness.py`` measures it on
  MNIST-5k); ASAM; the cheap family (LookSAM, late-phase SAM, randomized SAM, MSAM, MESA, SAF,
  ESAM, SAMPa); Functional-SAM and WSAM. SAM's radius is the best of ``auto_rho``'s grid on
  seed 0's noisy validation split; the variants that perturb along SAM's ball use that radius;
  ASAM, MSAM and WSAM choose theirs from two or three values the same way; SAF and MESA use
  their papers' λ.
* **Three compute matches**: equal epochs (40 for every method); equal gradient evaluations
  (SGD and AdamW for 80 epochs, SAM's two passes per step); equal wall clock (SGD and AdamW
  for the epochs SAM's measured time buys).
* **Time**: each method's seconds per epoch, measured in one interleaved timing run (two
  epochs each, five rounds; the median of each round's ratio to SGD's).
* **References**, run last and cut first: the MLP with clean labels (SGD, SAM at its chosen
  radius, ``rho="auto"``) and the ResNet-style CNN with BatchNorm at 40% noise, 8 epochs (SGD,
  SAM at 0.05).
* **Order**: seed 0's baselines, SAM's grid and the sweeps; the timing run; every method seed
  by seed; m-sharpness; the references. The plan is made again after each run, so a stopped
  study resumes where it stopped and a partial one has whole seeds.

Per run (``benchmarks/runs/<task>/<method>/seed<k>.json``): test, validation and noisy-fit
curves per epoch, the final and the validation-chosen test accuracy, corrupted-image
accuracy, ECE, λ_max and adaptive sharpness of the final solution. ``study.json`` holds the
summaries: ``regime`` (SGD's best and final test accuracy per model and seed at 40% noise),
``headline`` (per method at 40% noise: final, val_chosen, noisy_fit, time_ratio, under each
compute match), the full tables, and the choices made on the validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from . import auto_rho
from .lab.methods import Spec
from .lab.store import Progress, Store, fmt_seconds, jsonable
from .lab.tasks import MLP, ImageTask, ResNet

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = (0, 1, 2)
MAIN = "fmnist_mlp_noise40"

# the sweeps made on seed 0's noisy validation split (SAM's radius: auto_rho's whole grid)
CHOICE_SEEDS = (0,)
SWEEPS = {"asam": (0.5, 1.0, 2.0), "msam": (0.3, 1.0), "wsam": ("/8", "/2")}
# methods whose radius is SAM's chosen one; fixed values (the papers') for the others
SAM_RADIUS = ("looksam", "late_phase", "randomized", "esam", "sampa", "functional_sam")
FIXED = {"mesa": 0.8, "saf": 0.3}
GROUPS = (32,)   # m=8 is 14x SAM's step for this MLP on this CPU (group_cost.json)
BASELINES = ("sgd", "adamw")


def tasks(quick: bool = False) -> dict:
  limit = 3000 if quick else None
  short = (lambda e: 2) if quick else (lambda e: e)
  main = auto_rho.tasks(quick)[MAIN]
  return {
      MAIN: main,
      "fmnist_mlp_noise0": ImageTask("fmnist_mlp_noise0", "fashion_mnist", MLP, noise=0.0, lr=0.05,
                                     weight_decay=0.0, batch=128, epochs=short(40),
                                     val=500 if quick else 5000, loop="scan", limit=limit),
      "fmnist_cnn_noise40": ImageTask("fmnist_cnn_noise40", "fashion_mnist", ResNet, noise=0.4,
                                      lr=0.1, weight_decay=5e-4, batch=128, epochs=short(8),
                                      val=500 if quick else 5000, limit=limit),
  }


# the accelerator profile (``--device``): the CNN part at a size one short call on one GPU fits
DEVICE_TASK = "fmnist_cnn_noise40_device"
DEVICE_SPECS = ("sgd", "sam@0.05", "sam@auto", "looksam@0.05", "msam@0.3")


def device_tasks(quick: bool = False, epochs: int = 15) -> dict:
  """The CNN at 40% noise, wider (widths 32, 64, 128) and longer than on the CPU, one compiled
  epoch per call (``lax.scan``, fine for convolutions on an accelerator)."""
  return {DEVICE_TASK: ImageTask(
      DEVICE_TASK, "fashion_mnist", lambda: ResNet(widths=(32, 64, 128)), noise=0.4, lr=0.1,
      weight_decay=5e-4, batch=128, epochs=2 if quick else epochs, val=500 if quick else 5000,
      loop="scan", limit=3000 if quick else None)}


def run_device(store: Store, task: ImageTask) -> dict:
  """Every ``DEVICE_SPECS`` run on 3 seeds (resumable), then ``study_device.json``'s table:
  per spec the mean final, validation-chosen and best test accuracy, noisy fit and train
  seconds, with the device's name."""
  import jax
  rows = [(task.name, s, k) for k in SEEDS for s in DEVICE_SPECS]
  plan_rows = [(t, s, k, task.units(Spec.parse(s)),
                lambda tick, s=s, k=k: task.run(Spec.parse(s), k, tick, measure=False))
               for t, s, k in rows]
  from .lab.store import run_all
  results = run_all(store, plan_rows)
  table = {}
  for spec in DEVICE_SPECS:
    runs = [results[(task.name, spec, k)] for k in SEEDS]
    table[spec] = {key: float(100 * np.mean([r[key] for r in runs]))
                   for key in ("final", "val_chosen", "best", "noisy_fit")}
    table[spec]["train_seconds"] = float(np.median([r["train_seconds"] for r in runs]))
  return {"device": jax.devices()[0].device_kind, "epochs": task.epochs, "seeds": list(SEEDS),
          "table": table}


# ------------------------------------------------------------------------ choices


def mean_val(results: dict, task: str, spec: str, seeds=CHOICE_SEEDS) -> float | None:
  """The mean over seeds of the best noisy-validation accuracy (what selection can see)."""
  runs = [results.get((task, spec, s)) for s in seeds]
  if any(r is None for r in runs):
    return None
  return float(np.mean([max(r["curves"]["val_acc"]) for r in runs]))


def sam_scores(results: dict, task: str) -> dict[float, float]:
  scores = {r: mean_val(results, task, f"sam@{r:g}") for r in auto_rho.GRID}
  return {r: v for r, v in scores.items() if v is not None}


def choose_sam_rho(results: dict, task: str) -> float | None:
  """SAM's radius: the grid's best on the noisy validation split of the choice seeds, once
  the whole grid has finished."""
  scores = sam_scores(results, task)
  if len(scores) < len(auto_rho.GRID):
    return None
  return max(scores, key=lambda r: scores[r])


def sweep_values(name: str, rho: float) -> list:
  return [rho / float(v[1:]) if isinstance(v, str) else v for v in SWEEPS[name]]


def sweep_scores(results: dict, task: str, name: str, rho: float) -> dict:
  return {v: mean_val(results, task, f"{name}@{v:g}") for v in sweep_values(name, rho)}


def chosen_specs(results: dict, task: str, rho: float) -> dict[str, str]:
  """Each method's spec for the final runs, from the validation choices made so far (a
  swept method appears once its sweep has finished)."""
  out = {b: b for b in BASELINES}
  out.update({"sam": f"sam@{rho:g}", "sam@0.05": "sam@0.05", "sam@auto": "sam@auto"})
  for name in SAM_RADIUS:
    out[name] = f"{name}@{rho:g}"
  for name, v in FIXED.items():
    out[name] = f"{name}@{v:g}"
  for name in SWEEPS:
    scores = sweep_scores(results, task, name, rho)
    if all(s is not None for s in scores.values()):
      out[name] = f"{name}@{max(scores, key=lambda v: scores[v]):g}"
  for g in GROUPS:
    out[f"sam+m={g}"] = f"sam@{rho:g}+m={g}"
  return out


def matched_epochs(timing: dict | None, epochs: int, step: int = 10) -> int:
  """The SGD epochs that take SAM's wall clock (SAM's measured time ratio, to ``step``)."""
  ratio = ((timing or {}).get("ratio") or {}).get("sam")
  ratio = 2.0 if ratio is None else ratio
  return max(epochs, int(step * round(ratio * epochs / step)))


# --------------------------------------------------------------------------- plan


def plan(results: dict, timing: dict | None, all_tasks: dict) -> list[tuple[str, str, int]]:
  """Every run of the study as ``(task, spec, seed)``, in the order that makes each choice
  before it is needed and finishes a whole seed before the next: seed 0's baselines, SAM's
  grid and the sweeps; then every chosen method and the compute-matched baselines seed by
  seed (m-sharpness, 14x SAM's step on this CPU at m=8, last); then the references."""
  t = all_tasks[MAIN]
  rows: list[tuple[str, str, int]] = []
  for spec in BASELINES + tuple(auto_rho.specs(MAIN, with_auto=True))[1:]:
    rows.append((MAIN, spec, 0))
  rho = choose_sam_rho(results, MAIN)
  if rho is None:
    return rows
  for name in SWEEPS:
    rows += [(MAIN, f"{name}@{v:g}", 0) for v in sweep_values(name, rho)]
  chosen = chosen_specs(results, MAIN, rho)
  if len([k for k in chosen if k in SWEEPS]) < len(SWEEPS) or timing is None:
    return rows
  longer = sorted({2 * t.epochs, matched_epochs(timing, t.epochs)})
  matched = [f"{b}+epochs={e}" for b in BASELINES for e in longer]
  plain = [s for k, s in chosen.items() if "+m=" not in k]
  groups = [s for k, s in chosen.items() if "+m=" in k]
  for seed in SEEDS:
    rows += [(MAIN, s, seed) for s in plain + matched]
  for s in groups:
    rows += [(MAIN, s, seed) for seed in SEEDS]
  for name, specs in REFERENCES.items():
    for seed in SEEDS:
      rows += [(name, s.replace("{rho}", f"{rho:g}"), seed) for s in specs]
  return rows


# the references, cut first: the MLP on clean labels, the CNN at 40% noise
# (cut to fit the budget: the MLP study alone takes about 4 hours on 2 cores)
REFERENCES = {"fmnist_mlp_noise0": ("sgd", "sam@{rho}", "sam@auto"),
              "fmnist_cnn_noise40": ("sgd", "sam@0.05")}


# ------------------------------------------------------------------------- timing


def measure_timing(task: ImageTask, specs: list[str], rounds: int = 5, epochs: int = 2,
                   log=print) -> dict:
  """Seconds per epoch of each spec on this task's training loop: short runs of ``epochs``
  epochs from a fresh state with the full run's schedule shape, interleaved over the specs,
  ``rounds`` times after a compiling run; the median, and the ratios to SGD's
  (:func:`time_ratios`)."""
  timers = {}
  for i, s in enumerate(specs):
    timers[s] = task.epoch_timer(Spec.parse(s), epochs)
    timers[s]()   # compile
    log(f"timing: compiled {s} ({i + 1}/{len(specs)})")
  seconds: dict[str, list] = {s: [] for s in specs}
  for r in range(rounds):
    for s in specs:
      seconds[s].append(timers[s]() / epochs)
    log(f"timing: round {r + 1}/{rounds}")
  per_epoch = {s: float(np.median(v)) for s, v in seconds.items()}
  return {"seconds_per_epoch": per_epoch, "rounds": rounds, "epochs": epochs,
          "ratio": time_ratios(seconds), "runs": {s: v for s, v in seconds.items()}}


def time_ratios(seconds: dict[str, list]) -> dict[str, float]:
  """Each spec's time as a multiple of SGD's: the median over rounds of its time divided by
  SGD's in the same round, so that a slow round (the machine busy with something else)
  slows both sides of a ratio instead of one."""
  base = np.asarray(seconds["sgd"], float)
  return {s: float(np.median(np.asarray(v, float) / base)) for s, v in seconds.items()}


def timing_specs(results: dict, all_tasks: dict) -> list[str] | None:
  rho = choose_sam_rho(results, MAIN)
  if rho is None:
    return None
  chosen = chosen_specs(results, MAIN, rho)
  if len([k for k in chosen if k in SWEEPS]) < len(SWEEPS):
    return None
  return list(dict.fromkeys(["sgd"] + list(chosen.values())))


# --------------------------------------------------------------------------- run


def run(store: Store, all_tasks: dict, timing_path: str, retime: bool = False,
        only: tuple | None = None) -> None:
  """Runs what the plan still lacks, re-planning after each run (the choices move the plan);
  the timing run as soon as every method's spec is known."""
  start = time.perf_counter()
  bar = None
  while True:
    results = stored(store, all_tasks)
    timing = _read(timing_path)
    specs = timing_specs(results, all_tasks)
    if specs is not None and (timing is None or retime
                              or set(specs) - set(timing["seconds_per_epoch"])):
      print(f"timing {len(specs)} methods on {MAIN} ...", flush=True)
      timing = measure_timing(all_tasks[MAIN], specs)
      timing["ratio"]["sam"] = timing["ratio"][chosen_specs(results, MAIN,
                                                            choose_sam_rho(results, MAIN))["sam"]]
      with open(timing_path, "w") as f:
        json.dump(jsonable(timing), f, indent=1)
      retime = False
      continue
    rows = [r for r in plan(results, timing, all_tasks) if only is None or r[0] in only]
    todo = [r for r in rows if r not in results]
    total = sum(all_tasks[t].units(Spec.parse(s)) for t, s, _ in rows)
    if bar is None:
      bar = Progress(total)
      bar.skip(total - sum(all_tasks[t].units(Spec.parse(s)) for t, s, _ in todo))
    bar.total = total
    if not todo:
      break
    task, spec, seed = todo[0]
    t0 = time.perf_counter()
    given = [0.0]

    def tick(u, what, task=task, spec=spec, seed=seed):
      given[0] += u
      bar.advance(u, f"{task} {spec} seed {seed}: {what}")

    result = all_tasks[task].run(Spec.parse(spec), seed, tick, measure=True)
    result["wall_seconds"] = time.perf_counter() - t0
    bar.skip(max(all_tasks[task].units(Spec.parse(spec)) - given[0], 0.0))
    store.put(task, spec, seed, result)
  print(f"study finished: {fmt_seconds(time.perf_counter() - start)} in this invocation")


def stored(store: Store, all_tasks: dict) -> dict:
  """Every finished run of the study's tasks: ``{(task, spec, seed): result}``."""
  out = {}
  for task in all_tasks:
    folder = os.path.join(store.root, task)
    if not os.path.isdir(folder):
      continue
    for spec in os.listdir(folder):
      for seed in SEEDS:
        r = store.get(task, spec, seed)
        if r is not None:
          out[(task, spec, seed)] = r
  return out


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="slices of the data, 2 epochs")
  parser.add_argument("--report", action="store_true",
                      help="write study.json, the docs' tables and the figures from the "
                           "finished runs, training nothing")
  parser.add_argument("--retime", action="store_true", help="measure the time ratios again")
  parser.add_argument("--only", default=None, help="comma-separated task names")
  parser.add_argument("--store", default=None, help="folder of the finished runs")
  parser.add_argument("--device", action="store_true",
                      help="the accelerator profile: the CNN part only, wider and longer "
                           "(study_device.json)")
  parser.add_argument("--device-epochs", type=int, default=15)
  args = parser.parse_args(argv)
  if args.device:
    root = args.store or os.path.join(HERE, "runs_device" if not args.quick else "runs_quick")
    out = run_device(Store(root), device_tasks(args.quick, args.device_epochs)[DEVICE_TASK])
    path = os.path.join(root if args.quick else HERE, "study_device.json")
    with open(path, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0
  root = args.store or os.path.join(HERE, "runs" if not args.quick else "runs_quick")
  store = Store(root)
  all_tasks = tasks(args.quick)
  timing_path = os.path.join(root, f"timing_{MAIN}.json")
  if not args.report:
    only = tuple(args.only.split(",")) if args.only else None
    run(store, all_tasks, timing_path, retime=args.retime, only=only)
  from . import study_report
  study_report.write(store, all_tasks, timing_path, quick=args.quick, root=root)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
