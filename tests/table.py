"""The test rows, read from the method registry (``sam_optax._src.registry``).

Every test that runs "every transformation" (contract, hardening, soak, export, resume, the
Flax steps) takes its rows from here: ``ROWS`` maps a row name to its registry entry and
example call; :func:`optimizer` builds the full optimizer of a row (the transformation
chained before SGD, or the complete optimizer itself); :func:`closures` gives the keywords
of ``update`` that a row's closure kind needs, for any loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

import sam_optax as so
from sam_optax._src import registry

ROWS: dict[str, tuple[registry.Entry, registry.Example]] = registry.test_rows()
NAMES = sorted(ROWS)
SGD = lambda: optax.sgd(0.05, momentum=0.9)


def entry(row: str) -> registry.Entry:
  return ROWS[row][0]


def closure(row: str) -> str:
  """What a row's ``update`` needs (the row's own kind where it differs from the entry's)."""
  return ROWS[row][1].closure or entry(row).closure


def transformation(row: str, example: registry.Example | None = None,
                   fn: Callable | None = None) -> optax.GradientTransformation:
  """The row's public function called with its example (or ``example``, or through ``fn``)."""
  e, ex = ROWS[row]
  return (ex if example is None else example).build(e.fn if fn is None else fn)


def wrap(row: str, t: optax.GradientTransformation) -> optax.GradientTransformation:
  """The full optimizer around a row's transformation ``t``, by the entry's role."""
  role = entry(row).role
  if role == "optimizer":
    return t
  if role == "geometry":
    return optax.chain(so.sharpness_aware(0.05, perturbation=t), SGD())
  if role == "last":
    return optax.chain(SGD(), t)
  return optax.chain(t, SGD())   # "first" and "wrapper"


def optimizer(row: str) -> optax.GradientTransformation:
  return wrap(row, transformation(row))


def closures(row: str, loss_fn: Callable, params: Any, example_losses: Callable | None = None,
             grad_fn: Callable | None = None) -> dict:
  """The closure keywords of ``update`` for a row: what its kind needs, and the objective
  (per-example losses as the model's "outputs") for every row, which the methods that need
  only gradients accept and ignore.

  Args:
    loss_fn: ``params -> loss``.
    params: the current params (for ``value=``).
    example_losses: ``params -> (B,)`` per-example losses whose mean is ``loss_fn``
      (default: ``loss_fn`` itself as one example).
    grad_fn: the gradient closure (default ``jax.grad(loss_fn)``).
  """
  ex = ROWS[row][1]
  kind = ex.closure or entry(row).closure
  grad_fn = jax.grad(loss_fn) if grad_fn is None else grad_fn
  per_example = example_losses or (lambda q: loss_fn(q)[None])
  if ex.splits_batch:   # the examples' indices as the batch, so that groups can be taken
    import jax.numpy as jnp
    indices = jnp.arange(per_example(params).shape[0])
    objective = so.Objective(lambda q, b: per_example(q)[b], lambda o, b: o, indices)
  else:
    objective = so.Objective(lambda q, b: per_example(q), lambda o, b: o, None)
  out = {"objective": objective}
  if kind == "loss":
    out.update(value_and_grad_fn=lambda q: (loss_fn(q), grad_fn(q)), value=loss_fn(params))
  elif kind != "objective":
    out["grad_fn"] = grad_fn
  return out


def signature(tree: Any) -> Any:
  """Shapes and dtypes of every leaf (a state's structure for the stability checks)."""
  import jax.numpy as jnp
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)
