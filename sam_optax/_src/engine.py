"""The engine: one ``update`` for every sharpness-aware method.

A method is a :class:`Method` declaration: how it makes its evaluation point(s)
from the gradient, the params and its state (``points``), how it turns what the
closure returns there into its output (``combine``), and its own extra state
(``init``). :func:`build` makes the optax transformation and owns everything
else: the checks of the update call, the closure contract (:class:`Closures`),
casting back to the params' dtypes, ``rho`` schedules, the ``axis_name``
reduction, the telemetry, the chain-order check and the gating hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import distributed, gating
from sam_optax._src import telemetry as tm
from sam_optax._src import tree as tu
from sam_optax._src.validation import check_real

PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


# ------------------------------------------------------------ the closure contract


class Objective(NamedTuple):
  r"""The closure kind for methods that need more than gradients: model outputs and
  per-example losses, on the whole batch or a subset of it.

  With :math:`F(w) = ` ``apply_fn(w, batch)`` (the model's outputs, e.g. logits)
  and :math:`\ell_i = ` ``loss_fn(F, batch)[i]`` (one loss per example), the
  training loss is :math:`L(w) = \frac1B \sum_i \ell_i(F(w))`. Pass it to
  ``update`` as ``objective=`` (the Flax steps do). Methods that need only
  gradients derive ``value_and_grad_fn`` from it; ESAM evaluates a subset of the
  examples (:meth:`subset`, the leading axis of every leaf of ``batch``);
  Functional-SAM differentiates :math:`F` and :math:`\ell` apart.

  Attributes:
    apply_fn: ``(params, batch) -> outputs``; close over dropout keys and
      BatchNorm statistics (the same for every pass of a step).
    loss_fn: ``(outputs, batch) -> (B,)`` per-example losses.
    batch: a pytree of arrays whose leading axis is the example (``None`` when
      ``apply_fn`` closes over the batch itself; then no subset can be taken).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> obj = sam_optax.Objective(lambda w, b: b[0] @ w, lambda out, b: (out - b[1]) ** 2,
    ...                           (jnp.eye(3), jnp.ones(3)))
    >>> obj.example_losses(jnp.zeros(3)).tolist(), float(obj.loss(jnp.ones(3)))
    ([1.0, 1.0, 1.0], 0.0)
  """
  apply_fn: Callable[[PyTree, PyTree], PyTree]
  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  batch: PyTree = None

  def outputs(self, params: PyTree) -> PyTree:
    return self.apply_fn(params, self.batch)

  def example_losses(self, params: PyTree) -> jax.Array:
    return self.loss_fn(self.apply_fn(params, self.batch), self.batch)

  def loss(self, params: PyTree) -> jax.Array:
    return jnp.mean(self.example_losses(params).astype(jnp.float32))

  def subset(self, indices: jax.Array) -> Objective:
    """The objective on the examples ``indices`` of the batch."""
    if self.batch is None:
      raise ValueError("`Objective.subset` needs the batch: build the objective with "
                       "`batch=` so that examples can be selected.")
    return self._replace(batch=jax.tree.map(lambda a: jnp.take(a, indices, axis=0), self.batch))


def legacy_objective(per_example_loss_fn: Callable, batch: PyTree) -> Objective:
  """ESAM's earlier keywords as an :class:`Objective`: ``per_example_loss_fn(p)`` or
  ``per_example_loss_fn(p, batch)`` with ``batch=``."""
  if batch is None:
    return Objective(lambda p, b: per_example_loss_fn(p), lambda out, b: out, None)
  return Objective(per_example_loss_fn, lambda out, b: out, batch)


def describe_mismatch(got: PyTree, like: PyTree, what: str, fn: str) -> None:
  """Raises when ``got`` does not have the pytree structure and leaf shapes of ``like``."""
  got_def, like_def = jax.tree.structure(got), jax.tree.structure(like)
  if got_def != like_def:
    keys = lambda t: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
    missing = ", ".join(sorted(keys(like) - keys(got))[:5]) or "none"
    extra = ", ".join(sorted(keys(got) - keys(like))[:5]) or "none"
    raise ValueError(
        f"`{fn}`: {what} must have the pytree structure of `params`; missing leaves: "
        f"{missing}; unexpected leaves: {extra}. Make `grad_fn(p)` return "
        "`jax.grad(loss)(p, ...)` for the same `p` (use `has_aux` and drop the aux part).")
  bad = [f"{jax.tree_util.keystr(path)}: {jnp.shape(g)} vs {jnp.shape(w)}"
         for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(like))
         if jnp.shape(g) != jnp.shape(w)]
  if bad:
    raise ValueError(f"`{fn}`: {what} has leaves whose shapes differ from `params`: "
                     + "; ".join(bad[:5]) + ". Return the gradient with respect to `p`.")


def _is_scalar_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, float, int)) and np.ndim(x) == 0


def check_params(params: PyTree, fn: str) -> None:
  if params is None:
    raise ValueError(f"`{fn}` needs the current parameters: call "
                     "`update(grads, state, params, grad_fn=...)` with `params`, not None.")
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      raise TypeError(
          f"`{fn}`: the parameter {jax.tree_util.keystr(path)} has the integer/bool dtype "
          f"{jnp.result_type(x)}, which has no gradient and cannot be perturbed. Keep "
          "non-trainable arrays out of the optimized params (e.g. `nnx.Optimizer(..., "
          "wrt=nnx.Param)`, or a separate collection), or wrap the transformation in "
          "`optax.masked` over the floating leaves.")


class Closures:
  """The closures the caller passed to ``update``, checked once, as the evaluations a
  method may ask for.

  ``grad_fn`` (params -> gradient), ``value_and_grad_fn`` (params -> ``(loss,
  gradient)``) or an :class:`Objective`; every gradient is checked against the
  params' structure and cast to their dtypes.
  """

  def __init__(self, fn: str, params: PyTree, *, grad_fn: Any = None, value_and_grad_fn: Any = None,
               objective: Objective | None = None, needs: str = "gradient"):
    self.fn, self.params, self.objective = fn, params, objective
    if grad_fn is not None and value_and_grad_fn is not None:
      raise TypeError(f"`{fn}`: pass either `grad_fn=` or `value_and_grad_fn=`, not both.")
    for name, f in (("grad_fn", grad_fn), ("value_and_grad_fn", value_and_grad_fn)):
      if f is not None and not callable(f):
        raise TypeError(f"`{fn}`: `{name}` must be callable (params -> "
                        f"{'gradient pytree' if name == 'grad_fn' else '(loss, gradient)'}), "
                        f"got {type(f).__name__}.")
    if objective is not None and not isinstance(objective, Objective):
      raise TypeError(f"`{fn}`: `objective=` must be a `sam_optax.Objective(apply_fn, loss_fn, "
                      f"batch)`, got {type(objective).__name__}.")
    if grad_fn is None and value_and_grad_fn is None and objective is not None:
      value_and_grad_fn = jax.value_and_grad(objective.loss)
    self.grad_fn, self.value_and_grad_fn = grad_fn, value_and_grad_fn
    if needs == "objective" and objective is None:
      raise TypeError(
          f"`{fn}` needs the model outputs and per-example losses: call `update(grads, state, "
          "params, objective=sam_optax.Objective(apply_fn, loss_fn, batch))` with "
          "`apply_fn(params, batch) -> outputs` and `loss_fn(outputs, batch) -> (B,) losses` "
          "(`sam_optax.flax_training.make_linen_train_step` passes it), or the earlier keywords "
          "`per_example_loss_fn=f` with `f(p)` the (B,) losses (or `f(p, batch)` with `batch=`); "
          "`grad_fn` alone is not enough.")
    if needs in ("gradient", "loss") and grad_fn is None and value_and_grad_fn is None:
      raise TypeError(
          f"`{fn}` needs the loss gradient closure: call `update(grads, state, params, "
          "grad_fn=grad_fn)` with `grad_fn = lambda p: jax.grad(loss)(p, batch)` (or "
          "`value_and_grad_fn=lambda p: jax.value_and_grad(loss)(p, batch)` to also record "
          "the perturbed loss); inside `optax.chain` pass it as a keyword to the chain's "
          "`update`.")
    if needs == "loss" and self.value_and_grad_fn is None:
      raise TypeError(
          f"`{fn}` needs the loss at the perturbed points: call `update(grads, state, params, "
          "value_and_grad_fn=lambda p: jax.value_and_grad(loss)(p, batch))` (or pass "
          "`objective=`) instead of `grad_fn=`.")

  @property
  def has_loss(self) -> bool:
    return self.value_and_grad_fn is not None

  def __call__(self, point: PyTree) -> tuple[Any, PyTree]:
    """``(loss or None, gradient)`` at ``point``, the gradient in the params' dtypes."""
    fn = self.fn
    if self.value_and_grad_fn is not None:
      out = self.value_and_grad_fn(point)
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"`{fn}`: `value_and_grad_fn` must return a `(loss, grads)` pair "
                        f"like `jax.value_and_grad(loss)`, got {type(out).__name__}.")
      loss, g = out
      if not _is_scalar_array(loss):
        raise ValueError(f"`{fn}`: the loss returned by `value_and_grad_fn` must be a "
                         f"scalar, got shape {jnp.shape(loss)}; with `has_aux=True` return "
                         "`(loss, grads)` without the aux part.")
    else:
      loss, g = None, self.grad_fn(point)
      if (isinstance(g, tuple) and len(g) == 2 and _is_scalar_array(g[0])
          and jax.tree.structure(g) != jax.tree.structure(self.params)
          and jax.tree.structure(g[1]) == jax.tree.structure(self.params)):
        raise TypeError(
            f"`{fn}`: `grad_fn` returned a `(loss, grads)` pair; `grad_fn` must return the "
            "gradient only. Pass it as `value_and_grad_fn=` instead (then the perturbed "
            "loss is recorded too), or use `jax.grad` in `grad_fn`.")
    describe_mismatch(g, self.params, "the gradient returned by the closure", fn)
    return loss, tu.cast_like(g, self.params)

  def stacked(self, points: PyTree, how: str = "vmap", mesh: Any = None, axis: Any = None
              ) -> tuple[Any, PyTree]:
    """Losses (n,) or None and gradients (leaves (n, ...)) at n independent points,
    stacked on a leading axis: one ``vmap``-ed call, ``n`` calls with no data
    dependency between them (``how="loop"``), or one point per device of a mesh axis."""
    if how == "mesh":
      from jax.sharding import PartitionSpec as P
      return jax.shard_map(jax.vmap(self), mesh=mesh, in_specs=P(axis), out_specs=P(axis),
                           axis_names={axis})(points)
    n = jax.tree.leaves(points)[0].shape[0]
    if how == "vmap" and n > 1:
      return jax.vmap(self)(points)
    outs = [self(jax.tree.map(lambda x, i=i: x[i], points)) for i in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


# ------------------------------------------------------------ what a method sees


class Step(NamedTuple):
  """One update call, as a method's ``points`` and ``combine`` see it.

  Attributes:
    fn: the transformation's name, for error messages.
    updates: the incoming ``updates`` (the clean gradient g for most methods).
    params: the current parameters.
    state: the method's state (its own NamedTuple).
    radius: :math:`\\rho_t` as a float32 scalar (the schedule at ``state.count``).
    closures: the checked :class:`Closures`.
    value: the clean loss :math:`L(w)` if the caller passed ``value=``, else None.
    extra_args: the other keyword arguments of ``update`` (forwarded to perturbations).
    eps: norms at or below this count as zero.
    axis_name: the per-device axis, or None.
  """
  fn: str
  updates: PyTree
  params: PyTree
  state: Any
  radius: jax.Array
  closures: Closures
  value: Any
  extra_args: dict
  eps: float
  axis_name: Any

  @property
  def base_args(self) -> dict:
    """The extra arguments for a base optimizer inside the method (``value=`` included)."""
    return self.extra_args if self.value is None else {**self.extra_args, "value": self.value}

  def pmean(self, tree: PyTree) -> PyTree:
    return tree if self.axis_name is None else jax.lax.pmean(tree, self.axis_name)


class Points(NamedTuple):
  """Where a method evaluates the closure.

  Attributes:
    point: one point (a params-shaped pytree), points stacked on a leading axis
      (with ``how``), or None when ``combine`` evaluates by itself (ESAM's
      selection, Functional-SAM's VJP).
    how: None for one point, else ``"vmap"``, ``"loop"`` or ``"mesh"`` (see
      :meth:`Closures.stacked`).
    delta: the perturbation (telemetry's ``perturbation_norm``), or None.
    perturbation_norm: that norm directly, when there is no single delta.
    fields: state fields the points step already updated (a perturbation's state).
    aux: anything ``combine`` needs.
  """
  point: PyTree = None
  how: str | None = None
  delta: PyTree = None
  perturbation_norm: Any = None
  fields: dict = {}
  aux: Any = None
  mesh: Any = None
  mesh_axis: Any = None


class Result(NamedTuple):
  """What ``combine`` returns: the output, the state fields it changed, and
  (optionally) what the telemetry reports instead of the defaults."""
  output: PyTree
  fields: dict = {}
  grad: PyTree = None          # telemetry's g_adv (default: the evaluated gradient)
  loss: Any = None             # telemetry's perturbed loss (default: the evaluated loss)
  clean_grad: PyTree = None    # telemetry's g (default: updates)
  clean_loss: Any = None       # telemetry's clean loss (default: value=)


def perturbed_gradient(s: Step, pts: Points, loss: Any, grad: PyTree) -> Result:
  """The combine rule of SAM and every geometry: the gradient at the perturbed point."""
  return Result(grad)


class Method(NamedTuple):
  """A sharpness-aware method: the declaration :func:`build` turns into a transformation.

  Attributes:
    name: the public name (error messages).
    state: the state's NamedTuple class; it has the fields ``count`` and
      ``telemetry``, ``gate`` when ``gate`` is set, and the method's own.
    init: ``params -> dict`` of the method's own state fields.
    points: ``Step -> Points``.
    combine: ``(Step, Points, loss, grad) -> Result``; ``loss`` and ``grad`` are
      what the closure returned at ``Points.point`` (None where it was not called).
    needs: ``"gradient"`` (``grad_fn`` or ``value_and_grad_fn``), ``"loss"``
      (``value_and_grad_fn``), ``"objective"`` or ``"nothing"``.
    clean_gradient: ``updates`` is the clean gradient (checked for the chain
      order, used as telemetry's g).
    keeps_gradient: ``combine`` uses g after the second pass, so the cosine is free.
    gate: optional ``Step -> bool array``: when False the step runs ``skip``
      instead of ``points``/``combine`` (through :func:`gating.branch`).
    skip: ``Step -> Result`` for the gated-off steps (no closure call).
  """
  name: str
  state: type
  init: Callable[[PyTree], dict]
  points: Callable[[Step], Points]
  combine: Callable[..., Result] = perturbed_gradient
  needs: str = "gradient"
  clean_gradient: bool = True
  keeps_gradient: bool = False
  gate: Callable[[Step], jax.Array] | None = None
  skip: Callable[[Step], Result] | None = None


# ----------------------------------------------------------------- shared checks


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


def check_telemetry(telemetry: Any, fn: str) -> Any:
  if telemetry not in (True, False, "full"):
    raise ValueError(f"`{fn}(telemetry=...)` must be True (norms and losses), 'full' (also "
                     f"the cosine, which keeps g alive) or False, got {telemetry!r}.")
  return telemetry


def schedule_at(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """A float or a schedule of the step count, as a float32 scalar."""
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


# The chain-order check looks at the first few steps only.
ORDER_CHECK_STEPS = 3
ORDER_COSINE = -0.1


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


# ------------------------------------------------------------------- the builder


def build(method: Method, *, rho: ScalarOrSchedule = 0.0, eps: float = 1e-12, axis_name: Any = None,
          telemetry: Any = True) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of a :class:`Method`."""
  fn = method.name
  record_cosine = telemetry == "full" or (bool(telemetry) and method.keeps_gradient)

  def init_fn(params):
    if params is None:
      raise ValueError(f"`{fn}.init(params)` needs the parameters, not None.")
    fields = dict(method.init(params))
    fields["count"] = jnp.zeros([], jnp.int32)
    if "telemetry" in method.state._fields:
      fields["telemetry"] = tm.empty(record_cosine) if telemetry else None
    if "gate" in method.state._fields:
      fields["gate"] = gating.Gate()
    return method.state(**fields)

  def update_fn(updates, state, params=None, *, grad_fn=None, value_and_grad_fn=None, value=None,
                objective=None, per_example_loss_fn=None, batch=None, **extra_args):
    name = f"{fn}.update"
    if objective is None and per_example_loss_fn is not None:  # ESAM's keywords (issue 13)
      if not callable(per_example_loss_fn):
        raise TypeError(f"`{name}`: `per_example_loss_fn` must be callable (params -> (B,) losses).")
      objective = legacy_objective(per_example_loss_fn, batch)
    check_params(params, name)
    closures = Closures(name, params, grad_fn=grad_fn, value_and_grad_fn=value_and_grad_fn,
                        objective=objective, needs=method.needs)
    if params is not None:
      describe_mismatch(updates, params, "`updates`", name)
    if axis_name is not None and method.clean_gradient:
      distributed.check_local_gradient(updates, axis_name, fn)
    s = Step(fn, updates, params, state, schedule_at(rho, state.count), closures, value,
             extra_args, eps, axis_name)

    def full(s):
      pts = method.points(s)
      # ||g|| before the second pass: reduced after it, g would stay alive through it
      g_norm = tu.norm(s.updates) if telemetry else None
      loss, grad = None, None
      if pts.point is not None:
        if pts.how is None:
          loss, grad = closures(pts.point)
        else:
          loss, grad = closures.stacked(pts.point, pts.how, pts.mesh, pts.mesh_axis)
      res = method.combine(s, pts, loss, grad)
      fields = {**pts.fields, **res.fields}
      if "telemetry" in state._fields and state.telemetry is not None:
        fields["telemetry"] = _telemetry(s, pts, res, loss, grad, g_norm)
      return tu.cast_like(res.output, updates), fields

    if method.gate is None:
      out, fields = full(s)
    else:
      def skip(s):
        res = method.skip(s)
        kept = {"telemetry": state.telemetry} if "telemetry" in state._fields else {}
        return tu.cast_like(res.output, updates), {**res.fields, **kept}
      took = method.gate(s)
      out, fields = gating.branch(state.gate, took, lambda _: full(s), lambda _: skip(s), None)
      fields["sam_step"], fields["sam_step_fraction"] = gating.took_pass(
          state.count, state.sam_step_fraction, took)
    out = tu.cast_like(s.pmean(out), updates)
    fields["count"] = optax.safe_increment(state.count)
    return out, state._replace(**fields)

  def _telemetry(s, pts, res, loss, grad, g_norm):
    g = s.updates if res.clean_grad is None else res.clean_grad
    g_norm = g_norm if res.clean_grad is None else None
    g_adv = res.grad if res.grad is not None else (grad if grad is not None else res.output)
    pert_norm = pts.perturbation_norm
    if pert_norm is None:
      pert_norm = tu.norm(pts.delta) if pts.delta is not None else jnp.zeros([], jnp.float32)
    misordered = None
    if method.clean_gradient:
      cos = guard_cosine(s.updates, g_adv, eps)
      early = s.state.count < ORDER_CHECK_STEPS
      misordered = s.state.telemetry.misordered | (early & (cos < ORDER_COSINE)).astype(jnp.int32)
    clean_loss = s.value if res.clean_loss is None else res.clean_loss
    rec = tm.record(g, g_adv, perturbation_norm=pert_norm, clean_loss=clean_loss,
                    perturbed_loss=loss if res.loss is None else res.loss, cosine=record_cosine,
                    misordered=misordered, eps=eps, g_norm=g_norm)
    return tm.mean_over(rec, s.axis_name)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def schedule(fn: str, transform: optax.GradientTransformation, state: type, init: Callable,
             decide: Callable, *, axis_name: Any = None) -> optax.GradientTransformationExtraArgs:
  """A schedule around any transformation: ``decide(state, updates) -> (take, fields)``;
  the step runs ``transform`` where ``take`` holds and passes ``updates`` through
  (averaged over ``axis_name``) without calling the closure elsewhere. The state has
  ``count``, ``inner``, ``sam_step``, ``sam_step_fraction``, ``gate`` when the host can
  decide (:func:`gating.gated_jit`), and the schedule's own fields from ``init``."""
  inner_update = optax.with_extra_args_support(transform).update

  def init_fn(params):
    fields = dict(init(params))
    fields.update(count=jnp.zeros([], jnp.int32), inner=transform.init(params),
                  sam_step=jnp.zeros([], jnp.float32), sam_step_fraction=jnp.zeros([], jnp.float32))
    if "gate" in state._fields:
      fields["gate"] = gating.Gate()
    return state(**fields)

  def update_fn(updates, state, params=None, **extra_args):
    take, fields = decide(state, updates)
    passed = lambda: updates if axis_name is None else jax.lax.pmean(updates, axis_name)
    out, inner = gating.branch(getattr(state, "gate", gating.Gate()), take,
                               lambda _: inner_update(updates, state.inner, params, **extra_args),
                               lambda _: (passed(), state.inner), None)
    fields["sam_step"], fields["sam_step_fraction"] = gating.took_pass(
        state.count, state.sam_step_fraction, take)
    return out, state._replace(count=optax.safe_increment(state.count), inner=inner, **fields)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
