"""Pytree arithmetic shared by the transformations.

Reductions (norms, dot products) are accumulated in float32 whatever the leaf
dtype, so bf16/fp16 models neither overflow nor lose the norm to rounding;
elementwise results are cast back to each leaf's own dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Sum over all leaves of <a_i, b_i>, accumulated in (at least) float32."""
  parts = [jnp.vdot(_f32(x).ravel(), _f32(y).ravel()) for x, y in
           zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False)]
  return sum(parts, jnp.zeros((), jnp.float32)).real


def sq_norm(tree: PyTree) -> jax.Array:
  """Squared global L2 norm, accumulated in float32."""
  parts = [jnp.sum(jnp.square(_f32(x))) for x in jax.tree.leaves(tree)]
  return sum(parts, jnp.zeros((), jnp.float32))


def norm(tree: PyTree) -> jax.Array:
  """Global L2 norm over every leaf of the pytree: one pass, squares summed in float32.

  bf16/fp16 leaves are upcast before squaring, so fp16 gradients above 256 (whose
  squares overflow fp16) keep their norm. Squares below float32's range (|g| <
  1e-19) vanish, but such a norm is far below the ``eps`` (1e-12) under which
  the perturbation counts as zero anyway. A rescaled (BLAS nrm2) form would cost
  a second pass, or a conditional that on XLA:CPU raised the SAM step's compiled
  temporary memory by half; neither is worth it.
  """
  return jnp.sqrt(sq_norm(tree))


def safe_inverse(x: jax.Array, eps: float) -> jax.Array:
  """1/x where x > eps, else 0: a zero vector normalizes to zero, not NaN."""
  big = x > eps
  return jnp.where(big, 1.0 / jnp.where(big, x, 1.0), 0.0)


def scale(tree: PyTree, s: jax.Array | float) -> PyTree:
  """s * tree, each leaf keeping its dtype (the product is formed in f32)."""
  return jax.tree.map(lambda x: (_f32(x) * s).astype(x.dtype), tree)


def normalize(tree: PyTree, eps: float) -> PyTree:
  """tree / ||tree|| with a zero tree mapped to zero."""
  return scale(tree, safe_inverse(norm(tree), eps))


def add_scaled(a: PyTree, s: jax.Array | float, b: PyTree) -> PyTree:
  """a + s * b, each leaf in a's dtype."""
  return jax.tree.map(lambda x, y: (_f32(x) + s * _f32(y)).astype(x.dtype), a, b)


def zeros_like(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.asarray(x).astype(y.dtype), tree, like)


def select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
  """Leafwise jnp.where(pred, a, b) for a scalar predicate."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)
