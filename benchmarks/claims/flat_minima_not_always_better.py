"""Claim 6: not all flat minima generalize (better).

(a) Rescaling (Dinh, Pascanu, Bengio, Bengio, ICML 2017). A ReLU MLP
64-128-128-10 trained on digits (SGD, 1,000 steps); its first layer (weights
and bias) is multiplied by alpha and the second layer's weights divided by
alpha, alpha in {0.1, 0.3, 1, 3, 10}: the function is unchanged, so test error
is unchanged. On the 1,203 training examples we measure the top Hessian
eigenvalue, the worst-case L2 sharpness (``max_sharpness``, rho 0.05) and the
adaptive worst-case sharpness, max over |epsilon / |w|| <= 0.5 of L(w + epsilon)
- L(w) (Kwon et al. 2021; Andriushchenko et al. 2023), computed as
``max_sharpness`` of the loss in the normalized coordinates u = epsilon / |w|,
so that its random start, too, is the same for every alpha. Predictions: the
first two change by more than 10x (log10 change - 1 > 0), the adaptive one by
less than 1% (|log10 change| < 0.0043).

(b) A grid of trained models (Andriushchenko, Croce, Müller, Hein, Flammarion,
ICML 2023): digits, ReLU MLPs of width {32, 128}, SGD-momentum / SAM with lr
{0.01, 0.03, 0.1}, batch {16, 128}, rho {0, 0.05, 0.2}, 1,000 steps, 5 seeds.
Models that do not fit the training set (training accuracy < 99%) are left out,
since sharpness compares minima. For each seed, Kendall's tau over the remaining
models between each sharpness measure (on 512 training examples) and the test
error, the corrupted-test error (mean over the ``ood`` corruptions) and the
learning rate. Their finding, as a sign test: sharpness ranks the models by
learning rate better than by test error, |tau(sharpness, lr)| - |tau(sharpness,
test error)| > 0.

python -m benchmarks.claims.flat_minima_not_always_better [--quick] [--out DIR]
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.claims import common as C
from sam_optax import sharpness

NAME = "flat_minima_not_always_better"
CLAIM = ("Furthermore, while SAM seeks flat minima, some research suggests that not all flat "
         "minima necessarily lead to good generalization.")
PUBLISHED = ("Dinh et al., ICML 2017 (arXiv 1703.04933): function-preserving rescalings of ReLU "
             "nets make Hessian-based sharpness arbitrarily large or small; Andriushchenko et al., "
             "ICML 2023 (arXiv 2302.07011): over many trained models, sharpness (standard or "
             "adaptive, worst- or average-case) 'does not correlate well' with generalization and "
             "tracks the learning rate instead.")

ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0)
RHO_L2, RHO_ADAPTIVE = 0.05, 0.5
FIT = 99.0  # training accuracy (%) a grid model needs to count as a minimum
MEASURES = ("lambda_max", "l2_sharpness", "adaptive_sharpness")


def settings(quick: bool) -> dict:
  if quick:
    return {"seeds": 3, "steps": 200, "lrs": [0.05, 0.1], "batches": [32], "rhos": [0.0, 0.1],
            "widths": [32, 64], "power_iters": 10, "ascent_steps": 5, "fit": 0.0}
  return {"seeds": 5, "steps": 1000, "lrs": [0.01, 0.03, 0.1], "batches": [16, 128], "fit": FIT,
          "rhos": [0.0, 0.05, 0.2], "widths": [32, 128], "power_iters": 20, "ascent_steps": 10}


def adaptive_sharpness(loss_fn, params, rho, steps):
  """max over |u| <= rho of L(w + |w| u) - L(w): worst-case sharpness in ASAM's normalized
  coordinates (eta = 0), by ``max_sharpness`` on u, so both of its starts (SAM's step and a
  random point) are drawn in u and every ingredient is invariant to rescaling w."""
  scale = jax.tree.map(jnp.abs, params)
  zero = jax.tree.map(jnp.zeros_like, params)
  loss_u = lambda u: loss_fn(jax.tree.map(lambda w, s, v: w + s * v, params, scale, u))
  return sharpness.max_sharpness(loss_u, zero, rho, steps=steps)


def sharpness_measures(params, x, y, power_iters, ascent_steps):
  loss_fn = lambda p: C.ce_loss(p, (x, y))
  lam, _ = sharpness.hessian_top_eigenvalue(loss_fn, params, num_iters=power_iters)
  l2 = sharpness.max_sharpness(loss_fn, params, RHO_L2, steps=ascent_steps)
  adaptive = adaptive_sharpness(loss_fn, params, RHO_ADAPTIVE, ascent_steps)
  return {"lambda_max": lam, "l2_sharpness": l2, "adaptive_sharpness": adaptive}


@functools.cache
def _measure_fn(power_iters, ascent_steps):
  return jax.jit(jax.vmap(lambda p, x, y: sharpness_measures(p, x, y, power_iters, ascent_steps),
                          in_axes=(0, None, None)))


def measure_many(params, x, y, power_iters, ascent_steps):
  return {k: np.asarray(v) for k, v in _measure_fn(power_iters, ascent_steps)(params, x, y).items()}


def rescale(params, alpha):
  """Layer 1 (w, b) times alpha, layer 2's w divided by alpha: the same ReLU function."""
  out = [dict(layer) for layer in params]
  out[0] = {"w": params[0]["w"] * alpha, "b": params[0]["b"] * alpha}
  out[1] = {"w": params[1]["w"] / alpha, "b": params[1]["b"]}
  return out


