"""Measuring sharpness: Hessian spectrum, worst-case loss in a rho-ball, landscapes.

Everything is built on JAX's autodiff and takes a ``loss_fn(params) -> scalar``
closure (close over the batch, put BatchNorm in inference mode, switch dropout
off), so it works for any pytree model and inside ``jax.jit``. Hessian-vector
products are forward-over-reverse, ``jvp`` of ``grad``: the cost of about two
gradients, no Hessian is ever formed.

On XLA:CPU, convolutions inside ``lax`` loops run many times slower than at the
top level (jax-ml/jax#12868); the iterative functions take ``unroll`` (passed
to ``lax.fori_loop``/``lax.scan``) so a convnet on CPU can trade compile time
for speed (``unroll=True`` unrolls fully).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from sam_optax._src import geometries as pert
from sam_optax._src import tree as tu
from sam_optax._src.plots import plot_landscape_1d, plot_landscape_2d, plot_spectrum

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

__all__ = [
    "ascent_gap",
    "filter_normalized_direction",
    "hessian_spectrum",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_vector_product",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "m_sharpness",
    "max_sharpness",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_spectrum",
]


def _f32_tree(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _random_like(key, tree, rademacher=False):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  if rademacher:
    out = [jax.random.rademacher(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  else:
    out = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  return treedef.unflatten(out)


def hessian_vector_product(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
  r""":math:`H v` with :math:`H = \nabla^2 L(w)`, forward-over-reverse (``jvp`` of ``grad``).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from sam_optax import sharpness
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)   # H = diag(3, 1)
    >>> print(np.asarray(sharpness.hessian_vector_product(loss, jnp.zeros(2), jnp.ones(2))))
    [3. 1.]
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (tu.cast_like(v, params),))[1]


def hessian_top_eigenvalue(loss_fn: LossFn, params: PyTree, *, num_iters: int = 50,
                           key: jax.Array | None = None, unroll: int | bool = 1
                           ) -> tuple[jax.Array, PyTree]:
  r"""Largest-magnitude Hessian eigenvalue by power iteration on Hessian-vector products.

  .. math:: v_{k+1} = H v_k / \|H v_k\|,\qquad \lambda = v^\top H v

  Args:
    loss_fn: ``params -> scalar loss``.
    params: the point :math:`w`.
    num_iters: power iterations (convergence is geometric in
      :math:`|\lambda_2/\lambda_1|`).
    key: PRNG key of the random start (default ``jax.random.key(0)``).
    unroll: forwarded to ``lax.fori_loop``.

  Returns:
    ``(eigenvalue, eigenvector)``: a float32 scalar (signed) and a unit-norm
    pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from sam_optax import sharpness
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)   # H = diag(3, 1)
    >>> eig, vec = sharpness.hessian_top_eigenvalue(loss, jnp.zeros(2), num_iters=30)
    >>> round(float(eig), 4), np.round(np.abs(np.asarray(vec)), 4).tolist()
    (3.0, [1.0, 0.0])

  References:
    Yao, Gholami, Keutzer, Mahoney, `PyHessian: Neural Networks Through the Lens
    of the Hessian <https://arxiv.org/abs/1912.07145>`_, 2020 (power iteration on
    HVPs for the top eigenvalue).
  """
  key = jax.random.key(0) if key is None else key
  v0 = tu.normalize(_random_like(key, params), 0.0)

  def body(_, carry):
    v, _ = carry
    hv = _f32_tree(hessian_vector_product(loss_fn, params, v))
    eig = tu.vdot(v, hv)
    return tu.normalize(hv, 0.0), eig

  v, _ = jax.lax.fori_loop(0, num_iters, body, (v0, jnp.zeros((), jnp.float32)), unroll=unroll)
  eig = tu.vdot(v, _f32_tree(hessian_vector_product(loss_fn, params, v)))
  return eig, v


