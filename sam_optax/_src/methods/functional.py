"""Functional-SAM: the model's Jacobian at the perturbed point, the loss derivative at the clean
one."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.closures import describe_mismatch
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.protocol import Method, Result
from sam_optax._src.telemetry import Telemetry

PyTree = Any


class FunctionalSAMState(NamedTuple):
  """State of :func:`functional_sam`: the step count, the perturbation's state and the telemetry
  (its perturbed loss is :math:`\\frac1B\\sum_i \\ell_i(F(w+\\epsilon))`, from the forward of the
  VJP).

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> obj = sam_optax.Objective(lambda w, b: b @ w, lambda out, b: out ** 2, jnp.eye(2))
    >>> w, tx = jnp.array([1.0, 2.0]), sam_optax.functional_sam(0.05)
    >>> _, state = tx.update(jax.grad(obj.loss)(w), tx.init(w), w, objective=obj)
    >>> # both losses recorded, no value= needed
    >>> int(state.telemetry.has_clean_loss), int(state.telemetry.has_perturbed_loss)
    (1, 1)
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None = None


def _conj(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.conj(x) if jnp.iscomplexobj(x) else x, tree)


def functional_sam(rho: radius.Rho = 0.05, *,
                   perturbation: optax.GradientTransformation | None = None, eps: float = 1e-12,
                   axis_name: str | tuple[str, ...] | None = None
                   ) -> optax.GradientTransformationExtraArgs:
  r"""Functional-SAM: SAM's functional path only, one VJP of the model at the perturbed point.

  With model outputs :math:`F(w)` (e.g. logits) and the loss :math:`L(w) =
  \frac1B\sum_i \ell_i(F(w))`, SAM's gradient :math:`J_F(w+\epsilon)^\top
  \nabla_F \ell(F(w+\epsilon))` moves both the Jacobian (the functional path) and the
  loss derivative (the logit path). Functional-SAM keeps the first:

  .. math:: \epsilon = \rho\, d(g),\qquad
            \text{output} = J_F(w+\epsilon)^\top\, \nabla_F\, \ell(F(w))

  (default :math:`d(g) = g/\|g\|`; any geometry, e.g. :func:`preconditioned`, the paper's
  best combination). It costs a forward at :math:`w` (no backward; skipped when the
  objective carries the clean pass's outputs, ``Objective(..., clean_outputs=...)``) and
  one forward-backward at :math:`w + \epsilon`, as SAM's second pass. It needs the model
  and the loss apart: pass an :class:`Objective` (``apply_fn(params, batch) -> outputs``,
  ``loss_fn(outputs, batch) -> (B,)`` losses). With an objective whose "outputs" are the
  per-example losses themselves the rule is SAM's. For complex params the output is
  conjugated like the gradients optax descends along (JAX's gradient of a real loss is the
  conjugate).

  Args:
    rho: radius :math:`\rho \ge 0`, a float or a schedule.
    perturbation: the ascent geometry (default :func:`l2`).
    eps: norms at or below this count as zero (a zero gradient gives :math:`\epsilon = 0`).
    axis_name: per-device perturbation, as in :func:`sharpness_aware`; the outputs are
      averaged over the axis.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates, state, params,
    *, objective)`` returns the Functional-SAM gradient; put it first in the chain, before
    the base optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> x = jnp.arange(6.0).reshape(3, 2) / 5; y = jnp.array([0.0, 1.0, 0.5])
    >>> apply_fn = lambda w, b: jnp.tanh(b[0] @ w)
    >>> loss_fn = lambda out, b: (out - b[1]) ** 2
    >>> obj = sam_optax.Objective(apply_fn, loss_fn, (x, y))
    >>> w = jnp.array([0.3, -0.2])
    >>> g = jax.grad(obj.loss)(w)
    >>> tx = sam_optax.functional_sam(0.1)
    >>> out, _ = tx.update(g, tx.init(w), w, objective=obj)
    >>> w_eps = w + 0.1 * g / jnp.linalg.norm(g)   # by hand: J_F(w + eps)^T dl/dF(F(w))
    >>> c = 2 * (apply_fn(w, (x, y)) - y) / 3
    >>> bool(jnp.allclose(out, jax.vjp(lambda p: apply_fn(p, (x, y)), w_eps)[1](c)[0]))
    True

  References:
    Singh, Mobahi, Agarwala, Dauphin, `Avoiding spurious sharpness minimization broadens
    applicability of SAM <https://arxiv.org/abs/2502.02407>`_, ICML 2025.
  """
  fn = "functional_sam"
  rho = radius.check_rho(rho, fn)
  eps, perturbation, ascent = sam_method.check_geometry(fn, eps, axis_name, perturbation)

  def combine(s, pts, loss, grad):
    obj, name = s.closures.objective, s.fn

    def mean_loss(outputs):
      losses = jnp.asarray(obj.loss_fn(outputs, obj.batch))
      if losses.ndim != 1:
        raise ValueError(f"`{name}`: `loss_fn(outputs, batch)` must return one loss per example "
                         f"(a vector), got shape {losses.shape}; return the terms before the mean.")
      return jnp.mean(losses.astype(jnp.float32))

    clean = obj.clean_outputs
    clean = jax.lax.stop_gradient(obj.outputs(s.params) if clean is None else clean)
    clean_loss, cotangent = jax.value_and_grad(mean_loss)(clean)
    perturbed, vjp = jax.vjp(obj.outputs, pts.point)
    if jax.tree.structure(perturbed) != jax.tree.structure(clean):
      raise ValueError(f"`{name}`: `Objective(clean_outputs=...)` must have the structure of "
                       "`apply_fn(params, batch)`; pass the clean pass's model outputs (e.g. the "
                       "logits).")
    (g_out,) = vjp(tu.cast_like(cotangent, perturbed))
    describe_mismatch(g_out, s.params, "the VJP of `apply_fn`", name)
    return Result(tu.cast_like(_conj(g_out), s.updates), loss=mean_loss(perturbed),
                  clean_loss=clean_loss if s.value is None else None)

  m = Method(fn, FunctionalSAMState,
             lambda params: {"perturbation_state": perturbation.init(params)},
             ascent, combine, closure="objective", evaluates="method")
  return engine.build(m, rho=rho, eps=eps, axis_name=axis_name)
