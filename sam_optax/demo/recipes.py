"""The demo's optimizers by name, and the train step each needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

import sam_optax as so
from sam_optax import flax as ft

# SAM's radius per dataset. With the unnormalized ReLU head of earlier versions, rho = 0.1 on
# mnist5k at 40% noise killed the head (0% of its units live after epoch 1) and SAM, ESAM and
# SAMPa stayed at chance, hence 0.05 there. With the BatchNorm head both train (after epoch 1,
# benchmarks/dead_units.py: SAM 89.0% at 0.05, 87.7% at 0.1); 0.05, the SAM paper's usual value,
# is kept for the 28x28 sets.
DEFAULT_RHO = {"digits": 0.1, "mnist5k": 0.05, "fashion_mnist": 0.05}


class Recipe(NamedTuple):
  """An optimizer whose train step is not the standard SAM step: ``kind`` picks the
  :mod:`sam_optax.flax` step (``sampa``, ``esam``, ``saf``, ``mesa``) and
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
      # telemetry="full": the figure's third panel plots cos(g, g_adv), which SAM's default
      # telemetry leaves out (it would keep g alive through the second pass)
      "sam": lambda: optax.chain(so.sharpness_aware(rho, telemetry="full"), sgd()),
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


def make_step(recipe: Any) -> Callable:
  if not isinstance(recipe, Recipe):
    return ft.make_linen_train_step(jit=False)
  make = {"sampa": ft.make_linen_sampa_train_step, "esam": ft.make_linen_esam_train_step,
          "saf": ft.make_linen_saf_train_step, "mesa": ft.make_linen_mesa_train_step}[recipe.kind]
  return make(jit=False, **recipe.step_kwargs)
