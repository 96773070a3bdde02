"""One accessor for what the sharpness-aware transformations recorded in the state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import core, variants

_NORMS = ("clean_grad_norm", "perturbation_norm", "perturbed_grad_norm", "cosine")
_SCHEDULE = (variants.LookSAMState, variants.RandomizedState, variants.AdaptivePolicyState)
_KNOWN = (core.Telemetry, variants.MomentumSAMState, optax.ApplyIfFiniteState) + _SCHEDULE


def _array(x: Any) -> jax.Array:
  """The array in a state field (flax.nnx keeps optimizer state in Variables)."""
  leaves = jax.tree_util.tree_leaves(x)
  return leaves[0] if len(leaves) == 1 else x


def _present(flag: Any) -> bool:
  """Whether a loss slot was filled; inside ``jit`` (flag unknown) it counts as present."""
  flag = _array(flag)
  if isinstance(flag, jax.core.Tracer):
    return True
  return bool(np.asarray(flag))


def metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
  r"""The sharpness-aware telemetry of the last step, found anywhere in an optimizer state.

  Searches ``opt_state`` (inside ``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps``, ``apply_if_finite``, ``masked``, nested chains, an
  ``nnx.Optimizer``'s state, a restored checkpoint) and returns float32
  scalars:

  * ``clean_grad_norm`` :math:`\|g\|`, ``perturbation_norm`` :math:`\|\epsilon\|`,
    ``perturbed_grad_norm`` :math:`\|g_{adv}\|`, ``cosine`` :math:`\cos(g, g_{adv})`
    (for :func:`msam` only the two that apply: its :math:`\|\epsilon\|` and the
    norm of the gradient it was given, taken at the perturbed point);
  * ``clean_loss`` :math:`L(w)`, ``perturbed_loss`` :math:`L(w+\epsilon)` and
    ``sharpness`` :math:`L(w+\epsilon) - L(w)` (SAM's one-step sharpness
    estimate), when the step received ``value=`` and ``value_and_grad_fn=``;
  * ``sam_step`` (1 if the last step ran the second pass) and
    ``sam_step_fraction`` (its running mean) for the gated schedules
    (:func:`looksam`, :func:`randomized`, :func:`adaptive_policy`);
  * ``skipped_steps``, the number of non-finite steps an enclosing
    ``optax.apply_if_finite`` skipped (int32).

  Gated schedules report the norms and losses of the last step that ran the
  second pass. The first transformation found (outermost first) gives each
  entry. Outside ``jit`` an entry that was not recorded is absent; inside
  ``jit`` (where the flags are not known while tracing) the loss entries are
  present and read 0 until a step records them.

  Args:
    opt_state: any optimizer state.

  Returns:
    A dict of scalars; empty if no sharpness-aware state is found.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> w = jnp.ones(3)
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.1)
    >>> state = tx.init(w)
    >>> value, g = jax.value_and_grad(loss)(w)
    >>> _, state = tx.update(g, state, w, value=value,
    ...                      value_and_grad_fn=jax.value_and_grad(loss))
    >>> m = sam_optax.metrics(state)
    >>> round(float(m["perturbation_norm"]), 4), round(float(m["sharpness"]), 4)
    (0.1, 0.3564)
  """
  out: dict[str, jax.Array] = {}

  def put(name, value):
    out.setdefault(name, _array(value))

  def handle(node):
    if isinstance(node, core.Telemetry):
      for name in _NORMS:
        put(name, getattr(node, name))
      clean, pert = _present(node.has_clean_loss), _present(node.has_perturbed_loss)
      if clean:
        put("clean_loss", node.clean_loss)
      if pert:
        put("perturbed_loss", node.perturbed_loss)
      if clean and pert:
        put("sharpness", _array(node.perturbed_loss) - _array(node.clean_loss))
      return
    if isinstance(node, _SCHEDULE):
      put("sam_step", node.sam_step)
      put("sam_step_fraction", node.sam_step_fraction)
    elif isinstance(node, variants.MomentumSAMState):
      put("perturbation_norm", node.perturbation_norm)
      put("perturbed_grad_norm", node.perturbed_grad_norm)
    elif isinstance(node, optax.ApplyIfFiniteState):
      put("skipped_steps", jnp.asarray(_array(node.total_notfinite)))
    visit(tuple(node))

  def visit(tree):
    # pytree flattening reaches inside optax's NamedTuples, dicts and flax.nnx
    # Variables alike; the recorded states stop it and are read in pre-order
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, _KNOWN)):
      if isinstance(leaf, _KNOWN):
        handle(leaf)

  visit(opt_state)
  return out
