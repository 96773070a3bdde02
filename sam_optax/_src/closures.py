"""The closure contract: what a caller passes to ``update`` so a method can evaluate the loss.

Every method takes the same keywords and uses what it declares it needs:

========================  ==========================================================
``grad_fn``               ``params -> gradient`` (the same batch, the same dropout key)
``value_and_grad_fn``     ``params -> (loss, gradient)``, instead of ``grad_fn``; the
                          telemetry then records the loss at the perturbed point
``objective``             an :class:`Objective`: model outputs and per-example losses;
                          gradient methods derive ``value_and_grad_fn`` from it
``value``                 the clean loss :math:`L(w)`
``adam_state``            the optimizer state holding the base Adam's moments (for
                          ``preconditioned(moments="adam")`` only)
========================  ==========================================================

ESAM's first keywords (``per_example_loss_fn``, ``batch``, ``example_losses``) and
Functional-SAM's ``model_outputs`` still work for one release, with a
``DeprecationWarning`` that names the replacement.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import tree as tu

PyTree = Any


class Objective(NamedTuple):
  r"""The closure kind for methods that need more than gradients: model outputs and
  per-example losses, on the whole batch or a subset of it.

  With :math:`F(w) = ` ``apply_fn(w, batch)`` (the model's outputs, e.g. logits)
  and :math:`\ell_i = ` ``loss_fn(F, batch)[i]`` (one loss per example), the
  training loss is :math:`L(w) = \frac1B \sum_i \ell_i(F(w))`. Pass it to
  ``update`` as ``objective=`` (the Flax steps do). Methods that need only
  gradients derive ``value_and_grad_fn`` from it; ESAM evaluates a subset of the
  examples (:meth:`subset`, the leading axis of every leaf of ``batch``);
  Functional-SAM differentiates :math:`F` and :math:`\ell` apart; m-sharpness
  (``group_size=``) splits the batch into groups.

  Attributes:
    apply_fn: ``(params, batch) -> outputs``; close over dropout keys and
      BatchNorm statistics (the same for every pass of a step).
    loss_fn: ``(outputs, batch) -> (B,)`` per-example losses.
    batch: a pytree of arrays whose leading axis is the example (``None`` when
      ``apply_fn`` closes over the batch itself; then no subset can be taken).
    clean_outputs: optional, :math:`F(w)` as the caller's clean pass computed it;
      Functional-SAM then skips its forward at :math:`w`.
    clean_losses: optional, the per-example losses :math:`\ell_i(F(w))` of the clean
      pass; ESAM then skips its forward at :math:`w`.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> obj = sam_optax.Objective(lambda w, b: b[0] @ w, lambda out, b: (out - b[1]) ** 2,
    ...                           (jnp.eye(3), jnp.ones(3)))
    >>> obj.example_losses(jnp.zeros(3)).tolist(), float(obj.loss(jnp.ones(3)))
    ([1.0, 1.0, 1.0], 0.0)
    >>> obj.subset(jnp.array([0, 2])).example_losses(jnp.zeros(3)).tolist()
    [1.0, 1.0]
  """
  apply_fn: Callable[[PyTree, PyTree], PyTree]
  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  batch: PyTree = None
  clean_outputs: PyTree = None
  clean_losses: jax.Array | None = None

  def outputs(self, params: PyTree) -> PyTree:
    return self.apply_fn(params, self.batch)

  def example_losses(self, params: PyTree) -> jax.Array:
    return self.loss_fn(self.apply_fn(params, self.batch), self.batch)

  def loss(self, params: PyTree) -> jax.Array:
    return jnp.mean(self.example_losses(params).astype(jnp.float32))

  def subset(self, indices: jax.Array) -> Objective:
    """The objective on the examples ``indices`` of the batch (and of the clean pass's
    outputs and losses, where given)."""
    if self.batch is None:
      raise ValueError("`Objective.subset` needs the batch: build the objective with "
                       "`batch=` so that examples can be selected.")
    take = lambda tree: None if tree is None else jax.tree.map(
        lambda a: jnp.take(a, indices, axis=0), tree)
    return self._replace(batch=take(self.batch), clean_outputs=take(self.clean_outputs),
                         clean_losses=take(self.clean_losses))


# ------------------------------------------------------------------ earlier keywords

DEPRECATED = {
    "per_example_loss_fn": "objective=sam_optax.Objective(apply_fn, loss_fn, batch)",
    "batch": "the batch inside objective=sam_optax.Objective(apply_fn, loss_fn, batch)",
    "example_losses": "objective=sam_optax.Objective(..., clean_losses=losses)",
    "model_outputs": "objective=sam_optax.Objective(..., clean_outputs=outputs)",
}


def from_earlier_keywords(fn: str, objective: Objective | None,
                          extra_args: dict) -> Objective | None:
  """Turns ESAM's and Functional-SAM's first keywords (removed from ``extra_args``) into
  the objective they described, with a ``DeprecationWarning`` naming the replacement.
  ``batch=`` alone (without ``per_example_loss_fn=``) is left to other transformations."""
  per_example = extra_args.pop("per_example_loss_fn", None)
  batch = extra_args.pop("batch", None) if per_example is not None else None
  clean = {field: extra_args.pop(key) for key, field in (("example_losses", "clean_losses"),
                                                          ("model_outputs", "clean_outputs"))
           if extra_args.get(key) is not None}
  given = [k for k, v in (("per_example_loss_fn", per_example), ("batch", batch)) if v is not None]
  given += [{"clean_losses": "example_losses", "clean_outputs": "model_outputs"}[f] for f in clean]
  if not given:
    return objective
  warnings.warn(
      f"`{fn}`: the keyword(s) {', '.join(f'`{k}=`' for k in given)} are deprecated and will be "
      "removed in the next release; pass " + "; ".join(DEPRECATED[k] for k in given) + ".",
      DeprecationWarning, stacklevel=4)
  if per_example is not None and objective is None:
    if not callable(per_example):
      raise TypeError(f"`{fn}`: `per_example_loss_fn` must be callable (params -> (B,) losses).")
    if batch is None:
      objective = Objective(lambda p, b: per_example(p), lambda out, b: out, None)
    else:
      objective = Objective(per_example, lambda out, b: out, batch)
  if clean and objective is not None:
    objective = objective._replace(**clean)
  return objective


# ------------------------------------------------------------------- checks of a call


def describe_mismatch(got: PyTree, like: PyTree, what: str, fn: str) -> None:
  """Raises when ``got`` does not have the pytree structure and leaf shapes of ``like``."""
  got_def, like_def = jax.tree.structure(got), jax.tree.structure(like)
  if got_def != like_def:
    paths = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
    keys = lambda t: {jax.tree_util.keystr(p) for p, _ in paths(t)}
    missing = ", ".join(sorted(keys(like) - keys(got))[:5]) or "none"
    extra = ", ".join(sorted(keys(got) - keys(like))[:5]) or "none"
    raise ValueError(
        f"`{fn}`: {what} must have the pytree structure of `params`; missing leaves: "
        f"{missing}; unexpected leaves: {extra}. Make `grad_fn(p)` return "
        "`jax.grad(loss)(p, ...)` for the same `p` (use `has_aux` and drop the aux part).")
  bad = [f"{jax.tree_util.keystr(path)}: {jnp.shape(g)} vs {jnp.shape(w)}"
         for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                 jax.tree.leaves(like))
         if jnp.shape(g) != jnp.shape(w)]
  if bad:
    raise ValueError(f"`{fn}`: {what} has leaves whose shapes differ from `params`: "
                     + "; ".join(bad[:5]) + ". Return the gradient with respect to `p`.")


def is_scalar_array(x: Any) -> bool:
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


_NEEDS_GRADIENT = (
    "`{fn}` needs the loss gradient closure: call `update(grads, state, params, "
    "grad_fn=grad_fn)` with `grad_fn = lambda p: jax.grad(loss)(p, batch)` (or "
    "`value_and_grad_fn=lambda p: jax.value_and_grad(loss)(p, batch)` to also record "
    "the perturbed loss, or `objective=`); inside `optax.chain` pass it as a keyword to the "
    "chain's `update`.")
_NEEDS_LOSS = (
    "`{fn}` needs the loss at the perturbed points: call `update(grads, state, params, "
    "value_and_grad_fn=lambda p: jax.value_and_grad(loss)(p, batch))` (or pass "
    "`objective=`) instead of `grad_fn=`.")
_NEEDS_OBJECTIVE = (
    "`{fn}` needs the model outputs and per-example losses: call `update(grads, state, "
    "params, objective=sam_optax.Objective(apply_fn, loss_fn, batch))` with "
    "`apply_fn(params, batch) -> outputs` and `loss_fn(outputs, batch) -> (B,) losses` "
    "(`sam_optax.flax.make_linen_train_step` passes it); `grad_fn` alone is not enough.")


class Closures:
  """The closures the caller passed to ``update``, checked once, as the evaluations a
  method may ask for.

  ``grad_fn`` (params -> gradient), ``value_and_grad_fn`` (params -> ``(loss,
  gradient)``) or an :class:`Objective`; every gradient is checked against the
  params' structure and cast to their dtypes. ``needs``: ``"gradient"``, ``"loss"``,
  ``"objective"`` or ``"none"`` (what the method declared).
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
      raise TypeError(_NEEDS_OBJECTIVE.format(fn=fn))
    if needs in ("gradient", "loss") and grad_fn is None and value_and_grad_fn is None:
      raise TypeError(_NEEDS_GRADIENT.format(fn=fn))
    if needs == "loss" and self.value_and_grad_fn is None:
      raise TypeError(_NEEDS_LOSS.format(fn=fn))

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
      if not is_scalar_array(loss):
        raise ValueError(f"`{fn}`: the loss returned by `value_and_grad_fn` must be a "
                         f"scalar, got shape {jnp.shape(loss)}; with `has_aux=True` return "
                         "`(loss, grads)` without the aux part.")
    else:
      loss, g = None, self.grad_fn(point)
      if (isinstance(g, tuple) and len(g) == 2 and is_scalar_array(g[0])
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
