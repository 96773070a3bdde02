"""The demo's dead-unit measure and its stall notes: why a run did not train and what to change.

Kept apart from :mod:`sam_optax.demo` (the training loop and the table) so that each stays short;
the demo re-exports these names.
"""

from __future__ import annotations

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


def _worst(fractions: dict) -> tuple[str, float]:
  """The layer with the largest dead fraction, or ("", 0) for a model that sows nothing."""
  if not fractions:
    return "", 0.0
  name = max(fractions, key=lambda k: float(fractions[k]))
  return name, float(fractions[name])


CHANCE_FACTOR = 2.0  # a run whose test accuracy stays below twice chance (20% of 10 classes) is stalled
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
    dead, layer = run.history["dead_units"][0], "a"  # per-layer figures are kept for the final state only
  else:
    what = (f"stalled: test accuracy {100 * accs[-1]:.1f}% after {len(accs)} epochs (chance: "
            f"{100 * chance:.0f}%)")
    if loss is not None:
      what += f", training loss {loss[-1]:.3f} in the last epoch (ln {num_classes} = {uniform:.3f})"
    dead, layer = run.history["dead_units"][-1], _worst(run.dead_layers or {})[0]
    layer = f"the `{layer}`" if layer else "a"
  fixes = (f"Fixes: a smaller --rho (this run: {rho:g}); a short plain-SGD start, e.g. a rho warm-up "
           "`sharpness_aware(rho=optax.linear_schedule(0.0, rho, steps))`")
  if dead >= DEAD_CAUSE:
    cause = (f"Cause: dead units, {100 * dead:.0f}% of {layer} layer's units inactive on all "
             f"{PROBE} probe images (a ReLU that never fires passes no gradient, and the output "
             "stops depending on the input).")
    fixes += "; a normalized layer before the activation (the CNN's default head, --head bn)."
  else:
    cause = (f"Cause: not dead units (at most {100 * dead:.0f}% of a layer's units inactive); the "
             "perturbation may dominate the small early gradients.")
    fixes += "."
  wrap = lambda text, first: textwrap.fill(text, 100, initial_indent=first, subsequent_indent="    ")
  return "\n".join([wrap(f"{name}, seed {seed + 1}: {what}.", "! "), wrap(cause, "  "), wrap(fixes, "  ")])


DEAD_UNIT_NOTE = (f"³ the largest share of a layer's units inactive on all of {PROBE} training images\n"
                  "  (sam_optax.diagnostics), after epoch 1 -> after the last epoch, mean over seeds.")


def dead_unit_cell(name: str, runs: list, rho: float) -> tuple[str, list[str]]:
  """The table's dead-unit cell of one optimizer (after epoch 1 -> after the last epoch, mean
  over seeds; ``!`` when a run stalled) and the stall notes of its runs."""
  first = np.mean([r.history["dead_units"][0] for r in runs]) * 100
  last = np.mean([r.history["dead_units"][-1] for r in runs]) * 100
  reports = [stall_report(name, seed, r, rho) for seed, r in enumerate(runs)]
  flag = " !" if any(reports) else ""
  return f"{f'{first:.0f}% -> {last:.0f}%':>15}{flag:<2}", [m for m in reports if m]
