"""WSAM: sharpness as a weighted regularizer, coupled (first in the chain) or decoupled."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.protocol import Method, Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_real, check_transform


class WSAMState(NamedTuple):
  """State of :func:`wsam` and :func:`wsam_optimizer`: the step count (the argument of the
  ``rho`` and ``learning_rate`` schedules), the perturbation's state, the telemetry, and the
  base optimizer's state (``None`` except in the decoupled form of :func:`wsam_optimizer`).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.wsam(0.05, gamma=0.9).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.WSAMState), int(state.count), state.base
    (True, 0, None)
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None = None
  base: optax.OptState | None = None


def _check_gamma(gamma: Any, fn: str) -> Any:
  return check_real("gamma", gamma, fn, low=0.0, high=1.0, high_open=True,
                    hint="gamma = 0.5 is SAM; the paper recommends 0.8 to 0.95")


def _weight(gamma: Any) -> jax.Array:
  """gamma / (1 - gamma) as a float32 scalar (exactly 1 at gamma = 0.5)."""
  gamma = jnp.asarray(gamma, jnp.float32)
  return gamma / (1.0 - gamma)


def wsam(rho: radius.Rho = 0.05, gamma: float = 0.9, *,
         perturbation: optax.GradientTransformation | None = None, eps: float = 1e-12,
         axis_name: str | tuple[str, ...] | None = None) -> optax.GradientTransformationExtraArgs:
  r"""WSAM: sharpness as a weighted regularizer, the coupled form (first in the chain).

  WSAM minimizes :math:`L(w) + \frac{\gamma}{1-\gamma}\big(\max_{\|\epsilon\|\le\rho}
  L(w+\epsilon) - L(w)\big)`, whose gradient with SAM's ascent step is

  .. math:: g + \frac{\gamma}{1-\gamma}\,(\tilde g - g),\qquad
            \tilde g = \nabla L(w + \rho\, d(g)),\ d(g) = g/\|g\|

  (:math:`\gamma = 0.5` is SAM exactly, bit for bit; :math:`\gamma = 0` the clean
  gradient). Put it first in an optax chain, before the base optimizer, as
  :func:`sharpness_aware`. For the paper's decoupled form, where the sharpness term
  bypasses the base optimizer's momentum and weight decay, use
  :func:`wsam_optimizer` with ``decoupled=True``: a term added after the base
  optimizer cannot come from a transformation placed before it.

  Args:
    rho: radius :math:`\rho \ge 0`, a float or a schedule of the step count.
    gamma: weight :math:`\gamma \in [0, 1)` of the sharpness term (the paper: 0.8 to 0.95).
    perturbation: the ascent geometry (default :func:`l2`).
    eps: norms at or below this count as zero (a zero gradient gives no NaN).
    axis_name: per-device perturbation, as in :func:`sharpness_aware`; the outputs are
      averaged over the axis.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates, state, params,
    *, grad_fn)`` (or ``value_and_grad_fn=``/``objective=``) returns the WSAM gradient.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> g = grad_fn(w)
    >>> tx = sam_optax.wsam(0.05, gamma=0.9)
    >>> out, _ = tx.update(g, tx.init(w), w, grad_fn=grad_fn)
    >>> g_tilde = grad_fn(w + 0.05 * g / jnp.linalg.norm(g))   # by hand
    >>> bool(jnp.allclose(out, g + 9.0 * (g_tilde - g), rtol=1e-5))
    True

  References:
    Yue, Jiang, Ye, Gao, Liu, Zhang, `Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023.
  """
  return _wsam("wsam", rho, gamma, None, None, perturbation, eps, axis_name)


