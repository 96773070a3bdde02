"""The universal class of sharpness measures: Trace-, Det- and Frob-SAM.

All three evaluate the loss gradient (and, for Det and Frob, the loss) at n
random points :math:`w + \\epsilon_i` drawn independently of the gradient. The
points do not depend on one another, so they are stacked along a new leading
axis and evaluated in *one* ``jax.vmap``-ed call of the caller's closure
(sequential depth 1, whatever n is).

Noise derivation (documented so that a run can be reproduced outside the
library): at step ``t`` (the state's ``count``) the key is
``jax.random.fold_in(jax.random.key(seed), t)``; it is split into one key per
leaf of ``params`` (``jax.random.split(key, num_leaves)``, leaves in
``jax.tree.leaves`` order), and leaf ``j`` gets an array of shape
``(num_samples,) + leaf.shape`` from ``jax.random.normal`` (float32, or the
leaf's dtype when that is float64 or complex) or ``jax.random.uniform(...,
minval=-h, maxval=h)``. Complex leaves get complex normal noise (JAX's
convention, :math:`E|z|^2 = 1`) or independent uniform real and imaginary
parts drawn from ``jax.random.split(key_j)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.protocol import Method, Points, Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_int, check_real, check_static_int

PyTree = Any


class UniversalSAMState(NamedTuple):
  """State of :func:`trace_sam`, :func:`det_sam` and :func:`frob_sam`.

  Attributes:
    count: int32 steps taken; step ``t`` draws its noise from
      ``fold_in(key, t)``.
    key: raw PRNG key data of ``jax.random.key(seed)`` (constant).
    telemetry: a :class:`Telemetry` of the last step: ``perturbation_norm`` is
      the mean of :math:`\\|\\epsilon_i\\|`, ``perturbed_grad_norm`` the norm of
      the mean gradient over the samples, ``perturbed_loss`` the mean loss
      over the samples (when the closure returns losses).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> isinstance(sam_optax.trace_sam().init(jnp.ones(3)), sam_optax.UniversalSAMState)
    True
  """
  count: jax.Array
  key: jax.Array
  telemetry: Telemetry


def _real_noise_dtype(leaf: jax.Array) -> Any:
  return jnp.promote_types(tu.real_dtype(jnp.result_type(leaf)), jnp.float32)


def _leaf_sample(key: jax.Array, shape: tuple, leaf: jax.Array, kind: str, h: Any) -> jax.Array:
  real = _real_noise_dtype(leaf)
  if kind == "uniform":
    draw = lambda k: jax.random.uniform(k, shape, real, minval=-1.0, maxval=1.0) * h
    if jnp.iscomplexobj(leaf):
      kr, ki = jax.random.split(key)
      return jax.lax.complex(draw(kr), draw(ki))
    return draw(key)
  dtype = jnp.result_type(leaf) if jnp.iscomplexobj(leaf) else real
  return jax.random.normal(key, shape, dtype)


def draw_noise(key_data: jax.Array, count: jax.Array, params: PyTree, num_samples: int | None,
               kind: str = "normal", h: Any = 1.0) -> PyTree:
  """Per-leaf noise of step ``count`` (see the module docstring for the derivation).

  ``num_samples=None`` draws one sample shaped like ``params``; otherwise each
  leaf gets a leading axis of that length. ``kind``: ``"normal"``, ``"sphere"``
  (normal, then each sample divided by its global norm over all leaves) or
  ``"uniform"`` (in ``[-h, h]``).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), count)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  lead = () if num_samples is None else (num_samples,)
  z = treedef.unflatten([_leaf_sample(keys[j], lead + jnp.shape(w), w, kind, h)
                         for j, w in enumerate(leaves)])
  if kind == "sphere":
    unit = lambda s: tu.scale(s, tu.safe_inverse(tu.norm(s), 0.0))
    z = unit(z) if num_samples is None else jax.vmap(unit)(z)
  return z


