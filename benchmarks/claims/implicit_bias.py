"""Claim 7: SAM's implicit bias toward flatter minima (and low-rank features).

(a) Edge of stability. Full-batch training of a tanh MLP 64-128-128-10 on 512
digits with the MSE loss on one-hot targets (Cohen et al., ICLR 2021), from a
small initialization (LeCun-scaled hidden layers, output layer x 0.15), where
the top Hessian eigenvalue starts near 11.5, below GD's and USAM's thresholds. GD, USAM
(epsilon = rho g) and SAM (epsilon = rho g/|g|) at lr eta = 0.1 and rho = 0.05;
lambda_max by 20 power iterations every 50 steps; the plateau is the median
over the last quarter of the checkpoints. Closed forms: GD 2/eta = 20; USAM is
stable while eta lambda (1 + rho lambda) <= 2, so lambda* = (sqrt(1 + 8 rho/eta)
- 1) / (2 rho) = 12.4; SAM is USAM with rho/|g|, so its threshold is the same
formula with rho replaced by rho/|g| at the measured |g| (Agarwala & Dauphin,
ICML 2023, analyse this dependence). Prediction: GD's plateau exceeds USAM's.

(b) Low-rank features (Andriushchenko, Bahri, Mobahi, Flammarion, NeurIPS
2023): a ReLU MLP 64-256-256-10 trained on digits by SGD-momentum / SAM (lr
0.05 cosine, batch 64, 1,500 steps) at rho in {0, 0.05, 0.1, 0.2, 0.4, 0.8};
feature rank = the number of principal components holding 99% of the variance
of the last hidden layer over the training set. Prediction: the rank falls as
rho grows (Spearman(rho, rank) < 0 per seed).

(c) SAM's 2-cycle on a quadratic (Bartlett, Long, Bousquet, JMLR 2023): full-
batch SAM on f(x) = x^T diag(lambda) x / 2 (10 random eigenvalues in [0.1, 1],
lambda_1 = 1, eta = 0.5, rho = 0.1) ends bouncing along the top eigenvector
with amplitude eta lambda_1 rho / (2 - eta lambda_1) (from x_{t+1} = x_t - eta
lambda (x_t + rho sign x_t)); measured amplitude within 1% of it, per seed.

python -m benchmarks.claims.implicit_bias [--quick] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.claims import common as C
from sam_optax import sharpness

NAME = "implicit_bias"
CLAIM = ("Theoretical work continues to analyze the algorithm's behavior, including its implicit "
         "bias towards flatter minima [...]")
PUBLISHED = ("Cohen et al., ICLR 2021: GD's lambda_max settles at 2/eta (edge of stability); for "
             "USAM the same argument gives (sqrt(1 + 8 rho/eta) - 1)/(2 rho) = 12.4 at eta 0.1, "
             "rho 0.05 (vs 20 for GD); Agarwala & Dauphin, ICML 2023 (arXiv 2302.08692): SAM's "
             "edge of stability depends on the gradient norm; Andriushchenko et al., NeurIPS 2023 "
             "(arXiv 2305.16292): SAM reduces the feature rank; Bartlett, Long, Bousquet, JMLR "
             "2023 (arXiv 2210.01513): SAM's 2-cycle along the top eigenvector.")

ETA, RHO_EOS, N_EOS = 0.1, 0.05, 512
RHOS_RANK = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)


def settings(quick: bool) -> dict:
  if quick:
    return {"seeds": 3, "eos_steps": 300, "eos_every": 50, "rank_steps": 200,
            "rank_rhos": [0.0, 0.2, 0.8],
            "quad_steps": 500}
  return {"seeds": 5, "eos_steps": 2500, "eos_every": 50, "rank_steps": 1500,
          "rank_rhos": list(RHOS_RANK),
          "quad_steps": 2000}


def usam_threshold(rho):
  return (np.sqrt(1 + 8 * rho / ETA) - 1) / (2 * rho)


def mse_loss(params, batch):
  x, y = batch
  return 0.5 * jnp.mean(jnp.sum((C.mlp_apply(params, x, jnp.tanh) - y) ** 2, -1))


def eos_measure(params, data):
  loss_fn = lambda p: mse_loss(p, data)
  lam, _ = sharpness.hessian_top_eigenvalue(loss_fn, params, num_iters=20)
  g = jax.grad(loss_fn)(params)
  return {"lambda_max": lam, "grad_norm": jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(g))),
          "loss": loss_fn(params)}


def edge_of_stability(cfg, seeds):
  x_tr, y_tr, _, _ = C.digits_images()
  data = (jnp.asarray(C.flat(x_tr[:N_EOS])), jax.nn.one_hot(jnp.asarray(y_tr[:N_EOS]), 10))
  params0 = C.init_many(seeds, [64, 128, 128, 10])
  params0 = [{"w": layer["w"] * (np.sqrt(0.5) if i < 2 else 0.15), "b": layer["b"]}
             for i, layer in enumerate(params0)]
  idx = np.broadcast_to(np.arange(N_EOS, dtype=np.int32), (len(seeds), cfg["eos_steps"], N_EOS))
  res = {}
  for name, opt in (("gd", "gd"), ("usam", "usam_gd"), ("sam", "sam_gd")):
    _, _, m = C.fit(mse_loss, opt, params0, {"lr": ETA, "rho": RHO_EOS}, data, idx,
                    measure=eos_measure,
                    measure_every=cfg["eos_every"])
    res[name] = {k: np.asarray(v) for k, v in m.items()}
  g = res["sam"]["grad_norm"]
  res["sam"]["predicted"] = usam_threshold(RHO_EOS / np.maximum(g, 1e-12))
  return res


def plateau(a):
  return np.median(a[:, -max(1, a.shape[1] // 4):], axis=1)


def feature_rank(features, share=0.99):
  f = features - features.mean(0)
  s = np.linalg.svd(f, compute_uv=False) ** 2
  return int(np.searchsorted(np.cumsum(s) / s.sum(), share) + 1)


def feature_ranks(cfg, seeds):
  x_tr, y_tr, x_te, y_te = C.digits_images()
  data = (jnp.asarray(C.flat(x_tr)), jnp.asarray(y_tr))
  rhos = cfg["rank_rhos"]
  combos = [(r, s) for r in rhos for s in seeds]
  params0 = C.tile(C.init_many(seeds, [64, 256, 256, 10]), len(rhos))
  idx = np.stack([C.batch_indices(np.random.default_rng(s), len(y_tr), cfg["rank_steps"], 64)
                  for (_, s) in combos])
  params, _ = C.fit(C.ce_loss, "sam_sgd", params0, {"lr": 0.05, "rho": [r for r, _ in combos]},
                    data, idx)
  feats = np.asarray(jax.jit(jax.vmap(lambda p: C.mlp_features(p, data[0])))(params))
  ranks = np.array([feature_rank(f) for f in feats]).reshape(len(rhos), len(seeds)).T
  acc = C.accuracy(params, x_te, y_te).reshape(len(rhos), len(seeds)).T
  return ranks, acc  # (seeds, rhos)


def quadratic_cycle(cfg, seeds, eta=0.5, rho=0.1):
  out = []
  for s in seeds:
    rng = np.random.default_rng(s)
    lam = np.concatenate([[1.0], rng.uniform(0.1, 0.9, 9)])
    x = rng.normal(size=10)
    tail = []
    for t in range(cfg["quad_steps"]):
      g = lam * x
      x = x - eta * lam * (x + rho * g / np.linalg.norm(g))
      if t >= cfg["quad_steps"] - 100:
        tail.append(x.copy())
    tail = np.array(tail)
    out.append({"amplitude": float(np.abs(tail[:, 0]).mean()),
                "others": float(np.abs(tail[:, 1:]).max()),
                "predicted": eta * lam[0] * rho / (2 - eta * lam[0]),
                "alternates": bool(np.all(np.sign(tail[1:, 0]) != np.sign(tail[:-1, 0])))})
  return out


def run(quick: bool, out: str) -> dict:
  cfg = settings(quick)
  seeds = list(range(cfg["seeds"]))
  eos = edge_of_stability(cfg, seeds)
  pl = {k: plateau(v["lambda_max"]) for k, v in eos.items()}
  sam_pred = plateau(eos["sam"]["predicted"])
  ranks, acc = feature_ranks(cfg, seeds)
  rhos = cfg["rank_rhos"]
  quad = quadratic_cycle(cfg, seeds)
  rel = lambda a, b: np.abs(np.asarray(a) / np.asarray(b) - 1)
  tests = [
      C.sign_test("EoS: GD plateau - USAM plateau of lambda_max", pl["gd"] - pl["usam"],
                  what="> 0: USAM settles flatter"),
      C.sign_test("feature rank: Spearman(rho, rank)", [C.spearman(rhos, r) for r in ranks],
                  predicted="-", what="< 0: the rank falls as rho grows"),
      C.sign_test("quadratic: |amplitude / (eta lambda rho / (2 - eta lambda)) - 1| - 0.01",
                  rel([q["amplitude"] for q in quad], [q["predicted"] for q in quad]) - 0.01,
                  predicted="-", what="< 0: within 1% of the closed form"),
      C.sign_test("EoS: |GD plateau / (2/eta) - 1| - 0.1", rel(pl["gd"], 2 / ETA) - 0.1,
                  predicted="-",
                  primary=False, what="< 0: within 10% of 2/eta"),
      C.sign_test("EoS: |USAM plateau / closed form - 1| - 0.1",
                  rel(pl["usam"], usam_threshold(RHO_EOS)) - 0.1,
                  predicted="-", primary=False),
      C.sign_test("EoS: |SAM plateau / closed form at measured |g| - 1| - 0.1",
                  rel(pl["sam"], sam_pred) - 0.1,
                  predicted="-", primary=False),
      C.sign_test("EoS: USAM plateau - SAM plateau", pl["usam"] - pl["sam"], primary=False),
      C.sign_test(f"feature rank: rho=0 minus rho={rhos[-2]}", ranks[:, 0] - ranks[:, -2],
                  primary=False),
  ]
  closed_form = {"gd": 2 / ETA, "usam": float(usam_threshold(RHO_EOS)),
                 "sam_at_measured_grad_norm": C.mean_std(sam_pred)}
  figures = {"settings": cfg,
             "edge_of_stability": {"eta": ETA, "rho": RHO_EOS,
                                   "plateau": {k: C.mean_std(v) for k, v in pl.items()},
                                   "closed_form": closed_form,
                                   "final_loss": {k: C.mean_std(v["loss"][:, -1])
                                                  for k, v in eos.items()}},
             "feature_rank": {str(r): C.mean_std(ranks[:, i]) for i, r in enumerate(rhos)},
             "feature_rank_test_accuracy": {str(r): C.mean_std(acc[:, i])
                                            for i, r in enumerate(rhos)},
             "quadratic_cycle": quad}
  return C.record(NAME, claim=CLAIM, published=PUBLISHED, protocol=C.protocol_of(__doc__),
                  tests=tests,
                  figures=figures, plots=[plot(eos, ranks, acc, cfg, out)], quick=quick, seconds=0)


def plot(eos, ranks, acc, cfg, out):
  plt = C.plt()
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
  steps = np.arange(eos["gd"]["lambda_max"].shape[1]) * cfg["eos_every"]
  for j, (name, m) in enumerate(eos.items()):
    lam = m["lambda_max"]
    a1.plot(steps, lam.mean(0), color=f"C{j}", label=f"{name.upper()} lambda_max")
    a1.fill_between(steps, lam.min(0), lam.max(0), color=f"C{j}", alpha=0.2)
  a1.axhline(2 / ETA, color="C0", ls="--", lw=1, label="2/eta")
  a1.axhline(usam_threshold(RHO_EOS), color="C1", ls="--", lw=1, label="USAM closed form")
  a1.plot(steps[1:], np.median(eos["sam"]["predicted"], 0)[1:], color="C2", ls="--", lw=1,
          label="SAM closed form at measured |g|")
  a1.set_ylim(0, 2.6 / ETA)
  a1.set_xlabel("full-batch step")
  a1.set_ylabel("top Hessian eigenvalue")
  a1.set_title(f"edge of stability, eta={ETA}, rho={RHO_EOS}")
  a1.legend(fontsize=7)
  a1.grid(alpha=0.3)
  xs = np.array(cfg["rank_rhos"])
  xpos = np.arange(len(xs))
  a2.errorbar(xpos, ranks.mean(0), yerr=ranks.std(0, ddof=1), marker="o", capsize=3, color="C3",
              label="feature rank (99% variance)")
  a2.set_xticks(xpos, [f"{r:g}" for r in xs])
  a2.set_xlabel("rho (SAM; 0 = SGD)")
  a2.set_ylabel("principal components", color="C3")
  a3 = a2.twinx()
  a3.errorbar(xpos, acc.mean(0), yerr=acc.std(0, ddof=1), marker="s", capsize=3, color="C7",
              label="test accuracy")
  a3.set_ylabel("test accuracy (%)", color="C7")
  a2.set_title("last hidden layer's rank, digits MLP")
  a2.grid(alpha=0.3)
  a2.legend(loc="upper right", fontsize=7)
  a3.legend(loc="lower left", fontsize=7)
  return C.save(fig, out, NAME)


if __name__ == "__main__":
  C.script_main(NAME, run)
