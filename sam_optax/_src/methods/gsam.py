"""GSAM: descend the SAM gradient minus a multiple of g's part orthogonal to it; GSAM's radius
rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.distributed import check_axis_name
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.protocol import Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_real


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


def gsam(rho: radius.Rho = 0.05, alpha: float = 0.6, *,
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
    >>> by_hand = g_p - 0.5 * (g - (g @ u) * u)
    >>> bool(jnp.allclose(run(sam_optax.gsam(0.05, alpha=0.5)), by_hand, rtol=1e-5))
    True
    >>> sam = run(sam_optax.sharpness_aware(0.05))
    >>> bool(jnp.array_equal(run(sam_optax.gsam(0.05, alpha=0.0)), sam))
    True

  References:
    Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu,
    `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  fn = "gsam"
  rho = radius.check_rho(rho, fn)
  alpha = check_real("alpha", alpha, fn, low=0.0, hint="the paper uses 0.01 to 0.3")
  eps = sam_method.check_eps(eps, fn)
  check_axis_name(axis_name, fn)

  def combine(s, pts, loss, g_p):
    # g_p - alpha * (g - (g.u) u), u = g_p/|g_p|, as one combination of g_p and g:
    # two reductions over g_p and one elementwise pass.
    coef = 1.0 + alpha * tu.vdot(s.updates, g_p) * tu.safe_inverse(tu.sq_norm(g_p), eps * eps)
    return Result(tu.combine(g_p, coef, s.updates, -alpha))

  m = sam_method.method(fn, perturbation, eps, combine=combine, state=GSAMState,
                        keeps_gradient=True)
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
  rho_max = radius.check_rho(rho_max, "rho_schedule_from_lr")
  rho_min = radius.check_rho(rho_min, "rho_schedule_from_lr")

  def schedule(count):
    lr = jnp.asarray(lr_schedule(count), jnp.float32)
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)

  return schedule
