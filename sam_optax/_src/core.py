"""The core transformation: evaluate the gradient at the perturbed point."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import distributed
from sam_optax._src import perturbations as pert
from sam_optax._src import tree as tu
from sam_optax._src.validation import (  # noqa: F401 (check_int, check_transform: re-exported)
    check_int,
    check_real,
    check_static_int,
    check_transform,
)

PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class Telemetry(NamedTuple):
  r"""What the last sharpness-aware step saw, as float32 scalars (read them with
  :func:`sam_optax.metrics`).

  Attributes:
    clean_grad_norm: :math:`\|g\|`, the norm of the incoming gradient.
    perturbation_norm: :math:`\|\epsilon\|`, the length of the step to the
      perturbed point (:math:`\rho` for SAM with a non-zero gradient).
    perturbed_grad_norm: :math:`\|g_{adv}\|`, the norm of the gradient at the
      perturbed point.
    cosine: :math:`\cos(g, g_{adv})`; 0 when either is zero.
    clean_loss: :math:`L(w)`, when the caller passed ``value=``.
    perturbed_loss: :math:`L(w + \epsilon)`, when the caller passed
      ``value_and_grad_fn=``.
    has_clean_loss, has_perturbed_loss: int32 1/0, whether the two losses were
      given on the last step (:func:`sam_optax.metrics` omits absent entries).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.sharpness_aware(0.05).init(jnp.ones(3))
    >>> isinstance(state.telemetry, sam_optax.Telemetry), float(state.telemetry.cosine)
    (True, 0.0)
  """
  clean_grad_norm: jax.Array
  perturbation_norm: jax.Array
  perturbed_grad_norm: jax.Array
  cosine: jax.Array
  clean_loss: jax.Array
  perturbed_loss: jax.Array
  has_clean_loss: jax.Array
  has_perturbed_loss: jax.Array


_FLOAT_FIELDS = ("clean_grad_norm", "perturbation_norm", "perturbed_grad_norm", "cosine",
                 "clean_loss", "perturbed_loss")


def empty_telemetry() -> Telemetry:
  # one buffer per field: a state holding the same array twice cannot be donated
  return Telemetry(*(jnp.zeros([], jnp.float32) for _ in _FLOAT_FIELDS),
                   jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))


def make_telemetry(g: PyTree, delta: PyTree | None, g_adv: PyTree, clean_loss: Any,
                   perturbed_loss: Any, eps: float = 1e-12, *,
                   perturbation_norm: Any = None) -> Telemetry:
  """Telemetry of one step; a loss given as None is recorded as absent (0, flag 0)."""
  f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
  g_norm, adv_norm = tu.norm(g), tu.norm(g_adv)
  cos = tu.vdot(g, g_adv) * tu.safe_inverse(g_norm * adv_norm, eps * eps)
  if perturbation_norm is None:
    perturbation_norm = tu.norm(delta)

  def loss(x):
    if x is None:
      return jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32)
    return f32(jnp.real(x)), jnp.ones([], jnp.int32)

  (cl, has_cl), (pl, has_pl) = loss(clean_loss), loss(perturbed_loss)
  return Telemetry(f32(g_norm), f32(perturbation_norm), f32(adv_norm), f32(cos), cl, pl,
                   has_cl, has_pl)


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware`.

  Attributes:
    count: int32 number of updates applied so far (the argument of a ``rho``
      schedule).
    perturbation_state: the state of the perturbation transformation (EMAs,
      PRNG keys, masks; ``EmptyState`` for stateless ones).
    telemetry: a :class:`Telemetry` of the last step (``None`` when built with
      ``telemetry=False``).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.sharpness_aware(0.05).init({"w": jnp.ones(3)})
    >>> isinstance(state, sam_optax.SharpnessAwareState), int(state.count)
    (True, 0)
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None = None


def check_rho(rho: Any, fn: str = "sharpness_aware") -> Any:
  """Raises on a rho that is neither a schedule nor a finite number >= 0; returns it
  (a concrete number as a Python float)."""
  if callable(rho):
    return rho
  try:
    return check_real("rho", rho, fn, low=0.0)
  except TypeError:
    raise TypeError(f"`{fn}(rho=...)` must be a float or a schedule (a callable of the "
                    f"step count), got {type(rho).__name__} {rho!r}.") from None
  except ValueError:
    raise ValueError(f"`{fn}(rho=...)` must be finite and >= 0, got {rho!r}; the usual "
                     "value is 0.05 for SAM (0.5 to 1.0 for ASAM).") from None


def check_axis_name(axis_name: Any, fn: str) -> None:
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`{fn}(axis_name=...)` must be None, a mesh/pmap axis name or a "
                    f"tuple of names, got {axis_name!r}.")


def rho_at(rho: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  value = rho(count) if callable(rho) else rho
  return jnp.asarray(value, jnp.float32)


GradientOracle = Callable[[PyTree], tuple[Any, PyTree]]


def check_update_call(fn: str, params: PyTree, grad_fn: Any,
                      value_and_grad_fn: Any = None) -> None:
  """Trace-time checks of an update call that needs params and a gradient closure."""
  if grad_fn is None and value_and_grad_fn is None:
    raise TypeError(
        f"`{fn}` needs the loss gradient closure: call `update(grads, state, params, "
        "grad_fn=grad_fn)` with `grad_fn = lambda p: jax.grad(loss)(p, batch)` (or "
        "`value_and_grad_fn=lambda p: jax.value_and_grad(loss)(p, batch)` to also record "
        "the perturbed loss); inside `optax.chain` pass it as a keyword to the chain's "
        "`update`.")
  if grad_fn is not None and value_and_grad_fn is not None:
    raise TypeError(f"`{fn}`: pass either `grad_fn=` or `value_and_grad_fn=`, not both.")
  for name, f in (("grad_fn", grad_fn), ("value_and_grad_fn", value_and_grad_fn)):
    if f is not None and not callable(f):
      raise TypeError(f"`{fn}`: `{name}` must be callable (params -> "
                      f"{'gradient pytree' if name == 'grad_fn' else '(loss, gradient)'}), "
                      f"got {type(f).__name__}.")
  if params is None:
    raise ValueError(f"`{fn}` needs the current parameters: call "
                     "`update(grads, state, params, grad_fn=...)` with `params`, not None.")


def gradient_oracle(fn: str, params: PyTree, grad_fn: Any = None,
                    value_and_grad_fn: Any = None) -> GradientOracle:
  """One closure ``point -> (loss or None, gradient)`` from whichever the caller gave.

  The gradient is checked against ``params``' structure and cast to its dtypes;
  a ``grad_fn`` that returns a ``(loss, grads)`` pair gets an error pointing to
  ``value_and_grad_fn=``.
  """
  check_update_call(fn, params, grad_fn, value_and_grad_fn)

  def oracle(point):
    if value_and_grad_fn is not None:
      out = value_and_grad_fn(point)
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"`{fn}`: `value_and_grad_fn` must return a `(loss, grads)` pair "
                        f"like `jax.value_and_grad(loss)`, got {type(out).__name__}.")
      loss, g = out
      if jnp.ndim(loss) != 0:
        raise ValueError(f"`{fn}`: the loss returned by `value_and_grad_fn` must be a "
                         f"scalar, got shape {jnp.shape(loss)}; with `has_aux=True` return "
                         "`(loss, grads)` without the aux part.")
    else:
      loss, g = None, grad_fn(point)
      _reject_value_and_grad_pair(g, params, fn)
    _describe_mismatch(g, params, "the gradient returned by the closure", fn)
    return loss, tu.cast_like(g, params)

  return oracle


def _reject_value_and_grad_pair(g: Any, params: PyTree, fn: str) -> None:
  if (isinstance(g, tuple) and len(g) == 2 and jnp.ndim(g[0]) == 0
      and jax.tree.structure(g) != jax.tree.structure(params)
      and jax.tree.structure(g[1]) == jax.tree.structure(params)):
    raise TypeError(
        f"`{fn}`: `grad_fn` returned a `(loss, grads)` pair; `grad_fn` must return the "
        "gradient only. Pass it as `value_and_grad_fn=` instead (then the perturbed "
        "loss is recorded too), or use `jax.grad` in `grad_fn`.")


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


def perturbed_gradient(
    oracle: GradientOracle, params: PyTree, direction: PyTree, radius: jax.Array, *,
    ascent_steps: int | None = None, perturbation: optax.GradientTransformation | None = None,
    perturbation_state: Any = None, extra_args: dict | None = None,
    ) -> tuple[Any, PyTree, PyTree]:
  """``(loss, gradient, delta)`` at ``params + delta`` after ``ascent_steps`` steps.

  One step: delta = radius * direction (no projection, so SAM is exact to the
  bit). K steps: delta <- Proj(delta + radius/K * d(grad at params+delta)) in the
  perturbation's geometry, starting from the given direction. ``oracle`` comes
  from :func:`gradient_oracle`; the loss is None when it has none.
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
      _, g = oracle(tu.add_scaled(params, 1.0, delta))
      d, _ = update(g, perturbation_state, params, **(extra_args or {}))
      delta = project(tu.add_scaled(delta, step, d), radius, params)
  loss, g_adv = oracle(tu.add_scaled(params, 1.0, delta))
  return loss, g_adv, delta


