"""The gradient-norm penalty (PGN): a convex mix of the clean and the SAM gradient."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.protocol import Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_real


class GradientNormPenaltyState(NamedTuple):
  """State of :func:`gradient_norm_penalty`: the step count (the argument of the ``alpha``
  and ``rho`` schedules), the perturbation's state and the perturbed pass's telemetry.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.gradient_norm_penalty().init(jnp.ones(3))
    >>> state.perturbation_state   # the default l2 geometry keeps nothing between steps
    EmptyState()
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None = None


def gradient_norm_penalty(rho: radius.Rho = 0.1, alpha: radius.Rho = 0.8, *,
                          perturbation: optax.GradientTransformation | None = None,
                          eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-norm penalty (PGN): a convex mix of the clean and the SAM gradient.

  Penalizing the gradient norm, :math:`L(w) + \lambda \|\nabla L(w)\|`, has the
  gradient :math:`g + \lambda H g/\|g\|`; replacing the Hessian-vector product by
  a finite difference along :math:`\hat g = g/\|g\|` with step :math:`r = \rho`
  gives, with :math:`\alpha = \lambda/r`,

  .. math:: \text{output} = (1 - \alpha)\, g + \alpha\, \nabla L(w + \rho\, \hat g).

  :math:`\alpha = 1` is SAM exactly (bit for bit: the same core computes the
  second term) and :math:`\alpha = 0` returns the clean gradient ``g``. The
  second pass runs on every step, also when :math:`\alpha_t = 0` (a
  conditional would put the model's convolutions inside ``lax.cond``, which
  XLA:CPU runs far slower). This is the paper's form with the raw clean
  gradient ``g``; the official configuration mixes in the *normalized* clean
  gradient by default.

  ``alpha`` may be a schedule of the step count. Zhao, Zhang and Hu (ICML
  2024) found that with Adam and a learning-rate warm-up the penalty hurts
  (ViT-B on CIFAR-10: error 10.83 -> 12.36) unless it is warmed up too
  (-> 9.42): start :math:`\alpha` at 0 and raise it over the warm-up, as in the
  example.

  Args:
    rho: finite-difference radius :math:`r \ge 0` (a float or a schedule);
      the paper's default 0.1.
    alpha: mixing weight :math:`\alpha \in [0, 1]` (a float or a schedule of
      the step count); the paper's default 0.8.
    perturbation: the ascent direction (default :func:`l2`, :math:`\hat g`);
      any sam_optax geometry works (e.g. :func:`adaptive`).
    eps: norms at or below this count as zero (a zero gradient gives no NaN).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; put it first in a chain,
    before the base optimizer. ``update(updates, state, params, *, grad_fn)``
    (or ``value_and_grad_fn=`` and ``value=`` to record the losses) as for
    :func:`sharpness_aware`; :func:`sam_optax.metrics` reads the perturbed
    pass's telemetry.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(jnp.cos(w) * w ** 2)
    >>> w = jnp.linspace(-1.0, 1.0, 5)
    >>> warmup = 10
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup, 100)
    >>> alpha = optax.linear_schedule(0.0, 0.8, warmup)  # penalty warm-up
    >>> tx = optax.chain(sam_optax.gradient_norm_penalty(0.1, alpha), optax.adam(lr))
    >>> state = tx.init(w)
    >>> @jax.jit
    ... def step(w, state):
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(w, updates), state
    >>> for _ in range(20):
    ...   w, state = step(w, state)
    >>> bool(loss(w) < loss(jnp.linspace(-1.0, 1.0, 5)))
    True

  References:
    Zhao, Zhang, Hu, `Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning <https://arxiv.org/abs/2202.03599>`_,
    ICML 2022.

    Zhao, Zhang, Hu, `When Will Gradient Regularization Be Harmful?
    <https://arxiv.org/abs/2406.09723>`_, ICML 2024.
  """
  fn = "gradient_norm_penalty"
  rho = radius.check_rho(rho, fn)
  if not callable(alpha):
    check_real("alpha", alpha, fn, low=0.0, high=1.0,
               hint="alpha = 1 is SAM, 0 the base optimizer; the paper's default is 0.8")
  eps = sam_method.check_eps(eps, fn)

  def combine(s, pts, loss, g_adv):
    a = radius.at(alpha, s.state.count)  # float32, as rho
    # alpha * g_adv + (1 - alpha) * g: exactly g_adv at alpha = 1 and g at alpha = 0
    return Result(tu.combine(g_adv, a, s.updates, jnp.float32(1.0) - a))

  m = sam_method.method(fn, perturbation, eps, combine=combine, state=GradientNormPenaltyState,
                        keeps_gradient=True)
  return engine.build(m, rho=rho, eps=eps)