def rescaling_test(cfg, seeds, x_tr, y_tr, x_te, y_te):
  data = (jnp.asarray(C.flat(x_tr)), jnp.asarray(y_tr))
  idx = np.stack([C.batch_indices(np.random.default_rng(s), len(y_tr), cfg["steps"], 64)
                  for s in seeds])
  params, _ = C.fit(C.ce_loss, "sgd", C.init_many(seeds, [64, 128, 128, 10]), {"lr": 0.05}, data,
                    idx)
  res, logit_change = {}, []
  x_te_j = jnp.asarray(C.flat(x_te))
  base_logits = jax.vmap(lambda p: C.mlp_apply(p, x_te_j))(params)
  for a in ALPHAS:
    scaled = rescale(params, a)
    res[a] = measure_many(scaled, data[0], data[1], 4 * cfg["power_iters"], 2 * cfg["ascent_steps"])
    logits = jax.vmap(lambda p: C.mlp_apply(p, x_te_j))(scaled)
    logit_change.append(float(jnp.max(jnp.abs(logits - base_logits))))
  return res, max(logit_change), C.accuracy(params, x_te, y_te)


def grid_test(cfg, seeds, x_tr, y_tr, x_te, y_te):
  data = (jnp.asarray(C.flat(x_tr)), jnp.asarray(y_tr))
  shifted = C.corruptions(x_te)
  xm, ym = data[0][:512], data[1][:512]
  rows = []
  for width, batch in itertools.product(cfg["widths"], cfg["batches"]):
    combos = list(itertools.product(cfg["lrs"], cfg["rhos"], seeds))
    params0 = C.init_many([1000 * width + s for (_, _, s) in combos], [64, width, width, 10])
    idx = np.stack([C.batch_indices(np.random.default_rng([s, width, batch]), len(y_tr),
                                    cfg["steps"], batch)
                    for (_, _, s) in combos])
    hp = {"lr": [c[0] for c in combos], "rho": [c[1] for c in combos]}
    params, _ = C.fit(C.ce_loss, "sam_sgd", params0, hp, data, idx)
    m = measure_many(params, xm, ym, cfg["power_iters"], cfg["ascent_steps"])
    err = 100 - C.accuracy(params, x_te, y_te)
    corr = 100 - np.mean([C.accuracy(params, v, y_te) for v in shifted.values()], axis=0)
    train_acc = C.accuracy(params, x_tr, y_tr)
    for i, (lr, rho, s) in enumerate(combos):
      rows.append({"width": width, "batch": batch, "lr": lr, "rho": rho, "seed": s,
                   "test_error": err[i], "corrupted_error": corr[i], "train_accuracy": train_acc[i],
                   "fits": bool(train_acc[i] >= cfg["fit"]),
                   **{k: float(m[k][i]) for k in MEASURES}})
  return rows