def hessian_trace(loss_fn: LossFn, params: PyTree, *, num_samples: int = 100,
                  key: jax.Array | None = None, unroll: int | bool = 1) -> jax.Array:
  r"""Hutchinson's estimate :math:`\mathrm{tr}(H) \approx \frac1n\sum_i z_i^\top H z_i`,
  Rademacher probes :math:`z_i`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)   # H = diag(3, 1)
    >>> round(float(sharpness.hessian_trace(loss, jnp.zeros(2), num_samples=8)), 4)
    4.0

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines <https://doi.org/10.1080/03610919008812866>`_, 1990;
    Yao et al., PyHessian, 2020.
  """
  key = jax.random.key(0) if key is None else key
  keys = jax.random.split(key, num_samples)

  def one(carry, k):
    z = _random_like(k, params, rademacher=True)
    return carry + tu.vdot(z, _f32_tree(hessian_vector_product(loss_fn, params, z))), None

  total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), keys, unroll=unroll)
  return total / num_samples


def hessian_spectrum(loss_fn: LossFn, params: PyTree, *, num_iters: int = 30, num_probes: int = 1,
                     key: jax.Array | None = None, grid: jax.Array | None = None,
                     sigma: float | None = None) -> dict[str, jax.Array]:
  r"""Eigenvalue density by stochastic Lanczos quadrature (SLQ).

  For each random unit probe, ``num_iters`` Lanczos steps (with full
  reorthogonalization) give a tridiagonal :math:`T`; its eigenvalues
  :math:`\theta_j` are quadrature nodes with weights :math:`\tau_j = (e_1^\top
  u_j)^2`. The density is :math:`\phi(t) = \frac{1}{n_p}\sum_{p,j} \tau_j
  \mathcal N(t; \theta_j, \sigma^2)`.

  Returns:
    ``{'nodes': (probes, m), 'weights': (probes, m), 'grid': (G,), 'density': (G,)}``.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from sam_optax import sharpness
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, 1.0, 1.0]) * w ** 2)   # eigenvalues 3, 1, 1
    >>> spec = sharpness.hessian_spectrum(loss, jnp.zeros(3), num_iters=3)
    >>> nodes = np.asarray(spec["nodes"][0])    # Lanczos recovers the distinct eigenvalues
    >>> sorted({round(float(x), 3) for x in nodes if abs(x) > 1e-3})
    [1.0, 3.0]
    >>> spec["grid"].shape == spec["density"].shape
    True

  References:
    Ghorbani, Krishnan, Xiao, `An Investigation into Neural Net Optimization via
    Hessian Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_, ICML 2019.
  """
  key = jax.random.key(0) if key is None else key
  flat0, unravel = jax.flatten_util.ravel_pytree(_f32_tree(params))
  n = flat0.size
  m = min(num_iters, n)

  def hvp_flat(x):
    return jax.flatten_util.ravel_pytree(_f32_tree(
        hessian_vector_product(loss_fn, params, unravel(x))))[0]

  def lanczos(k):
    q = jax.random.normal(k, (n,), jnp.float32)
    q = q / jnp.linalg.norm(q)
    basis = jnp.zeros((m, n), jnp.float32).at[0].set(q)
    alphas = jnp.zeros(m, jnp.float32)
    betas = jnp.zeros(m, jnp.float32)
    for j in range(m):  # m is small; unrolled keeps XLA:CPU convolutions out of loops
      w = hvp_flat(basis[j])
      a = jnp.dot(w, basis[j])
      w = w - basis.T @ (basis @ w)  # full reorthogonalization against all stored vectors
      w = w - basis.T @ (basis @ w)
      b = jnp.linalg.norm(w)
      alphas = alphas.at[j].set(a)
      if j + 1 < m:
        betas = betas.at[j].set(b)
        basis = basis.at[j + 1].set(jnp.where(b > 1e-10, w / jnp.where(b > 1e-10, b, 1.0), 0.0))
    t = jnp.diag(alphas) + jnp.diag(betas[:m - 1], 1) + jnp.diag(betas[:m - 1], -1)
    nodes, vecs = jnp.linalg.eigh(t)
    return nodes, vecs[0] ** 2

  nodes, weights = jax.vmap(lanczos)(jax.random.split(key, num_probes)) if num_probes > 1 else (
      jax.tree.map(lambda x: x[None], lanczos(key)))
  lo, hi = jnp.min(nodes), jnp.max(nodes)
  span = jnp.maximum(hi - lo, 1e-6)
  if grid is None:
    grid = jnp.linspace(lo - 0.05 * span, hi + 0.05 * span, 400)
  s = (0.01 * span) if sigma is None else sigma
  dens = jnp.sum(weights[..., None] * jnp.exp(-0.5 * ((grid - nodes[..., None]) / s) ** 2),
                 axis=(0, 1)) / (num_probes * s * jnp.sqrt(2 * jnp.pi))
  return {"nodes": nodes, "weights": weights, "grid": grid, "density": dens}


