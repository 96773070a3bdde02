"""The core transformation: evaluate the gradient at the perturbed point."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import distributed
from sam_optax._src import perturbations as pert
from sam_optax._src import tree as tu

PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware`.

  Attributes:
    count: int32 number of updates applied so far (the argument of a ``rho``
      schedule).
    perturbation_state: the state of the perturbation transformation (EMAs,
      PRNG keys, masks; ``EmptyState`` for stateless ones).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.sharpness_aware(0.05).init({"w": jnp.ones(3)})
    >>> isinstance(state, sam_optax.SharpnessAwareState), int(state.count)
    (True, 0)
  """
  count: jax.Array
  perturbation_state: optax.OptState


def check_rho(rho: Any, fn: str = "sharpness_aware") -> None:
  """Raises on a rho that is neither a schedule nor a finite number >= 0."""
  if callable(rho) or isinstance(rho, jax.core.Tracer):
    return
  try:
    value = float(rho)
  except (TypeError, ValueError):
    raise TypeError(f"`{fn}(rho=...)` must be a float or a schedule (a callable of the "
                    f"step count), got {type(rho).__name__}.") from None
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"`{fn}(rho=...)` must be finite and >= 0, got {rho!r}; the usual "
                     "value is 0.05 for SAM (0.5 to 1.0 for ASAM).")


def check_axis_name(axis_name: Any, fn: str) -> None:
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`{fn}(axis_name=...)` must be None, a mesh/pmap axis name or a "
                    f"tuple of names, got {axis_name!r}.")


def rho_at(rho: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  value = rho(count) if callable(rho) else rho
  return jnp.asarray(value, jnp.float32)


def check_update_call(fn: str, params: PyTree, grad_fn: Any) -> None:
  """Trace-time checks of an update call that needs params and grad_fn."""
  if grad_fn is None:
    raise TypeError(
        f"`{fn}` needs the loss gradient closure: call `update(grads, state, params, "
        "grad_fn=grad_fn)` with `grad_fn = lambda p: jax.grad(loss)(p, batch)`; inside "
        "`optax.chain` pass it as a keyword to the chain's `update`.")
  if not callable(grad_fn):
    raise TypeError(f"`{fn}`: `grad_fn` must be callable (params -> gradient pytree), "
                    f"got {type(grad_fn).__name__}.")
  if params is None:
    raise ValueError(f"`{fn}` needs the current parameters: call "
                     "`update(grads, state, params, grad_fn=...)` with `params`, not None.")


def _describe_mismatch(got: PyTree, like: PyTree, what: str, fn: str) -> None:
  got_def, like_def = jax.tree.structure(got), jax.tree.structure(like)
  if got_def != like_def:
    got_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(got)[0]}
    like_paths = {jax.tree_util.keystr(p) for p, _ in
                  jax.tree_util.tree_flatten_with_path(like)[0]}
    missing = ", ".join(sorted(like_paths - got_paths)[:5]) or "none"
    extra = ", ".join(sorted(got_paths - like_paths)[:5]) or "none"
    raise ValueError(
        f"`{fn}`: {what} must have the pytree structure of `params`; missing leaves: "
        f"{missing}; unexpected leaves: {extra}. Make `grad_fn(p)` return "
        "`jax.grad(loss)(p, ...)` for the same `p` (use `has_aux` and drop the aux part).")
  bad = []
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(like), strict=False):
    if jnp.shape(g) != jnp.shape(w):
      bad.append(f"{jax.tree_util.keystr(path)}: {jnp.shape(g)} vs {jnp.shape(w)}")
  if bad:
    raise ValueError(f"`{fn}`: {what} has leaves whose shapes differ from `params`: "
                     + "; ".join(bad[:5]) + ". Return the gradient with respect to `p`.")


def call_grad_fn(grad_fn: Callable, point: PyTree, params: PyTree, fn: str) -> PyTree:
  """grad_fn(point), checked against params' structure and cast to params' dtypes."""
  g = grad_fn(point)
  _describe_mismatch(g, params, "the pytree returned by `grad_fn`", fn)
  return tu.cast_like(g, params)