def wsam_optimizer(base_optimizer: optax.GradientTransformation,
                   rho: radius.Rho = 0.05, gamma: float = 0.9, *,
                   decoupled: bool = False, learning_rate: radius.Rho | None = None,
                   perturbation: optax.GradientTransformation | None = None, eps: float = 1e-12,
                   axis_name: str | tuple[str, ...] | None = None
                   ) -> optax.GradientTransformationExtraArgs:
  r"""WSAM as a complete optimizer: coupled (``chain(wsam(...), base)``) or decoupled.

  Coupled (``decoupled=False``): the base optimizer consumes
  :math:`g + c\,(\tilde g - g)`, :math:`c = \gamma/(1-\gamma)`. Decoupled (the paper's
  Algorithm 1 with ``decouple``): the base optimizer consumes the clean gradient g
  alone, and the sharpness term is applied beside it, scaled by the learning rate
  :math:`\eta_t` only, outside the base optimizer's momentum, preconditioning and weight
  decay:

  .. math:: \Delta w = u_{\text{base}}(g) - \eta_t\, c\,(\tilde g - g).

  The base optimizer's state is kept inside this optimizer's :class:`WSAMState`
  (``base``). With ``optax.sgd(lr)`` (no momentum) and ``learning_rate=lr`` both forms
  give the same step.

  Args:
    base_optimizer: the optimizer (e.g. ``optax.sgd(lr, momentum=0.9)``, ``optax.adamw``).
    rho: radius, a float or a schedule.
    gamma: weight :math:`\gamma \in [0, 1)`.
    decoupled: apply the sharpness term outside the base optimizer.
    learning_rate: :math:`\eta_t` of the decoupled term, a float or a schedule of the
      step count (pass the base optimizer's own learning rate); required with
      ``decoupled=True``.
    perturbation: the ascent geometry (default :func:`l2`).
    eps: norms at or below this count as zero.
    axis_name: per-device perturbation; the base optimizer sees g averaged over the axis.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (a complete optimizer) whose
    ``update(grads, state, params, *, grad_fn)`` needs the params and the closure.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> g = grad_fn(w)
    >>> opt = sam_optax.wsam_optimizer(optax.sgd(0.1, momentum=0.9), 0.05, gamma=0.8,
    ...                                decoupled=True, learning_rate=0.1)
    >>> out, _ = opt.update(g, opt.init(w), w, grad_fn=grad_fn)
    >>> g_tilde = grad_fn(w + 0.05 * g / jnp.linalg.norm(g))   # by hand: -lr g - lr c (g~ - g)
    >>> bool(jnp.allclose(out, -0.1 * g - 0.1 * 4.0 * (g_tilde - g), rtol=1e-5))
    True

  References:
    Yue, Jiang, Ye, Gao, Liu, Zhang, `Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023.
  """
  fn = "wsam_optimizer"
  check_transform("base_optimizer", base_optimizer, fn)
  if not isinstance(decoupled, bool):
    raise TypeError(f"`{fn}(decoupled=...)` must be True or False, got {decoupled!r}.")
  if not decoupled:
    if learning_rate is not None:
      raise ValueError(f"`{fn}(learning_rate=...)` is used by the decoupled form only; pass "
                       "`decoupled=True`, or drop `learning_rate` (the coupled form's step size "
                       "is the base optimizer's).")
    return optax.chain(_wsam(fn, rho, gamma, None, None, perturbation, eps, axis_name),
                       base_optimizer)
  if learning_rate is None:
    raise ValueError(f"`{fn}(decoupled=True)` needs `learning_rate=`: the step size of the "
                     "sharpness term applied outside the base optimizer (pass the base "
                     "optimizer's learning rate or schedule).")
  if not callable(learning_rate):
    learning_rate = check_real("learning_rate", learning_rate, fn, low=0.0,
                               hint="pass the base optimizer's learning rate")
  return _wsam(fn, rho, gamma, base_optimizer, learning_rate, perturbation, eps, axis_name)


def _wsam(fn, rho, gamma, base_optimizer, learning_rate, perturbation, eps, axis_name):
  rho = radius.check_rho(rho, fn)
  gamma = _check_gamma(gamma, fn)
  eps, perturbation, ascent = sam_method.check_geometry(fn, eps, axis_name, perturbation)
  base = None if base_optimizer is None else optax.with_extra_args_support(base_optimizer)

  def init(params):
    fields = {"perturbation_state": perturbation.init(params)}
    return fields if base is None else {**fields, "base": base.init(params)}

  def combine(s, pts, loss, g_tilde):
    c = _weight(gamma)
    if base is None:  # c g~ + (1 - c) g: g~ exactly at c = 1
      return Result(tu.combine(g_tilde, c, s.updates, jnp.float32(1.0) - c))
    out, base_state = base.update(s.pmean(s.updates), s.state.base, s.params, **s.base_args)
    assert learning_rate is not None  # the decoupled form checked it at construction
    lr = radius.at(learning_rate, s.state.count)
    sharp = tu.combine(g_tilde, -lr * c, s.updates, lr * c)   # -lr c (g~ - g)
    return Result(tu.add_scaled(out, 1.0, tu.cast_like(sharp, out)), {"base": base_state},
                         grad=g_tilde)

  m = Method(fn, WSAMState, init, ascent, combine, keeps_gradient=True)
  return engine.build(m, rho=rho, eps=eps, axis_name=axis_name)
