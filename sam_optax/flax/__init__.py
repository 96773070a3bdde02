"""Flax integration: one jitted train step for linen ``TrainState`` and NNX models.

* linen: :func:`make_linen_train_step` serves every transformation (BatchNorm statistics
  from the clean pass, one dropout key for every pass, every closure kind passed); SAF and
  MESA add their trajectory term through ``regularizer=`` (:func:`saf_regularizer`,
  :func:`mesa_regularizer`); the per-method builders are thin wrappers of it.
* NNX: :func:`nnx_objective_update` (every method), :func:`nnx_sam_update` and
  :func:`nnx_sam_step` (the methods that need gradients only), and the closures they build
  (:func:`nnx_grad_fn`, :func:`nnx_value_and_grad_fn`, :func:`nnx_objective`).

This is ``sam_optax.flax``; the earlier module name ``sam_optax.flax_training`` still
imports, with a ``DeprecationWarning``, for one release.
"""

from sam_optax.flax.linen import (
    SAFTrainState,
    TrainState,
    make_linen_esam_train_step,
    make_linen_eval_step,
    make_linen_mesa_train_step,
    make_linen_saf_train_step,
    make_linen_sampa_train_step,
    make_linen_train_step,
)
from sam_optax.flax.losses import per_example_cross_entropy, softmax_cross_entropy
from sam_optax.flax.nnx import (
    nnx_grad_fn,
    nnx_objective,
    nnx_objective_update,
    nnx_sam_step,
    nnx_sam_update,
    nnx_value_and_grad_fn,
)
from sam_optax.flax.regularizers import Regularizer, mesa_regularizer, saf_regularizer

__all__ = (
    "Regularizer",
    "SAFTrainState",
    "TrainState",
    "make_linen_esam_train_step",
    "make_linen_eval_step",
    "make_linen_mesa_train_step",
    "make_linen_saf_train_step",
    "make_linen_sampa_train_step",
    "make_linen_train_step",
    "mesa_regularizer",
    "nnx_grad_fn",
    "nnx_objective",
    "nnx_objective_update",
    "nnx_sam_step",
    "nnx_sam_update",
    "nnx_value_and_grad_fn",
    "per_example_cross_entropy",
    "saf_regularizer",
    "softmax_cross_entropy",
)
