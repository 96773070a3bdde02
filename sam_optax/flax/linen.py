"""The linen train step: one jitted step for every sam_optax transformation.

BatchNorm and dropout are where SAM ports go wrong. Here, for every transformation:

* the running statistics come from the clean pass only (the other passes run in
  training mode, normalizing with their own batch statistics as in Foret et al.'s JAX
  code, but the statistics they would write are discarded);
* every pass of a step uses the same dropout key, so the same units are dropped (ESAM's
  subset pass and m-sharpness's groups draw masks for their own shapes);
* the optimizer gets every closure kind it may need: ``value_and_grad_fn``, the clean
  ``value`` and an :class:`sam_optax.Objective` that carries the clean pass's logits and
  per-example losses. A method that takes its own gradients (SAMPa, bSAM, m-sharpness)
  leaves the clean gradient unused, and XLA drops its backward pass from the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.closures import Objective
from sam_optax._src.telemetry import metrics as sam_metrics
from sam_optax.flax.losses import per_example_cross_entropy, softmax_cross_entropy
from sam_optax.flax.regularizers import Regularizer, mesa_regularizer, saf_regularizer

try:  # flax is an optional dependency
  from flax import struct
  from flax.training import train_state
except ImportError as e:  # pragma: no cover
  raise ImportError("sam_optax.flax needs flax: pip install 'sam_optax[flax]'") from e


class TrainState(train_state.TrainState):
  """A :class:`flax.training.train_state.TrainState` with BatchNorm statistics.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, sam_optax
    >>> from sam_optax.flax import TrainState
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


class SAFTrainState(TrainState):
  """A :class:`TrainState` that also carries SAF's logit store
  (:func:`sam_optax.trajectory.saf_init`); build it with
  ``SAFTrainState.create(..., saf=trajectory.saf_init(num_examples, num_classes))``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sam_optax import flax as ft, trajectory
    >>> state = ft.SAFTrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1),
    ...                                 saf=trajectory.saf_init(num_examples=8, num_classes=3))
    >>> isinstance(state.saf, trajectory.SAFState)
    True
  """
  saf: Any = struct.field(pytree_node=True, default=None)


def _model_call(state: Any, train_kwarg: str, dropout_key: jax.Array) -> Callable:
  """``call(params, x, train=True) -> (logits, new batch_stats or None)``."""
  stats = getattr(state, "batch_stats", None)

  def call(params, x, train=True):
    variables = {"params": params} if stats is None else {"params": params, "batch_stats": stats}
    try:
      if not train:
        return state.apply_fn(variables, x, **{train_kwarg: False}), None
      logits, mutated = state.apply_fn(variables, x, **{train_kwarg: True},
                                       rngs={"dropout": dropout_key},
                                       mutable=["batch_stats"] if stats is not None else [])
    except TypeError as e:
      if train_kwarg in str(e):
        raise TypeError(f"the model's `__call__` takes no `{train_kwarg}=` flag: build the step "
                        f"with `make_linen_train_step(train_kwarg=...)` and the name of the "
                        f"model's flag (e.g. 'training'); the step calls `apply_fn(variables, x, "
                        f"<flag>=True, rngs={{'dropout': key}}, mutable=['batch_stats'])`.") from e
      raise
    return logits, (mutated["batch_stats"] if stats is not None else None)

  return call


