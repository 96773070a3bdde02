"""ESAM: the second pass on the examples whose loss rises most under the perturbation."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import geometries as geo
from sam_optax._src import tree as tu
from sam_optax._src.closures import describe_mismatch
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.methods.sam import SharpnessAwareState
from sam_optax._src.protocol import Method, Result
from sam_optax._src.validation import check_real

PyTree = Any

# γB is an integer up to rounding (0.7 * 10 = 7.000000000000001); a fractional part
# below this counts as rounding, so ⌈γB⌉ is not one too many.
_ROUNDING = 1e-3


def num_selected(gamma: Any, batch_size: int) -> Any:
  """:math:`\\lceil \\gamma B \\rceil`, at least 1 and at most B (traced when gamma is)."""
  if isinstance(gamma, jax.core.Tracer):
    k = jnp.ceil(jnp.asarray(gamma, jnp.float32) * batch_size - _ROUNDING).astype(jnp.int32)
    return jnp.clip(k, 1, batch_size)
  return max(1, min(batch_size, math.ceil(float(gamma) * batch_size - _ROUNDING)))


def top_mask(scores: jax.Array, k: Any) -> jax.Array:
  """float32 mask of the k largest scores (ties: the lower index first); k may be traced."""
  n = scores.shape[0]
  order = jnp.argsort(-scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return (rank < k).astype(jnp.float32)


def esam(rho: radius.Rho = 0.05, gamma: float = 0.5, *,
         perturbation: optax.GradientTransformation | None = None, seed: int = 0,
         eps: float = 1e-12, telemetry: bool | str = True, subset: bool = True,
         axis_name: str | tuple[str, ...] | None = None) -> optax.GradientTransformationExtraArgs:
  r"""ESAM: the sharpness-aware pass on the fraction γ of the batch that is sharpest.

  With :math:`\epsilon = \rho\, d` from the perturbation (by default ESAM's
  stochastic weight perturbation, :func:`stochastic` with :math:`\beta = 0.6`)
  and the per-example losses :math:`l_i`, the score of example i is the rise of
  its loss under the perturbation, from a forward pass without gradient:

  .. math:: s_i = l_i(w + \epsilon) - l_i(w),

  the :math:`k = \lceil \gamma B \rceil` examples with the largest :math:`s_i`
  form the set :math:`S` (exactly k: ties go to the lower index), and the output
  is their mean loss's gradient at the perturbed point,

  .. math:: \frac{1}{k} \sum_{i \in S} \nabla l_i(w + \epsilon).

  ESAM needs per-example losses, so it takes the engine's further closure kind,
  ``objective=`` (a :class:`Objective`: ``apply_fn(params, batch)`` and
  ``loss_fn(outputs, batch) -> (B,)``; ``grad_fn`` is not used):

  * ``subset=True`` (the default) with a batch in the objective: the scores come
    from a forward on the whole batch, and the forward-backward runs on the k
    gathered examples only, ESAM's saving (about 1 + 1/3 + γ passes per step
    instead of 2). A dropout layer then draws masks for the subset's shape and
    BatchNorm normalizes with the subset's statistics.
  * ``subset=False``, a traced ``gamma`` (``optax.inject_hyperparams``: k is not
    static) or an objective without a batch: one forward at :math:`w +
    \epsilon` serves both the scores and the gradient, with a 0/1 weight per
    example in the backward pass: exact, the same dropout masks and batch
    statistics as the full batch, but as costly as SAM's second pass.

  ``Objective(..., clean_losses=...)`` (the :math:`l_i(w)` the caller's clean pass
  already computed, e.g. as ``has_aux`` output) saves the forward at :math:`w`. The state
  is SAM's (:class:`SharpnessAwareState`); its telemetry's losses are batch means at
  :math:`w` and :math:`w + \epsilon` over the whole batch, its ``perturbed_grad_norm`` the
  norm of the selected examples' gradient.

  Args:
    rho: radius :math:`\rho`, a float or a schedule (the paper: 0.05).
    gamma: fraction :math:`\gamma \in (0, 1]` of the batch kept for the second
      pass (the paper: 0.5). The reference code keeps one example fewer than
      :math:`\lceil\gamma B\rceil` (a strict comparison with the k-th score);
      this keeps exactly :math:`\lceil\gamma B\rceil`.
    perturbation: the ascent direction; default ``stochastic(0.6, seed)``
      (ESAM's weight perturbation). Pass :func:`l2` for data selection alone.
    seed: seed of the default perturbation's tensor mask.
    eps: norms at or below this count as zero.
    telemetry: record a :class:`Telemetry` of each step in the state.
    subset: run the second pass on the gathered subset when the objective has a
      batch (see above).
    axis_name: per-device perturbation and selection, as in
      :func:`sharpness_aware`; the outputs are averaged over the axis.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates,
    state, params, *, objective, **extra_args)`` returns the selected examples'
    gradient at the perturbed point; put it first in a chain, before the base
    optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def per_example_loss(w, batch):
    ...   x, y = batch
    ...   return (x @ w - y) ** 2
    >>> x = jnp.arange(12.0).reshape(6, 2) / 10; y = jnp.ones(6); w = jnp.zeros(2)
    >>> opt = optax.chain(sam_optax.esam(rho=0.05, gamma=0.5), optax.sgd(0.1))
    >>> state = opt.init(w)
    >>> @jax.jit
    ... def step(w, state):
    ...   losses, vjp = jax.vjp(lambda p: per_example_loss(p, (x, y)), w)
    ...   grads, = vjp(jnp.ones_like(losses) / losses.size)      # clean gradient
    ...   objective = sam_optax.Objective(per_example_loss, lambda out, b: out, (x, y),
    ...                                   clean_losses=losses)
    ...   updates, state = opt.update(grads, state, w, objective=objective)
    ...   return optax.apply_updates(w, updates), state
    >>> w, state = step(w, state)
    >>> w.shape
    (2,)

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh, Tan, `Efficient Sharpness-aware
    Minimization for Improved Training of Neural Networks
    <https://arxiv.org/abs/2110.03141>`_, ICLR 2022.
  """
  fn = "esam"
  rho = radius.check_rho(rho, fn)
  gamma = check_real("gamma", gamma, fn, low=0.0, high=1.0, low_open=True,
                     hint="the fraction of the batch kept for the second pass; the paper uses 0.5")
  eps, perturbation, ascent = sam_method.check_geometry(
      fn, eps, axis_name, perturbation, telemetry=telemetry,
      default=lambda eps: geo.stochastic(0.6, seed=seed, eps=eps))

  def combine(s, pts, loss, grad):
    objective, point, name = s.closures.objective, pts.point, s.fn

    def per_example(p, obj=objective):
      out = jnp.asarray(obj.example_losses(p))
      if out.ndim != 1:
        raise ValueError(f"`{name}`: the per-example losses must be a vector (one loss per "
                         f"example), got shape {out.shape}; return the terms before the mean.")
      return out.astype(jnp.float32)

    given = objective.clean_losses
    clean = per_example(s.params) if given is None else jnp.asarray(given).astype(jnp.float32)
    k = num_selected(gamma, clean.shape[0])
    if subset and objective.batch is not None and not isinstance(k, jax.Array):
      # score with a forward only, then forward-backward on the k gathered examples
      perturbed = jax.lax.stop_gradient(per_example(point))
      _, idx = jax.lax.top_k(perturbed - clean, k)  # exactly k; ties go to the lower index
      g_adv = jax.grad(objective.subset(idx).loss)(point)
    else:
      # one forward at w + eps for the scores and the gradient; unselected examples get weight 0
      perturbed, vjp = jax.vjp(per_example, point)
      (g_adv,) = vjp(top_mask(perturbed - clean, k) / jnp.asarray(k, jnp.float32))
    describe_mismatch(g_adv, s.params, "the gradient of the per-example losses", name)
    # JAX's gradient of a real loss in complex weights is the conjugate of the ascent
    # direction; the gradients optax descends along (and the caller's `updates`) are not
    g_adv = tu.cast_like(jax.tree.map(lambda x: jnp.conj(x) if jnp.iscomplexobj(x) else x, g_adv),
                         s.updates)
    return Result(g_adv, loss=jnp.mean(perturbed),
                  clean_loss=jnp.mean(clean) if s.value is None else None)

  m = Method(fn, SharpnessAwareState,
             lambda params: {"perturbation_state": perturbation.init(params)},
             ascent, combine, closure="objective", evaluates="method")
  return engine.build(m, rho=rho, eps=eps, axis_name=axis_name, telemetry=telemetry)
