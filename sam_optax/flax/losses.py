"""Losses in float32 for the Flax steps: the mean and the per-example cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer labels, computed in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.flax import softmax_cross_entropy
    >>> round(float(softmax_cross_entropy(jnp.zeros((2, 10)), jnp.array([0, 3]))), 4)  # ln 10
    2.3026
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of integer labels per example, ``(B,)``, computed in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.flax import per_example_cross_entropy
    >>> losses = per_example_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))
    >>> [round(float(v), 4) for v in losses]
    [1.3863, 1.3863]
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
