"""Ready-made optimizers: a sharpness-aware transformation chained before a base optimizer."""

from __future__ import annotations

import optax

from sam_optax._src import core
from sam_optax._src import perturbations as pert


def sam(base_optimizer: optax.GradientTransformation, rho: core.ScalarOrSchedule = 0.05, *,
        ascent_steps: int | None = None, axis_name: str | tuple[str, ...] | None = None
        ) -> optax.GradientTransformationExtraArgs:
  r"""SAM: ``optax.chain(sharpness_aware(rho), base_optimizer)``.

  The sharpness-aware transform comes first: it turns the clean gradient into
  :math:`\nabla L(w + \rho\, g/\|g\|)`, which the base optimizer then consumes.
  Put gradient clipping inside ``base_optimizer`` (after the ascent); clipping
  before the ascent does nothing since the direction is normalized.

  Example:
    >>> import optax, sam_optax
    >>> opt = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return optax.chain(core.sharpness_aware(rho, ascent_steps=ascent_steps, axis_name=axis_name),
                     base_optimizer)


def asam(base_optimizer: optax.GradientTransformation, rho: core.ScalarOrSchedule = 0.5,
         eta: float = 0.01, *, kernels_only: bool = False,
         axis_name: str | tuple[str, ...] | None = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""ASAM: ``optax.chain(sharpness_aware(rho, perturbation=adaptive(eta)), base_optimizer)``.

  :math:`\epsilon = \rho\, T^2 \odot g / \|T \odot g\|`, :math:`T = |w| + \eta`.
  ``kernels_only=True`` reproduces the official code, which rescales only
  weight tensors (biases and norm scales get T = 1): it perturbs kernels with
  the adaptive geometry and the other leaves with plain L2 jointly normalized.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> opt = sam_optax.asam(optax.sgd(0.1), rho=0.5, eta=0.01)
    >>> updates, _ = opt.update(grad_fn(w), opt.init(w), w, grad_fn=grad_fn)
    >>> g, t = grad_fn(w), jnp.abs(w) + 0.01   # by hand: eps = rho T^2 g / |T g|
    >>> bool(jnp.allclose(updates, -0.1 * grad_fn(w + 0.5 * t**2 * g / jnp.linalg.norm(t * g))))
    True

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  perturbation = pert.adaptive(eta, where=pert.kernel_mask if kernels_only else None)
  return optax.chain(core.sharpness_aware(rho, perturbation=perturbation, axis_name=axis_name),
                     base_optimizer)
