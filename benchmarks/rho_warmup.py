"""Does a rho warm-up remove the stall that a too-large rho causes at the start of training?

  python benchmarks/rho_warmup.py [--seeds 3] [--epochs 20] [--rho 0.2] [--warmup-epochs 5]

The setting of accuracy.py's rho sweep (the demo's BatchNorm CNN on digits, 40% label
noise, SGD + momentum 0.9, lr 0.05 cosine, batch 64), where SAM with rho = 0.2 stalls:
SAM with a constant rho against SAM whose rho rises linearly from 0 over the first
--warmup-epochs (``sharpness_aware(rho=optax.linear_schedule(0, rho, steps))``).
Prints the final test accuracy, mean ± std over seeds, and the share of runs stuck at
chance level (test accuracy < 20%).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import sam_optax as so
from sam_optax.datasets import load_digits
from sam_optax.demo.models import make_model
from sam_optax.demo.train import train_one


def main():
  ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--epochs", type=int, default=20)
  ap.add_argument("--rho", type=float, default=0.2)
  ap.add_argument("--warmup-epochs", type=int, default=5)
  ap.add_argument("--noise", type=float, default=0.4)
  args = ap.parse_args()
  steps_per_epoch = 1203 // 64
  steps = args.epochs * steps_per_epoch
  sched = optax.cosine_decay_schedule(0.05, steps)
  sgd = lambda: optax.sgd(sched, momentum=0.9)
  warm = optax.linear_schedule(0.0, args.rho, args.warmup_epochs * steps_per_epoch)
  table = {
      f"sam rho={args.rho}": lambda: so.sam(sgd(), args.rho),
      f"sam rho=0->{args.rho} over {args.warmup_epochs} epochs": lambda: so.sam(sgd(), warm),
  }
  print(f"# digits CNN, {args.noise:.0%} noise, {args.epochs} epochs, {args.seeds} seeds, "
        f"jax {jax.__version__}, {jax.default_backend()}, {time.strftime('%Y-%m-%d')}")
  model = make_model("cnn", head="relu")  # the head of the committed runs (the demo now uses "bn")
  print("| optimizer | test accuracy | runs stuck at chance |\n|---|---|---|")
  for name, make_opt in table.items():
    accs = []
    for seed in range(args.seeds):
      data = load_digits(seed, args.noise)
      run = train_one(model, make_opt, data, epochs=args.epochs, batch_size=64, seed=seed,
                           with_sharpness=False)
      accs.append(100 * run.accs[-1])
    stuck = sum(a < 20 for a in accs)
    print(f"| {name} | {np.mean(accs):.2f} ± {np.std(accs):.2f} | {stuck} of {len(accs)} |",
          flush=True)


if __name__ == "__main__":
  main()
