"""Flax integration: jitted SAM train steps for linen ``TrainState`` and NNX models.

BatchNorm and dropout are where SAM ports go wrong. Here:

* the running statistics come from the clean pass only (the perturbed pass runs
  in training mode, normalizing with its own batch statistics as in Foret et
  al.'s JAX code, but the statistics it would write are discarded);
* both passes use the same dropout key, so the same units are dropped;
* the step is one jitted program and works with any sam_optax transform in the
  chain (a transform that does not call ``grad_fn`` simply ignores it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.telemetry import metrics as sam_metrics

try:  # flax is an optional dependency
  from flax import struct
  from flax.training import train_state
except ImportError as e:  # pragma: no cover
  raise ImportError("sam_optax.flax_training needs flax: pip install 'sam_optax[flax]'") from e


class TrainState(train_state.TrainState):
  """A :class:`flax.training.train_state.TrainState` with BatchNorm statistics.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, sam_optax
    >>> from sam_optax.flax_training import TrainState
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool = False):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     return nn.Dense(3)(nn.relu(x))
    >>> model = Net()
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> state = TrainState.create(apply_fn=model.apply, params=variables["params"],
    ...                           batch_stats=variables["batch_stats"],
    ...                           tx=sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05))
    >>> sorted(state.batch_stats["BatchNorm_0"])
    ['mean', 'var']
  """
  batch_stats: Any = struct.field(pytree_node=True, default=None)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer labels, computed in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.flax_training import softmax_cross_entropy
    >>> round(float(softmax_cross_entropy(jnp.zeros((2, 10)), jnp.array([0, 3]))), 4)  # ln 10
    2.3026
  """
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def make_linen_train_step(loss_fn: Callable[[jax.Array, jax.Array], jax.Array] =
                          softmax_cross_entropy, *, train_kwarg: str = "train",
                          jit: bool = True) -> Callable:
  """Builds ``step(state, batch, dropout_key) -> (state, metrics)`` for linen models.

  ``state`` is a :class:`TrainState` (``batch_stats=None`` for models without
  BatchNorm) whose ``tx`` contains any sam_optax transformation; ``batch`` is
  ``(inputs, labels)``. The model is called as ``apply_fn(variables, x,
  **{train_kwarg: True}, rngs={'dropout': key}, mutable=['batch_stats'])``.

  Returns metrics ``loss`` (clean), ``accuracy``, ``grad_norm`` (clean) and
  ``update_norm``, plus what the optimizer recorded (:func:`sam_optax.metrics`):
  ``perturbed_loss``, ``sharpness`` (perturbed minus clean loss), ``cosine``,
  ``perturbation_norm``, ... The perturbed loss comes from the second pass
  itself (the closure is passed as ``value_and_grad_fn`` with ``value=loss``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, sam_optax
    >>> from sam_optax.flax_training import TrainState, make_linen_train_step
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool = False):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
    ...     x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    ...     return nn.Dense(3)(x)
    >>> model = Net()
    >>> x = jax.random.normal(jax.random.key(1), (32, 4))
    >>> y = (x[:, 0] > 0).astype(jnp.int32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> state = TrainState.create(apply_fn=model.apply, params=variables["params"],
    ...                           batch_stats=variables["batch_stats"],
    ...                           tx=sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05))
    >>> train_step = make_linen_train_step()
    >>> key = jax.random.key(2)
    >>> for _ in range(20):
    ...   key, dropout_key = jax.random.split(key)
    ...   state, metrics = train_step(state, (x, y), dropout_key)
    >>> int(state.step), sorted(k for k in metrics if "loss" in k)
    (20, ['clean_loss', 'loss', 'perturbed_loss'])
    >>> bool(metrics["loss"] < jnp.log(3.0))   # below chance level
    True
  """

  def step(state: TrainState, batch: tuple, dropout_key: jax.Array):
    x, y = batch
    has_stats = state.batch_stats is not None

    def forward(params):
      variables = {"params": params}
      if has_stats:
        variables["batch_stats"] = state.batch_stats
      out = state.apply_fn(variables, x, **{train_kwarg: True}, rngs={"dropout": dropout_key},
                           mutable=["batch_stats"] if has_stats else [])
      logits, mutated = out
      return loss_fn(logits, y), (logits, mutated)

    (loss, (logits, mutated)), grads = jax.value_and_grad(forward, has_aux=True)(state.params)
    # Same batch, same dropout key, clean statistics as input; what it writes is dropped.
    value_and_grad_fn = lambda p: jax.value_and_grad(lambda q: forward(q)[0])(p)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                         value_and_grad_fn=value_and_grad_fn, value=loss)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state,
                              batch_stats=mutated["batch_stats"] if has_stats else None)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
               "grad_norm": tu.norm(grads), "update_norm": tu.norm(updates)}
    for name, value in sam_metrics(opt_state).items():
      metrics.setdefault(name, value)
    return new_state, metrics

  return jax.jit(step) if jit else step


