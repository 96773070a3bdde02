"""Momentum-SAM: perturb along the normalized momentum, one gradient per step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.protocol import ABSENT, Method, Points, Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_real

PyTree = Any
_MOMENTUM_FIELDS = ("trace", "mu")


class MomentumSAMState(NamedTuple):
  """State of :func:`msam`: step count and the base optimizer's state.

  The parameters the caller holds are the perturbed ones, :math:`\\tilde w =
  w - \\rho\\, v/\\|v\\|` with ``v`` the momentum found in ``base``; use
  :func:`msam_clean_params` (or :func:`clean_params`) for the clean ones.
  ``momentum_norm`` is in the params' reduction dtype. The telemetry holds the length
  of the perturbation the last gradient was taken at (``perturbation_norm``), that
  gradient's norm (``perturbed_grad_norm``) and the caller's loss as the perturbed loss
  (it is taken at the perturbed point); the clean gradient and loss are never seen.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> state = sam_optax.msam(optax.sgd(0.1, momentum=0.9)).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.MomentumSAMState), round(float(state.rho), 4)
    (True, 0.3)
  """
  count: jax.Array
  base: optax.OptState
  rho: jax.Array
  momentum_norm: jax.Array
  telemetry: Telemetry | None = None

  def clean_params(self, params: PyTree) -> PyTree:
    """The clean parameters :math:`w = \\tilde w - \\epsilon` (see :func:`msam_clean_params`)."""
    v = momentum_of(self.base, params)
    e = tu.scale(v, -self.rho * tu.safe_inverse(self.momentum_norm, 1e-12))
    return jax.tree.map(lambda p, x: (p - x).astype(p.dtype), params, e)


def momentum_of(base_state: Any, params: PyTree) -> PyTree | None:
  """The first state field named ``trace`` (sgd) or ``mu`` (Adam family) shaped like
  ``params``, found at trace time from the state's structure (nothing is cached)."""
  target = jax.tree.structure(params)
  for name in _MOMENTUM_FIELDS:
    for _, value in optax.tree_utils.tree_get_all_with_path(base_state, name):
      if jax.tree.structure(value) == target:
        return value
  return None


def msam(base_optimizer: optax.GradientTransformation, rho: float = 0.3, *,
         eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM: perturb along the normalized momentum, one gradient per step.

  The caller's parameters are kept at the perturbed point
  :math:`\tilde w_t = w_t + \epsilon_t`, :math:`\epsilon_t = -\rho\,
  v_t/\|v_t\|` with :math:`v_t` the base optimizer's momentum (``trace`` of
  :func:`optax.sgd` with momentum, ``mu`` of the Adam family). The caller's
  ordinary gradient :math:`g = \nabla L(\tilde w_t)` is the only gradient:

  .. math:: w_{t+1} = w_t + u_t(g),\qquad \tilde w_{t+1} = w_{t+1} + \epsilon_{t+1}

  where :math:`u_t` is the base update computed at the clean :math:`w_t` (so
  decoupled weight decay acts on clean weights). ``grad_fn`` is accepted and
  ignored, so one train step serves every variant. Evaluate and checkpoint
  with :func:`msam_clean_params`. With :math:`v_0 = 0` the first step is
  unperturbed.

  Args:
    base_optimizer: an optimizer with a momentum buffer (sgd with momentum,
      adam, adamw, nadam, lion, ...).
    rho: radius (the paper: about 0.3 with SGD, 1 with AdamW).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> opt = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> for _ in range(3):   # one gradient per step, taken at the perturbed params
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> clean = sam_optax.msam_clean_params(params, state)
    >>> round(float(jnp.linalg.norm(params - clean)), 4)   # |eps| = rho
    0.3

  References:
    Becker, Altrock, Risse, `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
  """
  fn = "msam"
  if callable(rho):
    raise TypeError("`msam(rho=...)` must be a float: the parameters are kept perturbed by the "
                    "previous step's radius, so a schedule would leave them off the clean point "
                    "by the difference; use a constant rho (the paper uses 0.3 with SGD, 1 with "
                    "AdamW).")
  rho = radius.check_rho(rho, fn)
  eps = check_real("eps", eps, fn, low=0.0, hint="use a small positive value such as 1e-12")
  base = optax.with_extra_args_support(base_optimizer)

  def momentum(base_state, params):
    v = momentum_of(base_state, params)
    if v is None:
      raise ValueError(f"`{fn}(base_optimizer=...)` needs an optimizer with a momentum buffer "
                       "(a state field named `trace` or `mu` shaped like the params): use "
                       "`optax.sgd(lr, momentum=0.9)` or an Adam-family optimizer.")
    return v

  def eps_of(v, params, v_norm):
    coef = -jnp.asarray(rho, jnp.float32) * tu.safe_inverse(v_norm, eps)
    return tu.cast_like(tu.scale(v, coef), params)

  def init(params):
    base_state = base_optimizer.init(params)
    return {"base": base_state, "rho": jnp.asarray(rho, jnp.float32),
            "momentum_norm": tu.norm(momentum(base_state, params))}

  def points(s):
    # the length of the perturbation this step's gradient was taken at (no evaluation here)
    live = s.state.momentum_norm > eps
    return Points(perturbation_norm=jnp.where(live, jnp.abs(jnp.asarray(rho, jnp.float32)), 0.0))

  def combine(s, pts, loss, grad):
    state, params, updates = s.state, s.params, s.updates
    # the norm of v_t was stored last step: one reduction per step, not two
    eps_now = eps_of(momentum(state.base, params), params, state.momentum_norm)
    clean = jax.tree.map(lambda p, e: p - e, params, eps_now)
    u, base_state = base.update(updates, state.base, clean, **s.base_args)
    v_next = momentum(base_state, params)
    v_norm = tu.norm(v_next)
    eps_next = eps_of(v_next, params, v_norm)
    out = jax.tree.map(lambda a, e0, e1: (a - e0 + e1).astype(a.dtype), u, eps_now, eps_next)
    # the caller's gradient and loss are taken at the perturbed point; the clean ones never
    return Result(out, {"base": base_state, "momentum_norm": v_norm}, grad=updates, loss=s.value,
                  clean_loss=ABSENT)

  m = Method(fn, MomentumSAMState, init, points, combine, closure="none", evaluates="method",
             clean_gradient=False, reports_g=False)
  return engine.build(m, eps=eps)


def msam_clean_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
  """The clean parameters :math:`w = \\tilde w - \\epsilon` of an :func:`msam` run.

  Args:
    params: the perturbed parameters the training loop holds.
    opt_state: the optimizer state containing a :class:`MomentumSAMState`
      (at any depth, e.g. inside ``inject_hyperparams`` or ``chain``).

  Returns:
    The parameters to evaluate and to export.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> opt = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.array([1.0, 0.0]), state, params)
    >>> params = optax.apply_updates(params, updates)   # now w - 0.1 g + eps, eps = -0.3 v/|v|
    >>> print(jnp.round(sam_optax.msam_clean_params(params, state), 4))
    [ 0.9 -2. ]
  """
  state = tu.find_state(opt_state, MomentumSAMState, "msam_clean_params",
                       "pass the state of an optimizer built with `sam_optax.msam`.")
  return state.clean_params(params)
