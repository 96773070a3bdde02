"""Does a short plain-SGD start (late-phase SAM) remove SAM's stall at a large rho?

  python benchmarks/late_phase_stall.py [--rho 0.2] [--epochs 2] [--starts 20,62] [--seeds 1]

The demo's CNN with the unnormalized ReLU head (``demo.make_model("cnn", head="relu")``, the
head that dies under SAM: ARCHIVE.md, "Dead units") on MNIST-5k with 40% symmetric label noise,
SGD + momentum 0.9, lr 0.05 cosine over 10 epochs (the demo's ``--epochs 10`` schedule), batch
64 (62 steps an epoch). Rows: SGD, SAM at rho, and ``late_phase(sharpness_aware(rho),
start_step=s)`` for each s in --starts (plain SGD steps first). Prints the test accuracy and
the mean training loss of each epoch, the share of dead head units after the last one, the
share of steps that ran the second pass, and the train seconds (gated_jit on CPU, so the
plain steps run one pass).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from sam_optax._src.methods.late_phase import late_phase
from sam_optax._src.methods.sam import sharpness_aware
from sam_optax.datasets import load_mnist5k
from sam_optax.demo.models import make_model
from sam_optax.demo.train import train_one

STEPS_PER_EPOCH = 4000 // 64


def main():
  ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--rho", type=float, default=0.2)
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--schedule-epochs", type=int, default=10)
  ap.add_argument("--starts", default="20,62", help="comma-separated start steps of late_phase")
  ap.add_argument("--seeds", type=int, default=1)
  ap.add_argument("--noise", type=float, default=0.4)
  args = ap.parse_args()
  sched = optax.cosine_decay_schedule(0.05, args.schedule_epochs * STEPS_PER_EPOCH)
  sgd = lambda: optax.sgd(sched, momentum=0.9)
  table = {"sgd": sgd, f"sam rho={args.rho}": lambda: optax.chain(sharpness_aware(args.rho), sgd())}
  for s in (int(v) for v in args.starts.split(",") if v):
    table[f"late_phase(sam {args.rho}, start_step={s})"] = (
        lambda s=s: optax.chain(late_phase(sharpness_aware(args.rho), s), sgd()))
  print(f"# mnist5k CNN (relu head), {args.noise:.0%} noise, {args.epochs} epochs of a "
        f"{args.schedule_epochs}-epoch schedule, jax {jax.__version__}, {jax.default_backend()}, "
        f"{time.strftime('%Y-%m-%d')}")
  cols = " | ".join(f"ep {e + 1}: acc / loss" for e in range(args.epochs))
  print(f"| optimizer | seed | {cols} | dead head units | SAM steps | train s |")
  print("|---|---|" + "---|" * args.epochs + "---|---|---|")
  model = make_model("cnn", head="relu")
  for name, make_opt in table.items():
    for seed in range(args.seeds):
      data = load_mnist5k(seed, args.noise)
      t0 = time.perf_counter()
      run = train_one(model, make_opt, data, epochs=args.epochs, batch_size=64, seed=seed,
                           with_sharpness=False)
      wall = time.perf_counter() - t0
      loss = run.history["loss"]
      eps = " | ".join(f"{100 * a:.1f} / {loss[e]:.3f}" for e, a in enumerate(run.accs))
      sam_steps = run.history.get("sam_step")
      frac = "" if sam_steps is None else f"{np.mean(sam_steps):.2f}"
      if name.startswith("sam"):
        frac = "1.00"
      elif name == "sgd":
        frac = "0.00"
      print(f"| {name} | {seed} | {eps} | {100 * run.history['dead_units'][-1]:.0f}% | {frac} | "
            f"{wall:.1f} |", flush=True)


if __name__ == "__main__":
  main()
