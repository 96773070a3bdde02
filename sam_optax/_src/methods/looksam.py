"""LookSAM: the second pass every k-th step, its direction reused in between."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, gating, radius
from sam_optax._src import tree as tu
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.protocol import Gating, Method, Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_int, check_real

PyTree = Any


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: int32 steps taken; the SAM pass runs when ``count % k == 0``.
    perturbation_state: the perturbation's state.
    telemetry: a :class:`Telemetry` of the last step that ran the second pass.
    g_v: the stored component of the SAM gradient orthogonal to g.
    g_v_norm: norm of ``g_v`` (kept so the reuse steps skip a reduction), in the
      params' reduction dtype (float32, float64 for float64 params).
    period: int32 k (constant; lets :func:`gated_jit` decide on the host).
    sam_step: float32 1.0 if the last step ran the second pass, else 0.0.
    sam_step_fraction: float32 running mean of ``sam_step``: the passes the
      schedule really cost (1 + this fraction per step).
    gate: the :class:`Gate` (static) :func:`gated_jit` fixes the branch with.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.looksam(k=5).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.LookSAMState), int(state.count), int(state.period)
    (True, 0, 5)
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None
  g_v: PyTree
  g_v_norm: jax.Array
  period: jax.Array
  sam_step: jax.Array
  sam_step_fraction: jax.Array
  gate: gating.Gate = gating.Gate()

  host_plan = gating.count_plan("period", lambda count, period: count % period == 0,
                                "The schedule as the host follows it: SAM steps where the count "
                                "is a multiple of k.")


def looksam(rho: radius.Rho = 0.05, k: int = 5, alpha: float = 0.7, *,
            perturbation: optax.GradientTransformation | None = None, eps: float = 1e-12,
            axis_name: str | tuple[str, ...] | None = None
            ) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: the SAM pass every k-th step, its direction reused in between.

  On steps 0, k, 2k, ... (a call of ``grad_fn``):

  .. math:: g_s = \nabla L(w + \rho\, d),\quad
            g_v = g_s - \frac{g_s \cdot g}{\|g\|^2} g,\quad \text{output } g_s

  On the other steps (no call of ``grad_fn``):
  :math:`g + \alpha \frac{\|g\|}{\|g_v\|} g_v`. Use :func:`gated_jit` on CPU so
  the skipped steps run one pass (see :mod:`sam_optax` docs on gating).

  Args:
    rho: radius.
    k: period of the SAM pass (k=1 is SAM).
    alpha: weight of the reused component.
    perturbation: ascent geometry (default :func:`l2`).
    axis_name: per-device perturbation; the output is averaged over the axis.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> g = grad_fn(w)
    >>> tx = sam_optax.looksam(0.05, k=2, alpha=0.7)
    >>> state = tx.init(w)
    >>> out0, state = tx.update(g, state, w, grad_fn=grad_fn)  # step 0: SAM pass, stores g_v
    >>> out1, state = tx.update(g, state, w, grad_fn=grad_fn)  # step 1: reuses g_v
    >>> g_v = state.g_v
    >>> bool(jnp.allclose(out1, g + 0.7 * jnp.linalg.norm(g) / jnp.linalg.norm(g_v) * g_v))
    True

  References:
    Liu, Mai, Chen, Hsieh, You, `Towards Efficient and Scalable Sharpness-Aware
    Minimization <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  fn = "looksam"
  rho = radius.check_rho(rho, fn)
  k = check_int("k", k, fn, minimum=1, hint="the paper uses 5")
  alpha = check_real("alpha", alpha, fn, low=0.0, hint="the paper uses 0.7")
  eps, perturbation, ascent = sam_method.check_geometry(fn, eps, axis_name, perturbation)

  def init(params):
    return {"perturbation_state": perturbation.init(params), "g_v": tu.zeros_like(params),
            "g_v_norm": jnp.zeros([], tu.reduction_dtype(params)),
            "period": jnp.asarray(k, jnp.int32)}

  def combine(s, pts, loss, g_s):
    g_s = tu.cast_like(g_s, s.updates)
    coef = tu.vdot(g_s, s.updates) * tu.safe_inverse(tu.sq_norm(s.updates), eps * eps)
    g_v = tu.cast_like(tu.add_scaled(g_s, -coef, s.updates), s.state.g_v)
    return Result(g_s, {"g_v": g_v, "g_v_norm": tu.norm(g_v)})

  def reuse(s):
    ratio = tu.norm(s.updates) * tu.safe_inverse(s.state.g_v_norm, eps)
    out = tu.add_scaled(s.updates, alpha * ratio, s.state.g_v)
    return Result(out, {"perturbation_state": s.state.perturbation_state, "g_v": s.state.g_v,
                        "g_v_norm": s.state.g_v_norm})

  every_kth = Gating(lambda s: (s.state.count % s.state.period == 0, {}), reuse)
  m = Method(fn, LookSAMState, init, ascent, combine, keeps_gradient=True, gating=every_kth)
  return engine.build(m, rho=rho, eps=eps, axis_name=axis_name)
