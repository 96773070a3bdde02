"""RST: each step runs the wrapped transformation with probability p, else passes g through."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import gating, radius
from sam_optax._src.distributed import check_axis_name
from sam_optax._src.methods.wrapper import schedule
from sam_optax._src.validation import check_int, check_real, check_transform


class RandomizedState(NamedTuple):
  """State of :func:`randomized`.

  Attributes:
    count: int32 steps taken.
    key: raw PRNG key data; step t's draw uses ``fold_in(key, t)``.
    probability: float32 probability used for the current step's draw.
    inner: the wrapped transform's state (advanced only on steps it runs).
    sam_step: float32 1.0 if the last step ran ``transform``, else 0.0.
    sam_step_fraction: float32 running mean of ``sam_step``.
    gate: the :class:`Gate` (static) :func:`gated_jit` fixes the branch with.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.randomized(sam_optax.sharpness_aware(0.05)).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.RandomizedState), float(state.probability)
    (True, 0.5)
  """
  count: jax.Array
  key: jax.Array
  probability: jax.Array
  inner: optax.OptState
  sam_step: jax.Array
  sam_step_fraction: jax.Array
  gate: gating.Gate = gating.Gate()

  def host_plan(self):
    """This step's draw, read from the device (a scheduled probability is only known there)."""
    take = bool(np.asarray(_decide(self.key, self.count, self.probability)))
    return (lambda steps: take), False


def _bernoulli_at(key_data, count, p):
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), count)
  return jax.random.uniform(key, (), jnp.float32) < p


_decide = jax.jit(_bernoulli_at)


def randomized(transform: optax.GradientTransformation,
               probability: radius.Rho = 0.5, seed: int = 0, *,
               axis_name: str | tuple[str, ...] | None = None
               ) -> optax.GradientTransformationExtraArgs:
  r"""RST: each step runs ``transform`` with probability p, else passes g through.

  A Bernoulli(:math:`p_t`) draw per step (``probability`` a float or a
  schedule of the step count) picks a sharpness-aware step (``transform``,
  which calls ``grad_fn``) or a plain step (output ``g``, no call of
  ``grad_fn``). Expected passes per step: :math:`1 + p`. The key is in the
  state, so runs are reproducible and resume exactly.

  Args:
    transform: any sharpness-aware transformation (e.g. :func:`sharpness_aware`).
    probability: :math:`p \in [0, 1]` or a schedule.
    seed: PRNG seed of the draws.
    axis_name: averages the pass-through g over this axis (give the wrapped
      transform the same ``axis_name``).

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> g = grad_fn(w)
    >>> never = sam_optax.randomized(sam_optax.sharpness_aware(0.05), probability=0.0)
    >>> out, _ = never.update(g, never.init(w), w, grad_fn=grad_fn)
    >>> bool(jnp.array_equal(out, g))   # p = 0: always the plain gradient
    True
    >>> always = sam_optax.randomized(sam_optax.sharpness_aware(0.05), probability=1.0)
    >>> out, _ = always.update(g, always.init(w), w, grad_fn=grad_fn)
    >>> bool(jnp.allclose(out, grad_fn(w + 0.05 * g / jnp.linalg.norm(g))))   # p = 1: SAM
    True

  References:
    Zhao, Zhang, Hu, `Randomized Sharpness-Aware Training for Boosting
    Computational Efficiency in Deep Learning <https://arxiv.org/abs/2203.09962>`_,
    2022.
  """
  fn = "randomized"
  check_transform("transform", transform, fn)
  if not callable(probability):
    probability = check_real("probability", probability, fn, low=0.0, high=1.0,
                             hint="0.5 runs the second pass on half the steps")
  seed = check_int("seed", seed, fn)
  check_axis_name(axis_name, fn)

  def init(params):
    return {"key": jax.random.key_data(jax.random.key(seed)),
            "probability": radius.at(probability, jnp.zeros([], jnp.int32))}

  def decide(state, updates):
    count = optax.safe_increment(state.count)
    return (_bernoulli_at(state.key, state.count, state.probability),
            {"probability": radius.at(probability, count)})

  return schedule(fn, transform, RandomizedState, init, decide, axis_name=axis_name)