def max_sharpness(loss_fn: LossFn, params: PyTree, rho: float, *,
                  perturbation: optax.GradientTransformation | None = None, steps: int = 20,
                  step_size: float | None = None, key: jax.Array | None = None,
                  unroll: int | bool = 1) -> jax.Array:
  r"""Worst-case loss increase in the :math:`\rho`-ball, by projected gradient ascent.

  .. math:: \max_{\epsilon \in B_\rho} L(w+\epsilon) - L(w)

  with the ball of ``perturbation``'s geometry (L2 by default; ``adaptive()``
  gives ASAM's adaptive sharpness). Two ascents of ``steps`` steps,
  :math:`\delta \leftarrow \Pi_\rho(\delta + s\, d(\nabla L(w+\delta)))`, one
  from SAM's step :math:`\rho\, d(g)` and one from a random point of the ball
  (so a stationary point does not stall it); the best loss seen is returned.
  Default step size :math:`s = \rho`. A lower bound on the true maximum.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)
    >>> # at the minimum: rho^2 lambda_max / 2
    >>> s = sharpness.max_sharpness(loss, jnp.zeros(2), rho=0.1)
    >>> round(float(s), 5)
    0.015

  References:
    Foret et al., `Sharpness-Aware Minimization
    <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (sharpness definition);
    Andriushchenko, Croce, Müller, Hein, Flammarion, `A Modern Look at the
    Relationship between Sharpness and Generalization
    <https://arxiv.org/abs/2302.07011>`_, ICML 2023 (adaptive worst-case sharpness).
  """
  perturbation = pert.l2() if perturbation is None else perturbation
  update = optax.with_extra_args_support(perturbation).update
  radius = jnp.asarray(rho, jnp.float32)
  step = radius if step_size is None else jnp.asarray(step_size, jnp.float32)
  key = jax.random.key(1) if key is None else key
  p_state = perturbation.init(params)
  project = lambda delta, r, p: pert.project(perturbation, p_state, delta, r, p)
  base = loss_fn(params)
  grad = jax.grad(loss_fn)

  def direction(g):
    return update(g, p_state, params)[0]

  def ascend(delta):
    def body(_, carry):
      delta, best = carry
      value, g = jax.value_and_grad(loss_fn)(tu.add_scaled(params, 1.0, delta))
      delta = project(tu.add_scaled(delta, step, direction(g)), radius, params)
      return delta, jnp.maximum(best, value)
    delta, best = jax.lax.fori_loop(0, steps, body, (delta, -jnp.inf), unroll=unroll)
    return jnp.maximum(best, loss_fn(tu.add_scaled(params, 1.0, delta)))

  sam_start = project(tu.scale(direction(grad(params)), radius), radius, params)
  random_dir = tu.cast_like(_random_like(key, params), params)
  rand_start = project(tu.scale(direction(random_dir), radius), radius, params)
  best = jnp.maximum(ascend(sam_start), ascend(rand_start))
  return (best - base).astype(jnp.float32)


