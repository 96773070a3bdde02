"""Geometries with a memory of past gradients: F-SAM (friendly) and VaSSO."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.geometries import base
from sam_optax._src.geometries.base import Perturbation, make_perturbation

PyTree = Any


def _empty_history(state: type):
  """The init of a geometry with a memory: count 0 (no gradient seen yet) and a zero tree
  like params."""
  return lambda params: state(jnp.zeros([], jnp.int32), tu.zeros_like(params))


# ---------------------------------------------------------------- friendly (F-SAM)


class FriendlyState(NamedTuple):
  """State of :func:`friendly`: ``momentum``, the EMA ``m`` of past gradients (the estimate of
  the full-batch gradient that F-SAM removes), and ``count``, which is 0 until a first gradient
  has seeded the EMA with :math:`m_0 = g_0`.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> p = sam_optax.friendly(decay=0.9)
    >>> _, state = p.update(jnp.array([2.0, 0.0]), p.init(jnp.zeros(2)))
    >>> state.momentum.tolist(), int(state.count)   # seeded with g_0, not decayed from zeros
    ([2.0, 0.0], 1)
  """
  count: jax.Array
  momentum: PyTree


def friendly(sigma: float = 1.0, decay: float = 0.9, eps: float = 1e-12) -> Perturbation:
  r"""F-SAM: remove the full-gradient component estimated by an EMA.

  .. math::
     d_t = \frac{g_t - \sigma m_{t-1}}{\|g_t - \sigma m_{t-1}\|},\qquad
     m_t = \lambda m_{t-1} + (1-\lambda) g_t,\qquad m_0 = g_0

  The first step has no history and perturbs along :math:`g_0` (plain SAM).

  Args:
    sigma: weight :math:`\sigma` of the removed EMA.
    decay: EMA decay :math:`\lambda` in [0, 1).

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.friendly(sigma=1.0, decay=0.9)
    >>> state = p.init(jnp.zeros(2))
    >>> d0, state = p.update(jnp.array([1.0, 0.0]), state)  # first step: m = g_0, d = g_0/|g_0|
    >>> d1, state = p.update(jnp.array([1.0, 1.0]), state)  # d = (g_1 - m)/|g_1 - m|
    >>> print(np.asarray(d0), np.asarray(d1))
    [1. 0.] [0. 1.]

  References:
    Li, Zhou, Cheng, Pan, Yang, `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
  """
  sigma = base.check_nonneg("sigma", sigma, "friendly", "the paper uses sigma=1.0.")
  decay = base.check_decay("decay", decay, "friendly")
  eps = base.check_nonneg("eps", eps, "friendly", "use a small positive value such as 1e-12")

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    first = state.count == 0
    d = jax.tree.map(lambda g, m: g - jnp.where(first, 0.0, sigma) * m.astype(g.dtype),
                     updates, state.momentum)
    new_m = jax.tree.map(
        lambda g, m: jnp.where(first, g.astype(m.dtype), decay * m + (1 - decay) * g
                               ).astype(m.dtype), updates, state.momentum)
    return tu.normalize(d, eps), FriendlyState(optax.safe_increment(state.count), new_m)

  return make_perturbation(_empty_history(FriendlyState), update)


# ----------------------------------------------------------------- VaSSO


class VarianceSuppressedState(NamedTuple):
  r"""State of :func:`variance_suppressed`: ``direction``, the gradient average :math:`d_t`
  *before* normalization (the update returns :math:`d_t/\|d_t\|`, the state keeps the
  magnitude the next average needs), and ``count``, 0 until the first step sets :math:`d_0 = g_0`.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> p = sam_optax.variance_suppressed()
    >>> d, state = p.update(jnp.array([3.0, 4.0]), p.init(jnp.zeros(2)))
    >>> # the unit direction out, the raw average kept
    >>> [round(float(x), 4) for x in d], state.direction.tolist()
    ([0.6, 0.8], [3.0, 4.0])
  """
  count: jax.Array
  direction: PyTree


def variance_suppressed(theta: float = 0.9, eps: float = 1e-12) -> Perturbation:
  r"""VaSSO: perturb along an exponential average of gradients.

  .. math:: d_t = (1-\theta) d_{t-1} + \theta g_t,\quad d_0 = g_0,\qquad
            \epsilon = \rho\, d_t / \|d_t\|

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.variance_suppressed(theta=0.5)
    >>> state = p.init(jnp.zeros(2))
    >>> _, state = p.update(jnp.array([2.0, 0.0]), state)  # d_0 = g_0
    >>> d, state = p.update(jnp.array([0.0, 2.0]), state)  # d_1 = 0.5 d_0 + 0.5 g_1 = [1, 1]
    >>> print(np.round(np.asarray(d), 4))
    [0.7071 0.7071]

  References:
    Li, Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
  """
  theta = base.check_unit("theta", theta, "variance_suppressed")
  eps = base.check_nonneg("eps", eps, "variance_suppressed",
                          "use a small positive value such as 1e-12")

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    first = state.count == 0
    new_d = jax.tree.map(
        lambda g, d: jnp.where(first, g.astype(d.dtype),
                               (1 - theta) * d + theta * g).astype(d.dtype),
        updates, state.direction)
    return (tu.normalize(new_d, eps),
            VarianceSuppressedState(optax.safe_increment(state.count), new_d))

  return make_perturbation(_empty_history(VarianceSuppressedState), update)