def make_linen_train_step(loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
                          = per_example_cross_entropy,
                          *, train_kwarg: str = "train", jit: bool = True,
                          regularizer: Regularizer | None = None, subset: bool = False,
                          clean_forward: bool = True) -> Callable:
  r"""Builds ``step(state, batch, dropout_key) -> (state, metrics)`` for linen models.

  ``state`` is a :class:`TrainState` (or a plain ``flax.training.train_state.TrainState``
  for models without BatchNorm) whose ``tx`` holds any sam_optax transformation (ESAM,
  SAMPa, bSAM, MSAM, m-sharpness and the schedules included) or any optax optimizer;
  ``batch`` is ``(inputs, labels)`` (SAF: ``(inputs, labels, indices)``). The model is
  called as ``apply_fn(variables, x, **{train_kwarg: True}, rngs={'dropout': key},
  mutable=['batch_stats'])``. The optimizer receives ``value_and_grad_fn`` (the training
  loss at any params, the same batch and dropout key, the clean statistics as input),
  ``value`` (the clean training loss) and ``objective`` (an :class:`sam_optax.Objective` of
  the model's logits and the per-example losses, with the clean pass's logits and losses
  in ``clean_outputs`` and ``clean_losses``), so each method takes what it needs.

  Args:
    loss_fn: ``(logits, labels) -> (B,)`` per-example losses (or a scalar; ESAM,
      Functional-SAM and m-sharpness need per-example losses). The training loss is
      their mean.
    train_kwarg: the name of the model's training-mode flag.
    jit: wrap the step in ``jax.jit``.
    regularizer: a :class:`Regularizer` added to the loss (:func:`saf_regularizer`,
      :func:`mesa_regularizer`).
    subset: the objective carries the batch, so ESAM can run its second pass on the
      gathered subset (its saving; dropout then draws masks for the subset's shape and
      BatchNorm uses the subset's statistics) and m-sharpness can split it into groups.
      ``False``: the objective closes over the whole batch and ESAM weights the
      examples, exactly, with the same masks.
    clean_forward: run the clean pass. ``False`` skips it entirely, for methods that
      take their own gradients (SAMPa, bSAM) on models without BatchNorm: one forward
      less, and no ``loss``/``accuracy`` in the metrics.

  Returns:
    The step. Metrics: ``loss`` (clean, without the regularizer), ``accuracy``,
    ``update_norm``, ``trajectory_loss`` (with a regularizer), ``grad_norm`` (the clean
    gradient's norm, for optimizers that record no ``clean_grad_norm`` themselves), plus
    what the optimizer recorded (:func:`sam_optax.metrics`): ``clean_grad_norm``,
    ``perturbed_loss``, ``sharpness`` (perturbed minus clean loss), ``perturbation_norm``,
    ``perturbed_grad_norm``, ``cosine`` where recorded, ``sam_step`` and
    ``sam_step_fraction`` for the schedules, ``skipped_steps`` under ``skip_if_nonfinite``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, sam_optax
    >>> from sam_optax.flax import TrainState, make_linen_train_step
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

  def step(state, batch, dropout_key):
    x, y = batch[0], batch[1]
    call = _model_call(state, train_kwarg, dropout_key)
    has_stats = getattr(state, "batch_stats", None) is not None
    if regularizer is not None and not clean_forward:
      raise ValueError("`make_linen_train_step(clean_forward=False)` has no clean logits for "
                       "`regularizer=` (SAF's and MESA's terms need them); leave `clean_forward` "
                       "at its default.")
    if has_stats and not clean_forward:
      raise ValueError("`make_linen_train_step(clean_forward=False)`: this model has BatchNorm, "
                       "whose running statistics come from the clean pass; leave `clean_forward` "
                       "at its default.")
    ctx = None if regularizer is None else regularizer.prepare(
        state, batch, lambda p, inputs: jax.lax.stop_gradient(call(p, inputs, train=False)[0]))
    total = _training_loss(call, loss_fn, regularizer, ctx, x, y)
    value_and_grad_fn = lambda p: jax.value_and_grad(lambda q: total(q)[0])(p)
    if clean_forward:
      (value, (loss, reg, losses, logits, stats)), grads = jax.value_and_grad(
          total, has_aux=True)(state.params)
    else:  # the method takes its own gradients: only the structure of `updates` is read
      value = loss = reg = losses = logits = stats = None
      grads = state.params
    objective = _objective(call, loss_fn, x, y, subset, logits, losses)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                         value_and_grad_fn=value_and_grad_fn, value=value,
                                         objective=objective)
    fields = {}
    if regularizer is not None and regularizer.finish is not None:
      assert logits is not None   # the clean pass ran (checked above)
      fields = regularizer.finish(state, batch, logits, ctx)
    if has_stats:
      fields["batch_stats"] = stats
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, **fields)
    return new_state, _step_metrics(opt_state, updates, grads if clean_forward else None, loss,
                                    logits, y, reg)

  return jax.jit(step) if jit else step


def _training_loss(call: Callable, loss_fn: Callable, regularizer: Regularizer | None, ctx: Any,
                   x: jax.Array, y: jax.Array) -> Callable:
  """``total(params) -> (loss + penalty, (loss, penalty, per-example losses, logits, stats))``."""

  def total(params):
    logits, stats = call(params, x)
    losses = loss_fn(logits, y)
    loss = losses if jnp.ndim(losses) == 0 else jnp.mean(losses.astype(jnp.float32))
    if regularizer is None:
      return loss, (loss, None, losses, logits, stats)
    reg = regularizer.penalty(logits, ctx)
    return loss + reg, (loss, reg, losses, logits, stats)

  return total


def _objective(call: Callable, loss_fn: Callable, x: jax.Array, y: jax.Array, subset: bool,
               logits: Any, losses: Any) -> Objective:
  """The model's logits and per-example losses apart, with the clean pass's where known."""
  clean_losses = losses if losses is not None and jnp.ndim(losses) == 1 else None
  if subset:  # the batch in the objective: ESAM gathers a subset, m-sharpness splits it
    return Objective(lambda p, b: call(p, b[0])[0], lambda out, b: loss_fn(out, b[1]), (x, y),
                     clean_outputs=logits, clean_losses=clean_losses)
  # the whole batch, closed over: ESAM weights it instead of gathering
  return Objective(lambda p, b: call(p, x)[0], lambda out, b: loss_fn(out, y), None,
                   clean_outputs=logits, clean_losses=clean_losses)


def _step_metrics(opt_state: Any, updates: Any, grads: Any, loss: Any, logits: Any, y: jax.Array,
                  reg: Any) -> dict:
  metrics = {}
  if logits is not None:
    metrics.update(loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == y))
  if reg is not None:
    metrics["trajectory_loss"] = reg
  metrics["update_norm"] = tu.norm(updates)
  recorded = sam_metrics(opt_state)
  if grads is not None and "clean_grad_norm" not in recorded:
    metrics["grad_norm"] = tu.norm(grads)   # a plain optax optimizer: its gradient's norm here
  for name, value in recorded.items():
    metrics.setdefault(name, value)
  return metrics


def make_linen_eval_step(*, train_kwarg: str = "train") -> Callable:
  """``eval_step(state, x) -> logits`` using the running statistics.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> from sam_optax.flax import TrainState, make_linen_eval_step
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
  def evaluate(state, x):
    return _model_call(state, train_kwarg, jax.random.key(0))(state.params, x, train=False)[0]

  return evaluate