def m_sharpness(loss_fn_of_batch: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                batch: PyTree,
                rho: float, m: int, **kwargs) -> jax.Array:
  r"""m-sharpness: the mean over groups of m examples of each group's max sharpness.

  ``batch`` is a pytree whose leaves share a leading example axis, divisible by
  ``m``; ``loss_fn_of_batch(params, group)`` is the loss on one group.
  ``kwargs`` go to :func:`max_sharpness`. Groups are evaluated with ``lax.map``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    >>> loss = lambda w, xb: 0.5 * jnp.mean((xb @ w) ** 2)    # zero loss at w = 0
    >>> m1 = sharpness.m_sharpness(loss, jnp.zeros(2), x, rho=0.1, m=1)   # one example per group
    >>> m4 = sharpness.m_sharpness(loss, jnp.zeros(2), x, rho=0.1, m=4)   # the whole batch
    >>> # rho^2/2 * the top eigenvalue of each group's Hessian
    >>> round(float(m1), 5), round(float(m4), 5)
    (0.005, 0.0025)

  References:
    Foret et al., ICLR 2021, Section 4 (m-sharpness); Andriushchenko &
    Flammarion, `Towards Understanding Sharpness-Aware Minimization
    <https://arxiv.org/abs/2206.06232>`_, ICML 2022.
  """
  n = jax.tree.leaves(batch)[0].shape[0]
  if n % m:
    raise ValueError(f"`m_sharpness(m=...)`: the batch size {n} must be divisible by m={m}.")
  groups = jax.tree.map(lambda x: x.reshape(n // m, m, *x.shape[1:]), batch)
  of_group = lambda g: max_sharpness(lambda p: loss_fn_of_batch(p, g), params, rho, **kwargs)
  values = jax.lax.map(of_group, groups)
  return jnp.mean(values)


def ascent_gap(loss_fn: LossFn, params: PyTree, rho: float, *,
               perturbation: optax.GradientTransformation | None = None, **kwargs) -> jax.Array:
  r"""How much of the worst case SAM's one-step ascent reaches: a ratio in [0, 1].

  .. math:: \frac{L(w + \rho\, d(g)) - L(w)}{\max_{\epsilon\in B_\rho} L(w+\epsilon) - L(w)}

  1 means the first-order step finds the worst case; the literature reports
  that it degrades during training. Zero when the point is flat (denominator 0).
  ``kwargs`` go to :func:`max_sharpness`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)
    >>> # g along the top eigenvector
    >>> round(float(sharpness.ascent_gap(loss, jnp.array([1.0, 0.0]), rho=0.1)), 4)
    1.0
    >>> # small g along the flat direction: one step gains 0.006, the worst case 0.015025
    >>> round(float(sharpness.ascent_gap(loss, jnp.array([0.0, 0.01]), rho=0.1)), 3)
    0.399
  """
  perturbation = pert.l2() if perturbation is None else perturbation
  d, _ = optax.with_extra_args_support(perturbation).update(
      jax.grad(loss_fn)(params), perturbation.init(params), params)
  base = loss_fn(params)
  one_step = loss_fn(tu.add_scaled(params, jnp.asarray(rho, jnp.float32), d)) - base
  worst = jnp.maximum(max_sharpness(loss_fn, params, rho, perturbation=perturbation, **kwargs),
                      one_step)
  return jnp.clip(one_step * tu.safe_inverse(worst, 0.0), 0.0, 1.0)


def filter_normalized_direction(params: PyTree, key: jax.Array, *,
                                ignore_1d: bool = True) -> PyTree:
  r"""A random Gaussian direction rescaled filter by filter to the weights' norms.

  For a leaf of rank >= 2 (output filters on the last axis, Flax layout)
  :math:`d_i \leftarrow d_i \|w_i\|/\|d_i\|`; leaves of rank <= 1 (biases,
  norm scales) get 0 when ``ignore_1d`` (as Li et al.) and are rescaled as a
  whole otherwise.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> params = {"kernel": jnp.full((4, 2), 2.0), "bias": jnp.ones(2)}
    >>> d = sharpness.filter_normalized_direction(params, jax.random.key(0))
    >>> # |d_i| = |w_i| = 4
    >>> jnp.linalg.norm(d["kernel"], axis=0).round(4).tolist(), d["bias"].tolist()
    ([4.0, 4.0], [0.0, 0.0])

  References:
    Li, Xu, Taylor, Studer, Goldstein, `Visualizing the Loss Landscape of Neural
    Nets <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  d = _random_like(key, params)

  def scale(di, w):
    w = jnp.asarray(w, jnp.float32)
    if w.ndim >= 2:
      axes = tuple(range(w.ndim - 1))
      wn = jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True))
      dn = jnp.sqrt(jnp.sum(di * di, axis=axes, keepdims=True))
      return di * wn / jnp.maximum(dn, 1e-12)
    if ignore_1d:
      return jnp.zeros_like(di)
    return di * jnp.linalg.norm(w) / jnp.maximum(jnp.linalg.norm(di), 1e-12)

  return jax.tree.map(scale, d, params)


def loss_landscape_1d(loss_fn: LossFn, params: PyTree, *, direction: PyTree | None = None,
                      alphas: jax.Array | None = None, key: jax.Array | None = None,
                      batch_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  r"""Losses :math:`L(w + \alpha d)` along a direction.

  ``direction`` defaults to :func:`filter_normalized_direction`; pass
  ``tree_sub(w_b, w_a)`` with ``params = w_a`` and ``alphas`` in [0, 1] for the
  linear interpolation between two solutions. Evaluated with ``lax.map``
  (``batch_size`` points at a time under ``vmap``).

  Returns:
    ``(alphas, losses)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> alphas, losses = sharpness.loss_landscape_1d(
    ...     loss, jnp.zeros(2), direction=jnp.array([1.0, 1.0]), alphas=jnp.array([-1.0, 0.0, 0.5]))
    >>> losses.tolist()   # 2 alpha^2
    [2.0, 0.0, 0.5]

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018; Goodfellow, Vinyals,
    Saxe, `Qualitatively characterizing neural network optimization problems
    <https://arxiv.org/abs/1412.6544>`_, ICLR 2015 (interpolation).
  """
  alphas = jnp.linspace(-1.0, 1.0, 51) if alphas is None else jnp.asarray(alphas, jnp.float32)
  if direction is None:
    direction = filter_normalized_direction(params, jax.random.key(0) if key is None else key)
  losses = jax.lax.map(lambda a: loss_fn(tu.add_scaled(params, a, direction)), alphas,
                       batch_size=batch_size)
  return alphas, losses


def loss_landscape_2d(loss_fn: LossFn, params: PyTree, *,
                      directions: tuple[PyTree, PyTree] | None = None,
                      alphas: jax.Array | None = None, betas: jax.Array | None = None,
                      key: jax.Array | None = None, batch_size: int | None = 64
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Losses :math:`L(w + \alpha d_1 + \beta d_2)` on a grid (two filter-normalized
  random directions by default).

  Returns:
    ``(alphas, betas, losses)`` with ``losses[i, j]`` at ``(alphas[i], betas[j])``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss = lambda w: w[0] ** 2 + 3.0 * w[1] ** 2
    >>> a, b, losses = sharpness.loss_landscape_2d(
    ...     loss, jnp.zeros(2), directions=(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])),
    ...     alphas=jnp.array([0.0, 1.0]), betas=jnp.array([0.0, 1.0, 2.0]))
    >>> losses.tolist()   # alpha^2 + 3 beta^2
    [[0.0, 3.0, 12.0], [1.0, 4.0, 13.0]]

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  alphas = jnp.linspace(-1.0, 1.0, 51) if alphas is None else jnp.asarray(alphas, jnp.float32)
  betas = alphas if betas is None else jnp.asarray(betas, jnp.float32)
  if directions is None:
    k1, k2 = jax.random.split(jax.random.key(0) if key is None else key)
    directions = (filter_normalized_direction(params, k1), filter_normalized_direction(params, k2))
  d1, d2 = directions
  aa, bb = jnp.meshgrid(alphas, betas, indexing="ij")
  pts = jnp.stack([aa.ravel(), bb.ravel()], 1)
  losses = jax.lax.map(
      lambda ab: loss_fn(tu.add_scaled(tu.add_scaled(params, ab[0], d1), ab[1], d2)), pts,
      batch_size=batch_size)
  return alphas, betas, losses.reshape(aa.shape)
