"""Flax integration: one jitted train step for linen ``TrainState`` and NNX models.

BatchNorm and dropout are where SAM ports go wrong. Here, for every sam_optax
transformation:

* the running statistics come from the clean pass only (the other passes run
  in training mode, normalizing with their own batch statistics as in Foret et
  al.'s JAX code, but the statistics they would write are discarded);
* every pass of a step uses the same dropout key, so the same units are dropped
  (ESAM's subset pass is the exception it documents: see ``subset``);
* the step is one jitted program, and the optimizer gets every closure kind it
  may need: ``value_and_grad_fn``, the clean ``value`` and an
  :class:`sam_optax.Objective` (model outputs and per-example losses, for ESAM
  and Functional-SAM).

:func:`make_linen_train_step` serves any ``tx``; SAF and MESA add their
trajectory term through ``regularizer=`` (:func:`saf_regularizer`,
:func:`mesa_regularizer`); the per-method builders are thin wrappers of it. NNX: :func:`nnx_objective_update`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import trajectory
from sam_optax._src import tree as tu
from sam_optax._src.engine import Objective
from sam_optax._src.flax_nnx import nnx_grad_fn, nnx_objective, nnx_objective_update  # noqa: F401
from sam_optax._src.flax_nnx import nnx_sam_step, nnx_sam_update, nnx_value_and_grad_fn  # noqa: F401
from sam_optax._src.methods.bayes import BayesianSAMState
from sam_optax._src.methods.sampa import SAMPaState
from sam_optax._src.telemetry import metrics as sam_metrics
from sam_optax._src.validation import check_int

try:  # flax is an optional dependency
  from flax import struct
  from flax.training import train_state
except ImportError as e:  # pragma: no cover
  raise ImportError("sam_optax.flax_training needs flax: pip install 'sam_optax[flax]'") from e

__all__ = ("Regularizer", "SAFTrainState", "TrainState", "make_linen_esam_train_step", "make_linen_eval_step",
           "make_linen_mesa_train_step", "make_linen_saf_train_step", "make_linen_sampa_train_step",
           "make_linen_train_step", "mesa_regularizer", "nnx_grad_fn", "nnx_objective", "nnx_objective_update",
           "nnx_sam_step", "nnx_sam_update", "nnx_value_and_grad_fn", "per_example_cross_entropy",
           "saf_regularizer", "softmax_cross_entropy")


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


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer labels, computed in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.flax_training import softmax_cross_entropy
    >>> round(float(softmax_cross_entropy(jnp.zeros((2, 10)), jnp.array([0, 3]))), 4)  # ln 10
    2.3026
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of integer labels per example, ``(B,)``, computed in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.flax_training import per_example_cross_entropy
    >>> [round(float(v), 4) for v in per_example_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))]
    [1.3863, 1.3863]
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


class Regularizer(NamedTuple):
  """A term added to the training loss of :func:`make_linen_train_step` (SAF, MESA).

  Attributes:
    prepare: ``(state, batch, predict) -> context``, outside the gradient;
      ``predict(params, x)`` runs the model in inference mode.
    penalty: ``(logits, context) -> scalar``, added to the mean loss inside
      the differentiated function (so every pass of a sharpness-aware method
      sees it).
    finish: ``(state, batch, logits, context) -> dict`` of TrainState fields to
      replace after the step (e.g. SAF's store), or None.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import flax_training as ft
    >>> l2_logits = ft.Regularizer(lambda state, batch, predict: None,
    ...                            lambda logits, ctx: 1e-3 * jnp.mean(logits ** 2))
    >>> step = ft.make_linen_train_step(regularizer=l2_logits)
  """
  prepare: Callable[[Any, tuple, Callable], Any]
  penalty: Callable[[jax.Array, Any], jax.Array]
  finish: Callable[[Any, tuple, jax.Array, Any], dict] | None = None


def _model_call(state: Any, train_kwarg: str, dropout_key: jax.Array) -> Callable:
  """``call(params, x, train=True) -> (logits, new batch_stats or None)``."""
  stats = getattr(state, "batch_stats", None)

  def call(params, x, train=True):
    variables = {"params": params} if stats is None else {"params": params, "batch_stats": stats}
    try:
      if not train:
        return state.apply_fn(variables, x, **{train_kwarg: False}), None
      logits, mutated = state.apply_fn(variables, x, **{train_kwarg: True}, rngs={"dropout": dropout_key},
                                       mutable=["batch_stats"] if stats is not None else [])
    except TypeError as e:
      if train_kwarg in str(e):
        raise TypeError(f"the model's `__call__` takes no `{train_kwarg}=` flag: build the step with "
                        f"`make_linen_train_step(train_kwarg=...)` and the name of the model's flag "
                        f"(e.g. 'training'); the step calls `apply_fn(variables, x, <flag>=True, "
                        f"rngs={{'dropout': key}}, mutable=['batch_stats'])`.") from e
      raise
    return logits, (mutated["batch_stats"] if stats is not None else None)

  return call


def _needs_no_clean_gradient(opt_state: Any) -> bool:
  """SAMPa and bSAM take their own gradients: the step's clean backward pass is skipped."""
  return bool(tu.find_states(opt_state, (SAMPaState, BayesianSAMState)))


def make_linen_train_step(loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = per_example_cross_entropy,
                          *, train_kwarg: str = "train", jit: bool = True, regularizer: Regularizer | None = None,
                          subset: bool = False, clean_forward: bool | None = None) -> Callable:
  r"""Builds ``step(state, batch, dropout_key) -> (state, metrics)`` for linen models.

  ``state`` is a :class:`TrainState` (or a plain
  ``flax.training.train_state.TrainState`` for models without BatchNorm)
  whose ``tx`` holds any sam_optax transformation (ESAM, SAMPa, bSAM, MSAM and
  the schedules included) or any optax optimizer; ``batch`` is ``(inputs,
  labels)`` (SAF: ``(inputs, labels, indices)``). The model is called as
  ``apply_fn(variables, x, **{train_kwarg: True}, rngs={'dropout': key},
  mutable=['batch_stats'])``. The optimizer receives ``value_and_grad_fn`` (the
  training loss at any params, the same batch and dropout key, the clean
  statistics as input), ``value`` (the clean training loss) and ``objective``
  (an :class:`sam_optax.Objective` of the model's logits and the per-example
  losses), so each method takes what it needs. SAMPa and bSAM take their own
  gradients: for them the clean backward pass is skipped (a forward at the
  current weights remains for the statistics and the metrics, see
  ``clean_forward``).

  Args:
    loss_fn: ``(logits, labels) -> (B,)`` per-example losses (or a scalar;
      ESAM and Functional-SAM need per-example losses). The training loss is
      their mean.
    train_kwarg: the name of the model's training-mode flag.
    jit: wrap the step in ``jax.jit``.
    regularizer: a :class:`Regularizer` added to the loss (:func:`saf_regularizer`,
      :func:`mesa_regularizer`).
    subset: let ESAM run its second pass on the gathered subset of the batch
      (its saving; dropout then draws masks for the subset's shape and
      BatchNorm uses the subset's statistics). ``False``: the objective covers
      the whole batch and ESAM weights the examples, exactly, with the same masks.
    clean_forward: for SAMPa/bSAM, run the forward at the current weights;
      default: only when the state has BatchNorm statistics. Without it the
      metrics hold ``perturbed_loss`` instead of the clean loss and accuracy.

  Returns:
    The step. Metrics: ``loss`` (clean, without the regularizer), ``accuracy``,
    ``grad_norm`` (clean), ``update_norm``, ``trajectory_loss`` (with a
    regularizer), plus what the optimizer recorded (:func:`sam_optax.metrics`):
    ``perturbed_loss``, ``sharpness`` (perturbed minus clean loss),
    ``perturbation_norm``, ``clean_grad_norm``, ``perturbed_grad_norm``,
    ``cosine`` where recorded, ``sam_step`` and ``sam_step_fraction`` for the
    schedules, ``skipped_steps`` under ``apply_if_finite``.

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

  def step(state, batch, dropout_key):
    x, y = batch[0], batch[1]
    call = _model_call(state, train_kwarg, dropout_key)
    has_stats = getattr(state, "batch_stats", None) is not None
    ctx = None if regularizer is None else regularizer.prepare(
        state, batch, lambda p, inputs: jax.lax.stop_gradient(call(p, inputs, train=False)[0]))

    def total(params):
      logits, stats = call(params, x)
      losses = loss_fn(logits, y)
      loss = losses if jnp.ndim(losses) == 0 else jnp.mean(losses.astype(jnp.float32))
      if regularizer is None:
        return loss, (loss, None, losses, logits, stats)
      reg = regularizer.penalty(logits, ctx)
      return loss + reg, (loss, reg, losses, logits, stats)

    objective = Objective(lambda p, b: call(p, b[0])[0], lambda out, b: loss_fn(out, b[1]),
                          (x, y) if subset else None)
    if not subset:  # the whole batch, closed over: ESAM weights it instead of gathering
      objective = objective._replace(apply_fn=lambda p, b: call(p, x)[0], loss_fn=lambda out, b: loss_fn(out, y))
    value_and_grad_fn = lambda p: jax.value_and_grad(lambda q: total(q)[0])(p)
    metrics = {}
    if _needs_no_clean_gradient(state.opt_state):
      forward = has_stats if clean_forward is None else clean_forward
      if has_stats and not forward:
        raise ValueError("`make_linen_train_step(clean_forward=False)`: this model has BatchNorm, whose "
                         "running statistics come from the forward at the current weights; leave "
                         "`clean_forward` at its default.")
      value, stats, logits, loss, reg = None, None, None, None, None
      if forward:
        value, (loss, reg, losses, logits, stats) = total(jax.lax.stop_gradient(state.params))
      grads, losses = state.params, None  # SAMPa and bSAM use the structure only
    else:
      (value, (loss, reg, losses, logits, stats)), grads = jax.value_and_grad(total, has_aux=True)(state.params)
      metrics["grad_norm"] = tu.norm(grads)
    extra = {} if losses is None else {"example_losses": losses}
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value_and_grad_fn=value_and_grad_fn,
                                         value=value, objective=objective, **extra)
    fields = {} if regularizer is None or regularizer.finish is None else regularizer.finish(state, batch, logits, ctx)
    if has_stats:
      fields["batch_stats"] = stats
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, **fields)
    if logits is not None:
      metrics.update(loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == y))
    if reg is not None:
      metrics["trajectory_loss"] = reg
    metrics["update_norm"] = tu.norm(updates)
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
  def evaluate(state, x):
    return _model_call(state, train_kwarg, jax.random.key(0))(state.params, x, train=False)[0]

  return evaluate


# ------------------------------------------------------------- SAF and MESA terms


def _window(fn: str, steps_per_epoch: int, start_epoch: int, end_epoch: int | None) -> None:
  check_int("steps_per_epoch", steps_per_epoch, fn, minimum=1)
  check_int("start_epoch", start_epoch, fn, minimum=0)
  if end_epoch is not None:
    check_int("end_epoch", end_epoch, fn, minimum=0)


def saf_regularizer(*, steps_per_epoch: int, weight: float = 0.3, temperature: float = 5.0,
                    start_epoch: int = 5, end_epoch: int | None = None) -> Regularizer:
  r"""SAF's trajectory term for :func:`make_linen_train_step`, on a :class:`SAFTrainState`.

  :math:`R = \lambda T^2\,\mathrm{mean}_i\,\mathrm{KL}(\mathrm{softmax}(z_i^{(e-\tilde E)}/T)
  \,\|\,\mathrm{softmax}(z_i/T))` towards the logits the batch's examples had
  ``lookback`` epochs earlier (read from ``state.saf`` by the batch's third
  element, the examples' indices); the batch's logits are written back. The
  epoch is ``state.step // steps_per_epoch``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import flax_training as ft
    >>> reg = ft.saf_regularizer(steps_per_epoch=10)
    >>> step = ft.make_linen_train_step(regularizer=reg)
    >>> z = jnp.array([[2.0, 0.0, -1.0]])   # logits that match the stored ones cost nothing
    >>> float(reg.penalty(z, (z, jnp.array([True]), 5)))
    0.0

  References:
    Du et al., `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_,
    NeurIPS 2022.
  """
  fn = "saf_regularizer"
  _window(fn, steps_per_epoch, start_epoch, end_epoch)

  def prepare(state, batch, predict):
    if len(batch) != 3:
      raise ValueError("SAF: the batch must be `(x, y, indices)`, with the examples' indices in the "
                       "training set (SAF stores logits per example).")
    if getattr(state, "saf", None) is None:
      raise ValueError("SAF needs `state.saf`: build the state with "
                       "`SAFTrainState.create(..., saf=trajectory.saf_init(num_examples, num_classes))`.")
    epoch = state.step // steps_per_epoch
    ref, valid = trajectory.saf_reference(state.saf, batch[2], epoch)
    return ref, valid & trajectory.active(epoch, start_epoch, end_epoch), epoch

  def penalty(logits, ctx):
    ref, where, _ = ctx
    return trajectory.trajectory_loss(logits, ref, temperature=temperature, weight=weight, where=where)

  def finish(state, batch, logits, ctx):
    return {"saf": trajectory.saf_update(state.saf, batch[2], logits, ctx[2])}

  return Regularizer(prepare, penalty, finish)


def mesa_regularizer(*, steps_per_epoch: int, weight: float = 0.8, temperature: float = 5.0,
                     start_epoch: int = 5, end_epoch: int | None = None) -> Regularizer:
  r"""MESA's trajectory term for :func:`make_linen_train_step`; ``state.tx`` must end with
  :func:`sam_optax.weight_ema`.

  One forward of the EMA weights :math:`\bar w` without gradient (inference mode: the
  running statistics, no dropout) gives the teacher logits of the KL term
  (:func:`sam_optax.trajectory.mesa_loss`). The epoch is ``state.step // steps_per_epoch``.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import flax_training as ft
    >>> tx = optax.chain(optax.sgd(0.1), sam_optax.weight_ema(0.999))   # the teacher's weights, last
    >>> reg = ft.mesa_regularizer(steps_per_epoch=10, start_epoch=5)
    >>> student, teacher = jnp.array([[2.0, 0.0]]), jnp.array([[0.0, 2.0]])
    >>> float(reg.penalty(student, (teacher, 4)))   # before start_epoch the term is off
    0.0

  References:
    Du et al., NeurIPS 2022 (as :func:`saf_regularizer`): MESA is the paper's
    memory-efficient variant, an EMA teacher in place of SAF's stored logits.
  """
  _window("mesa_regularizer", steps_per_epoch, start_epoch, end_epoch)

  def prepare(state, batch, predict):
    ema = trajectory.ema_params(state.opt_state, like=state.params)
    return predict(jax.lax.stop_gradient(ema), batch[0]), state.step // steps_per_epoch

  def penalty(logits, ctx):
    teacher, epoch = ctx
    return trajectory.mesa_loss(logits, teacher, epoch, weight=weight, temperature=temperature,
                                start_epoch=start_epoch, end_epoch=end_epoch)

  return Regularizer(prepare, penalty)


# ----------------------------------------------- the per-method builders (thin wrappers)


def make_linen_sampa_train_step(loss_fn: Callable = softmax_cross_entropy, *, train_kwarg: str = "train",
                                clean_forward: bool | None = None, jit: bool = True) -> Callable:
  """:func:`make_linen_train_step` for :func:`sam_optax.sampa`, which needs no clean gradient
  (``clean_forward``: see there). ``state.tx`` must contain ``sampa``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import flax_training as ft
    >>> model, batch = nn.Dense(2), (jnp.ones((4, 3)), jnp.array([0, 1, 1, 0]))
    >>> params = model.init(jax.random.key(0), batch[0])["params"]
    >>> apply = lambda v, x, train=False, **kw: (model.apply(v, x), {}) if train else model.apply(v, x)
    >>> step = ft.make_linen_sampa_train_step()
    >>> state = ft.TrainState.create(apply_fn=apply, params=params, tx=sam_optax.sampa(optax.sgd(0.1)))
    >>> state, metrics = step(state, batch, jax.random.key(1))
    >>> "perturbed_loss" in metrics
    True
  """
  def step(state, batch, dropout_key):
    if not tu.find_states(state.opt_state, SAMPaState):
      raise ValueError("`make_linen_sampa_train_step` skips the clean gradient, which only "
                       "`sam_optax.sampa` can do without: build the TrainState with `tx=sampa(...)`, "
                       "or use `make_linen_train_step` for other optimizers.")
    return inner(state, batch, dropout_key)

  inner = make_linen_train_step(loss_fn, train_kwarg=train_kwarg, clean_forward=clean_forward, jit=False)
  return jax.jit(step) if jit else step


def make_linen_esam_train_step(example_loss_fn: Callable = per_example_cross_entropy, *, train_kwarg: str = "train",
                               subset: bool = True, jit: bool = True) -> Callable:
  """:func:`make_linen_train_step` with ``subset=True``: ESAM's second pass on the subset (its saving).

  Example:
    >>> from sam_optax import flax_training as ft
    >>> step = ft.make_linen_esam_train_step()
  """
  return make_linen_train_step(example_loss_fn, train_kwarg=train_kwarg, subset=subset, jit=jit)


def make_linen_saf_train_step(loss_fn: Callable = softmax_cross_entropy, *, steps_per_epoch: int,
                              weight: float = 0.3, temperature: float = 5.0, start_epoch: int = 5,
                              end_epoch: int | None = None, train_kwarg: str = "train", jit: bool = True) -> Callable:
  """:func:`make_linen_train_step` with :func:`saf_regularizer` (a :class:`SAFTrainState`, batches ``(x, y, i)``).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from sam_optax import flax_training as ft, trajectory
    >>> model = nn.Dense(3)
    >>> x, y, idx = jnp.ones((8, 4)), jnp.arange(8) % 3, jnp.arange(8)
    >>> apply = lambda v, x, train=False, **kw: (model.apply(v, x), {}) if train else model.apply(v, x)
    >>> state = ft.SAFTrainState.create(apply_fn=apply, params=model.init(jax.random.key(0), x)["params"],
    ...                                 tx=optax.sgd(0.1), saf=trajectory.saf_init(8, 3, lookback=1))
    >>> step = ft.make_linen_saf_train_step(steps_per_epoch=1, start_epoch=1)
    >>> for _ in range(3):
    ...   state, metrics = step(state, (x, y, idx), jax.random.key(1))
    >>> bool(metrics["trajectory_loss"] > 0)
    True
  """
  reg = saf_regularizer(steps_per_epoch=steps_per_epoch, weight=weight, temperature=temperature,
                        start_epoch=start_epoch, end_epoch=end_epoch)
  return make_linen_train_step(loss_fn, train_kwarg=train_kwarg, regularizer=reg, jit=jit)


def make_linen_mesa_train_step(loss_fn: Callable = softmax_cross_entropy, *, steps_per_epoch: int,
                               weight: float = 0.8, temperature: float = 5.0, start_epoch: int = 5,
                               end_epoch: int | None = None, train_kwarg: str = "train", jit: bool = True) -> Callable:
  """:func:`make_linen_train_step` with :func:`mesa_regularizer`; ``state.tx`` must end with
  :func:`sam_optax.weight_ema`. Report the live model's accuracy; the reference code
  silently reports the EMA model's.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import flax_training as ft
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((8, 4)), jnp.arange(8) % 3
    >>> apply = lambda v, x, train=False, **kw: (model.apply(v, x), {}) if train else model.apply(v, x)
    >>> state = ft.TrainState.create(apply_fn=apply, params=model.init(jax.random.key(0), x)["params"],
    ...                              tx=optax.chain(optax.sgd(0.1), sam_optax.weight_ema(0.9)))
    >>> step = ft.make_linen_mesa_train_step(steps_per_epoch=1, start_epoch=0)
    >>> state, metrics = step(state, (x, y), jax.random.key(1))
    >>> float(metrics["trajectory_loss"])   # the EMA starts at the weights
    0.0
  """
  reg = mesa_regularizer(steps_per_epoch=steps_per_epoch, weight=weight, temperature=temperature,
                         start_epoch=start_epoch, end_epoch=end_epoch)
  return make_linen_train_step(loss_fn, train_kwarg=train_kwarg, regularizer=reg, jit=jit)
