"""AE-SAM: run the wrapped transformation only where the loss looks sharp."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.distributed import check_axis_name
from sam_optax._src.methods.wrapper import schedule
from sam_optax._src.validation import check_int, check_real, check_transform


class AdaptivePolicyState(NamedTuple):
  """State of :func:`ae_sam`.

  Attributes:
    count: int32 steps taken.
    mean: EMA of :math:`\\|g\\|^2` (params' reduction dtype: float32, or
      float64 for float64 params).
    var: EMA of its squared deviation (same dtype).
    sharp_steps: int32 number of steps that ran ``transform``.
    inner: the wrapped transform's state.
    sam_step: float32 1.0 if the last step ran ``transform``, else 0.0.
    sam_step_fraction: float32 running mean of ``sam_step``.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> tx = sam_optax.ae_sam(sam_optax.sharpness_aware(0.05), total_steps=100)
    >>> state = tx.init(jnp.ones(2))
    >>> isinstance(state, sam_optax.AdaptivePolicyState), int(state.sharp_steps)
    (True, 0)
  """
  count: jax.Array
  mean: jax.Array
  var: jax.Array
  sharp_steps: jax.Array
  inner: optax.OptState
  sam_step: jax.Array
  sam_step_fraction: jax.Array


def ae_sam(transform: optax.GradientTransformation, *, total_steps: int,
                    decay: float = 0.9, lambda_start: float = -1.0, lambda_end: float = 1.0,
                    axis_name: str | tuple[str, ...] | None = None
                    ) -> optax.GradientTransformationExtraArgs:
  r"""AE-SAM: run ``transform`` only where the loss looks sharp.

  With :math:`s_t = \|g_t\|^2`,

  .. math::
     \mu_t = \delta \mu_{t-1} + (1-\delta) s_t,\quad
     \sigma^2_t = \delta \sigma^2_{t-1} + (1-\delta)(s_t - \mu_t)^2,

  the step runs ``transform`` iff :math:`s_t \ge \mu_t + c_t \sigma_t`, with
  :math:`c_t` moving linearly from ``lambda_start`` to ``lambda_end`` over
  ``total_steps`` (a rising threshold: more SAM steps early). At step 0 the
  statistics start at :math:`\mu_0 = s_0, \sigma_0 = 0`, so step 0 is a SAM
  step when ``lambda_start <= 0``. The decision needs the current gradient,
  so it is taken with ``lax.cond`` inside the step.

  Args:
    transform: the sharpness-aware transformation to run on sharp steps.
    total_steps: training length T over which :math:`c_t` moves.
    decay: EMA decay :math:`\delta`.
    lambda_start, lambda_end: :math:`\lambda_1, \lambda_2`, the ends of
      :math:`c_t`.
    axis_name: averages the pass-through g (and :math:`\|g\|^2`) over the axis.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> tx = sam_optax.ae_sam(sam_optax.sharpness_aware(0.05), total_steps=100,
    ...                       lambda_start=0.0, lambda_end=0.0)   # SAM iff s_t >= mu_t
    >>> state = tx.init(w)
    >>> for scale in (1.0, 2.0, 0.5):   # s_t = scale^2 s_0: mu_1 = 1.3 s_0, mu_2 = 1.195 s_0
    ...   _, state = tx.update(scale * grad_fn(w), state, w, grad_fn=grad_fn)
    >>> int(state.count), int(state.sharp_steps)   # the last step (0.25 s_0 < mu_2) skips SAM
    (3, 2)

  References:
    Jiang, Yang, Zhang, Kwok, `An Adaptive Policy to Employ Sharpness-Aware
    Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR 2023.
  """
  fn = "ae_sam"
  check_transform("transform", transform, fn)
  total_steps = check_int("total_steps", total_steps, fn, minimum=1,
                          hint="pass the training length in steps")
  decay = check_real("decay", decay, fn, low=0.0, high=1.0, high_open=True)
  lambda_start = check_real("lambda_start", lambda_start, fn)
  lambda_end = check_real("lambda_end", lambda_end, fn)
  check_axis_name(axis_name, fn)

  def init(params):
    dtype = tu.reduction_dtype(params)  # separate buffers, so the state can be donated
    return {"mean": jnp.zeros([], dtype), "var": jnp.zeros([], dtype),
            "sharp_steps": jnp.zeros([], jnp.int32)}

  def decide(state, updates):
    s = tu.sq_norm(updates)
    if axis_name is not None:
      s = jax.lax.pmean(s, axis_name)
    first = state.count == 0
    mean = jnp.where(first, s, decay * state.mean + (1 - decay) * s)
    var = jnp.where(first, 0.0, decay * state.var + (1 - decay) * jnp.square(s - mean))
    frac = jnp.minimum(state.count.astype(s.dtype) / total_steps, 1.0)
    c = lambda_start + (lambda_end - lambda_start) * frac
    sharp = s >= mean + c * jnp.sqrt(var)
    return sharp, {"mean": mean.astype(state.mean.dtype), "var": var.astype(state.var.dtype),
                   "sharp_steps": state.sharp_steps + sharp.astype(jnp.int32)}

  return schedule(fn, transform, AdaptivePolicyState, init, decide, axis_name=axis_name)