# The chain-order guard looks at the first few steps only.
_ORDER_CHECK_STEPS = 3
_ORDER_COSINE = -0.1
_ORDER_MESSAGE = (
    "`{fn}`: the incoming `updates` point away from the gradient at the perturbed point "
    "(cosine {cos:.2f}), which is what happens when the sharpness-aware transformation is "
    "not first in the chain: it must come first, so that it receives the raw loss "
    "gradient. Write `optax.chain(sam_optax.sharpness_aware(rho), <base optimizer>)` (or "
    "`sam_optax.sam(base, rho)`), not `optax.chain(<base optimizer>, sharpness_aware(rho))`.")


def guard_cosine(g: PyTree, g_adv: PyTree, eps: float = 1e-12, budget: int = 4096) -> jax.Array:
  """cos(g, g_adv) over the smallest leaves only (at least one, at most ``budget``
  entries beyond the first): enough to see the sign flip of a chain in the wrong order,
  and cheap to keep alive through the second pass, unlike a full copy of g."""
  leaves = jax.tree.leaves(g)
  order = sorted(range(len(leaves)), key=lambda i: leaves[i].size)
  keep, total = [], 0
  for i in order:
    if keep and total + leaves[i].size > budget:
      break
    keep.append(i)
    total += leaves[i].size
  adv = jax.tree.leaves(g_adv)
  return tu.cosine([leaves[i] for i in keep], [adv[i] for i in keep], eps)


