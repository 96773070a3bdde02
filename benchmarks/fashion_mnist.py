"""SGD and AdamW against the sharpness-aware family on the full Fashion-MNIST.

  flock /tmp/sam_heavy.lock python -m benchmarks.fashion_mnist              # the recorded run
  python -m benchmarks.fashion_mnist --smoke                                 # a few minutes

Data: ``sam_optax.datasets.load_fashion_mnist`` (60,000 training / 10,000 test images,
Debian's ``dataset-fashion-mnist``), symmetric label noise on the training labels only
(0% and 40%), clean test labels.

Models (``--models``):

* ``cnn``: a ResNet-style CNN with BatchNorm: a 3x3 stride-2 stem and three residual
  stages of two 3x3 convolutions (widths 8, 16, 32; stride 2 from the second stage,
  1x1 projection shortcuts), global average pooling, one dense layer: 20k parameters.
  SGD + momentum 0.9, lr 0.1 cosine-decayed to 0, weight decay 5e-4, batch 128.
* ``mlp``: 784-512-512-10 with ReLU, no normalization: 0.67M parameters, enough to
  start fitting the noisy labels within a short run. SGD + momentum 0.9, lr 0.05
  cosine, weight decay 5e-4, batch 128.

AdamW: lr 1e-3 cosine, weight decay 1e-4 (not swept). Each sharpness-aware method
wraps the model's SGD. Its radius (λ for MESA and SAF) is chosen from two values by a
sweep on a validation split: 15,000 of the noisy (40%) training images to train on,
5,000 others to score, the run's own schedule, final-epoch accuracy on the noisy
validation labels (a practitioner has no clean ones); the chosen value serves both
noise levels.

Final runs: all 60,000 training images, ``--seeds`` seeds. Within a seed every method
advances one epoch in turn, so the machine's noise falls on all of them. Reported per
method: final and best (over epochs) clean test accuracy, accuracy on the corrupted test
set (Gaussian noise std 0.3, Gaussian blur sigma 1, rotation by ±15°; their mean), ECE
(15 bins), the share of the mislabelled training images whose noisy label the final
model predicts (memorization; 40% noise only), and of the final solution: λ_max of the
training loss (20 power iterations of Hessian-vector products) and adaptive sharpness
(``max_sharpness`` with ASAM's geometry, ρ = 0.1, 5 ascent steps), both on a fixed
1,024-image training batch with its training labels, BatchNorm in inference mode.
Wall clock: the training steps' seconds per run (evaluation not timed; the first run
of each method, which compiles, left out), as a ratio to SGD's.

Writes ``fashion_mnist.json`` and three plots into ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax as so
from sam_optax import calibration, sharpness, trajectory
from sam_optax import flax as ft
from sam_optax.datasets import load_fashion_mnist

from .claims import common as C
from .lab.tasks import MLP, ResNet  # the same models as the auto-rho and m-sharpness runs

BATCH, NOISE, SWEEP_TRAIN, SWEEP_VAL = 128, 0.4, 15_000, 5_000
CORRUPTIONS = ("noise", "blur", "rotate15")


MODELS = {"cnn": (ResNet, 0.1), "mlp": (MLP, 0.05)}


class Method(NamedTuple):
  """``make(value, base, steps, spe, epochs) -> (tx, kind, step_kwargs)``; ``grid``: the two
  swept values of ``what``; ``gated``: runs under ``gated_jit``."""
  make: Callable[..., tuple]
  grid: tuple
  what: str = "ρ"
  gated: bool = False


def _late_start(steps: int) -> int:
  return (3 * steps) // 4  # SAM for the last quarter (Zhou et al. switch late in training)


def methods() -> dict[str, Method]:
  plain = lambda tx: (tx, "plain", {})
  window = lambda e: max(1, e // 3)
  return {
      "sgd": Method(lambda v, b, n, spe, e: plain(b), (None,), "-"),
      "adamw": Method(lambda v, b, n, spe, e: plain(
          optax.adamw(optax.cosine_decay_schedule(1e-3, n), weight_decay=1e-4)), (None,), "-"),
      "sam": Method(lambda v, b, n, spe, e: plain(so.sam(b, v)), (0.05, 0.1)),
      "asam": Method(lambda v, b, n, spe, e: plain(so.asam(b, v)), (0.5, 1.0)),
      "gsam": Method(lambda v, b, n, spe, e: plain(optax.chain(so.gsam(v), b)), (0.05, 0.1)),
      "looksam": Method(lambda v, b, n, spe, e: plain(optax.chain(so.looksam(v, k=5), b)),
                        (0.05, 0.1), gated=True),
      "mesa": Method(lambda v, b, n, spe, e: (optax.chain(b, so.weight_ema(0.99)), "mesa", dict(
          steps_per_epoch=spe, weight=v, temperature=5.0, start_epoch=window(e))), (0.3, 0.8), "λ"),
      "esam": Method(lambda v, b, n, spe, e: (optax.chain(so.esam(v, 0.5), b), "esam", {}),
                     (0.05, 0.1)),
      "late_phase": Method(lambda v, b, n, spe, e: plain(optax.chain(
          so.late_phase(so.sharpness_aware(v), _late_start(n)), b)), (0.05, 0.1), gated=True),
      # the frontier's other cheap variants (40% noise only)
      "msam": Method(lambda v, b, n, spe, e: plain(so.msam(b, rho=v)), (0.3, 1.0)),
      "saf": Method(lambda v, b, n, spe, e: (b, "saf", dict(
          steps_per_epoch=spe, weight=v, temperature=5.0, start_epoch=window(e))), (0.3, 1.0), "λ"),
      "randomized": Method(lambda v, b, n, spe, e: plain(optax.chain(
          so.randomized(so.sharpness_aware(v), 0.5), b)), (0.05, 0.1), gated=True),
  }


FRONTIER_ONLY = ("msam", "saf", "randomized")


def base_sgd(lr: float, steps: int) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(5e-4),
                     optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9))


class Trainer:
  """One method's optimizer and compiled step for a model and a run length, shared by its
  runs (the same ``tx`` object, so the jit cache serves every seed and noise level)."""

  def __init__(self, name: str, value: Any, model_name: str, n_train: int, epochs: int):
    cls, lr = MODELS[model_name]
    self.name, self.model = name, cls()
    self.spe = n_train // BATCH
    m = methods()[name]
    steps = epochs * self.spe
    self.tx, self.kind, kw = m.make(value, base_sgd(lr, steps), steps, self.spe, epochs)
    if self.kind == "plain":
      inner = ft.make_linen_train_step(jit=False)
    else:
      inner = {"mesa": ft.make_linen_mesa_train_step, "saf": ft.make_linen_saf_train_step,
               "esam": ft.make_linen_esam_train_step}[self.kind](jit=False, **kw)
    self.step = so.gated_jit(inner) if m.gated else jax.jit(inner)
    self.n_train = n_train

  def init(self, seed: int, x0: np.ndarray):
    variables = self.model.init(jax.random.key(seed), jnp.asarray(x0[:2]))
    extra = {"saf": trajectory.saf_init(self.n_train, 10, lookback=2)} if self.kind == "saf" else {}
    cls = ft.SAFTrainState if self.kind == "saf" else ft.TrainState
    return cls.create(apply_fn=self.model.apply, params=variables["params"], tx=self.tx,
                      batch_stats=variables.get("batch_stats", {}), **extra)


class Run:
  """A training run advanced one epoch at a time (so the methods of a seed interleave)."""

  def __init__(self, trainer: Trainer, seed: int, x: jax.Array, y: jax.Array):
    self.t, self.seed, self.x, self.y = trainer, seed, x, y
    self.state = trainer.init(seed, np.asarray(x[:2]))
    self.key = jax.random.key(seed)
    self.rng = np.random.default_rng(seed)
    self.seconds, self.curve = 0.0, []

  def epoch(self, epoch: int) -> None:
    t, order = self.t, self.rng.permutation(len(self.y))
    t0 = time.perf_counter()
    for i in range(t.spe):
      idx = jnp.asarray(order[i * BATCH:(i + 1) * BATCH])
      batch = (self.x[idx], self.y[idx]) + ((idx,) if t.kind == "saf" else ())
      self.state, _ = t.step(self.state, batch, jax.random.fold_in(self.key, epoch * t.spe + i))
    jax.block_until_ready(self.state.params)
    self.seconds += time.perf_counter() - t0

  def variables(self) -> dict:
    params = self.state.params
    if self.t.name == "msam":
      params = so.msam_clean_params(params, self.state.opt_state)
    bs = self.state.batch_stats
    return {"params": params, **({"batch_stats": bs} if bs else {})}


_EVAL: dict = {}


def _evaluator(model: nn.Module):
  """Jitted logits, λ_max and adaptive sharpness for a model (one compile per model)."""
  if model in _EVAL:
    return _EVAL[model]

  @jax.jit
  def logits(variables, x):
    return model.apply(variables, x)

  @jax.jit
  def sharp(variables, x, y):
    rest = {k: v for k, v in variables.items() if k != "params"}
    loss = lambda p: jnp.mean(
        ft.per_example_cross_entropy(model.apply({"params": p, **rest}, x), y))
    lam, _ = sharpness.hessian_top_eigenvalue(loss, variables["params"], num_iters=20, unroll=True)
    ada = sharpness.max_sharpness(loss, variables["params"], 0.1, perturbation=so.adaptive(),
                                  steps=5,
                                  unroll=True)
    return lam, ada

  _EVAL[model] = (logits, sharp)
  return _EVAL[model]


def _predict(logits, variables, x: np.ndarray) -> np.ndarray:
  return np.concatenate([np.asarray(jax.nn.softmax(logits(variables, jnp.asarray(x[i:i + 5000]))))
                         for i in range(0, len(x), 5000)])


def score(run: Run, test: dict, probe: tuple, noisy: np.ndarray | None) -> dict:
  logits, sharp = _evaluator(run.t.model)
  v = run.variables()
  probs = _predict(logits, v, test["x"])
  out = {"final": float(np.mean(probs.argmax(-1) == test["y"])),
         "ece": float(calibration.expected_calibration_error(jnp.asarray(probs),
                                                             jnp.asarray(test["y"])))}
  out["corrupted"] = {k: float(np.mean(_predict(logits, v, test[k]).argmax(-1) == test["y"]))
                      for k in CORRUPTIONS}
  out["corrupted_mean"] = float(np.mean(list(out["corrupted"].values())))
  if noisy is not None:  # (indices of mislabelled training images, their noisy labels)
    pred = _predict(logits, v, np.asarray(run.x)[noisy[0]]).argmax(-1)
    out["noisy_fit"] = float(np.mean(pred == noisy[1]))
  lam, ada = sharp(v, *probe)
  out["lambda_max"], out["adaptive_sharpness"] = float(lam), float(ada)
  out["curve"] = run.curve
  out["best"] = float(max(run.curve))
  out["seconds"] = run.seconds
  stats = so.metrics(run.state.opt_state)
  if "sam_step_fraction" in stats:
    out["sam_step_fraction"] = float(stats["sam_step_fraction"])
  return out


def accuracy(run: Run, x: np.ndarray, y: np.ndarray) -> float:
  logits, _ = _evaluator(run.t.model)
  return float(np.mean(_predict(logits, run.variables(), x).argmax(-1) == y))


def sweep(model: str, names: list[str], epochs: int, log) -> dict:
  x_tr, y_tr, _, _ = load_fashion_mnist(0, NOISE)
  perm = np.random.default_rng(1234).permutation(len(y_tr))
  tr, va = perm[:SWEEP_TRAIN], perm[SWEEP_TRAIN:SWEEP_TRAIN + SWEEP_VAL]
  x, y = jnp.asarray(x_tr[tr]), jnp.asarray(y_tr[tr])
  chosen = {}
  for name in names:
    m = methods()[name]
    if m.grid == (None,):
      chosen[name] = {"value": None, "what": m.what, "scores": {}}
      continue
    runs = {v: Run(Trainer(name, v, model, SWEEP_TRAIN, epochs), 0, x, y) for v in m.grid}
    for epoch in range(epochs):
      for r in runs.values():
        r.epoch(epoch)
    scores = {v: accuracy(r, x_tr[va], y_tr[va]) for v, r in runs.items()}
    best = max(scores, key=lambda k: scores[k])
    chosen[name] = {"value": best, "what": m.what, "scores": {str(k): s for k, s in scores.items()}}
    log(f"  sweep {model} "
        f"{name}: " + ", ".join(f"{m.what}={k}: {100 * s:.1f}" for k, s in scores.items())
        + f" -> {best}")
  return chosen


def final(model: str, names: list[str], chosen: dict, epochs: int, seeds: int, noises: list[float],
          test: dict, log) -> dict:
  trainers = {n: Trainer(n, chosen[n]["value"], model, 60_000, epochs) for n in names}
  out: dict = {}
  first = set()
  for noise in noises:
    for seed in range(seeds):
      x_tr, y_tr, _, _ = load_fashion_mnist(seed, noise)
      y_clean = load_fashion_mnist(seed, 0.0)[1]
      wrong = np.flatnonzero(y_tr != y_clean)[:10_000]
      noisy = (wrong, y_tr[wrong]) if noise > 0 else None
      probe_idx = np.random.default_rng(99).choice(len(y_tr), 1024, replace=False)
      x, y = jnp.asarray(x_tr), jnp.asarray(y_tr)
      probe = (x[probe_idx], y[probe_idx])
      here = [n for n in names if noise > 0 or n not in FRONTIER_ONLY]
      runs = {n: Run(trainers[n], seed, x, y) for n in here}
      for epoch in range(epochs):
        for r in runs.values():
          r.epoch(epoch)
          r.curve.append(accuracy(r, test["x"], test["y"]))
      for n, r in runs.items():
        res = score(r, test, probe, noisy)
        res["timed"] = n in first  # the first run of a method compiles
        first.add(n)
        out.setdefault(f"{noise:g}", {}).setdefault(n, []).append(res)
        log(f"  {model} noise {noise:.0%} seed {seed} {n}: final {100 * res['final']:.2f} best "
            f"{100 * res['best']:.2f} corrupted {100 * res['corrupted_mean']:.2f} "
            f"ECE {res['ece']:.3f} λmax {res['lambda_max']:.2f} {r.seconds:.1f}s")
  return out


def summarize(runs: dict) -> dict:
  """Mean and std over seeds of each figure, and the wall-clock ratio to SGD (timed runs)."""
  def ms(vals):
    a = np.asarray(vals, float)
    return [float(a.mean()), float(a.std())]
  out = {}
  for noise, per in runs.items():
    timed = lambda n: [r["seconds"] for r in per[n] if r["timed"]] or [r["seconds"] for r in per[n]]
    sgd_s = np.median(timed("sgd"))
    out[noise] = {}
    for n, rs in per.items():
      row = {k: ms([r[k] for r in rs]) for k in
             ("final", "best", "corrupted_mean", "ece", "lambda_max", "adaptive_sharpness")}
      if "noisy_fit" in rs[0]:
        row["noisy_fit"] = ms([r["noisy_fit"] for r in rs])
      row["time_ratio"] = float(np.median(timed(n)) / sgd_s)
      row["sam_step_fraction"] = rs[0].get("sam_step_fraction")
      out[noise][n] = row
  return out


def table(summary: dict, chosen: dict) -> str:
  lines = []
  for noise, per in summary.items():
    lines += [f"\n**{float(noise):.0%} label noise**\n",
              "| method | chosen | final acc | best acc | corrupted acc | ECE | " +
              ("noisy labels fit | " if float(noise) > 0 else "") +
              "λ_max | adaptive sharpness | × SGD time |",
              "|---" * (10 if float(noise) > 0 else 9) + "|"]
    for n, r in per.items():
      c = chosen[n]
      pm = lambda k, s=100, d=2: f"{s * r[k][0]:.{d}f} ± {s * r[k][1]:.{d}f}"
      cells = [n, "-" if c["value"] is None else f"{c['what']} = {c['value']}", pm("final"),
               pm("best"),
               pm("corrupted_mean"), pm("ece", 1, 3)]
      if float(noise) > 0:
        cells.append(pm("noisy_fit", 100, 1))
      cells += [pm("lambda_max", 1, 1), pm("adaptive_sharpness", 1, 3), f"{r['time_ratio']:.2f}"]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plots(saved: dict, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = list(saved["summary"])
  # 1. final and best accuracy per method, per model and noise level
  panels = [(m, nz) for m in models for nz in saved["summary"][m]]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
  for ax, (m, nz) in zip(axes[0], panels, strict=True):
    per = saved["summary"][m][nz]
    names = list(per)
    xs = np.arange(len(names))
    for k, (key, col) in enumerate((("final", "tab:blue"), ("best", "tab:grey"))):
      ax.errorbar(xs + (k - 0.5) * 0.25, [100 * per[n][key][0] for n in names],
                  yerr=[100 * per[n][key][1] for n in names], fmt="o", color=col, capsize=2,
                  label=key)
    ax.set_xticks(xs, names, rotation=60, fontsize=8)
    ax.set_title(f"{m}, {float(nz):.0%} noise")
    ax.grid(alpha=0.3)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
  fig.suptitle("Fashion-MNIST (60,000 training images): final and best test accuracy, mean ± std "
               "over seeds")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "fashion_mnist_accuracy.png"), dpi=110)
  plt.close(fig)
  # 2. frontier at 40% noise: accuracy against time
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.6), squeeze=False)
  for ax, m in zip(axes[0], models, strict=True):
    per = saved["summary"][m][f"{NOISE:g}"]
    sam = per.get("sam")
    if sam:
      ax.axhspan(100 * (sam["final"][0] - sam["final"][1]),
                 100 * (sam["final"][0] + sam["final"][1]),
                 color="tab:orange", alpha=0.15, label="SAM mean ± std")
    ax.axvline(1.25, color="grey", ls="--", lw=1, label="1.25 × SGD")
    for n, r in per.items():
      ax.errorbar(r["time_ratio"], 100 * r["final"][0], yerr=100 * r["final"][1], fmt="o",
                  capsize=3)
      ax.annotate(n, (r["time_ratio"], 100 * r["final"][0]), textcoords="offset points",
                  xytext=(5, 4), fontsize=8)
    ax.set_xlabel("training wall clock (× SGD)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"{m}, {NOISE:.0%} label noise")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
  fig.suptitle("Fashion-MNIST: accuracy against cost")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "fashion_mnist_frontier.png"), dpi=110)
  plt.close(fig)
  # 3. test accuracy by epoch at 40% noise (memorization shows as a fall after the peak)
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
  for ax, m in zip(axes[0], models, strict=True):
    for n, rs in saved["runs"][m][f"{NOISE:g}"].items():
      if n in FRONTIER_ONLY:
        continue
      c = 100 * np.asarray([r["curve"] for r in rs])
      ax.plot(np.arange(1, c.shape[1] + 1), c.mean(0), marker=".", label=n,
              lw=2 if n in ("sgd", "sam") else 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title(f"{m}, {NOISE:.0%} label noise (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "fashion_mnist_curves.png"), dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="cnn,mlp")
  ap.add_argument("--epochs", default="cnn=3,mlp=20", help="per model, e.g. cnn=3,mlp=20")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--clean-models", default="cnn", help="models also run on clean labels")
  ap.add_argument("--only", default="", help="comma-separated subset of the methods")
  ap.add_argument("--smoke", action="store_true", help="1 epoch, 1 seed, sgd/sam/looksam")
  ap.add_argument("--out", default="benchmarks")
  ap.add_argument("--from-json", default="", help="re-print and re-plot a saved fashion_mnist.json")
  args = ap.parse_args()
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    for m, s in saved["summary"].items():
      print(f"\n### {m}\n" + table(s, saved["sweep"][m]))
    plots(saved, args.out)
    return
  epochs = {k: int(v) for k, v in (p.split("=") for p in args.epochs.split(","))}
  names = [n for n in (args.only.split(",") if args.only else methods()) if n]
  seeds = args.seeds
  if args.smoke:
    epochs, seeds = {k: 1 for k in epochs}, 1
    names = names if args.only else ["sgd", "sam", "looksam"]
  for n in ("sgd",):
    if n not in names:
      names.insert(0, n)
  t_start = time.perf_counter()
  log = lambda s: print(f"[{time.perf_counter() - t_start:7.1f}s] {s}", flush=True)
  header = (f"{platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
            f"{jax.default_backend()}, {time.strftime('%Y-%m-%d')}; Fashion-MNIST 60,000/10,000, "
            f"epochs {epochs}, {seeds} seeds")
  print("# " + header, flush=True)
  _, _, x_te, y_te = load_fashion_mnist(0, 0.0)
  shifted = C.corruptions(x_te[..., 0])  # (N, 28, 28): blur and rotation in the image plane
  test = {"x": x_te, "y": y_te, **{k: shifted[k][..., None] for k in CORRUPTIONS}}
  saved = {"header": header, "args": vars(args), "sweep": {}, "runs": {}, "summary": {}}
  for model in args.models.split(","):
    chosen = sweep(model, names, epochs[model], log)
    noises = [0.0, NOISE] if model in args.clean_models.split(",") else [NOISE]
    runs = final(model, names, chosen, epochs[model], seeds, noises, test, log)
    saved["sweep"][model], saved["runs"][model], saved["summary"][model] = (
        chosen, runs, summarize(runs))
    print(f"\n### {model}\n" + table(saved["summary"][model], chosen), flush=True)
  saved["total_s"] = time.perf_counter() - t_start
  log("done")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "fashion_mnist.json"), "w") as f:
    json.dump(saved, f, indent=1)
  plots(saved, args.out)


if __name__ == "__main__":
  main()
