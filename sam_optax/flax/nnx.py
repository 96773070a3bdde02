"""NNX: the closures and the train step for ``nnx.Optimizer``.

The closures rebuild the model from a snapshot of its non-trained state taken before the
clean pass (the same dropout masks in every pass; what a pass writes into BatchNorm
statistics is dropped); :func:`nnx_objective_update` passes every closure kind, so one step
serves every transformation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax._src.closures import Objective
from sam_optax._src.telemetry import metrics


def nnx_grad_fn(graphdef: Any, rest: Any, loss_fn: Callable[..., jax.Array], *args,
                **kwargs) -> Callable[[Any], Any]:
  """A ``grad_fn`` for ``nnx.Optimizer.update(model, grads, grad_fn=...)``.

  ``grad_fn(params_state)`` rebuilds the model with ``nnx.merge(graphdef,
  params_state, rest)`` and returns the gradient of ``loss_fn(model, *args,
  **kwargs)`` with respect to the parameters. ``rest`` holds BatchNorm
  statistics and RNG state: split the model *before* the clean pass, so that
  the perturbed pass replays the clean pass's RNG counters (the same dropout
  masks). The closure keeps a copy of ``rest`` taken when it is built (``nnx.split``
  can hand out live Variables, which the clean pass would advance), and each
  call rebuilds a copy of the model: what the perturbed pass writes into its
  statistics is discarded, so the caller's model keeps the clean pass's.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sam_optax.flax import nnx_grad_fn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> x = jnp.ones((4, 2))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)   # before the clean pass
    >>> grad_fn = nnx_grad_fn(graphdef, rest, loss_fn, x)
    >>> g = grad_fn(params)   # the gradient at any params state; here the clean one
    >>> expected = nnx.grad(loss_fn)(model, x)
    >>> all(bool(jnp.allclose(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(expected)))
    True
  """
  value_and_grad_fn = nnx_value_and_grad_fn(graphdef, rest, loss_fn, *args, **kwargs)
  return lambda params: value_and_grad_fn(params)[1]


def nnx_value_and_grad_fn(graphdef: Any, rest: Any, loss_fn: Callable[..., jax.Array], *args,
                          **kwargs) -> Callable[[Any], tuple[jax.Array, Any]]:
  """Like :func:`nnx_grad_fn`, returning ``(loss, grads)``: pass it as
  ``optimizer.update(model, grads, value_and_grad_fn=..., value=loss)`` so the
  optimizer records the perturbed loss and the sharpness estimate.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sam_optax.flax import nnx_value_and_grad_fn
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(1)))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> vg = nnx_value_and_grad_fn(graphdef, rest, lambda m, x: jnp.mean(m(x) ** 2), x)
    >>> loss, g = vg(jax.tree.map(lambda p: 2 * p, params))   # e.g. a perturbed params state
    >>> stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))   # untouched by that pass
    >>> [float(jnp.abs(s).max()) for s in stats]
    [0.0, 1.0]
  """
  from flax import nnx

  rest = jax.tree.map(lambda a: a, rest)  # a snapshot: later RNG advances do not reach it

  def value_and_grad_fn(params):
    def loss_of(p):
      model = nnx.merge(graphdef, p, rest, copy=True)
      return loss_fn(model, *args, **kwargs)
    return jax.value_and_grad(loss_of)(params)

  return value_and_grad_fn


def nnx_sam_update(model: Any, optimizer: Any, loss_fn: Callable[..., jax.Array], *args,
                   **kwargs) -> jax.Array:
  """One SAM step for an NNX model; call inside ``nnx.jit``. Returns the clean loss.

  Computes the clean loss and gradient (updating BatchNorm statistics, advancing
  dropout RNG streams once), builds the closure from the state *before* the
  clean pass's RNG advance so the perturbed pass reuses the same dropout
  masks, and calls ``optimizer.update(model, grads, value_and_grad_fn=...,
  value=loss)``. :func:`nnx_sam_step` does the same and returns the metrics.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from flax import nnx
    >>> from sam_optax.flax import nnx_sam_update
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.lin1, self.bn = nnx.Linear(4, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
    ...     self.drop, self.lin2 = nnx.Dropout(0.1, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))
    >>> def loss_fn(model, x, y):
    ...   return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    >>> model = Net(nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, sam_optax.sam(optax.sgd(0.1, momentum=0.9)), wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   return nnx_sam_update(model, optimizer, loss_fn, x, y)
    >>> x = jax.random.normal(jax.random.key(1), (32, 4))
    >>> y = (x[:, 0] > 0).astype(jnp.int32)
    >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    >>> losses[-1] < losses[0]
    True
  """
  from flax import nnx

  # What the optimizer trains (nnx.Param, or nnx.LoRAParam for adapters only), split off
  # before the clean pass: the same RNG counters, hence the same dropout masks.
  wrt = getattr(optimizer, "wrt", nnx.Param)
  graphdef, _, rest = nnx.split(model, wrt, ...)
  value_and_grad_fn = nnx_value_and_grad_fn(graphdef, rest, loss_fn, *args, **kwargs)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, *args, **kwargs)
  optimizer.update(model, grads, value_and_grad_fn=value_and_grad_fn, value=loss)
  return loss


def nnx_sam_step(model: Any, optimizer: Any, loss_fn: Callable[..., jax.Array], *args,
                 **kwargs) -> dict[str, jax.Array]:
  """:func:`nnx_sam_update`, returning ``{'loss': clean loss, **sam_optax.metrics(...)}``
  (perturbed loss, sharpness, cosine, norms; see :func:`sam_optax.metrics`).

  Call inside ``nnx.jit``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from flax import nnx
    >>> from sam_optax import flax as ft
    >>> model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, sam_optax.sam(optax.sgd(0.1), 0.05), wrt=nnx.Param)
    >>> x, y = jnp.ones((8, 4)), jnp.zeros((8, 1))
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> m = nnx.jit(ft.nnx_sam_step, static_argnums=2)(model, opt, loss_fn, x, y)
    >>> sorted(k for k in m if "loss" in k)
    ['clean_loss', 'loss', 'perturbed_loss']
  """
  loss = nnx_sam_update(model, optimizer, loss_fn, *args, **kwargs)
  return {"loss": loss, **metrics(optimizer.opt_state)}


def nnx_objective(graphdef: Any, rest: Any, forward: Callable[[Any, Any], Any],
                  example_loss_fn: Callable[[Any, Any], jax.Array], batch: Any) -> Objective:
  r"""The :class:`sam_optax.Objective` of an NNX model, for the methods that need model
  outputs or per-example losses (ESAM, Functional-SAM).

  .. math:: F(w) = \mathrm{forward}(\mathrm{merge}(w), \mathrm{batch}), \qquad
            \ell_i = \mathrm{example\_loss\_fn}(F(w), \mathrm{batch})_i

  ``forward(model, batch)`` gives the outputs (e.g. ``lambda m, b: m(b[0])``) and
  ``example_loss_fn(outputs, batch)`` one loss per example. As for
  :func:`nnx_grad_fn`, split the model before the clean pass; each evaluation
  rebuilds a copy of the model from the snapshot of ``rest`` (the clean pass's
  dropout masks; what a pass writes into BatchNorm statistics is dropped). A
  subset (ESAM's) runs ``forward`` on the selected examples, so BatchNorm
  normalizes with the subset's statistics there.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sam_optax.flax import nnx_objective
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> batch = (jnp.ones((3, 2)), jnp.zeros((3, 1)))
    >>> obj = nnx_objective(graphdef, rest, lambda m, b: m(b[0]),
    ...                     lambda out, b: jnp.sum((out - b[1]) ** 2, -1), batch)
    >>> bool(jnp.allclose(obj.example_losses(params), jnp.sum(model(batch[0]) ** 2, -1)))
    True
  """
  from flax import nnx

  rest = jax.tree.map(lambda a: a, rest)  # a snapshot, as in nnx_value_and_grad_fn
  return Objective(lambda p, b: forward(nnx.merge(graphdef, p, rest, copy=True), b),
                   example_loss_fn, batch)


def nnx_objective_update(model: Any, optimizer: Any, forward: Callable[[Any, Any], Any],
                         example_loss_fn: Callable[[Any, Any], jax.Array], batch: Any) -> jax.Array:
  """:func:`nnx_sam_update` for every method, ESAM and Functional-SAM included: the clean
  pass on ``batch`` and ``optimizer.update(model, grads, objective=..., value_and_grad_fn=...,
  value=loss)`` (the closures of :func:`nnx_objective`). Call inside ``nnx.jit``; returns the
  clean loss, the mean of ``example_loss_fn(forward(model, batch), batch)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from flax import nnx
    >>> from sam_optax.flax import nnx_objective_update
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> tx = optax.chain(sam_optax.esam(0.05, gamma=0.5), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> forward = lambda m, b: m(b[0])
    >>> ce = lambda out, b: optax.softmax_cross_entropy_with_integer_labels(out, b[1])
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   return nnx_objective_update(model, optimizer, forward, ce, (x, y))
    >>> x = jax.random.normal(jax.random.key(1), (32, 4)); y = jnp.argmax(x[:, :3], -1)
    >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    >>> losses[-1] < losses[0]
    True
  """
  from flax import nnx

  wrt = getattr(optimizer, "wrt", nnx.Param)
  graphdef, _, rest = nnx.split(model, wrt, ...)  # before the clean pass: its dropout masks
  objective = nnx_objective(graphdef, rest, forward, example_loss_fn, batch)

  def clean(m):
    return jnp.mean(example_loss_fn(forward(m, batch), batch).astype(jnp.float32))

  loss, grads = nnx.value_and_grad(clean, argnums=nnx.DiffState(0, wrt))(model)
  optimizer.update(model, grads, objective=objective,
                   value_and_grad_fn=jax.value_and_grad(objective.loss), value=loss)
  return loss
