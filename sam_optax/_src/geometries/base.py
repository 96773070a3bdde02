"""What a perturbation geometry is, and the pieces every geometry shares.

A geometry says, where it is defined (:func:`make_perturbation`), three things:

* its **direction**: ``update(g, state, params, **extra_args) -> (d, state)``, the
  direction ``d`` of the step to the perturbed point :math:`w + \\rho d` (a pytree
  shaped like ``params``); this is the transformation's ``update``;
* its **projection** onto its ball of a radius, which multi-step ascent uses (default:
  the L2 ball);
* the **norm** of its direction in closed form, where one exists (``‖g/‖g‖‖ = 1``),
  so the telemetry need not reduce the perturbation itself (which would keep a
  params-sized copy of it alive through the second pass).

The result is an ordinary optax transformation (a :class:`Perturbation`). The engine
asks a geometry for its projection and norm through that same ``update`` (one
:class:`Request` in the keyword ``sam_optax_geometry``, answered by a :class:`Answer`),
so both survive every wrapper that forwards extra arguments: ``optax.inject_hyperparams``,
:func:`masked`, ``_replace``. A transformation that answers no request (a user's own
``optax.GradientTransformation``) is projected onto the L2 ball and has no closed-form norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.validation import check_real

PyTree = Any
Projection = Callable[[PyTree, jax.Array, PyTree, Any], PyTree]
Norm = Callable[[PyTree, PyTree], jax.Array]
REQUEST = "sam_optax_geometry"


class Request(NamedTuple):
  """What the engine asks a geometry through ``update``: ``"project"`` (the input is a
  perturbation; project it onto the ball of ``radius``) or ``"norm"`` (the input is g;
  the norm of d(g) in closed form)."""
  kind: str
  radius: Any = None


class Answer(NamedTuple):
  """A geometry's answer to a :class:`Request`: the projected perturbation, or the norm
  (None: no closed form)."""
  value: Any


class Perturbation(optax.GradientTransformationExtraArgs):
  """A perturbation geometry: an optax transformation whose ``update`` gives the direction,
  which also projects onto its ball and knows its direction's norm where one exists.

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.l2()
    >>> isinstance(p, sam_optax.Perturbation)
    True
    >>> print(np.asarray(p.project(jnp.array([3.0, 4.0]), 1.0, None)))  # onto the unit ball
    [0.6 0.8]
    >>> float(p.direction_norm(jnp.array([3.0, 4.0]), None))  # |g / |g|| = 1
    1.0
  """

  def project(self, delta: PyTree, radius: jax.Array, params: PyTree,
              state: Any = None) -> PyTree:
    """``delta`` projected onto this geometry's ball of ``radius``."""
    return project(self, optax.EmptyState() if state is None else state, delta, radius, params)

  def direction_norm(self, g: PyTree, params: PyTree) -> jax.Array | None:
    """``‖d(g)‖`` in closed form, or None where the geometry has none."""
    return direction_norm(self, optax.EmptyState(), g, params)


