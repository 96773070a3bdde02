"""SAM: the gradient at the perturbed point, for any geometry; the shared ascent; sam/asam."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import geometries as geo
from sam_optax._src import tree as tu
from sam_optax._src.distributed import check_axis_name
from sam_optax._src.methods import groups
from sam_optax._src.protocol import Method, Points, Step, perturbed_gradient
from sam_optax._src.radius import RadiusState
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_real, check_static_int

PyTree = Any


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware` (and of :func:`esam`).

  Attributes:
    count: int32 number of updates applied so far (the argument of a ``rho``
      schedule).
    perturbation_state: the state of the perturbation transformation (EMAs,
      PRNG keys, masks; ``EmptyState`` for stateless ones).
    telemetry: a :class:`Telemetry` of the last step (``None`` when built with
      ``telemetry=False``).
    radius: the ``rho="auto"`` rule's :class:`~sam_optax.RadiusState` (``None`` for a
      fixed radius or a schedule).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.sharpness_aware(0.05).init({"w": jnp.ones(3)})
    >>> isinstance(state, sam_optax.SharpnessAwareState), int(state.count)
    (True, 0)
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None = None
  radius: RadiusState | None = None


def check_perturbation(perturbation: Any, eps: float, fn: str) -> optax.GradientTransformation:
  if perturbation is None:
    return geo.l2(eps)
  if not (hasattr(perturbation, "init") and hasattr(perturbation, "update")):
    raise TypeError(f"`{fn}(perturbation=...)` must be an optax GradientTransformation such "
                    f"as `sam_optax.l2()`, got {type(perturbation).__name__}.")
  return perturbation


def check_eps(eps: Any, fn: str) -> float:
  return check_real("eps", eps, fn, low=0.0, hint="use a small positive value such as 1e-12")


_UNCHECKED = object()  # telemetry= not passed: the method has no such argument, nothing to check


def check_geometry(fn: str, eps: Any, axis_name: Any, perturbation: Any, *,
                   telemetry: Any = _UNCHECKED,
                   default: Callable[[float], Any] | None = None) -> tuple:
  """The checks a method that perturbs along a geometry shares, in the order their errors
  are raised: ``eps``, ``axis_name``, ``telemetry`` (when given), ``perturbation`` (None:
  ``default(eps)`` when given, else ``l2(eps)``). Returns ``(eps, perturbation, ascent)``,
  the last its one-step :func:`ascent`; ``rho`` and the method's own arguments are checked
  by the caller first, so each error keeps its place."""
  eps = check_eps(eps, fn)
  check_axis_name(axis_name, fn)
  if telemetry is not _UNCHECKED:
    engine.check_telemetry(telemetry, fn)
  if perturbation is None and default is not None:
    perturbation = default(eps)
  perturbation = check_perturbation(perturbation, eps, fn)
  return eps, perturbation, ascent(perturbation)


def ascent(perturbation: optax.GradientTransformation, ascent_steps: int = 1):
  r"""The ``points`` of SAM and every method that perturbs along a geometry.

  One step: :math:`\delta = \rho\, d(g)` (no projection, so SAM is exact to the
  bit). K steps: :math:`\delta \leftarrow \Pi_\rho(\delta + (\rho/K)\, d(\nabla
  L(w+\delta)))` in the perturbation's geometry, from :math:`\delta = \Pi_\rho((\rho/K)\,
  d(g))`; the perturbation's state advances once per ascent step (fresh noise
  for each pass of a random geometry).
  """
  p_update = optax.with_extra_args_support(perturbation).update

  def points(s: Step) -> Points:
    direction, p_state = p_update(s.updates, s.state.perturbation_state, s.params, **s.extra_args)
    if ascent_steps == 1:
      delta = tu.scale(direction, s.radius)
      # |rho| ||d|| where the geometry knows ||d|| in closed form: reducing delta itself
      # makes XLA keep a params-sized copy of it through the second pass
      d_norm = geo.direction_norm(perturbation, p_state, s.updates, s.params)
      pert_norm = tu.norm(delta) if d_norm is None else jnp.abs(s.radius) * d_norm
    else:
      step = s.radius / ascent_steps
      delta = geo.project(perturbation, p_state, tu.scale(direction, step), s.radius, s.params)
      # Unrolled on purpose: XLA:CPU runs convolutions inside while-loops far slower
      # than outside (jax-ml/jax#12868); K is small, so compile time stays modest.
      for _ in range(ascent_steps - 1):
        _, g = s.closures(tu.add_scaled(s.params, 1.0, delta))
        d, p_state = p_update(g, p_state, s.params, **s.extra_args)
        delta = geo.project(perturbation, p_state, tu.add_scaled(delta, step, d), s.radius,
                            s.params)
      pert_norm = tu.norm(delta)
    return Points(tu.add_scaled(s.params, 1.0, delta), perturbation_norm=pert_norm,
                  fields={"perturbation_state": p_state})

  return points


def method(name: str, perturbation: Any, eps: float, *, ascent_steps: int = 1,
           combine=perturbed_gradient, state: type = SharpnessAwareState,
           keeps_gradient: bool = False, **kwargs) -> Method:
  """A :class:`~sam_optax._src.protocol.Method` that perturbs along ``perturbation`` and
  combines with ``combine``."""
  perturbation = check_perturbation(perturbation, eps, name)
  return Method(name, state, lambda params: {"perturbation_state": perturbation.init(params)},
                ascent(perturbation, ascent_steps), combine, keeps_gradient=keeps_gradient,
                **kwargs)


def sharpness_aware(
    rho: radius.Rho = 0.05, *,
    perturbation: optax.GradientTransformation | None = None,
    eps: float = 1e-12,
    ascent_steps: int | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    telemetry: bool | str = True,
    group_size: int | None = None,
    group_chunk: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-aware gradient: replaces g by the gradient at a perturbed point.

  Given the clean gradient :math:`g = \nabla L(w)` (the ``updates``) and a
  closure ``grad_fn`` computing :math:`\nabla L`, it returns

  .. math:: \nabla L(w + \rho\, d),\qquad d = \mathrm{perturbation}(g, w)

  which for the default :func:`l2` perturbation is SAM's
  :math:`\nabla L(w + \rho\, g/\|g\|)`. Put it first in an optax chain, before
  the base optimizer; clipping belongs after it (clipping before the ascent
  changes nothing, since the direction is normalized). ``update`` needs the
  closure: ``tx.update(grads, state, params, grad_fn=grad_fn)``.

  Args:
    rho: radius :math:`\rho \ge 0` of the neighbourhood, a float, a schedule
      ``count -> rho``, or ``"auto"`` (:func:`auto_rho`: the radius follows the measured
      one-step sharpness; ``update`` then needs ``value=`` and ``value_and_grad_fn=`` or
      ``objective=``). ``rho = 0`` returns ``grad_fn(w)`` exactly.
    perturbation: a transformation mapping g (with params) to the direction
      ``d``; default ``l2(eps)``. See :func:`adaptive`, :func:`masked` and the
      other geometries.
    eps: norms at or below this count as zero, so a zero gradient gives
      :math:`\epsilon = 0` and a finite result (used by the default ``l2``).
    ascent_steps: K >= 1 (None: 1) gradient evaluations per update: K - 1 extra ascent
      steps :math:`\delta \leftarrow \Pi_\rho(\delta + (\rho/K)\, d(w+\delta))`
      before the final gradient; K = 1 is SAM.
    axis_name: for per-device perturbation (m-sharpness) inside ``shard_map`` or
      ``pmap``: each device perturbs with its own local ``updates`` and the
      perturbed gradients are averaged with ``lax.pmean`` over this axis. Pass
      *local* (not yet averaged) gradients. ``None``: no collective.
    telemetry: ``True`` records a :class:`Telemetry` of each step in the state
      (norms, losses when given; a few reductions, no extra gradient pass);
      ``"full"`` also records :math:`\cos(g, g_{adv})`, which keeps g alive
      through the second pass (a params-sized buffer); ``False`` records nothing
      (and does not check the chain order).
    group_size: m-sharpness on one device: ``m`` splits the batch of ``objective=``
      (required) into groups of m examples along its leading axis; group k gets its own
      :math:`\epsilon_k = \rho\, d(\nabla L_k(w))` and the output is the mean of
      :math:`\nabla L_k(w + \epsilon_k)` (Foret et al. 2021, Section 4). ``updates`` is
      then not read, so under ``jit`` the caller's clean backward pass is dropped. The
      batch size must be a multiple of m; the geometry must be stateless (l2, adaptive,
      masked, ...). ``None``: SAM on the whole batch (bit for bit the same as before).
    group_chunk: with ``group_size``, process this many groups at a time in a
      ``lax.scan`` (memory: ``group_chunk`` per-group gradients instead of all
      ``B/m``); None: all groups in one ``vmap``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``(updates, state, params, *, grad_fn, **extra_args)``; unused extra
    arguments are ignored and forwarded to the perturbation. Instead of
    ``grad_fn`` the caller may pass ``value_and_grad_fn`` (params -> ``(loss,
    grads)``, as ``jax.value_and_grad`` gives) or ``objective=`` (a
    :class:`Objective`), and the clean loss as ``value=``; then the state records
    the clean and perturbed losses too (the perturbed loss comes from the
    gradient pass that runs anyway).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w, x: jnp.sum((x @ w) ** 2)
    >>> x = jnp.ones((4, 3)); w = jnp.ones(3)
    >>> tx = optax.chain(sam_optax.sharpness_aware(0.05), optax.sgd(0.1))
    >>> state = tx.init(w)
    >>> @jax.jit
    ... def step(w, state):
    ...   grad_fn = lambda p: jax.grad(loss)(p, x)
    ...   updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
    ...   return optax.apply_updates(w, updates), state
    >>> w, state = step(w, state)

  References:
    Foret, Kleiner, Mobahi, Neyshabur, `Sharpness-Aware Minimization for
    Efficiently Improving Generalization <https://arxiv.org/abs/2010.01412>`_,
    ICLR 2021.
  """
  fn = "sharpness_aware"
  rho = radius.check_rho(rho, fn, auto=0.05)
  eps = check_eps(eps, fn)
  # None means 1: a default of None keeps `optax.inject_hyperparams(sharpness_aware)`
  # from turning this structural int into a traced hyperparameter.
  ascent_steps = int(check_static_int("ascent_steps", 1 if ascent_steps is None else ascent_steps,
                                      fn, hint="1 is SAM"))
  check_axis_name(axis_name, fn)
  engine.check_telemetry(telemetry, fn)
  group_size, group_chunk = groups.check_group_size(group_size, group_chunk, ascent_steps, fn)
  if group_size is not None:
    perturbation = check_perturbation(perturbation, eps, fn)
    grouped = groups.method(fn, perturbation, SharpnessAwareState, group_size, group_chunk,
                            record_cosine=telemetry == "full")
    return engine.build(grouped, rho=rho, eps=eps, axis_name=axis_name, telemetry=telemetry)
  return engine.build(method(fn, perturbation, eps, ascent_steps=ascent_steps), rho=rho, eps=eps,
                      axis_name=axis_name, telemetry=telemetry)


def sam(base_optimizer: optax.GradientTransformation, rho: radius.Rho = 0.05, *,
        ascent_steps: int | None = None, axis_name: str | tuple[str, ...] | None = None,
        group_size: int | None = None, group_chunk: int | None = None
        ) -> optax.GradientTransformationExtraArgs:
  r"""SAM: ``optax.chain(sharpness_aware(rho), base_optimizer)``.

  The sharpness-aware transform comes first: it turns the clean gradient into
  :math:`\nabla L(w + \rho\, g/\|g\|)`, which the base optimizer then consumes.
  Put gradient clipping inside ``base_optimizer`` (after the ascent); clipping
  before the ascent does nothing since the direction is normalized. ``update``
  needs ``grad_fn=`` (or ``value_and_grad_fn=``/``objective=``), as for
  :func:`sharpness_aware`.

  Args:
    base_optimizer: the optimizer that consumes the perturbed gradient.
    rho: radius (float, schedule or ``"auto"``).
    ascent_steps: gradient evaluations per step (None: 1, SAM).
    axis_name: per-device perturbation (see :func:`sharpness_aware`).
    group_size, group_chunk: m-sharpness on one device (see :func:`sharpness_aware`).

  Example:
    >>> import optax, sam_optax
    >>> opt = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return optax.chain(sharpness_aware(rho, ascent_steps=ascent_steps, axis_name=axis_name,
                                     group_size=group_size, group_chunk=group_chunk),
                     base_optimizer)


