"""Random and sparse geometries: ESAM's stochastic weight perturbation, SSAM, RWP."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.geometries import base
from sam_optax._src.geometries.base import Perturbation, make_perturbation, project_l2
from sam_optax._src.validation import check_int

PyTree = Any


# ---------------------------------------------------------------- ESAM SWP


class StochasticState(NamedTuple):
  """State of :func:`stochastic`: the PRNG key for the next tensor mask.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.stochastic(seed=0).init(jnp.zeros(2))
    >>> isinstance(state, sam_optax.StochasticState), state.key.dtype.name
    (True, 'uint32')
  """
  key: jax.Array


def stochastic(keep_prob: float = 0.5, seed: int = 0, eps: float = 1e-12) -> Perturbation:
  r"""ESAM's stochastic weight perturbation: perturb a random subset of tensors.

  Each tensor (leaf) is kept with probability :math:`\beta`; with the mask
  :math:`M`,

  .. math:: d = \frac{M \odot g}{\beta\, \|M \odot g\|}

  so :math:`\epsilon = (\rho/\beta)\, M\odot g/\|M\odot g\|`. The key lives in
  the state, so runs are reproducible and resume exactly.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> p = sam_optax.stochastic(keep_prob=0.5, seed=0)
    >>> g = {"a": jnp.ones(3), "b": jnp.ones(4), "c": jnp.ones(5)}
    >>> d, state = p.update(g, p.init(g))
    >>> kept = {k: bool(jnp.any(v != 0)) for k, v in d.items()}  # whole tensors kept or dropped
    >>> norm = float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in d.values())))
    >>> round(norm, 4) == (2.0 if any(kept.values()) else 0.0)  # |d| = 1 / keep_prob
    True

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh, Tan, `Efficient Sharpness-aware
    Minimization for Improved Training of Neural Networks
    <https://arxiv.org/abs/2110.03141>`_, ICLR 2022.
  """
  keep_prob = base.check_unit("keep_prob", keep_prob, "stochastic")
  seed = check_int("seed", seed, "stochastic")
  eps = base.check_nonneg("eps", eps, "stochastic", "use a small positive value such as 1e-12")

  def init(params):
    del params
    return StochasticState(jax.random.key_data(jax.random.key(seed)))

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    leaves, treedef = jax.tree.flatten(updates)
    keep = jax.random.bernoulli(sub, keep_prob, (len(leaves),))
    kept = treedef.unflatten([jnp.where(keep[i], g, jnp.zeros_like(g))
                              for i, g in enumerate(leaves)])
    d = tu.scale(kept, tu.safe_inverse(tu.norm(kept), eps) / keep_prob)
    return d, StochasticState(jax.random.key_data(key))

  def project(delta, radius, params):
    return project_l2(delta, radius / keep_prob, params)

  return make_perturbation(init, update, project)


# ---------------------------------------------------------------- SSAM


class SparseState(NamedTuple):
  """State of :func:`sparse`: step count, the running g² estimate and the mask.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.sparse().init(jnp.zeros(4))
    >>> isinstance(state, sam_optax.SparseState), state.mask.dtype.name
    (True, 'bool')
  """
  count: jax.Array
  fisher: PyTree
  mask: PyTree


def sparse(sparsity: float = 0.5, refresh_every: int = 100, decay: float = 0.9,
           eps: float = 1e-12) -> Perturbation:
  r"""SSAM-style sparse perturbation from a running Fisher estimate.

  A running estimate :math:`\hat F \leftarrow \beta \hat F + (1-\beta) g^2` of
  the diagonal empirical Fisher is kept; every ``refresh_every`` steps (and at
  step 0, from :math:`g_0^2`) the binary mask :math:`M` is reset to keep the
  :math:`\lceil (1-s) N \rceil` entries with the largest :math:`\hat F`
  (globally, over the whole pytree). Then

  .. math:: d = \frac{M \odot g}{\|M \odot g\|}

  Relation to SSAM-F (Mi et al.): the paper scores entries by the squared
  gradients of a sampled subset of the data and recomputes the mask every
  :math:`T_m` iterations; here the score is an EMA of the training
  mini-batches' own :math:`g^2`, so no extra passes are spent, and the refresh
  runs inside the jitted step.

  Args:
    sparsity: fraction :math:`s \in [0, 1)` of entries left unperturbed.
    refresh_every: steps between mask refreshes.
    decay: EMA decay of the Fisher estimate.

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.sparse(sparsity=0.5, refresh_every=10)
    >>> g = jnp.array([4.0, -1.0, 3.0, 0.5])
    >>> d, state = p.update(g, p.init(g))  # keeps the half of the entries with the largest g^2
    >>> print(np.asarray(state.mask), np.round(np.asarray(d), 4))
    [ True False  True False] [0.8 0.  0.6 0. ]

  References:
    Mi, Shen, Ren, Zhou, Sun, Ji, Tao, `Make Sharpness-Aware Minimization
    Stronger: A Sparsified Perturbation Approach
    <https://arxiv.org/abs/2210.05177>`_, NeurIPS 2022.
  """
  sparsity = base.check_decay("sparsity", sparsity, "sparse")
  refresh_every = check_int("refresh_every", refresh_every, "sparse", minimum=1)
  decay = base.check_decay("decay", decay, "sparse")
  eps = base.check_nonneg("eps", eps, "sparse", "use a small positive value such as 1e-12")

  def init(params):
    return SparseState(jnp.zeros([], jnp.int32),
                       jax.tree.map(lambda w: jnp.zeros_like(w, jnp.float32), params),
                       jax.tree.map(lambda w: jnp.ones_like(w, jnp.bool_), params))

  def top_mask(score):
    # The k-th largest score by bisection on the float32 bit patterns (monotone for
    # scores >= 0): 32 passes of counts, each a sum per leaf. No flattening, sort or
    # gather, so it runs on params sharded over an Explicit or Auto mesh alike, and
    # k may be traced (an injected `sparsity`). Ties at the threshold are all kept.
    leaves = jax.tree.leaves(score)
    n = sum(x.size for x in leaves)
    k = jnp.maximum(1, jnp.ceil((1.0 - jnp.asarray(sparsity, jnp.float32)) * n)).astype(jnp.int32)
    bits = [jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) for x in leaves]

    def count_at_least(t):
      return sum((jnp.sum(b >= t, dtype=jnp.int32) for b in bits), jnp.zeros([], jnp.int32))

    def halve(_, bounds):
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      ok = count_at_least(mid) >= k
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    # invariant: count(>= lo) >= k > count(>= hi); +inf's bits + 1 bounds every finite score
    lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros([], jnp.int32),
                                             jnp.asarray(0x7F800001, jnp.int32)))
    return jax.tree.unflatten(jax.tree.structure(score), [b >= lo for b in bits])

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    first = state.count == 0
    sq = jax.tree.map(lambda g: tu.abs2(g, jnp.float32), updates)
    fisher_est = jax.tree.map(lambda f, s: jnp.where(first, s, decay * f + (1 - decay) * s),
                              state.fisher, sq)
    refresh = (state.count % refresh_every) == 0
    mask = jax.lax.cond(refresh, top_mask, lambda _: state.mask, fisher_est)
    kept = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), updates, mask)
    return (tu.normalize(kept, eps),
            SparseState(optax.safe_increment(state.count), fisher_est, mask))

  return make_perturbation(init, update)


# ---------------------------------------------------------------- RWP


class RandomWeightState(NamedTuple):
  """State of :func:`random_weight`: the PRNG key for the next draw.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.random_weight(seed=0).init(jnp.zeros(2))
    >>> isinstance(state, sam_optax.RandomWeightState)
    True
  """
  key: jax.Array


def random_weight(sigma: float = 0.015, seed: int = 0) -> Perturbation:
  r"""Random weight perturbation: filter-wise Gaussian noise, independent of g.

  For a leaf of rank >= 2 (a Flax kernel, output filters on the last axis) the
  noise of filter :math:`i` has std :math:`\sigma \|W_i\|`; a leaf of rank
  <= 1 uses its whole norm. Use with ``rho=1.0`` for the paper's
  :math:`\epsilon_i \sim N(0, \sigma^2\|W_i\|^2)`; ``rho`` scales it otherwise.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> w = {"kernel": jnp.full((3, 1000), 2.0), "bias": jnp.ones(2)}
    >>> p = sam_optax.random_weight(sigma=0.015, seed=0)
    >>> eps, _ = p.update(w, p.init(w), w)  # ignores the gradient (here: w)
    >>> filter_norm = float(jnp.linalg.norm(w["kernel"][:, 0]))  # |W_i| = sqrt(3 * 2^2)
    >>> round(filter_norm, 4)
    3.4641
    >>> bool(abs(float(jnp.std(eps["kernel"])) / (0.015 * filter_norm) - 1) < 0.05)  # sigma |W_i|
    True

  References:
    Li, Tang, Wu, Yang, Huang, `Revisiting Random Weight Perturbation for
    Efficiently Improving Generalization <https://arxiv.org/abs/2404.00357>`_,
    TMLR 2024.
  """
  sigma = base.check_nonneg("sigma", sigma, "random_weight", "the paper uses sigma=0.015.")
  seed = check_int("seed", seed, "random_weight")

  def init(params):
    del params
    return RandomWeightState(jax.random.key_data(jax.random.key(seed)))

  def filter_norm(w):
    sq = tu.abs2(w)
    if w.ndim >= 2:
      return jnp.sqrt(jnp.sum(sq, axis=tuple(range(w.ndim - 1)), keepdims=True))
    return jnp.sqrt(jnp.sum(sq))

  def noise_dtype(w):  # complex params get complex noise (both parts perturbed)
    return w.dtype if jnp.iscomplexobj(w) else jnp.promote_types(w.dtype, jnp.float32)

  def update(updates, state, params=None, **extra_args):
    del updates, extra_args
    base.need_params(params, "random_weight")
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(sub, max(len(leaves), 1))
    noise = [(sigma * filter_norm(w) * jax.random.normal(keys[i], w.shape, noise_dtype(w))
              ).astype(w.dtype) for i, w in enumerate(leaves)]
    return treedef.unflatten(noise), RandomWeightState(jax.random.key_data(key))

  return make_perturbation(init, update)
