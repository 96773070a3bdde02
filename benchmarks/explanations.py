"""Two measured explanations for the guides (figures in ARCHIVE.md).

  python -m benchmarks.explanations [--only lambda_max,looksam] [--seeds 2] [--lambda-seeds 1]

1. ``lambda_max``: why SAM's final solution on MNIST-5k can have the larger top Hessian
   eigenvalue while its adaptive sharpness is lower. The demo's CNN with the head it had
   when issue 20 measured it (``sam_optax.demo.make_model("cnn", head="relu")``: BatchNorm
   after both convolutions, a bare ``Dense(64)`` + ReLU head), MNIST-5k with 40% label
   noise, the demo's SGD
   (momentum 0.9, lr 0.05 cosine, batch 64, no weight decay) and SAM (ρ = 0.05),
   ``--epochs`` epochs. For each final solution: λ_max (20 power iterations), adaptive
   sharpness (``max_sharpness`` with ASAM's geometry, ρ = 0.1) and L2 max-sharpness
   (ρ = 0.05) of the training loss on 512 training images (BatchNorm in inference mode);
   the norms of the kernels that feed a BatchNorm; and λ_max again after each such kernel
   is rescaled to unit norm, which leaves the network's function (checked: the loss is
   unchanged) and its adaptive sharpness as they are: a kernel in front of BatchNorm is
   scale-invariant, and the Hessian along it scales as 1/‖w‖².
2. ``looksam``: why LookSAM (α = 0.7) is unstable on the demo's CNN at 40% noise on digits.
   LookSAM adds α‖g‖ · g_v/‖g_v‖ to every reuse step, a push of fixed size α‖g‖ along a
   direction measured up to k − 1 steps earlier; SAM's own correction, ‖g_adv − g‖, is
   measured here (SAM with ``telemetry="full"``) along SAM's run. Then LookSAM at α in
   {0.7, 0.3, 0.1} against SAM and SGD, ``--seeds`` seeds, final test accuracy.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax as so
from sam_optax import flax as ft
from sam_optax import sharpness
from sam_optax.datasets import load_digits, load_mnist5k
from sam_optax.demo.models import make_model
from sam_optax.demo.recipes import DEFAULT_RHO
from sam_optax.demo.train import train_one

BN_KERNELS = ("Conv_0", "Conv_1")  # each feeds a BatchNorm in the demo's CNN (relu head)


def _sgd(steps):
  return optax.sgd(optax.cosine_decay_schedule(0.05, steps), momentum=0.9)


def _loss(state, x, y, batch_stats=None):
  stats = state.batch_stats if batch_stats is None else batch_stats

  def loss_fn(p):
    v = {"params": p, "batch_stats": stats}
    return ft.softmax_cross_entropy(state.apply_fn(v, x, train=False), y)
  return loss_fn


def _unit_kernels(params, batch_stats):
  """The same function with each BN-fed layer's kernel at unit norm: kernel and bias scaled by
  c = 1/||kernel||, the BatchNorm's running mean by c and its running variance by c^2 (exact up
  to BatchNorm's epsilon)."""
  p, bs = dict(params), dict(batch_stats)
  for i, k in enumerate(BN_KERNELS):
    c = 1.0 / jnp.linalg.norm(params[k]["kernel"])
    p[k] = {name: c * v for name, v in params[k].items()}
    stats = batch_stats[f"BatchNorm_{i}"]
    bs[f"BatchNorm_{i}"] = {"mean": c * stats["mean"], "var": c * c * stats["var"]}
  return p, bs


