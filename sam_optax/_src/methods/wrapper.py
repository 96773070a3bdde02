"""A schedule around any transformation: run it on some steps, pass the gradient through on
the others without calling the closure (randomized, AE-SAM, late-phase SAM).

A schedule is a method like any other (:class:`~sam_optax._src.protocol.Method`) whose
``combine`` runs the wrapped transformation and whose :class:`~sam_optax._src.protocol.Gating`
decides the steps: the engine's one gating mechanism, LookSAM's too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from sam_optax._src import engine
from sam_optax._src.protocol import Gating, Method, Result, Step, no_points


def schedule(fn: str, transform: optax.GradientTransformation, state: type, init: Callable,
             decide: Callable[[Any, Any], tuple[jax.Array, dict]], *,
             axis_name: Any = None) -> optax.GradientTransformationExtraArgs:
  """``decide(state, updates) -> (take, fields)``: the step runs ``transform`` where
  ``take`` holds and passes ``updates`` through (averaged over ``axis_name``) without
  calling the closure elsewhere. The state has ``count``, ``inner``, ``sam_step``,
  ``sam_step_fraction``, ``gate`` where the host can decide (:func:`gating.gated_jit`),
  and the schedule's own fields from ``init``."""
  inner_update = optax.with_extra_args_support(transform).update

  def run(s: Step, pts: Any, loss: Any, grad: Any) -> Result:
    del pts, loss, grad
    out, inner = inner_update(s.updates, s.state.inner, s.params, **s.forward_args)
    return Result(out, {"inner": inner})

  def skip(s: Step) -> Result:
    passed = s.updates if axis_name is None else jax.lax.pmean(s.updates, axis_name)
    return Result(passed, {"inner": s.state.inner})

  method = Method(fn, state, lambda params: {**init(params), "inner": transform.init(params)},
                  no_points, run, closure="none", evaluates="method", telemetry=False,
                  gating=Gating(lambda s: decide(s.state, s.updates), skip), averages=False)
  return engine.build(method)
