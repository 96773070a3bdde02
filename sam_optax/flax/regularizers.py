"""Terms added to the training loss of the linen step: SAF's and MESA's trajectory losses.

A :class:`Regularizer` prepares its context outside the gradient, adds its penalty inside
the differentiated loss (so every pass of a sharpness-aware method sees it) and may write
TrainState fields after the step (SAF's logit store).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from sam_optax import trajectory
from sam_optax._src.validation import check_int


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
    >>> from sam_optax import flax as ft
    >>> l2_logits = ft.Regularizer(lambda state, batch, predict: None,
    ...                            lambda logits, ctx: 1e-3 * jnp.mean(logits ** 2))
    >>> step = ft.make_linen_train_step(regularizer=l2_logits)
  """
  prepare: Callable[[Any, tuple, Callable], Any]
  penalty: Callable[[jax.Array, Any], jax.Array]
  finish: Callable[[Any, tuple, jax.Array, Any], dict] | None = None


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
    >>> from sam_optax import flax as ft
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
      raise ValueError("SAF: the batch must be `(x, y, indices)`, with the examples' indices in "
                       "the training set (SAF stores logits per example).")
    if getattr(state, "saf", None) is None:
      raise ValueError("SAF needs `state.saf`: build the state with "
                       "`SAFTrainState.create(..., saf=trajectory.saf_init(num_examples, "
                       "num_classes))`.")
    epoch = state.step // steps_per_epoch
    ref, valid = trajectory.saf_reference(state.saf, batch[2], epoch)
    return ref, valid & trajectory.active(epoch, start_epoch, end_epoch), epoch

  def penalty(logits, ctx):
    ref, where, _ = ctx
    return trajectory.trajectory_loss(logits, ref, temperature=temperature, weight=weight,
                                      where=where)

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
    >>> from sam_optax import flax as ft
    >>> # the teacher's weights, last in the chain
    >>> tx = optax.chain(optax.sgd(0.1), sam_optax.weight_ema(0.999))
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
