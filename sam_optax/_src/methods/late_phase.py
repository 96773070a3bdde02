"""Late-phase SAM: plain gradient steps first, the sharpness-aware transformation from a given
step on."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import gating
from sam_optax._src.distributed import check_axis_name
from sam_optax._src.methods.wrapper import schedule
from sam_optax._src.validation import check_int, check_transform


class LatePhaseState(NamedTuple):
  """State of :func:`late_phase`.

  Attributes:
    count: int32 steps taken.
    start_step: int32 first step that runs ``transform`` (constant; lets :func:`gated_jit`
      decide on the host).
    inner: the wrapped transform's state (advanced only on the steps it runs).
    sam_step: float32 1.0 if the last step ran ``transform``, else 0.0.
    sam_step_fraction: float32 running mean of ``sam_step``.
    gate: the :class:`Gate` (static) :func:`gated_jit` fixes the branch with.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.late_phase(sam_optax.sharpness_aware(0.05), 100).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.LatePhaseState), int(state.start_step)
    (True, 100)
  """
  count: jax.Array
  start_step: jax.Array
  inner: optax.OptState
  sam_step: jax.Array
  sam_step_fraction: jax.Array
  gate: gating.Gate = gating.Gate()

  host_plan = gating.count_plan("start_step", lambda count, start: count >= start,
                                "The schedule as the host follows it: ``transform`` from "
                                "``start_step`` on.")


def late_phase(transform: optax.GradientTransformation, start_step: int, *,
               axis_name: str | tuple[str, ...] | None = None
               ) -> optax.GradientTransformationExtraArgs:
  r"""Late-phase SAM: the plain gradient for steps ``< start_step``, then ``transform``.

  .. math:: \text{output}_t = \begin{cases} g_t & t < t_0 \\
            \mathrm{transform}(g_t) & t \ge t_0 \end{cases}

  The early steps do not call the closure: inside ``jax.jit`` the branch is a
  ``lax.cond`` (free on GPU and TPU); on CPU use :func:`gated_jit`, which compiles one
  program per branch and follows the step count on the host after reading it once. Zhou
  et al. switch to SAM for the last part of training (e.g. the last 1/8) and recover
  nearly all of SAM's generalization at about 1.1x SGD's cost; Park et al. find that a
  short plain start also removes SAM's stalls at a large :math:`\rho`. The wrapped
  transform's own count (the argument of its ``rho`` schedule) advances on the steps it
  runs only: it is 0 at step ``start_step``.

  Args:
    transform: any sharpness-aware transformation (e.g. :func:`sharpness_aware`).
    start_step: :math:`t_0 \ge 0`, the first step (counted from 0) that runs ``transform``.
    axis_name: averages the plain gradient over this axis (give ``transform`` the same).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state :class:`LatePhaseState`;
    put it first in the chain, where ``transform`` would go.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0]); g = grad_fn(w)
    >>> tx, outs = sam_optax.late_phase(sam_optax.sharpness_aware(0.05), start_step=1), []
    >>> state = tx.init(w)
    >>> for _ in range(2):   # step 0: plain, step 1: SAM
    ...   out, state = tx.update(g, state, w, grad_fn=grad_fn)
    ...   outs.append(out)
    >>> sam = grad_fn(w + 0.05 * g / jnp.linalg.norm(g))
    >>> bool(jnp.array_equal(outs[0], g)), bool(jnp.allclose(outs[1], sam))
    (True, True)
    >>> int(state.inner.count)   # the wrapped transform counted only the step it ran
    1

  References:
    Zhou, Wang, Mao, Li, Yan, `Sharpness-Aware Minimization Efficiently Selects Flatter
    Minima Late in Training <https://arxiv.org/abs/2410.10373>`_, ICLR 2025.

    Park, Jang, Ryu, Yang, `SAM can hallucinate minimizers
    <https://arxiv.org/abs/2509.21818>`_, 2025.
  """
  fn = "late_phase"
  check_transform("transform", transform, fn)
  start_step = check_int("start_step", start_step, fn, minimum=0,
                         hint="the first step (from 0) that runs `transform`, e.g. 7/8 of training")
  check_axis_name(axis_name, fn)

  def init(params):
    del params
    return {"start_step": jnp.asarray(start_step, jnp.int32)}

  def decide(state, updates):
    del updates
    return state.count >= state.start_step, {}

  return schedule(fn, transform, LatePhaseState, init, decide, axis_name=axis_name)