# ------------------------------------------------ the per-method builders (thin wrappers)


def make_linen_sampa_train_step(loss_fn: Callable = softmax_cross_entropy, *,
                                train_kwarg: str = "train",
                                clean_forward: bool = True, jit: bool = True) -> Callable:
  """:func:`make_linen_train_step` for :func:`sam_optax.sampa`, which needs no clean gradient
  (the compiled step drops the clean backward pass; ``clean_forward=False`` drops the clean
  forward too, on models without BatchNorm).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import flax as ft
    >>> model, batch = nn.Dense(2), (jnp.ones((4, 3)), jnp.array([0, 1, 1, 0]))
    >>> params = model.init(jax.random.key(0), batch[0])["params"]
    >>> def apply(v, x, train=False, **kw):   # a model without BatchNorm
    ...   return (model.apply(v, x), {}) if train else model.apply(v, x)
    >>> step = ft.make_linen_sampa_train_step()
    >>> tx = sam_optax.sampa(optax.sgd(0.1))
    >>> state = ft.TrainState.create(apply_fn=apply, params=params, tx=tx)
    >>> state, metrics = step(state, batch, jax.random.key(1))
    >>> "perturbed_loss" in metrics
    True
  """
  return make_linen_train_step(loss_fn, train_kwarg=train_kwarg, clean_forward=clean_forward,
                               jit=jit)


