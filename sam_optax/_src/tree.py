"""Pytree arithmetic shared by the transformations.

One place decides how reductions are done, so every transformation is right for
every dtype and layout:

* Reductions (norms, dot products) accumulate in the *reduction dtype*: float32
  for bf16/fp16/float32 leaves, float64 when a leaf is float64 (under x64). bf16
  and fp16 gradients neither overflow nor lose the norm to rounding.
* Complex leaves use :math:`|x|^2 = x\\bar x` and :math:`\\mathrm{Re}\\langle a, b\\rangle`,
  so a complex gradient is normalized by its true length.
* Nothing is flattened or concatenated: each leaf is reduced in its own shape,
  which keeps the reductions valid for arrays sharded over a mesh with Explicit
  axes (where ``ravel`` of a sharded dimension is an error) as well as Auto ones.

Elementwise results are cast back to each leaf's own dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def real_dtype(dtype: Any) -> np.dtype:
  """The real counterpart of a dtype (complex64 -> float32, complex128 -> float64)."""
  dtype = jnp.dtype(dtype)
  return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def reduction_dtype(*trees: PyTree) -> np.dtype:
  """The real dtype reductions over these trees accumulate (and return) in:
  float32, or float64 when a leaf is (complex) float64."""
  dt = jnp.dtype(jnp.float32)
  for tree in trees:
    for x in jax.tree.leaves(tree):
      x_dtype = jnp.result_type(x)
      if jnp.issubdtype(x_dtype, jnp.inexact):
        dt = jnp.promote_types(dt, real_dtype(x_dtype))
  return jnp.dtype(dt)


def _acc(x: jax.Array) -> jax.Array:
  """x in at least float32 (complex stays complex)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def abs2(x: jax.Array, dtype: Any = None) -> jax.Array:
  """Elementwise |x|^2, real, in ``dtype`` (default: x's accumulation dtype)."""
  x = _acc(x)
  out = jnp.square(x.real) + jnp.square(x.imag) if jnp.iscomplexobj(x) else jnp.square(x)
  return out if dtype is None else out.astype(dtype)


def _sum(parts: list, dtype: Any) -> jax.Array:
  return sum((p.astype(dtype) for p in parts), jnp.zeros((), dtype))


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Re(sum over leaves of <a_i, b_i>), the real inner product of two pytrees."""
  dtype = reduction_dtype(a, b)
  parts = []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = _acc(x), _acc(y)
    prod = jnp.conj(x) * y if jnp.iscomplexobj(x) else x * y
    parts.append(jnp.sum(prod.real))
  return _sum(parts, dtype)


def sq_norm(tree: PyTree) -> jax.Array:
  """Squared global L2 norm, sum of |x|^2 over every entry of every leaf."""
  dtype = reduction_dtype(tree)
  return _sum([jnp.sum(abs2(x)) for x in jax.tree.leaves(tree)], dtype)


def norm(tree: PyTree) -> jax.Array:
  """Global L2 norm over every leaf of the pytree: one pass, squares summed in float32
  (float64 for float64 leaves).

  bf16/fp16 leaves are upcast before squaring, so fp16 gradients above 256 (whose
  squares overflow fp16) keep their norm. Squares below float32's range (|g| <
  1e-19) vanish, but such a norm is far below the ``eps`` (1e-12) under which
  the perturbation counts as zero anyway. A rescaled (BLAS nrm2) form would cost
  a second pass, or a conditional that on XLA:CPU raised the SAM step's compiled
  temporary memory by half; neither is worth it.
  """
  return jnp.sqrt(sq_norm(tree))


def safe_inverse(x: jax.Array, eps: Any) -> jax.Array:
  """1/x where x > eps, else 0: a zero vector normalizes to zero, not NaN."""
  big = x > eps
  return jnp.where(big, 1.0 / jnp.where(big, x, 1.0), jnp.zeros_like(x))


def cosine(a: PyTree, b: PyTree, eps: float = 1e-12) -> jax.Array:
  """Re<a, b> / (|a| |b|), 0 when either is (numerically) zero."""
  return vdot(a, b) * safe_inverse(norm(a) * norm(b), eps * eps)


def scale(tree: PyTree, s: jax.Array | float) -> PyTree:
  """s * tree, each leaf keeping its dtype (the product is formed in >= f32)."""
  return jax.tree.map(lambda x: (_acc(x) * s).astype(x.dtype), tree)


def normalize(tree: PyTree, eps: float) -> PyTree:
  """tree / ||tree|| with a zero tree mapped to zero."""
  return scale(tree, safe_inverse(norm(tree), eps))


def add_scaled(a: PyTree, s: jax.Array | float, b: PyTree) -> PyTree:
  """a + s * b, each leaf in a's dtype."""
  return jax.tree.map(lambda x, y: (_acc(x) + s * _acc(y)).astype(x.dtype), a, b)


def combine(a: PyTree, ca: jax.Array | float, b: PyTree, cb: jax.Array | float) -> PyTree:
  """ca * a + cb * b, each leaf in a's dtype (complex-safe)."""
  return jax.tree.map(lambda x, y: (ca * _acc(x) + cb * _acc(y)).astype(x.dtype), a, b)


def conj(tree: PyTree) -> PyTree:
  """The complex conjugate of the complex leaves: JAX's gradient of a real loss in complex
  weights is the conjugate of the direction optax descends along."""
  return jax.tree.map(lambda x: jnp.conj(x) if jnp.iscomplexobj(x) else x, tree)


def zeros_like(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.asarray(x).astype(y.dtype), tree, like)


def select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
  """Leafwise jnp.where(pred, a, b) for a scalar predicate."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def find_states(tree: PyTree, kind: type | tuple) -> list:
  """Every node of type ``kind`` in ``tree`` (an optimizer state at any depth: inside
  ``chain``, ``inject_hyperparams``, ``MultiSteps``, a Flax ``TrainState``), outermost first."""
  return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)]


def find_state(tree: PyTree, kind: type, fn: str, hint: str) -> Any:
  """The first node of type ``kind`` in ``tree``; a ValueError naming ``fn`` and ``hint`` if
  none."""
  found = find_states(tree, kind)
  if not found:
    raise ValueError(f"`{fn}`: no {kind.__name__} in the optimizer state; {hint}")
  return found[0]
