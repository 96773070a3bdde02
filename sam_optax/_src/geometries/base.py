"""What a perturbation geometry is, and the pieces every geometry shares.

A perturbation is an :class:`optax.GradientTransformationExtraArgs` whose
``update(g, state, params, **extra_args)`` returns the direction ``d`` (a pytree
shaped like ``params``) and its new state; :func:`sam_optax.sharpness_aware`
then evaluates the gradient at ``w + rho * d``. A geometry built with
:func:`make_perturbation` also knows the projection onto its ball, which
multi-step ascent uses: asked through ``update`` itself (the keyword
``project_onto_radius=``), so the projection survives every wrapper that
forwards extra arguments (``optax.inject_hyperparams``, :func:`masked`,
``_replace``). A user-written perturbation without one is projected onto the L2
ball.
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
Projection = Callable[[PyTree, jax.Array, PyTree], PyTree]
PROJECT = "project_onto_radius"
NORM = "direction_norm_of"


class Projected(NamedTuple):
  """What a geometry's ``update`` returns when asked for a projection."""
  delta: PyTree


class DirectionNorm(NamedTuple):
  """What a geometry's ``update`` returns when asked for ``||d(g)||`` in closed form."""
  value: jax.Array


class Perturbation(optax.GradientTransformationExtraArgs):
  """A perturbation transformation (``init``/``update``) that also projects onto its ball.

  It is an ordinary :class:`optax.GradientTransformationExtraArgs`;
  ``project(delta, radius, params)`` maps ``delta`` onto the ball of ``radius``
  in the perturbation's own geometry.

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.l2()
    >>> isinstance(p, sam_optax.Perturbation)
    True
    >>> print(np.asarray(p.project(jnp.array([3.0, 4.0]), 1.0, None)))  # onto the unit ball
    [0.6 0.8]
  """

  def project(self, delta: PyTree, radius: jax.Array, params: PyTree) -> PyTree:
    return project(self, optax.EmptyState(), delta, radius, params)


def make_perturbation(init: Callable, update: Callable, project: Projection | None = None
                      ) -> Perturbation:
  """Builds a :class:`Perturbation` from its pure functions.

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
  projection = project_l2 if project is None else project
  return with_projection(init, update, lambda delta, radius, params, state: projection(delta, radius, params))


def with_projection(init: Callable, update: Callable, project: Callable,
                    norm: Callable | None = None) -> Perturbation:
  """A :class:`Perturbation` whose projection also sees its state:
  ``project(delta, radius, params, state)``; ``norm(g, params)``, if given, is
  ``||d(g)||`` in closed form (the telemetry then need not reduce the perturbation
  itself, which would make XLA keep a params-sized copy of it)."""

  def update_or_project(updates, state, params=None, **extra_args):
    radius = extra_args.pop(PROJECT, None)
    if radius is not None:
      return Projected(project(updates, radius, params, state)), state
    if extra_args.pop(NORM, None) is not None:
      return (None if norm is None else DirectionNorm(norm(updates, params))), state
    return update(updates, state, params, **extra_args)

  return Perturbation(init, update_or_project)


def direction_norm(perturbation: optax.GradientTransformation, state: Any, g: PyTree,
                   params: PyTree) -> jax.Array | None:
  """``||d(g)||`` if the geometry knows it in closed form, else None."""
  out, _ = optax.with_extra_args_support(perturbation).update(g, state, params, **{NORM: True})
  return out.value if isinstance(out, DirectionNorm) else None


def project(perturbation: optax.GradientTransformation, state: Any, delta: PyTree,
            radius: jax.Array, params: PyTree) -> PyTree:
  """``delta`` projected onto ``perturbation``'s ball of ``radius`` (the L2 ball for a
  perturbation that declares none)."""
  update = optax.with_extra_args_support(perturbation).update
  out, _ = update(delta, state, params, **{PROJECT: radius})
  return out.delta if isinstance(out, Projected) else project_l2(delta, radius, params)


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
