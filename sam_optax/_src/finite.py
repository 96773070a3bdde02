"""Skipping non-finite steps where SAM's second pass blows up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.validation import check_int, check_transform


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [True]))


def skip_if_nonfinite(inner: optax.GradientTransformation, max_consecutive_errors: int = 5
                      ) -> optax.GradientTransformationExtraArgs:
  r"""Skip a step whose gradient *or* output is not finite, keeping ``inner``'s state.

  ``optax.apply_if_finite`` looks at the incoming gradient only. In a
  sharpness-aware chain the gradient that can blow up is the one taken at the
  perturbed point :math:`w + \epsilon`, inside the chain, which it never sees:
  the NaN reaches the parameters. This wrapper runs ``inner`` and checks its
  output as well as its input; when either is not finite it returns zero
  updates and the *previous* state of ``inner`` (so counters, EMAs, stored
  directions and the base optimizer's moments are untouched by the skipped
  step). After ``max_consecutive_errors`` non-finite steps in a row the update
  is applied anyway, as in optax. The state is ``optax.ApplyIfFiniteState``, so
  ``total_notfinite`` counts skipped steps (:func:`sam_optax.metrics` reports it
  as ``skipped_steps``).

  Unlike ``optax.apply_if_finite`` it has no ``lax.cond``: ``inner`` always runs
  and the result is selected, which keeps XLA:CPU from running the step's
  convolutions inside a conditional (jax-ml/jax#12868).

  Args:
    inner: the whole optimizer, e.g. ``sam_optax.sam(optax.sgd(0.1), 0.05)``.
    max_consecutive_errors: non-finite steps in a row that are skipped before
      one is applied regardless.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with the signature of ``inner``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> tx = sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1), 0.05))
    >>> w = jnp.ones(2); state = tx.init(w)
    >>> blows_up = lambda p: jnp.full_like(p, jnp.nan)  # NaN at the perturbed point
    >>> u, state = tx.update(w, state, w, grad_fn=blows_up)
    >>> u, int(state.total_notfinite)
    (Array([0., 0.], dtype=float32), 1)
  """
  check_transform("inner", inner, "skip_if_nonfinite")
  max_consecutive_errors = check_int("max_consecutive_errors", max_consecutive_errors,
                                     "skip_if_nonfinite", minimum=0)
  inner_update = optax.with_extra_args_support(inner).update

  def init(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner_update(updates, state.inner_state, params, **extra_args)
    isfinite = _all_finite(updates) & _all_finite(new_updates)
    notfinite_count = jnp.where(isfinite, jnp.zeros([], jnp.int32),
                                optax.safe_increment(state.notfinite_count))
    accept = isfinite | (notfinite_count > max_consecutive_errors)
    out = tu.select(accept, new_updates, tu.zeros_like(new_updates))
    inner_state = tu.select(accept, new_inner, state.inner_state)
    total = jnp.where(isfinite, state.total_notfinite, optax.safe_increment(state.total_notfinite))
    return out, optax.ApplyIfFiniteState(notfinite_count, isfinite, total, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)