def make_linen_esam_train_step(example_loss_fn: Callable = per_example_cross_entropy, *,
                               train_kwarg: str = "train",
                               subset: bool = True, jit: bool = True) -> Callable:
  """:func:`make_linen_train_step` with ``subset=True``: ESAM's second pass on the subset (its
  saving).

  Example:
    >>> from sam_optax import flax as ft
    >>> step = ft.make_linen_esam_train_step()
  """
  return make_linen_train_step(example_loss_fn, train_kwarg=train_kwarg, subset=subset, jit=jit)


def make_linen_saf_train_step(loss_fn: Callable = softmax_cross_entropy, *, steps_per_epoch: int,
                              weight: float = 0.3, temperature: float = 5.0,
                              start_epoch: int = 5, end_epoch: int | None = None,
                              train_kwarg: str = "train", jit: bool = True) -> Callable:
  """:func:`make_linen_train_step` with :func:`saf_regularizer` (a :class:`SAFTrainState`,
  batches ``(x, y, i)``).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from sam_optax import flax as ft, trajectory
    >>> model = nn.Dense(3)
    >>> x, y, idx = jnp.ones((8, 4)), jnp.arange(8) % 3, jnp.arange(8)
    >>> def apply(v, x, train=False, **kw):
    ...   return (model.apply(v, x), {}) if train else model.apply(v, x)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> state = ft.SAFTrainState.create(apply_fn=apply, params=params, tx=optax.sgd(0.1),
    ...                                 saf=trajectory.saf_init(8, 3, lookback=1))
    >>> step = ft.make_linen_saf_train_step(steps_per_epoch=1, start_epoch=1)
    >>> for _ in range(3):
    ...   state, metrics = step(state, (x, y, idx), jax.random.key(1))
    >>> bool(metrics["trajectory_loss"] > 0)
    True
  """
  reg = saf_regularizer(steps_per_epoch=steps_per_epoch, weight=weight, temperature=temperature,
                        start_epoch=start_epoch, end_epoch=end_epoch)
  return make_linen_train_step(loss_fn, train_kwarg=train_kwarg, regularizer=reg, jit=jit)


def make_linen_mesa_train_step(loss_fn: Callable = softmax_cross_entropy, *,
                               steps_per_epoch: int, weight: float = 0.8,
                               temperature: float = 5.0, start_epoch: int = 5,
                               end_epoch: int | None = None, train_kwarg: str = "train",
                               jit: bool = True) -> Callable:
  """:func:`make_linen_train_step` with :func:`mesa_regularizer`; ``state.tx`` must end with
  :func:`sam_optax.weight_ema`. Report the live model's accuracy; the reference code
  silently reports the EMA model's.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import flax as ft
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((8, 4)), jnp.arange(8) % 3
    >>> def apply(v, x, train=False, **kw):
    ...   return (model.apply(v, x), {}) if train else model.apply(v, x)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> state = ft.TrainState.create(apply_fn=apply, params=params,
    ...                              tx=optax.chain(optax.sgd(0.1), sam_optax.weight_ema(0.9)))
    >>> step = ft.make_linen_mesa_train_step(steps_per_epoch=1, start_epoch=0)
    >>> state, metrics = step(state, (x, y), jax.random.key(1))
    >>> float(metrics["trajectory_loss"])   # the EMA starts at the weights
    0.0
  """
  reg = mesa_regularizer(steps_per_epoch=steps_per_epoch, weight=weight, temperature=temperature,
                         start_epoch=start_epoch, end_epoch=end_epoch)
  return make_linen_train_step(loss_fn, train_kwarg=train_kwarg, regularizer=reg, jit=jit)
