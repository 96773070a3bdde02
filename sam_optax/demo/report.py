"""What the demo reports: dead units and the stall notes (why a run did not train and what to
change), the table, the per-epoch records and the figure."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROBE = 512  # training images on which dead units are counted


def dead_units(state, x) -> Callable:
  """``measure(params, batch_stats) -> {layer: dead fraction}``: the share of each sown
  activation's units that are inactive on all of ``x[:PROBE]`` (BatchNorm with the probe's
  batch statistics, as a training step sees it; dropout comes after the sown values)."""
  from sam_optax.diagnostics import linen_dead_unit_fractions
  probe = jnp.asarray(x[:PROBE])
  has_stats = state.batch_stats is not None

  @jax.jit
  def measure(params, batch_stats):
    variables = {"params": params, **({"batch_stats": batch_stats} if has_stats else {})}
    return linen_dead_unit_fractions(state.apply_fn, variables, probe, capture=False, train=True,
                                     mutable=("batch_stats",) if has_stats else (),
                                     rngs={"dropout": jax.random.key(0)})

  return measure


def worst_layer(fractions: dict) -> tuple[str, float]:
  """The layer with the largest dead fraction, or ("", 0) for a model that sows nothing."""
  if not fractions:
    return "", 0.0
  name = max(fractions, key=lambda k: float(fractions[k]))
  return name, float(fractions[name])


# a run whose test accuracy stays below twice chance (20% of 10 classes) is stalled
CHANCE_FACTOR = 2.0
LOSS_NEAR_UNIFORM = 0.97  # ... or whose epoch's training loss is above 0.97 ln(classes)
DEAD_CAUSE = 0.5  # the cause is named "dead units" when at least half a layer's units are inactive


def stall_report(name: str, seed: int, run: Any, rho: float, num_classes: int = 10) -> str | None:
  """A note when a run stalled (test accuracy near chance or the training loss near
  ln(classes) in its last epoch) or started at chance and recovered late; it names the
  measured cause (dead units: the share of the worst layer's units inactive on the whole
  probe, see :mod:`sam_optax.diagnostics`) and the fixes. None for a run that trained."""
  chance = 1.0 / num_classes
  uniform = float(np.log(num_classes))
  accs = np.asarray(run.accs)
  loss = run.history.get("loss")
  trained = accs >= CHANCE_FACTOR * chance
  last_loss_flat = loss is not None and loss[-1] >= LOSS_NEAR_UNIFORM * uniform
  if trained[-1] and not last_loss_flat:
    if trained[0]:
      return None
    late = int(np.argmax(trained))  # epochs at chance before it left
    what = (f"started at chance: test accuracy {100 * accs[0]:.1f}% after epoch 1, above "
            f"{100 * CHANCE_FACTOR * chance:.0f}% only from epoch {late + 1}")
    # per-layer figures are kept for the final state only
    dead, layer = run.history["dead_units"][0], "a"
  else:
    what = (f"stalled: test accuracy {100 * accs[-1]:.1f}% after {len(accs)} epochs (chance: "
            f"{100 * chance:.0f}%)")
    if loss is not None:
      what += f", training loss {loss[-1]:.3f} in the last epoch (ln {num_classes} = {uniform:.3f})"
    dead, layer = run.history["dead_units"][-1], worst_layer(run.dead_layers or {})[0]
    layer = f"the `{layer}`" if layer else "a"
  fixes = (f"Fixes: a smaller --rho (this run: {rho:g}); a short plain-SGD start, e.g. a rho "
           "warm-up `sharpness_aware(rho=optax.linear_schedule(0.0, rho, steps))`")
  if dead >= DEAD_CAUSE:
    cause = (f"Cause: dead units, {100 * dead:.0f}% of {layer} layer's units inactive on all "
             f"{PROBE} probe images (a ReLU that never fires passes no gradient, and the output "
             "stops depending on the input).")
    fixes += "; a normalized layer before the activation (the CNN's default head, --head bn)."
  else:
    cause = (f"Cause: not dead units (at most {100 * dead:.0f}% of a layer's units inactive); the "
             "perturbation may dominate the small early gradients.")
    fixes += "."
  wrap = lambda text, first: textwrap.fill(text, 100, initial_indent=first,
                                           subsequent_indent="    ")
  return "\n".join([wrap(f"{name}, seed {seed + 1}: {what}.", "! "), wrap(cause, "  "),
                    wrap(fixes, "  ")])


DEAD_UNIT_NOTE = (f"³ the largest share of a layer's units inactive on all of {PROBE} training "
                  "images\n  (sam_optax.diagnostics), after epoch 1 -> after the last epoch, "
                  "mean over seeds.")


def dead_unit_cell(name: str, runs: list, rho: float) -> tuple[str, list[str]]:
  """The table's dead-unit cell of one optimizer (after epoch 1 -> after the last epoch, mean
  over seeds; ``!`` when a run stalled) and the stall notes of its runs."""
  first = np.mean([r.history["dead_units"][0] for r in runs]) * 100
  last = np.mean([r.history["dead_units"][-1] for r in runs]) * 100
  reports = [stall_report(name, seed, r, rho) for seed, r in enumerate(runs)]
  flag = " !" if any(reports) else ""
  return f"{f'{first:.0f}% -> {last:.0f}%':>15}{flag:<2}", [m for m in reports if m]


def print_table(args, results) -> None:
  """The table of final and best test accuracy, time, sharpness and dead units per
  optimizer (mean ± std over seeds), its notes, and why a run did not train."""
  import jax
  head = f" ({args.head} head)" if args.model == "cnn" else ""
  print(f"\n{args.dataset}, {args.model}{head}, label noise {args.label_noise:.0%}, {args.epochs} "
        f"epochs, {args.seeds} seeds, rho={args.rho}, backend={jax.default_backend()}")
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
                 "  mode: top Hessian eigenvalue (20 power iterations) and the largest L(w+e) - "
                 "L(w)\n  over |e| <= 0.05 (5 projected ascent steps).")
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


PANELS = (("test_accuracy", "test accuracy (%)", 100.0,
           "{dataset}, {noise:.0%} label noise; band: ±1 std over seeds"),
          ("sharpness", "sharpness estimate L(w+ε) − L(w)", 1.0,
           "one-step sharpness (epoch mean over steps)"),
          ("cosine", "cos(g, g_adv)", 1.0, "gradient vs perturbed gradient (epoch mean)"))


def _curves(runs, key):
  curves = [r.accs if key == "test_accuracy" else r.history.get(key) for r in runs]
  return None if any(c is None for c in curves) else np.array(curves)


def figure(args, results, plt):
  """Test accuracy, the one-step sharpness estimate L(w+eps) - L(w) and cos(g, g_adv) per
  epoch for every optimizer (mean over seeds, band = ±1 std, as in the table). A panel whose
  quantity no optimizer recorded (SGD alone has no second pass) is left out."""
  shown = [p for p in PANELS if any(_curves(runs, p[0]) is not None for runs in results.values())]
  fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
  for ax, (key, label, factor, title) in zip(axes[0], shown, strict=True):
    for i, (name, runs) in enumerate(results.items()):
      curves = _curves(runs, key)
      if curves is None:
        continue  # this optimizer has no second pass: nothing to show
      curves = curves * factor
      epochs = np.arange(1, curves.shape[1] + 1)
      mean, std = curves.mean(0), curves.std(0)
      color = f"C{i}"  # one colour per optimizer in every panel
      ax.plot(epochs, mean, label=f"{name} (mean of {len(runs)} seeds)", color=color)
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=color)
    if key == "test_accuracy":
      ax.axhline(10, color="gray", linestyle=":", linewidth=1, label="chance (10 classes)")
      ax.set_ylim(0, 100)  # the full range: a zoomed axis would exaggerate small gaps
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_title(title.format(dataset=args.dataset, noise=args.label_noise), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  return fig


def panels_without_data(fig) -> list[str]:
  """The titles (or y labels) of the figure's panels that draw no finite point."""
  empty = []
  for ax in fig.axes:
    ys = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
    if not any(np.isfinite(y).any() for y in ys if y.size > 1):
      empty.append(ax.get_ylabel() or ax.get_title())
  return empty


def plot(args, results, plt) -> str:
  """Writes :func:`figure` to ``args.out/test_accuracy.png``; returns the path. A panel
  without data is an error (the demo's figure must show what it says it shows)."""
  fig = figure(args, results, plt)
  empty = panels_without_data(fig)
  if empty:
    raise RuntimeError(f"the demo's figure has panels without data: {empty}")
  path = os.path.join(args.out, "test_accuracy.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