def asam(base_optimizer: optax.GradientTransformation, rho: radius.Rho = 0.5,
         eta: float = 0.01, *, kernels_only: bool = False,
         axis_name: str | tuple[str, ...] | None = None, group_size: int | None = None,
         group_chunk: int | None = None) -> optax.GradientTransformationExtraArgs:
  r"""ASAM: ``optax.chain(sharpness_aware(rho, perturbation=adaptive(eta)), base_optimizer)``.

  :math:`\epsilon = \rho\, T^2 \odot g / \|T \odot g\|`, :math:`T = |w| + \eta`.
  ``kernels_only=True`` reproduces the official code, which rescales only
  weight tensors (biases and norm scales get T = 1): it perturbs kernels with
  the adaptive geometry and the other leaves with plain L2 jointly normalized.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> opt = sam_optax.asam(optax.sgd(0.1), rho=0.5, eta=0.01)
    >>> updates, _ = opt.update(grad_fn(w), opt.init(w), w, grad_fn=grad_fn)
    >>> g, t = grad_fn(w), jnp.abs(w) + 0.01   # by hand: eps = rho T^2 g / |T g|
    >>> bool(jnp.allclose(updates, -0.1 * grad_fn(w + 0.5 * t**2 * g / jnp.linalg.norm(t * g))))
    True

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  perturbation = geo.adaptive(eta, where=geo.kernel_mask if kernels_only else None)
  rho = radius.check_rho(rho, "asam", auto=0.5)   # "auto" starts at ASAM's own radius
  return optax.chain(sharpness_aware(rho, perturbation=perturbation, axis_name=axis_name,
                                     group_size=group_size, group_chunk=group_chunk),
                     base_optimizer)