def _mean_over_samples(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _weighted_sum(weights: jax.Array, tree: PyTree, like: PyTree) -> PyTree:
  """sum_i weights[i] * tree_i (leaves (n, ...)), each leaf in like's dtype."""
  def leaf(x, y):
    acc = x.astype(jnp.promote_types(x.dtype, weights.dtype))
    return jnp.tensordot(weights.astype(acc.dtype), acc, axes=(0, 0)).astype(y.dtype)
  return jax.tree.map(leaf, tree, like)


def _universal(fn: str, rule: Callable, *, rho: Any, num_samples: int, seed: Any, kind: str,
               h: Any = 1.0, needs_loss: bool = False, keeps_gradient: bool = True,
               needs_clean_loss: bool = False) -> optax.GradientTransformationExtraArgs:
  """The class's method: n random points, one vmapped call, combined with
  ``rule(g, losses, grads, clean_loss, radius)``."""

  def points(s):
    z = draw_noise(s.state.key, s.state.count, s.params, num_samples, kind, h)
    eps = jax.vmap(lambda e: tu.scale(e, s.radius))(z)
    pts = jax.vmap(lambda e: tu.add_scaled(s.params, 1.0, e))(eps)
    return Points(pts, "vmap", perturbation_norm=jnp.mean(jax.vmap(tu.norm)(eps)))

  def combine(s, pts, losses, grads):
    clean_loss = s.value
    if needs_clean_loss and clean_loss is None:
      # one more call of the closure; only its loss is used, so under jit XLA drops
      # the backward pass and this costs one forward pass
      clean_loss, _ = s.closures(s.params)
    out = rule(s.updates, losses, grads, clean_loss, s.radius)
    return Result(out, grad=_mean_over_samples(grads),
                  loss=None if losses is None else jnp.mean(losses))

  init = lambda params: {"key": jax.random.key_data(jax.random.key(seed))}
  m = Method(fn, UniversalSAMState, init, points, combine,
             closure="loss" if needs_loss else "gradient", keeps_gradient=keeps_gradient)
  return engine.build(m, rho=rho)


def _check_common(fn: str, rho: Any, num_samples: Any, seed: Any, minimum: int = 1) -> tuple:
  rho = radius.check_rho(rho, fn)
  num_samples = check_static_int("num_samples", num_samples, fn, minimum=minimum,
                   hint="the samples are evaluated in one vmapped call of the closure")
  seed = check_int("seed", seed, fn)
  return rho, num_samples, seed


# ------------------------------------------------------------------- Trace


def trace_sam(rho: radius.Rho = 0.01, num_samples: int = 1, seed: int = 0, *,
              distribution: str = "normal") -> optax.GradientTransformationExtraArgs:
  r"""Trace-SAM: the mean gradient at isotropically perturbed points.

  .. math::
     \text{output} = \frac1n \sum_{i=1}^n \nabla L(w + \rho z_i),
     \qquad z_i \sim N(0, I)

  the gradient of :math:`E_z L(w + \rho z) \approx L(w) + \tfrac{\rho^2}{2}
  \mathrm{tr}\, H(w)`, so it penalizes the trace of the Hessian. The
  perturbations are independent of the clean gradient ``g``, which is not
  used (only its structure is checked). The n points are evaluated in one
  ``jax.vmap``-ed call of ``grad_fn``, so ``grad_fn`` must be vmappable (pure
  JAX, no Python side effects that depend on values); n = 1 calls it directly.

  Noise (the same derivation for :func:`frob_sam`, :func:`det_sam` and
  :func:`bsam`): at step t the key is ``jax.random.fold_in(jax.random.key(seed),
  t)``, split into one key per leaf (``jax.random.split(key, num_leaves)``, in
  ``jax.tree.leaves(params)`` order); leaf j gets ``jax.random.normal(keys[j],
  (n,) + leaf.shape, float32)`` (the leaf's dtype if float64 or complex).

  On the sampler: the reference implementation's "hypersphere" sampler draws
  Gaussian samples and never divides them by their norm, so its runs (and its
  default :math:`\rho = 0.01`) use Gaussian perturbations, of length about
  :math:`\rho\sqrt d`. ``distribution="normal"`` (the default) does the same.
  ``distribution="sphere"`` samples the unit sphere for real: each
  :math:`z_i` is divided by its global norm over the whole pytree, so
  :math:`\|\epsilon_i\| = \rho` (an unbiased trace estimate up to the factor
  :math:`1/d`; scale ``rho`` by about :math:`\sqrt d` to match the default's
  perturbation length).

  Args:
    rho: perturbation scale :math:`\rho \ge 0` (a float or a schedule);
      0.01 in the paper. ``rho = 0`` returns the clean gradient.
    num_samples: n >= 1, a static int (with ``optax.inject_hyperparams``, list
      it in ``static_args``).
    seed: seed of the perturbations.
    distribution: ``"normal"`` or ``"sphere"`` (see above).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` to put first in a chain;
    ``update(updates, state, params, *, grad_fn)`` or ``value_and_grad_fn=``
    (then the mean perturbed loss is recorded for :func:`sam_optax.metrics`).
    Passes per step: 1 + n (the clean one is the caller's).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> w = jnp.ones(3)
    >>> tx = optax.chain(sam_optax.trace_sam(0.01, num_samples=4), optax.sgd(0.1))
    >>> state = tx.init(w)
    >>> updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    >>> updates.shape
    (3,)

  References:
    Tahmasebi, Soleymani, Bahri, Jegelka, Jaillet, `A Universal Class of
    Sharpness-Aware Minimization Algorithms <https://arxiv.org/abs/2406.03682>`_,
    ICML 2024.
  """
  fn = "trace_sam"
  rho, num_samples, seed = _check_common(fn, rho, num_samples, seed)
  if distribution not in ("normal", "sphere"):
    raise ValueError(f"`{fn}(distribution=...)` must be 'normal' or 'sphere', got "
                     f"{distribution!r}.")

  def rule(g, losses, grads, clean_loss, radius):
    del g, losses, clean_loss, radius
    return _mean_over_samples(grads)

  return _universal(fn, rule, rho=rho, num_samples=int(num_samples), seed=seed, kind=distribution,
                    keeps_gradient=False)


# -------------------------------------------------------------------- Frob


def frob_sam(rho: radius.Rho = 0.005, lam: float = 0.005, num_samples: int = 2,
             seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""Frob-SAM: the clean gradient plus a loss-gradient covariance at random points.

  With :math:`\epsilon_i = \rho z_i`, :math:`z_i \sim N(0, I)`,
  :math:`L_i = L(w + \epsilon_i)` and :math:`G_i = \nabla L(w + \epsilon_i)`,

  .. math::
     \text{output} = g + \frac{\lambda}{\rho^2}\,\widehat{\mathrm{Cov}}(L, G),\qquad
     \widehat{\mathrm{Cov}}(L, G) = \frac{1}{n-1}\sum_{i=1}^n (L_i - \bar L)(G_i - \bar G)

  (the unbiased sample covariance), the stochastic gradient of
  :math:`L(w) + \frac{\lambda}{2\rho^2}\mathrm{Var}_\epsilon L(w + \epsilon)`.
  Since :math:`\mathrm{Var}_z\, L(w + \rho z) \approx \rho^2 \|g\|^2 +
  \tfrac{\rho^4}{2}\|H\|_F^2`, at a critical point the penalty is the squared
  Frobenius norm of the Hessian. It needs the losses: pass
  ``value_and_grad_fn=`` (a ``grad_fn=`` alone is an error). :math:`L(w)` is
  not needed. The n points are evaluated in one ``jax.vmap``-ed call, so the
  closure must be vmappable. ``rho = 0`` returns ``g`` (no perturbation, no
  penalty). Noise: as :func:`trace_sam` with ``distribution="normal"``.

  Args:
    rho: perturbation scale :math:`\rho \ge 0` (float or schedule); the
      paper's 0.005.
    lam: penalty weight :math:`\lambda`; the paper's 0.005.
    num_samples: n >= 2 (a covariance needs two samples), static.
    seed: seed of the perturbations.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` to put first in a chain;
    ``update(updates, state, params, *, value_and_grad_fn)``. Passes per
    step: 1 + n.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> vg = jax.value_and_grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -0.5])
    >>> g = vg(w)[1]
    >>> off = sam_optax.frob_sam(rho=0.0)   # no perturbation, no penalty: g itself
    >>> bool(jnp.array_equal(off.update(g, off.init(w), w, value_and_grad_fn=vg)[0], g))
    True
    >>> tx = sam_optax.frob_sam(0.01, lam=0.01, num_samples=4)
    >>> out, state = tx.update(g, tx.init(w), w, value_and_grad_fn=vg)
    >>> state.telemetry.perturbed_loss is not None   # the mean loss over the 4 points
    True

  References:
    Tahmasebi et al., ICML 2024 (cited in full at :func:`trace_sam`), where the
    Frobenius-norm instance is derived from the loss variance.
  """
  fn = "frob_sam"
  rho, num_samples, seed = _check_common(fn, rho, num_samples, seed, minimum=2)
  lam = check_real("lam", lam, fn, low=0.0, hint="the paper uses 0.005")
  n = int(num_samples)

  def rule(g, losses, grads, clean_loss, radius):
    del clean_loss
    dl = losses.astype(jnp.promote_types(losses.dtype, jnp.float32))
    coef = (dl - jnp.mean(dl)) / (n - 1)  # sum_i coef_i G_i is the sample covariance
    scale = lam * tu.safe_inverse(jnp.square(radius), 0.0)  # rho = 0: no penalty
    return tu.add_scaled(g, scale, _weighted_sum(coef, grads, g))

  return _universal(fn, rule, rho=rho, num_samples=n, seed=seed, kind="normal", needs_loss=True)


# --------------------------------------------------------------------- Det


def det_sam(rho: radius.Rho = 1.0, lam: float = 1.0, h: float = 0.01,
            num_samples: int = 1, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""Det-SAM: the universal-class instance whose sharpness is the Hessian's determinant.

  With :math:`\epsilon_i = \rho u_i`, :math:`u_i` uniform in the cube
  :math:`[-h, h]^d`, the normalized loss increases
  :math:`\Delta_i = (L(w + \epsilon_i) - L(w))/\rho^2`, :math:`\psi(x) =
  e^{-x/2}` and :math:`\phi(x) = x^{-2}`, the objective is
  :math:`L(w) + \lambda\,\phi(X)`, :math:`X = \frac1n\sum_i \psi(\Delta_i)`
  (up to a constant, :math:`\int e^{-u^\top H u/4}du \propto \det H^{-1/2}`,
  so :math:`\phi(X) \propto \det H`). The output is its gradient with the
  :math:`\epsilon_i` held fixed:

  .. math::
     \text{output} = g + \frac{\lambda}{\rho^2}\,\frac{1}{n X^3}
       \sum_{i=1}^n e^{-\Delta_i/2}\,\big(\nabla L(w + \epsilon_i) - g\big)

  (:math:`\phi'(X)\psi'(\Delta_i) = e^{-\Delta_i/2}/X^3`; the weights are
  formed in log space, so large :math:`|\Delta_i|` do not overflow in between).
  The reference code leaves out the chain rule's :math:`1/\rho^2`; at its
  default :math:`\rho = 1` the two agree. ``rho = 0`` returns ``g``.

  It needs the losses at the perturbed points, so pass ``value_and_grad_fn=``,
  and the clean loss :math:`L(w)` as ``value=``; without ``value=`` the step
  calls the closure once more at ``w`` for the loss (under ``jit`` XLA drops
  the unused backward pass, so this costs a forward pass). The n points are
  evaluated in one ``jax.vmap``-ed call (the closure must be vmappable).
  Noise: keys as in :func:`trace_sam`, leaf j gets ``jax.random.uniform(keys[j],
  (n,) + leaf.shape, float32, -1.0, 1.0) * h``.

  Args:
    rho: scale :math:`\rho > 0` of the perturbation and of :math:`\Delta`
      (float or schedule); the paper's 1.
    lam: weight :math:`\lambda` (it also absorbs the omitted
      :math:`(2\pi)^{d}` constant); the paper's 1.
    h: half-width of the sampling cube; the paper's 0.01.
    num_samples: n >= 1, static.
    seed: seed of the perturbations.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` to put first in a chain;
    ``update(updates, state, params, *, value_and_grad_fn, value=None)``.
    Passes per step: 1 + n (plus a forward pass without ``value=``).

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> vg = jax.value_and_grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.ones(3)
    >>> tx = sam_optax.det_sam(num_samples=2)
    >>> value, g = vg(w)
    >>> given, _ = tx.update(g, tx.init(w), w, value=value, value_and_grad_fn=vg)
    >>> recomputed, _ = tx.update(g, tx.init(w), w, value_and_grad_fn=vg)   # L(w) by one more call
    >>> bool(jnp.allclose(given, recomputed))
    True

  References:
    Tahmasebi et al., `A Universal Class of Sharpness-Aware Minimization Algorithms
    <https://arxiv.org/abs/2406.03682>`_, ICML 2024: the determinant instance and its
    :math:`\psi, \phi` pair.
  """
  fn = "det_sam"
  rho, num_samples, seed = _check_common(fn, rho, num_samples, seed)
  lam = check_real("lam", lam, fn, low=0.0, hint="the paper uses 1.0")
  h = check_real("h", h, fn, low=0.0, low_open=True, hint="the paper uses 0.01")
  n = int(num_samples)

  def rule(g, losses, grads, clean_loss, radius):
    dtype = jnp.promote_types(losses.dtype, jnp.float32)
    inv_r2 = tu.safe_inverse(jnp.square(radius), 0.0).astype(dtype)  # rho = 0: no penalty
    delta = (losses.astype(dtype) - jnp.asarray(clean_loss).astype(dtype)) * inv_r2
    log_psi = -0.5 * delta
    log_x = jax.nn.logsumexp(log_psi) - jnp.log(jnp.asarray(n, dtype))
    # psi(D_i) / (n X^3); capped where every perturbed loss is far above the clean one (a
    # half-width h far beyond the paper's), so that the huge weight stays finite
    cap = 0.5 * float(np.log(np.finfo(dtype).max))
    coef = jnp.exp(jnp.minimum(log_psi - 3.0 * log_x, cap)) / n
    weighted = _weighted_sum(coef, grads, g)
    return tu.add_scaled(tu.add_scaled(g, lam * inv_r2, weighted),
                         -lam * inv_r2 * jnp.sum(coef), g)

  return _universal(fn, rule, rho=rho, num_samples=n, seed=seed, kind="uniform", h=h,
                    needs_loss=True,
                    needs_clean_loss=True)