def make_perturbation(init: Callable, update: Callable, project: Callable | None = None, *,
                      norm: Norm | None = None, project_with_state: bool = False) -> Perturbation:
  """Builds a :class:`Perturbation` from its pure functions.

  Args:
    init: ``params -> state``.
    update: the direction, ``(g, state, params=None, **extra_args) -> (d, state)``.
    project: ``(delta, radius, params) -> delta`` onto the geometry's ball of ``radius``
      (``project_with_state=True``: ``(delta, radius, params, state)``); default: the L2
      ball.
    norm: ``(g, params) -> ‖d(g)‖`` in closed form, where one exists.
    project_with_state: the projection also takes the geometry's state.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, sam_optax
    >>> def init(params):
    ...   return optax.EmptyState()
    >>> def update(g, state, params=None, **extra_args):  # d = g / max|g|
    ...   return jax.tree.map(lambda x: x / jnp.max(jnp.abs(x)), g), state
    >>> tx = sam_optax.sharpness_aware(0.1, perturbation=sam_optax.make_perturbation(init, update))
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 3))
    >>> w = jnp.array([1.0, 2.0])   # g = 3 w^2 = [3, 12], d = [0.25, 1]
    >>> out, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> print(np.round(np.asarray(out), 4))   # 3 (w + 0.1 d)^2
    [ 3.1519 13.23  ]
  """
  if project is None:
    projection: Projection = lambda delta, radius, params, state: project_l2(delta, radius, params)
  elif project_with_state:
    projection = project
  else:
    projection = lambda delta, radius, params, state: project(delta, radius, params)

  def answer_or_direction(updates, state, params=None, **extra_args):
    request = extra_args.pop(REQUEST, None)
    if request is None:
      return update(updates, state, params, **extra_args)
    if request.kind == "project":
      return Answer(projection(updates, request.radius, params, state)), state
    return Answer(None if norm is None else norm(updates, params)), state

  return Perturbation(init, answer_or_direction)


def _ask(perturbation: optax.GradientTransformation, state: Any, x: PyTree, params: PyTree,
         request: Request) -> Any:
  """The geometry's answer to ``request``, or None where it answers none."""
  out, _ = optax.with_extra_args_support(perturbation).update(x, state, params,
                                                              **{REQUEST: request})
  return out.value if isinstance(out, Answer) else None


def direction_norm(perturbation: optax.GradientTransformation, state: Any, g: PyTree,
                   params: PyTree) -> jax.Array | None:
  """``||d(g)||`` if the geometry knows it in closed form, else None."""
  return _ask(perturbation, state, g, params, Request("norm"))


def project(perturbation: optax.GradientTransformation, state: Any, delta: PyTree,
            radius: jax.Array, params: PyTree) -> PyTree:
  """``delta`` projected onto ``perturbation``'s ball of ``radius`` (the L2 ball for a
  transformation that declares none)."""
  out = _ask(perturbation, state, delta, params, Request("project", radius))
  return project_l2(delta, radius, params) if out is None else out


def project_l2(delta: PyTree, radius: jax.Array, params: PyTree) -> PyTree:
  """Radial projection onto the L2 ball {||delta|| <= radius}."""
  del params
  n = tu.norm(delta)
  return tu.scale(delta, jnp.minimum(1.0, radius * tu.safe_inverse(n, 0.0)))


def check_nonneg(name: str, value: float, fn: str, hint: str) -> Any:
  return check_real(name, value, fn, low=0.0, hint=hint.rstrip("."))


def check_unit(name: str, value: float, fn: str, *, open_left: bool = True) -> Any:
  return check_real(name, value, fn, low=0.0, high=1.0, low_open=open_left)


def check_decay(name: str, value: float, fn: str) -> Any:
  return check_real(name, value, fn, low=0.0, high=1.0, high_open=True)


def need_params(params: PyTree, fn: str) -> None:
  if params is None:
    raise ValueError(f"`{fn}()` needs the current parameters: call "
                     f"`update(updates, state, params, ...)` with `params`.")


def stateless_init(params: PyTree) -> optax.EmptyState:
  del params
  return optax.EmptyState()


def select_leaves(mask, params):
  """Flat list of booleans, one per leaf of params (mask may be a prefix tree)."""
  m = mask(params) if callable(mask) else mask
  treedef = jax.tree.structure(params)
  try:
    flags = treedef.flatten_up_to(m)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "`masked(mask=...)` must be a pytree of bools with the structure of the "
        "parameters (or a prefix of it), or a callable returning one; "
        f"got a mask that does not match: {e}") from None
  out = []
  for f in flags:
    if isinstance(f, (bool, jnp.bool_)) or (hasattr(f, "dtype") and f.shape == ()):
      out.append(bool(f))
    else:
      raise TypeError(f"`masked(mask=...)` leaves must be Python bools, got {f!r}.")
  return out
