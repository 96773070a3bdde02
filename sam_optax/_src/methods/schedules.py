"""Schedules around any sharpness-aware transformation: randomized (RST), AE-SAM, late-phase SAM.

Each runs the wrapped transformation on some steps and passes the gradient through
on the others, with no call of the closure (:func:`engine.schedule`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import engine, gating
from sam_optax._src import tree as tu
from sam_optax._src.validation import check_int, check_real, check_transform

PyTree = Any


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
               probability: engine.ScalarOrSchedule = 0.5, seed: int = 0, *,
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
  engine.check_axis_name(axis_name, fn)

  def init(params):
    return {"key": jax.random.key_data(jax.random.key(seed)),
            "probability": engine.schedule_at(probability, jnp.zeros([], jnp.int32))}

  def decide(state, updates):
    count = optax.safe_increment(state.count)
    return (_bernoulli_at(state.key, state.count, state.probability),
            {"probability": engine.schedule_at(probability, count)})

  return engine.schedule(fn, transform, RandomizedState, init, decide, axis_name=axis_name)


class AdaptivePolicyState(NamedTuple):
  """State of :func:`adaptive_policy`.

  Attributes:
    count: int32 steps taken.
    mean: EMA of :math:`\\|g\\|^2` (params' reduction dtype: float32, or
      float64 for float64 params).
    var: EMA of its squared deviation (same dtype).
    sharp_steps: int32 number of steps that ran ``transform``.
    inner: the wrapped transform's state.
    sam_step: float32 1.0 if the last step ran ``transform``, else 0.0.
    sam_step_fraction: float32 running mean of ``sam_step``.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> tx = sam_optax.adaptive_policy(sam_optax.sharpness_aware(0.05), total_steps=100)
    >>> state = tx.init(jnp.ones(2))
    >>> isinstance(state, sam_optax.AdaptivePolicyState), int(state.sharp_steps)
    (True, 0)
  """
  count: jax.Array
  mean: jax.Array
  var: jax.Array
  sharp_steps: jax.Array
  inner: optax.OptState
  sam_step: jax.Array
  sam_step_fraction: jax.Array


def adaptive_policy(transform: optax.GradientTransformation, *, total_steps: int,
                    decay: float = 0.9, lambda_start: float = -1.0, lambda_end: float = 1.0,
                    axis_name: str | tuple[str, ...] | None = None
                    ) -> optax.GradientTransformationExtraArgs:
  r"""AE-SAM: run ``transform`` only where the loss looks sharp.

  With :math:`s_t = \|g_t\|^2`,

  .. math::
     \mu_t = \delta \mu_{t-1} + (1-\delta) s_t,\quad
     \sigma^2_t = \delta \sigma^2_{t-1} + (1-\delta)(s_t - \mu_t)^2,

  the step runs ``transform`` iff :math:`s_t \ge \mu_t + c_t \sigma_t`, with
  :math:`c_t` moving linearly from ``lambda_start`` to ``lambda_end`` over
  ``total_steps`` (a rising threshold: more SAM steps early). At step 0 the
  statistics start at :math:`\mu_0 = s_0, \sigma_0 = 0`, so step 0 is a SAM
  step when ``lambda_start <= 0``. The decision needs the current gradient,
  so it is taken with ``lax.cond`` inside the step.

  Args:
    transform: the sharpness-aware transformation to run on sharp steps.
    total_steps: training length T over which :math:`c_t` moves.
    decay: EMA decay :math:`\delta`.
    lambda_start, lambda_end: :math:`\lambda_1, \lambda_2`, the ends of
      :math:`c_t`.
    axis_name: averages the pass-through g (and :math:`\|g\|^2`) over the axis.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> tx = sam_optax.adaptive_policy(sam_optax.sharpness_aware(0.05), total_steps=100,
    ...                                lambda_start=0.0, lambda_end=0.0)   # SAM iff s_t >= mu_t
    >>> state = tx.init(w)
    >>> for scale in (1.0, 2.0, 0.5):   # s_t = scale^2 s_0: mu_1 = 1.3 s_0, mu_2 = 1.195 s_0
    ...   _, state = tx.update(scale * grad_fn(w), state, w, grad_fn=grad_fn)
    >>> int(state.count), int(state.sharp_steps)   # the last step (0.25 s_0 < mu_2) skips SAM
    (3, 2)

  References:
    Jiang, Yang, Zhang, Kwok, `An Adaptive Policy to Employ Sharpness-Aware
    Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR 2023.
  """
  fn = "adaptive_policy"
  check_transform("transform", transform, fn)
  total_steps = check_int("total_steps", total_steps, fn, minimum=1,
                          hint="pass the training length in steps")
  decay = check_real("decay", decay, fn, low=0.0, high=1.0, high_open=True)
  lambda_start = check_real("lambda_start", lambda_start, fn)
  lambda_end = check_real("lambda_end", lambda_end, fn)
  engine.check_axis_name(axis_name, fn)

  def init(params):
    dtype = tu.reduction_dtype(params)  # separate buffers, so the state can be donated
    return {"mean": jnp.zeros([], dtype), "var": jnp.zeros([], dtype),
            "sharp_steps": jnp.zeros([], jnp.int32)}

  def decide(state, updates):
    s = tu.sq_norm(updates)
    if axis_name is not None:
      s = jax.lax.pmean(s, axis_name)
    first = state.count == 0
    mean = jnp.where(first, s, decay * state.mean + (1 - decay) * s)
    var = jnp.where(first, 0.0, decay * state.var + (1 - decay) * jnp.square(s - mean))
    frac = jnp.minimum(state.count.astype(s.dtype) / total_steps, 1.0)
    c = lambda_start + (lambda_end - lambda_start) * frac
    sharp = s >= mean + c * jnp.sqrt(var)
    return sharp, {"mean": mean.astype(state.mean.dtype), "var": var.astype(state.var.dtype),
                   "sharp_steps": state.sharp_steps + sharp.astype(jnp.int32)}

  return engine.schedule(fn, transform, AdaptivePolicyState, init, decide, axis_name=axis_name)


# AE-SAM under a name that cannot be confused with the `adaptive` (ASAM) geometry;
# `adaptive_policy` stays as the name the first release spelled.
ae_sam = adaptive_policy
