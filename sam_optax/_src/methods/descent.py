"""Descent rules on the SAM point: GSAM, the gradient-norm penalty (PGN), and GSAM's radius rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine
from sam_optax._src import tree as tu
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_real

PyTree = Any


class GSAMState(NamedTuple):
  """State of :func:`gsam`: the step count, the perturbation's state and the telemetry.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> tx, w = sam_optax.gsam(0.05), jnp.ones(2)
    >>> _, state = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> int(state.count), round(float(state.telemetry.perturbation_norm), 4)   # |eps| = rho
    (1, 0.05)
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None = None


def gsam(rho: engine.ScalarOrSchedule = 0.05, alpha: float = 0.6, *,
         perturbation: optax.GradientTransformation | None = None, eps: float = 1e-12,
         axis_name: str | tuple[str, ...] | None = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""GSAM: the SAM gradient minus a multiple of g's part orthogonal to it.

  .. math::
     g_p = \nabla L(w + \rho_t\, d),\quad
     g_\perp = g - (g \cdot \hat g_p)\, \hat g_p,\quad
     \text{output} = g_p - \alpha\, g_\perp

  ``alpha = 0`` with a constant ``rho`` is SAM exactly. For the paper's
  :math:`\rho_t` that follows the learning rate, pass
  ``rho=rho_schedule_from_lr(...)``.

  Args:
    rho: radius, a float or a schedule.
    alpha: weight :math:`\alpha` of the orthogonal (surrogate-gap) term.
    perturbation: the ascent geometry (default :func:`l2`).
    axis_name: per-device perturbation, as in :func:`sharpness_aware`: each
      device decomposes with its own g and :math:`g_p`, and the outputs are
      averaged over the axis.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0]); g = grad_fn(w)
    >>> run = lambda tx: tx.update(g, tx.init(w), w, grad_fn=grad_fn)[0]
    >>> g_p = grad_fn(w + 0.05 * g / jnp.linalg.norm(g)); u = g_p / jnp.linalg.norm(g_p)   # by hand
    >>> bool(jnp.allclose(run(sam_optax.gsam(0.05, alpha=0.5)), g_p - 0.5 * (g - (g @ u) * u), rtol=1e-5))
    True
    >>> bool(jnp.array_equal(run(sam_optax.gsam(0.05, alpha=0.0)), run(sam_optax.sharpness_aware(0.05))))
    True

  References:
    Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu,
    `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  fn = "gsam"
  rho = engine.check_rho(rho, fn)
  alpha = check_real("alpha", alpha, fn, low=0.0, hint="the paper uses 0.01 to 0.3")
  eps = sam_method.check_eps(eps, fn)
  engine.check_axis_name(axis_name, fn)

  def combine(s, pts, loss, g_p):
    # g_p - alpha * (g - (g.u) u), u = g_p/|g_p|, as one combination of g_p and g:
    # two reductions over g_p and one elementwise pass.
    coef = 1.0 + alpha * tu.vdot(s.updates, g_p) * tu.safe_inverse(tu.sq_norm(g_p), eps * eps)
    return engine.Result(tu.combine(g_p, coef, s.updates, -alpha))

  m = sam_method.method(fn, perturbation, eps, combine=combine, state=GSAMState, keeps_gradient=True)
  return engine.build(m, rho=rho, eps=eps, axis_name=axis_name)


def rho_schedule_from_lr(lr_schedule: optax.Schedule, rho_max: float,
                         rho_min: float, lr_max: float, lr_min: float
                         ) -> Callable[[jax.Array], jax.Array]:
  r"""GSAM's radius schedule: :math:`\rho_t` moves linearly with the learning rate.

  .. math:: \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
            \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}}

  Args:
    lr_schedule: the optax learning-rate schedule ``count -> lr``.
    rho_max, rho_min: radii at the largest and smallest learning rate
      (the paper: 0.6 and 0.1 for ViT-B/32).
    lr_max, lr_min: the schedule's largest and smallest learning rates.

  Example:
    >>> import optax, sam_optax
    >>> lr = optax.cosine_decay_schedule(0.1, decay_steps=100)
    >>> rho = sam_optax.rho_schedule_from_lr(lr, rho_max=0.1, rho_min=0.02, lr_max=0.1, lr_min=0.0)
    >>> [round(float(rho(t)), 4) for t in (0, 50, 100)]
    [0.1, 0.06, 0.02]
    >>> tx = sam_optax.gsam(rho=rho, alpha=0.3)   # or sharpness_aware(rho=rho)

  References:
    Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  if not callable(lr_schedule):
    raise TypeError("`rho_schedule_from_lr(lr_schedule=...)` must be an optax schedule "
                    "(a callable of the step count).")
  if lr_max == lr_min:
    raise ValueError("`rho_schedule_from_lr`: `lr_max` and `lr_min` must differ; with a "
                     "constant learning rate use a constant `rho`.")
  rho_max = engine.check_rho(rho_max, "rho_schedule_from_lr")
  rho_min = engine.check_rho(rho_min, "rho_schedule_from_lr")

  def schedule(count):
    lr = jnp.asarray(lr_schedule(count), jnp.float32)
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)

  return schedule


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


def gradient_norm_penalty(rho: engine.ScalarOrSchedule = 0.1, alpha: engine.ScalarOrSchedule = 0.8, *,
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
  rho = engine.check_rho(rho, fn)
  if not callable(alpha):
    check_real("alpha", alpha, fn, low=0.0, high=1.0,
               hint="alpha = 1 is SAM, 0 the base optimizer; the paper's default is 0.8")
  eps = sam_method.check_eps(eps, fn)

  def combine(s, pts, loss, g_adv):
    a = engine.schedule_at(alpha, s.state.count)  # float32, as rho
    # alpha * g_adv + (1 - alpha) * g: exactly g_adv at alpha = 1 and g at alpha = 0
    return engine.Result(tu.combine(g_adv, a, s.updates, jnp.float32(1.0) - a))

  m = sam_method.method(fn, perturbation, eps, combine=combine, state=GradientNormPenaltyState,
                        keeps_gradient=True)
  return engine.build(m, rho=rho, eps=eps)