def order_guard(fn: str) -> Callable[[jax.Array, jax.Array], None]:
  """A check, once per transformation instance, that ``updates`` is the loss gradient.

  If the transform sits after the base optimizer its ``updates`` are
  ``-lr * (something like g)``, so their cosine with the perturbed gradient is
  close to -1 in the first steps; a real gradient gives a positive cosine. The
  check runs inside a ``lax.cond`` on the first steps only and warns from the host.
  """
  warned = [False]

  def warn(count, cos):
    # re-checked here: under vmap the cond below becomes a select and always calls back
    bad = (np.asarray(count) < _ORDER_CHECK_STEPS) & (np.asarray(cos) < _ORDER_COSINE)
    if bad.any() and not warned[0]:
      warned[0] = True
      warnings.warn(_ORDER_MESSAGE.format(fn=fn, cos=float(np.min(np.asarray(cos)[bad]))),
                    UserWarning, stacklevel=2)

  def check(count, cos):
    if warned[0]:
      return
    jax.lax.cond((count < _ORDER_CHECK_STEPS) & (cos < _ORDER_COSINE),
                 lambda c, x: jax.debug.callback(warn, c, x), lambda c, x: None, count, cos)

  return check


def sharpness_aware(
    rho: ScalarOrSchedule = 0.05, *,
    perturbation: optax.GradientTransformation | None = None,
    eps: float = 1e-12,
    ascent_steps: int | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    telemetry: bool = True,
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
    ascent_steps: K >= 1 (None: 1) gradient evaluations per update: K - 1 extra ascent
      steps :math:`\delta \leftarrow \Pi_\rho(\delta + (\rho/K)\, d(w+\delta))`
      before the final gradient; K = 1 is SAM.
    axis_name: for per-device perturbation (m-sharpness) inside ``shard_map`` or
      ``pmap``: each device perturbs with its own local ``updates`` and the
      perturbed gradients are averaged with ``lax.pmean`` over this axis. Pass
      *local* (not yet averaged) gradients. ``None``: no collective.
    telemetry: record a :class:`Telemetry` of each step in the state (norms,
      cosine, losses when given; a few reductions, no extra gradient pass).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``(updates, state, params, *, grad_fn, **extra_args)``; unused extra
    arguments are ignored and forwarded to the perturbation. Instead of
    ``grad_fn`` the caller may pass ``value_and_grad_fn`` (params -> ``(loss,
    grads)``, as ``jax.value_and_grad`` gives) and the clean loss as
    ``value=``; then the state records the clean and perturbed losses too (the
    perturbed loss comes from the gradient pass that runs anyway).

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
  rho = check_rho(rho)
  eps = pert._check_nonneg("eps", eps, "sharpness_aware", "use a small positive value such as 1e-12.")
  # None means 1: a default of None keeps `optax.inject_hyperparams(sharpness_aware)`
  # from turning this structural int into a traced hyperparameter.
  ascent_steps = 1 if ascent_steps is None else ascent_steps
  ascent_steps = check_static_int("ascent_steps", ascent_steps, "sharpness_aware", hint="1 is SAM")
  ascent_steps = int(ascent_steps)
  check_axis_name(axis_name, "sharpness_aware")
  if perturbation is None:
    perturbation = pert.l2(eps)
  if not (hasattr(perturbation, "init") and hasattr(perturbation, "update")):
    raise TypeError("`sharpness_aware(perturbation=...)` must be an optax "
                    "GradientTransformation such as `sam_optax.l2()`, got "
                    f"{type(perturbation).__name__}.")
  p_update = optax.with_extra_args_support(perturbation).update

  guard = order_guard("sharpness_aware")

  def init_fn(params):
    if params is None:
      raise ValueError("`sharpness_aware.init(params)` needs the parameters, not None.")
    return SharpnessAwareState(jnp.zeros([], jnp.int32), perturbation.init(params),
                               empty_telemetry() if telemetry else None)

  def update_fn(updates, state, params=None, *, grad_fn=None, value_and_grad_fn=None,
                value=None, **extra_args):
    fn = "sharpness_aware.update"
    oracle = gradient_oracle(fn, params, grad_fn, value_and_grad_fn)
    _describe_mismatch(updates, params, "`updates`", fn)
    if axis_name is not None:
      distributed.check_local_gradient(updates, axis_name, "sharpness_aware")
    radius = rho_at(rho, state.count)
    direction, p_state = p_update(updates, state.perturbation_state, params, **extra_args)
    loss, g_local, delta = perturbed_gradient(
        oracle, params, direction, radius, ascent_steps=ascent_steps,
        perturbation=perturbation, perturbation_state=p_state, extra_args=extra_args)
    g_adv = g_local if axis_name is None else jax.lax.pmean(g_local, axis_name)
    g_adv = tu.cast_like(g_adv, updates)
    record = None
    if telemetry:
      record = make_telemetry(updates, delta, g_local, value, loss, eps)
      if axis_name is not None:  # one number for the whole axis, as the update is
        record = record._replace(**{f: jax.lax.pmean(getattr(record, f), axis_name)
                                    for f in _FLOAT_FIELDS})
      guard(state.count, record.cosine)
    else:
      guard(state.count, guard_cosine(updates, g_local, eps))
    return g_adv, SharpnessAwareState(optax.safe_increment(state.count), p_state, record)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
