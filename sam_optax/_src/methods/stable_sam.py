"""StableSAM: SAM's gradient renormalized to the clean gradient's norm."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.protocol import Method, Result
from sam_optax._src.telemetry import Telemetry


class StableSAMState(NamedTuple):
  """State of :func:`stable_sam`: the step count, the perturbation's state and the telemetry.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> tx = sam_optax.stable_sam(0.05, perturbation=sam_optax.stochastic(seed=0))
    >>> state = tx.init(jnp.ones(2))
    >>> type(state.perturbation_state).__name__   # a random geometry keeps its PRNG key here
    'StochasticState'
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None = None


def stable_sam(rho: radius.Rho = 0.05, *,
               perturbation: optax.GradientTransformation | None = None, eps: float = 1e-12,
               axis_name: str | tuple[str, ...] | None = None
               ) -> optax.GradientTransformationExtraArgs:
  r"""StableSAM: SAM's gradient renormalized to the clean gradient's norm.

  .. math:: \tilde g = \nabla L(w + \rho\, d(g)),\qquad
            \text{output} = \tilde g\, \frac{\|g\|}{\|\tilde g\|}

  so the step has SGD's length and SAM's direction, which the paper shows widens the
  range of stable learning rates. A zero :math:`\tilde g` gives a zero output (no NaN).
  :math:`\|g\|` is taken before the second pass, so g need not stay alive through it.
  Put it first in the chain, as :func:`sharpness_aware`.

  Args:
    rho: radius :math:`\rho \ge 0`, a float or a schedule.
    perturbation: the ascent geometry (default :func:`l2`).
    eps: norms at or below this count as zero.
    axis_name: per-device perturbation and renormalization (each device with its own
      norms); the outputs are averaged over the axis.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update(updates, state, params,
    *, grad_fn)`` as for :func:`sharpness_aware`.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> g = grad_fn(w)
    >>> tx = sam_optax.stable_sam(0.05)
    >>> out, _ = tx.update(g, tx.init(w), w, grad_fn=grad_fn)
    >>> g_tilde = grad_fn(w + 0.05 * g / jnp.linalg.norm(g))   # by hand
    >>> bool(jnp.allclose(out, g_tilde * jnp.linalg.norm(g) / jnp.linalg.norm(g_tilde)))
    True

  References:
    Tan, Chen, Zhang, Zhang, Wu, Li, `Stabilizing Sharpness-Aware Minimization Through A
    Simple Renormalization Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR 2025.
  """
  fn = "stable_sam"
  rho = radius.check_rho(rho, fn)
  eps, perturbation, ascent = sam_method.check_geometry(fn, eps, axis_name, perturbation)

  def points(s):
    return ascent(s)._replace(aux=tu.norm(s.updates))

  def combine(s, pts, loss, g_tilde):
    return Result(tu.scale(g_tilde, pts.aux * tu.safe_inverse(tu.norm(g_tilde), eps)))

  m = Method(fn, StableSAMState, lambda params: {"perturbation_state": perturbation.init(params)},
             points, combine)
  return engine.build(m, rho=rho, eps=eps, axis_name=axis_name)
