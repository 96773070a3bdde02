"""What a sharpness-aware step saw: the :class:`Telemetry` record and :func:`metrics`."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import tree as tu
from sam_optax._src.radius import RadiusState


class Telemetry(NamedTuple):
  r"""What the last sharpness-aware step saw, as scalars (read them with
  :func:`sam_optax.metrics`).

  Attributes:
    clean_grad_norm: :math:`\|g\|`, the norm of the clean gradient, or None where the
      method never sees it (MSAM takes its only gradient at the perturbed point).
    perturbation_norm: :math:`\|\epsilon\|`, the length of the step to the
      perturbed point (:math:`\rho` for SAM with a non-zero gradient).
    perturbed_grad_norm: :math:`\|g_{adv}\|`, the norm of the gradient at the
      perturbed point.
    cosine: :math:`\cos(g, g_{adv})` (0 when either is zero), or None where the
      method does not record it: it needs g alive until the perturbed gradient
      is done, a params-sized buffer, so it is recorded where the method keeps g
      anyway (GSAM, LookSAM, PGN, SAMPa, bSAM, Frob/Det-SAM) or with
      ``telemetry="full"``.
    clean_loss: :math:`L(w)`, when the caller passed ``value=``.
    perturbed_loss: :math:`L(w + \epsilon)`, when the caller passed
      ``value_and_grad_fn=`` (or an ``objective=``).
    has_clean_loss, has_perturbed_loss: int32 1/0, whether the loss was given
      on the last step (:func:`sam_optax.metrics` omits absent entries).
    misordered: int32 1 once a step in the first three saw ``updates`` pointing
      away from the perturbed gradient, the sign of a chain in the wrong order
      (the sharpness-aware transformation after the base optimizer);
      :func:`sam_optax.metrics` then warns.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.sharpness_aware(0.05).init(jnp.ones(3))
    >>> isinstance(state.telemetry, sam_optax.Telemetry), float(state.telemetry.clean_grad_norm)
    (True, 0.0)
    >>> state.telemetry.cosine is None   # SAM keeps no copy of g for it
    True
  """
  clean_grad_norm: jax.Array | None
  perturbation_norm: jax.Array
  perturbed_grad_norm: jax.Array
  cosine: jax.Array | None
  clean_loss: jax.Array
  perturbed_loss: jax.Array
  has_clean_loss: jax.Array
  has_perturbed_loss: jax.Array
  misordered: jax.Array


FLOAT_FIELDS = ("clean_grad_norm", "perturbation_norm", "perturbed_grad_norm", "cosine",
                "clean_loss", "perturbed_loss")


def empty(cosine: bool = True, clean_grad_norm: bool = True) -> Telemetry:
  """The record before the first step; ``cosine``/``clean_grad_norm`` False: absent (None)."""
  # one buffer per field: a state holding the same array twice cannot be donated
  rec = Telemetry(*(jnp.zeros([], jnp.float32) for _ in FLOAT_FIELDS),
                  *(jnp.zeros([], jnp.int32) for _ in range(3)))
  return rec._replace(cosine=rec.cosine if cosine else None,
                      clean_grad_norm=rec.clean_grad_norm if clean_grad_norm else None)


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _flag(present: bool, like: Any) -> Any:
  """Whether an optional entry was recorded. Inside ``jit`` a numpy constant: it stays
  concrete in the step's own trace, so a ``metrics()`` call there can leave out what was
  not recorded. Outside ``jit`` an array typed and sharded like the state's flag
  (``like``), so an eager step keeps ``jax.typeof`` of the state as ``init`` made it."""
  if like is None or isinstance(like, jax.core.Tracer):
    return np.asarray(int(present), np.int32)
  return jnp.full_like(like, int(present))


def _optional(x: Any, like: Any, like_flag: Any) -> tuple[jax.Array, Any]:
  if x is None:
    zero = jnp.zeros([], jnp.float32) if like is None else jnp.zeros_like(like)
    return zero, _flag(False, like_flag)
  return _f32(jnp.real(x)), _flag(True, like_flag)


def record(g: Any, g_adv: Any, *, perturbation_norm: Any, clean_loss: Any = None,
           perturbed_loss: Any = None, cosine: bool = False, misordered: Any = None,
           eps: float = 1e-12, g_norm: Any = None, previous: Telemetry | None = None,
           clean: bool = True, given: dict | None = None) -> Telemetry:
  """The telemetry of one step.

  A loss given as None is recorded as absent (0, flag 0). ``g_norm``: ||g|| if already
  reduced (before the second pass, so g need not outlive it). ``previous``: the last
  record (its flags' types are kept). ``clean=False``: the method has no clean gradient
  (``clean_grad_norm`` and the cosine absent). ``given``: norms the method computed itself
  (``clean_grad_norm``, ``perturbed_grad_norm``, ``cosine``), used instead of g and g_adv."""
  given = given or {}
  adv_norm = given["perturbed_grad_norm"] if "perturbed_grad_norm" in given else tu.norm(g_adv)
  cos = None
  if clean:
    g_norm = given.get("clean_grad_norm", g_norm)
    g_norm = tu.norm(g) if g_norm is None else g_norm
    if cosine:
      cos = (given["cosine"] if "cosine" in given else
             tu.vdot(g, g_adv) * tu.safe_inverse(g_norm * adv_norm, eps * eps))
      cos = _f32(cos)
  else:
    g_norm = None
  last = lambda field: None if previous is None else getattr(previous, field)
  (cl, has_cl) = _optional(clean_loss, last("clean_loss"), last("has_clean_loss"))
  (pl, has_pl) = _optional(perturbed_loss, last("perturbed_loss"), last("has_perturbed_loss"))
  flag = jnp.zeros([], jnp.int32) if misordered is None else misordered.astype(jnp.int32)
  return Telemetry(None if g_norm is None else _f32(g_norm), _f32(perturbation_norm),
                   _f32(adv_norm), cos, cl, pl, has_cl, has_pl, flag)


def mean_over(rec: Telemetry, axis_name: Any) -> Telemetry:
  """One number for the whole axis, as the update is."""
  if axis_name is None:
    return rec
  return rec._replace(**{f: jax.lax.pmean(getattr(rec, f), axis_name) for f in FLOAT_FIELDS
                         if getattr(rec, f) is not None},
                      misordered=jax.lax.pmax(rec.misordered, axis_name))


# ------------------------------------------------------------------- reading it

_NORMS = ("clean_grad_norm", "perturbation_norm", "perturbed_grad_norm", "cosine")
MISORDER_MESSAGE = (
    "`{fn}`: the incoming `updates` pointed away from the gradient at the perturbed point "
    "in the first steps, which is what happens when the sharpness-aware transformation is "
    "not first in the chain: it must come first, so that it receives the raw loss "
    "gradient. Write `optax.chain(sam_optax.sharpness_aware(rho), <base optimizer>)` (or "
    "`sam_optax.sam(base, rho)`), not `optax.chain(<base optimizer>, sharpness_aware(rho))`.")


def _array(x: Any) -> Any:
  """The array in a state field (flax.nnx keeps optimizer state in Variables)."""
  leaves = jax.tree_util.tree_leaves(x)
  return leaves[0] if len(leaves) == 1 else x


def _present(flag: Any) -> bool:
  """Whether an entry was recorded; where only a run-time flag knows (a state passed into
  ``jit``, one out of a gated ``lax.cond``) it counts as present and reads the stored value."""
  flag = _array(flag)
  if isinstance(flag, jax.core.Tracer):
    return True
  return bool(np.asarray(flag))


def _concrete_flag(flag: Any) -> bool:
  flag = _array(flag)
  return not isinstance(flag, jax.core.Tracer) and bool(np.asarray(flag))


def is_gated(x: Any) -> bool:
  """A gated method's state: a NamedTuple that counts its evaluating steps."""
  return isinstance(x, tuple) and "sam_step_fraction" in getattr(x, "_fields", ())


def metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
  r"""The sharpness-aware telemetry of the last step, found anywhere in an optimizer state.

  Searches ``opt_state`` (inside ``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps``, ``skip_if_nonfinite``, ``masked``, nested chains, an
  ``nnx.Optimizer``'s state, a restored checkpoint) and returns float32
  scalars:

  * ``clean_grad_norm`` :math:`\|g\|` (where the method sees the clean gradient),
    ``perturbation_norm`` :math:`\|\epsilon\|`, ``perturbed_grad_norm``
    :math:`\|g_{adv}\|`, and ``cosine`` :math:`\cos(g, g_{adv})` where it was recorded
    (see :class:`Telemetry`);
  * ``clean_loss`` :math:`L(w)`, ``perturbed_loss`` :math:`L(w+\epsilon)` and
    ``sharpness`` :math:`L(w+\epsilon) - L(w)` (SAM's one-step sharpness
    estimate), when the step received ``value=`` and ``value_and_grad_fn=``;
  * ``sam_step`` (1 if the last step ran the second pass) and
    ``sam_step_fraction`` (its running mean) for the gated methods
    (:func:`looksam`, :func:`randomized`, :func:`ae_sam`, :func:`late_phase`);
  * ``skipped_steps``, the number of non-finite steps an enclosing
    ``skip_if_nonfinite`` skipped (int32);
  * ``rho``, the radius the last step used, and ``rho_signal``, what the rule measured
    on it, under ``rho="auto"`` (see :func:`sam_optax.auto_rho`).

  Gated schedules report the norms and losses of the last step that ran the
  second pass. The first transformation found (outermost first) gives each
  entry. An entry that was not recorded is absent: outside ``jit``, and inside
  the jitted step that recorded it (the flags are trace-time constants there).
  Where the flags are known only at run time (a state passed into a jitted
  function, or one out of a ``lax.cond`` of the gated schedules) the optional
  entries are present and read 0 until a step records them. A
  recorded chain-order problem (:class:`Telemetry`'s ``misordered``) raises a
  ``UserWarning`` outside ``jit`` that says how to fix the chain.

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
  known = (Telemetry, optax.ApplyIfFiniteState, RadiusState)
  is_known = lambda x: isinstance(x, known) or is_gated(x)
  out: dict[str, jax.Array] = {}
  misordered = []

  def put(name, value):
    out.setdefault(name, _array(value))

  def handle(node):
    if isinstance(node, Telemetry):
      for name in _NORMS:
        if getattr(node, name) is not None:
          put(name, getattr(node, name))
      clean, pert = _present(node.has_clean_loss), _present(node.has_perturbed_loss)
      if clean:
        put("clean_loss", node.clean_loss)
      if pert:
        put("perturbed_loss", node.perturbed_loss)
      if clean and pert:
        put("sharpness", _array(node.perturbed_loss) - _array(node.clean_loss))
      if _concrete_flag(node.misordered):
        misordered.append(True)
      return
    if isinstance(node, RadiusState):
      put("rho", node.last)
      put("rho_signal", node.signal)
      return
    if is_gated(node):
      put("sam_step", node.sam_step)
      put("sam_step_fraction", node.sam_step_fraction)
    elif isinstance(node, optax.ApplyIfFiniteState):
      put("skipped_steps", jnp.asarray(_array(node.total_notfinite)))
    visit(tuple(node))

  def visit(tree):
    # pytree flattening reaches inside optax's NamedTuples, dicts and flax.nnx
    # Variables alike; the recorded states stop it and are read in pre-order
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_known):
      if is_known(leaf):
        handle(leaf)

  visit(opt_state)
  if misordered:
    warnings.warn(MISORDER_MESSAGE.format(fn="sharpness_aware"), UserWarning, stacklevel=2)
  return out