def run(quick: bool, out: str) -> dict:
  cfg = settings(quick)
  seeds = list(range(cfg["seeds"]))
  x_tr, y_tr, x_te, y_te = C.digits_images()
  resc, logit_change, acc = rescaling_test(cfg, seeds, x_tr, y_tr, x_te, y_te)
  lg = {k: {a: np.log10(np.maximum(resc[a][k], 1e-12) / np.maximum(resc[1.0][k], 1e-12))
            for a in ALPHAS}
        for k in MEASURES}
  widest = lambda k: np.max(np.abs(np.stack([lg[k][a] for a in ALPHAS])), axis=0)
  tests = [
      C.sign_test("rescaling: log10 change of lambda_max, minus 1", widest("lambda_max") - 1,
                  what="> 0: more than 10x for some alpha, same function"),
      C.sign_test("rescaling: log10 change of L2 sharpness, minus 1", widest("l2_sharpness") - 1),
      C.sign_test("rescaling: |log10 change| of adaptive sharpness, minus log10(1.01)",
                  widest("adaptive_sharpness") - np.log10(1.01), predicted="-",
                  what="< 0: adaptive sharpness changes by less than 1%"),
  ]
  all_rows = grid_test(cfg, seeds, x_tr, y_tr, x_te, y_te)
  rows = [r for r in all_rows if r["fits"]]
  taus = {}
  for k in MEASURES:
    for target in ("test_error", "corrupted_error", "lr"):
      taus[(k, target)] = np.array([C.kendall_tau([r[k] for r in rows if r["seed"] == s],
                                                  [r[target] for r in rows if r["seed"] == s])
                                    for s in seeds])
  for k in MEASURES:
    tests.append(C.sign_test(f"grid: |tau({k}, lr)| - |tau({k}, test error)|",
                             np.abs(taus[(k, "lr")]) - np.abs(taus[(k, "test_error")]),
                             primary=k == "lambda_max",
                             what="> 0: sharpness ranks models by learning rate more than by "
                                  "test error"))
  for k in MEASURES:
    for target in ("test_error", "corrupted_error"):
      tests.append(C.sign_test(f"grid: tau({k}, {target.replace('_', ' ')})", taus[(k, target)],
                               primary=False, what="> 0 would mean flatter is better"))
  figures = {"settings": cfg,
             "rescaling": {"test_accuracy": C.mean_std(acc), "max_logit_change": logit_change,
                           "values": {k: {a: C.mean_std(resc[a][k]) for a in ALPHAS}
                                      for k in MEASURES}},
             "kendall_tau": {f"{k} vs {t}": C.mean_std(v) for (k, t), v in taus.items()},
             "grid_models": len(all_rows), "grid_models_fitting": len(rows), "grid": all_rows}
  plots = [plot_rescaling(resc, out), plot_grid(rows, taus, out)]
  return C.record(NAME, claim=CLAIM, published=PUBLISHED, protocol=C.protocol_of(__doc__),
                  tests=tests,
                  figures=figures, plots=plots, quick=quick, seconds=0)


LABELS = {"lambda_max": "top Hessian eigenvalue",
          "l2_sharpness": "worst-case L2 sharpness (rho 0.05)",
          "adaptive_sharpness": "adaptive worst-case sharpness (rho 0.5)"}


def plot_rescaling(resc, out):
  plt = C.plt()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for k in MEASURES:
    ratio = np.stack([resc[a][k] / resc[1.0][k] for a in ALPHAS], 1)
    C.errorbar(ax, ALPHAS, ratio, LABELS[k])
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("alpha (layer 1 x alpha, layer 2 / alpha: same function)")
  ax.set_ylabel("measure / measure at alpha = 1")
  ax.set_title("digits MLP: sharpness under rescaling")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return C.save(fig, out, f"{NAME}_rescaling")


def plot_grid(rows, taus, out):  # rows: the models that fit the training set
  plt = C.plt()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  lrs = sorted({r["lr"] for r in rows})
  for ax, k in zip(axes, MEASURES):
    for j, lr in enumerate(lrs):
      sel = [r for r in rows if r["lr"] == lr]
      ax.scatter([r[k] for r in sel], [r["test_error"] for r in sel], s=14, color=f"C{j}",
                 label=f"lr {lr}")
    ax.set_xscale("log")
    ax.set_xlabel(LABELS[k])
    ax.set_ylabel("test error (%)")
    te, lr_ = taus[(k, "test_error")], taus[(k, "lr")]
    ax.set_title(f"tau(test err) {te.mean():+.2f}, tau(lr) {lr_.mean():+.2f}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  return C.save(fig, out, f"{NAME}_grid")


if __name__ == "__main__":
  C.script_main(NAME, run)