def make_linen_eval_step(*, train_kwarg: str = "train") -> Callable:
  """``eval_step(state, x) -> logits`` using the running statistics.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> from sam_optax.flax_training import TrainState, make_linen_eval_step
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool = False):
    ...     return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(x))
    >>> variables = Net().init(jax.random.key(0), jnp.ones((1, 4)))
    >>> state = TrainState.create(apply_fn=Net().apply, params=variables["params"],
    ...                           batch_stats=variables["batch_stats"], tx=optax.sgd(0.1))
    >>> make_linen_eval_step()(state, jnp.ones((5, 4))).shape
    (5, 3)
  """

  @jax.jit
  def evaluate(state: TrainState, x: jax.Array) -> jax.Array:
    variables = {"params": state.params}
    if state.batch_stats is not None:
      variables["batch_stats"] = state.batch_stats
    return state.apply_fn(variables, x, **{train_kwarg: False})

  return evaluate


def nnx_grad_fn(graphdef: Any, rest: Any, loss_fn: Callable[..., jax.Array], *args,
                **kwargs) -> Callable[[Any], Any]:
  """A ``grad_fn`` for ``nnx.Optimizer.update(model, grads, grad_fn=...)``.

  ``grad_fn(params_state)`` rebuilds the model with ``nnx.merge(graphdef,
  params_state, rest)`` (``rest`` holds BatchNorm statistics and RNG state,
  captured after the clean pass) and returns the gradient of ``loss_fn(model,
  *args, **kwargs)`` with respect to the parameters. The rebuilt model is a
  copy: whatever the perturbed pass writes into its statistics is discarded,
  so the caller's model keeps the clean pass's statistics.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sam_optax.flax_training import nnx_grad_fn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> x = jnp.ones((4, 2))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
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
  optimizer records the perturbed loss and the sharpness estimate."""
  from flax import nnx

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
    >>> from sam_optax.flax_training import nnx_sam_update
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

  # Snapshot before the clean pass: same RNG counters, hence the same dropout masks.
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  # nnx.split may hand out the live Variables: copy so the clean pass can't advance them.
  rest_before = jax.tree.map(lambda a: a, rest)
  loss, grads = nnx.value_and_grad(loss_fn)(model, *args, **kwargs)
  value_and_grad_fn = nnx_value_and_grad_fn(graphdef, rest_before, loss_fn, *args, **kwargs)
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
    >>> from sam_optax import flax_training as ft
    >>> model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, sam_optax.sam(optax.sgd(0.1), 0.05), wrt=nnx.Param)
    >>> x, y = jnp.ones((8, 4)), jnp.zeros((8, 1))
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> m = nnx.jit(ft.nnx_sam_step, static_argnums=2)(model, opt, loss_fn, x, y)
    >>> sorted(k for k in m if "loss" in k)
    ['clean_loss', 'loss', 'perturbed_loss']
  """
  loss = nnx_sam_update(model, optimizer, loss_fn, *args, **kwargs)
  return {"loss": loss, **sam_metrics(optimizer.opt_state)}