def lambda_max(epochs: int, seeds: int) -> None:
  data = load_mnist5k(0, 0.4)
  x, y = jnp.asarray(data[0][:512]), jnp.asarray(data[1][:512])
  spe = len(data[1]) // 64
  n = epochs * spe
  txs = {"sgd": lambda: _sgd(n), "sam": lambda: so.sam(_sgd(n), 0.05)}
  print(f"\n## lambda_max: MNIST-5k, 40% noise, demo CNN (relu head), {epochs} epochs\n")
  print("| optimizer | seed | final test acc | λ_max | adaptive sharpness (ρ=0.1) | L2 "
        "max-sharpness (ρ=0.05) | ‖w‖ of the BN-fed kernels | the same, those kernels at unit "
        "norm: λ_max / adaptive / L2 |")
  print("|---|---|---|---|---|---|---|---|")
  for seed in range(seeds):
    for name, tx in txs.items():
      run = train_one(make_model("cnn", head="relu"), tx, data, epochs=epochs, batch_size=64,
                      seed=seed,
                           with_sharpness=False, log=lambda *_: None)
      state = run.state
      p = state.params
      unit, unit_stats = _unit_kernels(p, state.batch_stats)
      same = abs(float(_loss(state, x, y, unit_stats)(unit)) - float(_loss(state, x, y)(p)))

      def measure(p, stats):
        loss_fn = _loss(state, x, y, stats)
        lam, _ = sharpness.hessian_top_eigenvalue(loss_fn, p, num_iters=20, unroll=True)
        ada = sharpness.max_sharpness(loss_fn, p, 0.1, perturbation=so.adaptive(), steps=5,
                                      unroll=True)
        l2 = sharpness.max_sharpness(loss_fn, p, 0.05, steps=5, unroll=True)
        return lam, ada, l2

      measure = jax.jit(measure)
      lam, ada, l2 = (float(v) for v in measure(p, state.batch_stats))
      lam_u, ada_u, l2_u = (float(v) for v in measure(unit, unit_stats))
      norms = "/".join(f"{float(jnp.linalg.norm(p[k]['kernel'])):.2f}" for k in BN_KERNELS)
      print(f"| {name} | {seed} | {100 * run.accs[-1]:.2f} | {lam:.2f} | {ada:.4f} | {l2:.4f} | "
            f"{norms} | {lam_u:.2f} / {ada_u:.4f} / {l2_u:.4f} (loss moved "
            f"{same:.1e}) |", flush=True)


def looksam(epochs: int, seeds: int) -> None:
  data_of = lambda s: load_digits(s, 0.4)
  spe = len(data_of(0)[1]) // 64
  n = epochs * spe
  rho = DEFAULT_RHO["digits"]
  print(f"\n## LookSAM: digits, 40% noise, demo CNN, ρ = {rho}, {epochs} epochs\n")
  # SAM's own correction along its run, from its telemetry (cosine recorded with "full")
  run = train_one(make_model("cnn"),
                       lambda: optax.chain(so.sharpness_aware(rho, telemetry="full"), _sgd(n)),
                       data_of(0), epochs=epochs, batch_size=64, seed=0, with_sharpness=False,
                       log=lambda *_: None)
  h = run.history
  g, ga, cos = (np.asarray(h[k]) for k in ("clean_grad_norm", "perturbed_grad_norm", "cosine"))
  rel = np.sqrt(np.maximum(g ** 2 + ga ** 2 - 2 * cos * g * ga, 0)) / np.maximum(g, 1e-12)
  print("SAM's correction ‖g_adv − g‖ / ‖g‖ (epoch means of the per-step norms and cosine), epochs "
        "1, 2, 5, 10, last: "
        + ", ".join(f"{rel[i]:.2f}" for i in (0, 1, 4, 9, epochs - 1) if i < epochs)
        + "; LookSAM's push on a reuse step is α = 0.7 by construction\n")
  txs = {"sgd": lambda: _sgd(n), "sam": lambda: so.sam(_sgd(n), rho)}
  for a in (0.7, 0.3, 0.1):
    txs[f"looksam α={a}"] = (lambda a=a: optax.chain(so.looksam(rho, k=5, alpha=a), _sgd(n)))
  print("| optimizer | final test acc per seed | mean | best epoch (mean) |")
  print("|---|---|---|---|")
  for name, tx in txs.items():
    accs, best = [], []
    for seed in range(seeds):
      r = train_one(make_model("cnn"), tx, data_of(seed), epochs=epochs, batch_size=64,
                         seed=seed, with_sharpness=False, log=lambda *_: None)
      accs.append(100 * r.accs[-1])
      best.append(100 * max(r.accs))
    print(f"| {name} | {', '.join(f'{a:.2f}' for a in accs)} | {np.mean(accs):.2f} | "
          f"{np.mean(best):.2f} |", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default="lambda_max,looksam")
  ap.add_argument("--epochs", type=int, default=25, help="lambda_max's epochs (MNIST-5k)")
  ap.add_argument("--looksam-epochs", type=int, default=25)
  ap.add_argument("--seeds", type=int, default=2, help="LookSAM's seeds")
  ap.add_argument("--lambda-seeds", type=int, default=1)
  args = ap.parse_args()
  t0 = time.perf_counter()
  print(f"# jax {jax.__version__} {jax.default_backend()}, {time.strftime('%Y-%m-%d')}")
  if "lambda_max" in args.only:
    lambda_max(args.epochs, args.lambda_seeds)
  if "looksam" in args.only:
    looksam(args.looksam_epochs, args.seeds)
  print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
