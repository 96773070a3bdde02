"""The plain balls: L2 (SAM), unnormalized (USAM), the box (l-infinity) and Fisher-SAM's metric."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sam_optax._src import tree as tu
from sam_optax._src.geometries import base
from sam_optax._src.geometries.base import Perturbation, make_perturbation, stateless_init

PyTree = Any


# --------------------------------------------------------------------------- l2


def l2(eps: float = 1e-12) -> Perturbation:
  r"""The SAM direction: the gradient normalized by its global L2 norm.

  .. math:: d = g / \|g\|_2 ,\qquad \epsilon = \rho\, d

  The norm runs over every leaf of the pytree (accumulated in float32); a
  gradient whose norm is at most ``eps`` gives ``d = 0``.

  Args:
    eps: norms at or below this count as zero.

  Returns:
    A :class:`Perturbation`.

  Example:
    >>> import sam_optax
    >>> tx = sam_optax.sharpness_aware(0.05, perturbation=sam_optax.l2())

  References:
    Foret, Kleiner, Mobahi, Neyshabur, `Sharpness-Aware Minimization for
    Efficiently Improving Generalization <https://arxiv.org/abs/2010.01412>`_,
    ICLR 2021.
  """
  eps = base.check_nonneg("eps", eps, "l2", "use a small positive value such as 1e-12.")

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return tu.normalize(updates, eps), state

  # ||d|| = ||g|| / ||g|| in closed form (1, or 0 for a zero gradient)
  norm = lambda g, params: tu.norm(g) * tu.safe_inverse(tu.norm(g), eps)
  return make_perturbation(stateless_init, update, norm=norm)


def unnormalized() -> Perturbation:
  r"""USAM: the raw gradient as direction, :math:`\epsilon = \rho\, g`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, sam_optax
    >>> tx = sam_optax.sharpness_aware(0.1, perturbation=sam_optax.unnormalized())
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 3))
    >>> w = jnp.array([1.0, 2.0])   # g = 3 w^2 = [3, 12]
    >>> out, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> print(np.round(np.asarray(out), 4))   # 3 (w + 0.1 g)^2
    [ 5.07 30.72]

  References:
    Andriushchenko, Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022.
  """
  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return updates, state

  return make_perturbation(stateless_init, update)


def _project_linf(delta, radius, params):
  del params
  return jax.tree.map(lambda x: jnp.clip(x, -radius, radius).astype(x.dtype), delta)


def linf() -> Perturbation:
  r"""The :math:`\ell_\infty` ball: :math:`d = \mathrm{sign}(g)`.

  Compose with :func:`adaptive` for the adaptive box
  :math:`\epsilon = \rho\, T \odot \mathrm{sign}(g)`:
  ``adaptive(eta, base=linf())``.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax, sam_optax
    >>> d, _ = sam_optax.linf().update(jnp.array([0.3, -2.0, 0.0]), optax.EmptyState())
    >>> print(np.asarray(d))
    [ 1. -1.  0.]

  References:
    Mueller, Vlaar, Rolnick, Hein, `Normalization Layers Are All That
    Sharpness-Aware Minimization Needs <https://arxiv.org/abs/2306.04226>`_,
    NeurIPS 2023 (the :math:`\ell_\infty` option of its SAM variants).
  """
  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.tree.map(jnp.sign, updates), state

  return make_perturbation(stateless_init, update, _project_linf)



# ------------------------------------------------------------------------ fisher


def fisher(eta: float = 1.0, eps: float = 1e-12) -> Perturbation:
  r"""Fisher-SAM: the ball of the diagonal Fisher metric :math:`F = 1 + \eta g^2`.

  .. math:: f = g / (1 + \eta g^2),\qquad d = f / \sqrt{g \cdot f}

  so that :math:`d^\top F d = 1`. Multi-step ascent projects onto the L2 ball
  (the metric changes with every gradient).

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> g = jnp.array([1.0, 2.0])
    >>> d, _ = sam_optax.fisher(eta=1.0).update(g, optax.EmptyState())
    >>> f = g / (1 + g ** 2)
    >>> bool(jnp.allclose(d, f / jnp.sqrt(g @ f)))
    True

  References:
    Kim, Li, Hu, Hospedales, `Fisher SAM: Information Geometry and Sharpness
    Aware Minimisation <https://arxiv.org/abs/2206.04920>`_, ICML 2022.
  """
  eta = base.check_nonneg("eta", eta, "fisher", "the paper uses eta=1.0.")
  eps = base.check_nonneg("eps", eps, "fisher", "use a small positive value such as 1e-12")

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    f = jax.tree.map(lambda g: (g / (1 + eta * tu.abs2(g))).astype(g.dtype), updates)
    s = tu.safe_inverse(jnp.sqrt(jnp.maximum(tu.vdot(updates, f), 0.0)), eps)
    return tu.scale(f, s), state

  return make_perturbation(stateless_init, update)
