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
  optimizer records the perturbed loss and the sharpness estimate.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sam_optax.flax_training import nnx_value_and_grad_fn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> x = jnp.ones((4, 2))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> loss, g = nnx_value_and_grad_fn(graphdef, rest, loss_fn, x)(params)
    >>> bool(jnp.allclose(loss, loss_fn(model, x)))
    True
  """
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

# ------------------------------------------------ SAMPa, ESAM, SAF and MESA train steps
#
# Each is one jitted program with the calling convention of `make_linen_train_step`:
# `step(state, batch, dropout_key) -> (state, metrics)`; BatchNorm statistics come from
# the pass at the current weights only, and every pass of a step uses the same dropout key.


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of integer labels per example, ``(B,)``, computed in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.flax_training import per_example_cross_entropy
    >>> [round(float(v), 4) for v in per_example_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))]
    [1.3863, 1.3863]
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _linen_apply(state: TrainState, train_kwarg: str, dropout_key: jax.Array) -> Callable:
  """``apply(params, x, train=True) -> (logits, new batch_stats or None)``."""
  has_stats = state.batch_stats is not None

  def apply(params, x, train=True):
    variables = {"params": params}
    if has_stats:
      variables["batch_stats"] = state.batch_stats
    if not train:
      return state.apply_fn(variables, x, **{train_kwarg: False}), None
    logits, mutated = state.apply_fn(variables, x, **{train_kwarg: True},
                                     rngs={"dropout": dropout_key},
                                     mutable=["batch_stats"] if has_stats else [])
    return logits, (mutated["batch_stats"] if has_stats else None)

  return apply


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def _finish(state: TrainState, updates: Any, opt_state: Any, batch_stats: Any, **fields) -> Any:
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, batch_stats=batch_stats, **fields)


def make_linen_sampa_train_step(loss_fn: Callable[[jax.Array, jax.Array], jax.Array] =
                                softmax_cross_entropy, *, train_kwarg: str = "train",
                                clean_forward: bool | None = None, jit: bool = True) -> Callable:
  r"""``step(state, batch, dropout_key) -> (state, metrics)`` for :func:`sam_optax.sampa`.

  The step never computes the clean gradient :math:`\nabla f(x_t)`: the
  optimizer gets ``value_and_grad_fn`` (the loss on the batch, one vmapped call
  at :math:`\tilde x_t` and :math:`y_{t+1}`) and evaluates both gradients side by
  side. A model with BatchNorm needs one forward pass at :math:`x_t` (no
  backward) for its running statistics and the step's clean loss and accuracy;
  it does not depend on the two gradients, so it adds no sequential depth.

  Args:
    loss_fn: ``(logits, labels) -> scalar loss``.
    train_kwarg: the model's training-mode keyword.
    clean_forward: run that forward at :math:`x_t`; default: only when the
      state has ``batch_stats``. Without it the metrics hold the loss at
      :math:`\tilde x_t` (``perturbed_loss``) instead of the clean loss and accuracy.
    jit: wrap the step in ``jax.jit``.

  Returns:
    The step; ``state.tx`` must contain :func:`sam_optax.sampa` (a ``ValueError``
    otherwise: the other optimizers need the clean gradient).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import flax_training as ft
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return nn.Dense(3)(x)
    >>> model = Net()
    >>> x, y = jnp.ones((8, 4)), jnp.arange(8) % 3
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> state = ft.TrainState.create(apply_fn=model.apply, params=params, tx=sam_optax.sampa(optax.sgd(0.1)))
    >>> state, metrics = ft.make_linen_sampa_train_step()(state, (x, y), jax.random.key(1))
    >>> sorted(metrics)
    ['perturbed_loss', 'update_norm']
  """
  from sam_optax._src.methods.sampa import SAMPaState
  from sam_optax._src.telemetry import metrics as read_metrics

  def step(state: TrainState, batch: tuple, dropout_key: jax.Array):
    x, y = batch[0], batch[1]
    if not _contains(state.opt_state, SAMPaState):
      raise ValueError("`make_linen_sampa_train_step` skips the clean gradient, which only "
                       "`sam_optax.sampa` can do without: build the TrainState with `tx=sampa(...)`, "
                       "or use `make_linen_train_step` for other optimizers.")
    has_stats = state.batch_stats is not None
    forward = has_stats if clean_forward is None else clean_forward
    if has_stats and not forward:
      raise ValueError("`make_linen_sampa_train_step(clean_forward=False)`: this model has "
                       "BatchNorm, whose running statistics come from the forward at the "
                       "current weights; leave `clean_forward` at its default.")
    apply = _linen_apply(state, train_kwarg, dropout_key)
    value_and_grad_fn = lambda p: jax.value_and_grad(lambda q: loss_fn(apply(q, x)[0], y))(p)
    metrics, loss, stats = {}, None, None
    if forward:
      logits, stats = apply(jax.lax.stop_gradient(state.params), x)
      loss = loss_fn(logits, y)
      metrics = {"loss": loss, "accuracy": _accuracy(logits, y)}
    updates, opt_state = state.tx.update(state.params, state.opt_state, state.params,
                                         value_and_grad_fn=value_and_grad_fn, value=loss)
    if not forward:  # the loss at x~ came with its gradient (the telemetry holds it)
      metrics["perturbed_loss"] = read_metrics(opt_state).get("perturbed_loss", jnp.nan)
    metrics["update_norm"] = tu.norm(updates)
    return _finish(state, updates, opt_state, stats), metrics

  return jax.jit(step) if jit else step


def _contains(tree: Any, kind: type) -> bool:
  found = []
  jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, kind) and not found.append(x))
  return bool(found)


def make_linen_esam_train_step(example_loss_fn: Callable[[jax.Array, jax.Array], jax.Array] =
                               per_example_cross_entropy, *, train_kwarg: str = "train",
                               subset: bool = True, jit: bool = True) -> Callable:
  r"""``step(state, batch, dropout_key) -> (state, metrics)`` for :func:`sam_optax.esam`.

  The clean pass returns the per-example losses :math:`l_i(w)` with the
  gradient (no extra forward), and the optimizer gets
  ``per_example_loss_fn(params, batch)``, ``batch=(x, y)`` and
  ``example_losses``: it scores the examples by a forward at :math:`w+\epsilon`
  and runs the forward-backward on the :math:`\lceil\gamma B\rceil` selected ones
  only. BatchNorm statistics come from the clean pass; the passes at
  :math:`w+\epsilon` run in training mode and what they would write is dropped.
  ``grad_fn`` is passed too, so other sharpness-aware transforms in the chain
  still work.

  Args:
    example_loss_fn: ``(logits, labels) -> (B,)`` per-example losses; the
      training loss is their mean.
    train_kwarg: the model's training-mode keyword.
    subset: ``True`` runs the second pass on the gathered subset (ESAM's
      saving; with BatchNorm its statistics are then the subset's); ``False``
      weights the whole batch by the 0/1 selection instead.
    jit: wrap the step in ``jax.jit``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import flax_training as ft
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return nn.Dense(3)(x)
    >>> model = Net()
    >>> x, y = jnp.ones((8, 4)), jnp.arange(8) % 3
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = optax.chain(sam_optax.esam(0.05, 0.5), optax.sgd(0.1))
    >>> state = ft.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> state, metrics = ft.make_linen_esam_train_step()(state, (x, y), jax.random.key(1))
    >>> int(state.step)
    1
  """

  def step(state: TrainState, batch: tuple, dropout_key: jax.Array):
    x, y = batch[0], batch[1]
    apply = _linen_apply(state, train_kwarg, dropout_key)

    def losses_at(params, b):
      return example_loss_fn(apply(params, b[0])[0], b[1])

    def clean(params):
      logits, stats = apply(params, x)
      losses = example_loss_fn(logits, y)
      return jnp.mean(losses), (losses, logits, stats)

    (loss, (losses, logits, stats)), grads = jax.value_and_grad(clean, has_aux=True)(state.params)
    grad_fn = lambda p: jax.grad(lambda q: clean(q)[0])(p)
    if subset:
      closure = dict(per_example_loss_fn=losses_at, batch=(x, y))
    else:
      closure = dict(per_example_loss_fn=lambda p: losses_at(p, (x, y)))
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn,
                                         example_losses=losses, value=loss, **closure)
    metrics = {"loss": loss, "accuracy": _accuracy(logits, y), "grad_norm": tu.norm(grads),
               "update_norm": tu.norm(updates)}
    return _finish(state, updates, opt_state, stats), metrics

  return jax.jit(step) if jit else step


class SAFTrainState(TrainState):
  """A :class:`TrainState` that also carries SAF's logit store
  (:func:`sam_optax.trajectory.saf_init`); build it with
  ``SAFTrainState.create(..., saf=trajectory.saf_init(num_examples, num_classes))``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sam_optax import flax_training as ft, trajectory
    >>> state = ft.SAFTrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1),
    ...                                 saf=trajectory.saf_init(num_examples=8, num_classes=3))
    >>> isinstance(state.saf, trajectory.SAFState)
    True
  """
  saf: Any = struct.field(pytree_node=True, default=None)


def _window_checks(fn: str, steps_per_epoch: int, start_epoch: int, end_epoch: int | None) -> None:
  from sam_optax._src.validation import check_int
  steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, fn, minimum=1)
  start_epoch = check_int("start_epoch", start_epoch, fn, minimum=0)
  if end_epoch is not None:
    end_epoch = check_int("end_epoch", end_epoch, fn, minimum=0)


def make_linen_saf_train_step(loss_fn: Callable[[jax.Array, jax.Array], jax.Array] =
                              softmax_cross_entropy, *, steps_per_epoch: int, weight: float = 0.3,
                              temperature: float = 5.0, start_epoch: int = 5,
                              end_epoch: int | None = None, train_kwarg: str = "train",
                              jit: bool = True) -> Callable:
  r"""SAF: ``step(state, (x, y, indices), dropout_key) -> (state, metrics)``, one gradient pass.

  The loss is :math:`\mathrm{loss}(z, y) + R` with :math:`R` SAF's trajectory
  term (:func:`sam_optax.trajectory.saf_loss`): the KL towards the logits the
  same examples had ``lookback`` epochs earlier, read from ``state.saf`` by the
  examples' ``indices`` (their positions in the training set), and the batch's
  logits are written back. The epoch is ``state.step // steps_per_epoch``, so
  feed each example at most once per epoch (a fresh permutation per epoch).
  Any optimizer works (``state.tx``; a ``grad_fn`` of the full loss is passed
  too).

  Args:
    loss_fn: ``(logits, labels) -> scalar loss``.
    steps_per_epoch: steps in one epoch of the caller's loop.
    weight, temperature: :math:`\lambda` (the paper: 0.3) and :math:`T` (5).
    start_epoch, end_epoch: the window in which :math:`R` is on
      (:func:`sam_optax.trajectory.active`).
    train_kwarg: the model's training-mode keyword.
    jit: wrap the step in ``jax.jit``.

  Returns:
    The step, for a :class:`SAFTrainState`; metrics ``loss`` (without
    :math:`R`), ``trajectory_loss`` (:math:`R`), ``accuracy``, ``grad_norm``,
    ``update_norm``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from sam_optax import flax_training as ft, trajectory
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return nn.Dense(3)(x)
    >>> model = Net()
    >>> x, y, idx = jnp.ones((8, 4)), jnp.arange(8) % 3, jnp.arange(8)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> state = ft.SAFTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1),
    ...                                 saf=trajectory.saf_init(8, 3, lookback=1))
    >>> step = ft.make_linen_saf_train_step(steps_per_epoch=1, start_epoch=1)
    >>> for _ in range(3):
    ...   state, metrics = step(state, (x, y, idx), jax.random.key(1))
    >>> bool(metrics["trajectory_loss"] > 0)
    True
  """
  from sam_optax import trajectory
  _window_checks("make_linen_saf_train_step", steps_per_epoch, start_epoch, end_epoch)

  def step(state: SAFTrainState, batch: tuple, dropout_key: jax.Array):
    if len(batch) != 3:
      raise ValueError("`make_linen_saf_train_step`: the batch must be `(x, y, indices)`, with "
                       "the examples' indices in the training set (SAF stores logits per example).")
    if state.saf is None:
      raise ValueError("`make_linen_saf_train_step` needs `state.saf`: build the state with "
                       "`SAFTrainState.create(..., saf=trajectory.saf_init(num_examples, num_classes))`.")
    x, y, idx = batch
    epoch = state.step // steps_per_epoch
    apply = _linen_apply(state, train_kwarg, dropout_key)
    ref, valid = trajectory.saf_reference(state.saf, idx, epoch)
    where = valid & trajectory.active(epoch, start_epoch, end_epoch)

    def total(params):
      logits, stats = apply(params, x)
      base = loss_fn(logits, y)
      reg = trajectory.trajectory_loss(logits, ref, temperature=temperature, weight=weight,
                                       where=where)
      return base + reg, (base, reg, logits, stats)

    (_, (loss, reg, logits, stats)), grads = jax.value_and_grad(total, has_aux=True)(state.params)
    grad_fn = lambda p: jax.grad(lambda q: total(q)[0])(p)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    metrics = {"loss": loss, "trajectory_loss": reg, "accuracy": _accuracy(logits, y),
               "grad_norm": tu.norm(grads), "update_norm": tu.norm(updates)}
    return _finish(state, updates, opt_state, stats,
                   saf=trajectory.saf_update(state.saf, idx, logits, epoch)), metrics

  return jax.jit(step) if jit else step


def make_linen_mesa_train_step(loss_fn: Callable[[jax.Array, jax.Array], jax.Array] =
                               softmax_cross_entropy, *, steps_per_epoch: int, weight: float = 0.8,
                               temperature: float = 5.0, start_epoch: int = 5,
                               end_epoch: int | None = None, train_kwarg: str = "train",
                               jit: bool = True) -> Callable:
  r"""MESA: ``step(state, batch, dropout_key) -> (state, metrics)``, one gradient pass.

  ``state.tx`` must end with :func:`sam_optax.weight_ema`, which keeps the
  moving average :math:`\bar w` of the weights. Each step runs one forward of
  :math:`\bar w` without gradient (inference mode: the running BatchNorm
  statistics, no dropout, as the reference code's EMA model) and adds MESA's
  trajectory term (:func:`sam_optax.trajectory.mesa_loss`) towards those
  logits to the loss. The epoch is ``state.step // steps_per_epoch``. Report the
  live model's accuracy (:func:`make_linen_eval_step` on ``state``), or
  evaluate ``trajectory.ema_params(state.opt_state)`` separately: the
  reference code silently reports the EMA model's.

  Args:
    loss_fn: ``(logits, labels) -> scalar loss``.
    steps_per_epoch: steps in one epoch of the caller's loop.
    weight, temperature: :math:`\lambda` (the paper: 0.8) and :math:`T` (5).
    start_epoch, end_epoch: the window in which the term is on.
    train_kwarg: the model's training-mode keyword.
    jit: wrap the step in ``jax.jit``.

  Returns:
    The step; metrics ``loss`` (without the term), ``trajectory_loss``,
    ``accuracy``, ``grad_norm``, ``update_norm``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import flax_training as ft
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return nn.Dense(3)(x)
    >>> model = Net()
    >>> x, y = jnp.ones((8, 4)), jnp.arange(8) % 3
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = optax.chain(optax.sgd(0.1), sam_optax.weight_ema(0.9))
    >>> state = ft.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> step = ft.make_linen_mesa_train_step(steps_per_epoch=1, start_epoch=0)
    >>> state, metrics = step(state, (x, y), jax.random.key(1))
    >>> float(metrics["trajectory_loss"])   # the EMA starts at the weights
    0.0
  """
  from sam_optax import trajectory
  _window_checks("make_linen_mesa_train_step", steps_per_epoch, start_epoch, end_epoch)

  def step(state: TrainState, batch: tuple, dropout_key: jax.Array):
    x, y = batch[0], batch[1]
    epoch = state.step // steps_per_epoch
    apply = _linen_apply(state, train_kwarg, dropout_key)
    ema = trajectory.ema_params(state.opt_state, like=state.params)
    teacher, _ = apply(jax.lax.stop_gradient(ema), x, train=False)
    teacher = jax.lax.stop_gradient(teacher)

    def total(params):
      logits, stats = apply(params, x)
      base = loss_fn(logits, y)
      reg = trajectory.mesa_loss(logits, teacher, epoch, weight=weight, temperature=temperature,
                                 start_epoch=start_epoch, end_epoch=end_epoch)
      return base + reg, (base, reg, logits, stats)

    (_, (loss, reg, logits, stats)), grads = jax.value_and_grad(total, has_aux=True)(state.params)
    grad_fn = lambda p: jax.grad(lambda q: total(q)[0])(p)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    metrics = {"loss": loss, "trajectory_loss": reg, "accuracy": _accuracy(logits, y),
               "grad_norm": tu.norm(grads), "update_norm": tu.norm(updates)}
    return _finish(state, updates, opt_state, stats), metrics

  return jax.jit(step) if jit else step