def perturbed_gradient(
    grad_fn: Callable, params: PyTree, direction: PyTree, radius: jax.Array, *,
    ascent_steps: int = 1, perturbation: optax.GradientTransformation | None = None,
    perturbation_state: Any = None, extra_args: dict | None = None,
    fn: str = "sharpness_aware") -> PyTree:
  """The gradient at ``params + delta`` after ``ascent_steps`` ascent steps.

  One step: delta = radius * direction (no projection, so SAM is exact to the
  bit). K steps: delta <- Proj(delta + radius/K * d(grad at params+delta)) in the
  perturbation's geometry, starting from the given direction.
  """
  if ascent_steps == 1:
    delta = tu.scale(direction, radius)
  else:
    project = pert.projection_of(perturbation)
    update = optax.with_extra_args_support(perturbation).update
    step = radius / ascent_steps
    delta = project(tu.scale(direction, step), radius, params)
    # Unrolled on purpose: XLA:CPU runs convolutions inside while-loops far slower
    # than outside (jax-ml/jax#12868); K is small, so compile time stays modest.
    for _ in range(ascent_steps - 1):
      g = call_grad_fn(grad_fn, tu.add_scaled(params, 1.0, delta), params, fn)
      d, _ = update(g, perturbation_state, params, **(extra_args or {}))
      delta = project(tu.add_scaled(delta, step, d), radius, params)
  return call_grad_fn(grad_fn, tu.add_scaled(params, 1.0, delta), params, fn)


def sharpness_aware(
    rho: ScalarOrSchedule = 0.05, *,
    perturbation: optax.GradientTransformation | None = None,
    eps: float = 1e-12,
    ascent_steps: int = 1,
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-aware gradient: replaces g by the gradient at a perturbed point.

  Given the clean gradient :math:`g = \nabla L(w)` (the ``updates``) and a
  closure ``grad_fn`` computing :math:`\nabla L`, it returns

  .. math:: \nabla L(w + \rho\, d),\qquad d = \mathrm{perturbation}(g, w)

  which for the default :func:`l2` perturbation is SAM's
  :math:`\nabla L(w + \rho\, g/\|g\|)`. Put it first in an optax chain, before
  the base optimizer; clipping belongs after it (clipping before the ascent
  changes nothing, since the direction is normalized).

  Args:
    rho: radius :math:`\rho \ge 0` of the neighbourhood, a float or a schedule
      ``count -> rho``. ``rho = 0`` returns ``grad_fn(w)`` exactly.
    perturbation: a transformation mapping g (with params) to the direction
      ``d``; default ``l2(eps)``. See :func:`adaptive`, :func:`masked` and the
      other geometries.
    eps: norms at or below this count as zero, so a zero gradient gives
      :math:`\epsilon = 0` and a finite result (used by the default ``l2``).
    ascent_steps: K >= 1 gradient evaluations per update: K - 1 extra ascent
      steps :math:`\delta \leftarrow \Pi_\rho(\delta + (\rho/K)\, d(w+\delta))`
      before the final gradient; K = 1 is SAM.
    axis_name: for per-device perturbation (m-sharpness) inside ``shard_map`` or
      ``pmap``: each device perturbs with its own local ``updates`` and the
      perturbed gradients are averaged with ``lax.pmean`` over this axis. Pass
      *local* (not yet averaged) gradients. ``None``: no collective.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``(updates, state, params, *, grad_fn, **extra_args)``; unused extra
    arguments are ignored and forwarded to the perturbation.

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
  check_rho(rho)
  pert._check_nonneg("eps", eps, "sharpness_aware", "use a small positive value such as 1e-12.")
  if not isinstance(ascent_steps, int) or isinstance(ascent_steps, bool) or ascent_steps < 1:
    raise ValueError(f"`sharpness_aware(ascent_steps=...)` must be an int >= 1, got "
                     f"{ascent_steps!r}; 1 is SAM.")
  check_axis_name(axis_name, "sharpness_aware")
  if perturbation is None:
    perturbation = pert.l2(eps)
  if not (hasattr(perturbation, "init") and hasattr(perturbation, "update")):
    raise TypeError("`sharpness_aware(perturbation=...)` must be an optax "
                    "GradientTransformation such as `sam_optax.l2()`, got "
                    f"{type(perturbation).__name__}.")
  p_update = optax.with_extra_args_support(perturbation).update

  def init_fn(params):
    if params is None:
      raise ValueError("`sharpness_aware.init(params)` needs the parameters, not None.")
    return SharpnessAwareState(jnp.zeros([], jnp.int32), perturbation.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    check_update_call("sharpness_aware.update", params, grad_fn)
    _describe_mismatch(updates, params, "`updates`", "sharpness_aware.update")
    if axis_name is not None:
      distributed.check_local_gradient(updates, axis_name, "sharpness_aware")
    radius = rho_at(rho, state.count)
    direction, p_state = p_update(updates, state.perturbation_state, params, **extra_args)
    g_adv = perturbed_gradient(grad_fn, params, direction, radius, ascent_steps=ascent_steps,
                               perturbation=perturbation, perturbation_state=p_state,
                               extra_args=extra_args, fn="sharpness_aware.update")
    if axis_name is not None:
      g_adv = jax.lax.pmean(g_adv, axis_name)
    g_adv = tu.cast_like(g_adv, updates)
    return g_adv, SharpnessAwareState(optax.safe_increment(state.count), p_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
