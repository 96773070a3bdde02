"""Claim 4: the one-step approximation of SAM's worst-case perturbation degrades in training.

An MLP 784-256-256-10 trained on MNIST-5k by SAM (SGD momentum 0.9, lr 0.05
cosine, batch 128, rho 0.05). At the start and every 60 steps, on a fixed batch
of 512 training examples: the one-step sharpness s1 = L(w + rho g/|g|) - L(w);
the multi-step worst case s_K, the best loss increase found by K = 20 projected
normalized-gradient ascent steps of size rho/5 inside the rho-ball from five
starts (SAM's point, +-rho v_max, two random points; never below s1); their
ratio r = s1 / s_K; the cosine between SAM's perturbation and the best
multi-step one; |cos| between SAM's perturbation and the top Hessian
eigenvector v_max; the Rayleigh quotient of g/|g| relative to lambda_max
(what r tends to as |g| -> 0 on a quadratic); and the predicted driver
kappa = |g| / (rho lambda_max). Predictions: r falls during training (early
quarter of the checkpoints minus late quarter > 0) and follows kappa (Spearman
correlation over checkpoints > 0), per seed.

The multi-step search is implemented here (``ascent``) rather than with
``sam_optax.sharpness.max_sharpness``, which returns the value but not the
perturbation whose direction we compare.

python -m benchmarks.claims.one_step_degrades [--quick] [--out DIR]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.claims import common as C
from sam_optax import sharpness

NAME = "one_step_degrades"
CLAIM = ("The accuracy of the single gradient step approximation for finding the worst-case "
         "perturbation may also decrease during the training process.")
PUBLISHED = ("No single source pinned down. Related: Eigen-SAM (Luo et al., NeurIPS 2024, "
             "arXiv 2501.12666): SAM's alignment with the top Hessian eigenvector is inadequate in "
             "practice; Kim et al. 2023 (arXiv 2302.10181): single- and multi-step ascent reach "
             "different solutions. Second-order reasoning: s1/s* -> g^T H g / (|g|^2 lambda_max) < "
             "1 as |g| -> 0, so the gap should track kappa = |g| / (rho lambda_max).")

RHO, MEASURE_BATCH = 0.05, 512


def settings(quick: bool) -> dict:
  if quick:
    return {"seeds": 3, "steps": 160, "every": 40, "ascent_steps": 8, "power_iters": 10}
  return {"seeds": 5, "steps": 960, "every": 60, "ascent_steps": 20, "power_iters": 20}


def tree_cos(a, b):
  dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return dot / (tree_norm(a) * tree_norm(b) + 1e-12)


def tree_norm(a):
  return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(a)))


def axpy(a, x, y):
  return jax.tree.map(lambda u, v: a * u + v, x, y)


def ascent(loss_fn, params, delta, steps):
  """Projected normalized-gradient ascent in the rho-ball from delta; returns the best
  (value, delta) seen."""
  def project(d):
    return jax.tree.map(lambda x: x * jnp.minimum(1.0, RHO / (tree_norm(d) + 1e-12)), d)

  def body(carry, _):
    d, best, best_d = carry
    value, g = jax.value_and_grad(loss_fn)(axpy(1.0, d, params))
    better = value > best
    best_d = jax.tree.map(lambda b, x: jnp.where(better, x, b), best_d, d)
    best = jnp.maximum(best, value)
    d = project(axpy(RHO / 5 / (tree_norm(g) + 1e-12), g, d))
    return (d, best, best_d), None

  d = project(delta)
  (d, best, best_d), _ = jax.lax.scan(body, (d, -jnp.inf, d), None, length=steps)
  last = loss_fn(axpy(1.0, d, params))
  return jnp.maximum(best, last), jax.tree.map(lambda b, x: jnp.where(last > best, x, b), best_d, d)


def measure(params, data, *, ascent_steps, power_iters):
  x, y = data[0][:MEASURE_BATCH], data[1][:MEASURE_BATCH]
  loss_fn = lambda p: C.ce_loss(p, (x, y))
  base, g = jax.value_and_grad(loss_fn)(params)
  g_norm = tree_norm(g)
  e1 = jax.tree.map(lambda t: RHO * t / (g_norm + 1e-12), g)
  s1 = loss_fn(axpy(1.0, e1, params)) - base
  lam, v = sharpness.hessian_top_eigenvalue(loss_fn, params, num_iters=power_iters)
  g_hat = jax.tree.map(lambda t: t / (g_norm + 1e-12), g)
  hg = sharpness.hessian_vector_product(loss_fn, params, g_hat)
  rayleigh = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_hat), jax.tree.leaves(hg)))
  rand = [jax.tree.map(lambda t, k=k: jax.random.normal(k, t.shape), params)
          for k in jax.random.split(jax.random.key(0), 2)]
  rand = [jax.tree.map(lambda t, n=tree_norm(r): RHO * t / n, r)  # noqa: B008 (n binds per r)
          for r in rand]
  starts = [e1, jax.tree.map(lambda t: RHO * t, v), jax.tree.map(lambda t: -RHO * t, v), *rand]
  stacked = jax.tree.map(lambda *ds: jnp.stack(ds), *starts)
  values, deltas = jax.vmap(lambda d: ascent(loss_fn, params, d, ascent_steps))(stacked)
  best = jnp.argmax(values)
  e_k = jax.tree.map(lambda d: d[best], deltas)
  s_k = jnp.maximum(values[best] - base, s1)
  return {"loss": base, "grad_norm": g_norm, "lambda_max": lam, "s1": s1, "sK": s_k,
          "ratio": s1 / jnp.maximum(s_k, 1e-12), "cos_one_multi": tree_cos(e1, e_k),
          "cos_one_vmax": jnp.abs(tree_cos(e1, v)), "rayleigh_ratio": rayleigh / lam,
          "kappa": g_norm / (RHO * lam)}


def run(quick: bool, out: str) -> dict:
  cfg = settings(quick)
  seeds = list(range(cfg["seeds"]))
  x_tr, y_tr, _, _ = C.mnist_images()
  perm = np.random.default_rng(0).permutation(len(y_tr))  # the first 512 are the measured batch
  data = (jnp.asarray(C.flat(x_tr[perm])), jnp.asarray(y_tr[perm]))
  idx = np.stack([C.batch_indices(np.random.default_rng(s), len(y_tr), cfg["steps"], 128)
                  for s in seeds])
  probe = functools.partial(measure, ascent_steps=cfg["ascent_steps"],
                            power_iters=cfg["power_iters"])
  _, _, m = C.fit(C.ce_loss, "sam_sgd", C.init_many(seeds, [784, 256, 256, 10]),
                  {"lr": 0.05, "rho": RHO},
                  data, idx, measure=probe, measure_every=cfg["every"])
  m = {k: np.asarray(v) for k, v in m.items()}  # (seeds, checkpoints)
  steps = np.arange(m["ratio"].shape[1]) * cfg["every"]
  q = max(1, len(steps) // 4)
  early_late = lambda a: a[:, :q].mean(1) - a[:, -q:].mean(1)
  per_seed = lambda f, a, b: np.array([f(a[i], b[i]) for i in range(len(seeds))])
  tests = [
      C.sign_test("r = s1/s_K: early quarter - late quarter", early_late(m["ratio"]),
                  what="> 0: the one-step ascent reaches less of the worst case late in training"),
      C.sign_test("Spearman(r, kappa) over checkpoints",
                  per_seed(C.spearman, m["ratio"], m["kappa"]),
                  what="> 0: r follows kappa = |g|/(rho lambda_max)"),
      C.sign_test("cos(one-step, multi-step): early - late", early_late(m["cos_one_multi"]),
                  primary=False),
      C.sign_test("Spearman(r, Rayleigh quotient of g / lambda_max)",
                  per_seed(C.spearman, m["ratio"], m["rayleigh_ratio"]), primary=False),
      C.sign_test("|cos(one-step, v_max)|: early - late", early_late(m["cos_one_vmax"]),
                  primary=False),
  ]
  figures = {"settings": cfg, "rho": RHO, "steps": steps,
             "per_checkpoint_mean": {k: v.mean(0) for k, v in m.items()},
             "per_checkpoint_std": {k: v.std(0, ddof=1) for k, v in m.items()},
             "first_checkpoint": {k: C.mean_std(v[:, 0]) for k, v in m.items()},
             "last_checkpoint": {k: C.mean_std(v[:, -1]) for k, v in m.items()}}
  return C.record(NAME, claim=CLAIM, published=PUBLISHED, protocol=C.protocol_of(__doc__),
                  tests=tests,
                  figures=figures, plots=[plot(m, steps, out)], quick=quick, seconds=0)


def plot(m: dict, steps: np.ndarray, out: str) -> str:
  plt = C.plt()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  ax = axes[0]
  for key, label in (("ratio", "r = s1 / s_K"), ("cos_one_multi", "cos(one-step, multi-step)"),
                     ("cos_one_vmax", "|cos(one-step, v_max)|"), ("rayleigh_ratio",
                                                                  "g^T H g / (|g|^2 lambda_max)")):
    mean, sd = m[key].mean(0), m[key].std(0)
    ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
  ax.set_xlabel("training step")
  ax.set_ylim(-0.05, 1.05)
  ax.set_title("one-step vs multi-step ascent (SAM training)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  ax = axes[1]
  for key, label in (("kappa", "kappa = |g| / (rho lambda_max)"), ("grad_norm", "|g|"),
                     ("lambda_max", "lambda_max"), ("loss", "training loss")):
    ax.semilogy(steps, np.exp(np.log(np.maximum(m[key], 1e-12)).mean(0)), label=label)
  ax.set_xlabel("training step")
  ax.set_title("the predicted driver (geometric mean over seeds)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  ax = axes[2]
  for i in range(len(m["ratio"])):
    ax.scatter(m["kappa"][i], m["ratio"][i], s=12, label=f"seed {i}")
  ax.set_xscale("log")
  ax.xaxis.set_minor_formatter(plt.NullFormatter())
  ax.set_xlabel("kappa")
  ax.set_ylabel("r = s1 / s_K")
  ax.set_title("r against kappa, every checkpoint")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return C.save(fig, out, NAME)


if __name__ == "__main__":
  C.script_main(NAME, run)
