"""Skipping the second pass for real: ``lax.cond`` in the step, or one program per branch.

Inside ``jax.jit`` a step that does not need ``grad_fn`` skips it through
``jax.lax.cond``: on GPU and TPU the untaken branch costs nothing. XLA:CPU,
however, runs a convolution inside a conditional (or loop) body many times
slower than the same convolution at the top level (jax-ml/jax#12868; a small
Flax CNN's gradient here: 84 ms plain, 1920 ms in a taken ``lax.cond``), which
would make LookSAM slower than SAM on a CPU convnet.

:func:`gated_jit` removes the conditional on CPU. A gated transformation's state
carries a :class:`Gate`, a pytree node without leaves whose *static* data is the
branch: ``None`` (decide inside the step with ``lax.cond``), ``True`` or
``False`` (the branch is fixed while tracing). Because the branch is part of the
state's pytree structure, every ``jax.jit`` cache on the way, the caller's own
jitted step included, traces and compiles one program per branch. ``gated_jit``
sets the gate of the single gated state in the step's arguments before each call
and resets it to ``None`` in the results. The decision comes from the state's
``host_plan``: LookSAM's and late-phase SAM's schedules depend on the step count
only, so the host reads the count once and then follows it without reading the
device again while it is handed back the state it returned; the randomized
schedule's draw is read from the device each step. :func:`sam_optax.ae_sam`
decides from the current gradient and always uses ``lax.cond``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@jax.tree_util.register_pytree_node_class
class Gate:
  """The branch of a gated transformation, held as static pytree data in its state.

  ``Gate()`` (decision ``None``) is what ``init`` and every step return: the
  branch is taken inside the step with ``lax.cond``. :func:`gated_jit` passes
  ``Gate(True)`` or ``Gate(False)``, which fixes the branch while tracing; being
  part of the pytree structure, the decision is seen by every ``jax.jit`` cache.

  Example:
    >>> import jax
    >>> from sam_optax._src.gating import Gate
    >>> jax.tree.leaves(Gate(True)), Gate(True) == Gate(False)
    ([], False)
  """
  __slots__ = ("decision",)

  def __init__(self, decision: bool | None = None):
    if decision is not None and not isinstance(decision, bool):
      raise TypeError(f"`Gate(decision=...)` must be None, True or False, got {decision!r}.")
    self.decision = decision

  def tree_flatten(self):
    return (), self.decision

  @classmethod
  def tree_unflatten(cls, decision, children):
    del children
    return cls(decision)

  def __eq__(self, other):
    return isinstance(other, Gate) and other.decision is self.decision

  def __hash__(self):
    return hash((Gate, self.decision))

  def __repr__(self):
    return f"Gate({self.decision!r})"


def branch(gate: Gate, pred: jax.Array, true_fn: Callable, false_fn: Callable, *operands) -> Any:
  """``lax.cond(pred, true_fn, false_fn, *operands)``, or the branch ``gate`` fixes."""
  if gate.decision is True:
    return true_fn(*operands)
  if gate.decision is False:
    return false_fn(*operands)
  return jax.lax.cond(pred, true_fn, false_fn, *operands)


def took_pass(count: jax.Array, fraction: jax.Array,
              took: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``sam_step`` (1.0 if this step ran the second pass) and the running mean of it."""
  step = jnp.asarray(took).astype(jnp.float32)
  return step, fraction + (step - fraction) / (count.astype(jnp.float32) + 1.0)


def is_gated(x: Any) -> bool:
  """A gated state: a NamedTuple with a ``gate`` field holding a :class:`Gate`."""
  return (isinstance(x, tuple) and isinstance(getattr(x, "gate", None), Gate)
          and hasattr(x, "_fields"))


# Wrappers whose inner state may stay as it was on a call (a micro-batch, a skipped
# non-finite step): below them the host cannot follow the count without reading it.
_MAY_HOLD = (optax.MultiStepsState, optax.ApplyIfFiniteState)


def _find(tree: Any) -> list[tuple[Any, bool]]:
  """The gated states in ``tree``, each with whether it sits below a wrapper that may hold it."""
  found = []

  def visit(node, held):
    stop = lambda x: is_gated(x) or isinstance(x, _MAY_HOLD)
    for leaf in jax.tree_util.tree_leaves(node, is_leaf=stop):
      if is_gated(leaf):
        found.append((leaf, held))
        visit(tuple(leaf), held)
      elif isinstance(leaf, _MAY_HOLD):
        visit(tuple(leaf), True)

  visit(tree, False)
  return found


def _set_gates(tree: Any, decision: bool | None) -> Any:
  def put(x):
    if is_gated(x):
      inner = {f: _set_gates(getattr(x, f), decision) for f in x._fields if f != "gate"}
      return x._replace(**inner, gate=Gate(decision))
    return x
  return jax.tree_util.tree_map(put, tree, is_leaf=is_gated)


class _Follower:
  """The host's view of one gated schedule: a plan read from the device, and the count
  array the last call returned (while the caller hands that array back, the plan holds)."""

  def __init__(self):
    self.plan: Callable[[int], bool] | None = None
    self.ahead = False
    self.steps = 0
    self.returned: Any = None
    self.reads = 0

  def decide(self, state: Any, held: bool) -> bool:
    follow = (self.plan is not None and self.ahead and not held and self.returned is not None
              and state.count is self.returned)
    if follow:
      self.steps += 1
    else:
      self.plan, self.ahead = state.host_plan()
      self.steps = 0
      self.reads += 1
    return bool(self.plan(self.steps))


def gated_jit(step: Callable, *, host_gating: bool | None = None, **jit_kwargs) -> Callable:
  """``jax.jit`` for a train step whose optimizer skips passes on some steps.

  On CPU (or with ``host_gating=True``) each call runs the program compiled for
  the branch of the single gated transformation (LookSAM, late-phase SAM or
  randomized) found in the step's arguments: a skipped step runs one pass, with
  no conditional in the program. Each branch compiles once, also when ``step``
  calls jitted functions itself (the branch is part of the state's pytree
  structure, which every ``jax.jit`` cache sees). The host reads LookSAM's and
  late-phase SAM's step count once and follows their schedules from then on
  while it is handed back the state it returned (it reads again after a restore,
  or below ``MultiSteps``/``skip_if_nonfinite``, whose inner state may hold);
  the randomized schedule's draw is read each step. Elsewhere it is
  ``jax.jit(step, **jit_kwargs)`` with ``lax.cond`` inside the step. No gated
  state in the arguments: plain ``jax.jit``.

  Args:
    step: the train step; its arguments must contain the optimizer state.
    host_gating: force (True) or forbid (False) the host-gated mode; default:
      on when JAX's default backend is CPU.
    **jit_kwargs: forwarded to ``jax.jit`` (e.g. ``donate_argnums``).

  Returns:
    A callable with the signature of ``step``; its ``reads`` attribute counts
    the device reads made to decide.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.looksam(0.05, k=5), optax.sgd(0.1))
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> def train_step(w, state):
    ...   grad_fn = jax.grad(loss)
    ...   updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
    ...   return optax.apply_updates(w, updates), state, loss(w)
    >>> train_step = sam_optax.gated_jit(train_step)  # CPU: steps 1-4 of 5 run one pass
    >>> w = jnp.ones(3)
    >>> state = tx.init(w)
    >>> for _ in range(10):
    ...   w, state, value = train_step(w, state)
    >>> bool(loss(w) < 0.1), train_step.reads   # the count was read once
    (True, 1)
  """
  compiled = jax.jit(step, **jit_kwargs)
  use_host = (jax.default_backend() == "cpu") if host_gating is None else host_gating
  if not use_host:
    return compiled
  follower = _Follower()

  @functools.wraps(step)
  def call(*args, **kwargs):
    states = _find((args, kwargs))
    if not states:
      return compiled(*args, **kwargs)
    if len(states) > 1:
      raise ValueError(
          "`gated_jit` found several gated optimizer states (LookSAM, late-phase SAM, "
          "randomized) in the step's arguments; it can fix the branch of one only. Use "
          "`gated_jit(step, host_gating=False)` to keep `lax.cond` inside the step.")
    state, held = states[0]
    decision = follower.decide(state, held)
    args, kwargs = _set_gates((args, kwargs), decision)
    out = _set_gates(compiled(*args, **kwargs), None)
    returned = _find(out)
    follower.returned = returned[0][0].count if len(returned) == 1 else None
    return out

  class _Call:
    __wrapped__ = step

    def __call__(self, *args, **kwargs):
      return call(*args, **kwargs)

    @property
    def reads(self) -> int:
      return follower.reads

    @property
    def jitted(self):
      return compiled

    def lower(self, *args, decision: bool = True, **kwargs):
      """The program of one branch, lowered (for ``.compile().memory_analysis()``)."""
      args, kwargs = _set_gates((args, kwargs), decision)
      return compiled.lower(*args, **kwargs)

  out = _Call()
  functools.update_wrapper(out, step)
  return out


def follow_count(count: Any, extra: Callable[[int], bool]) -> tuple[Callable[[int], bool], bool]:
  """A host plan for a schedule that depends on the step count only: reads it once."""
  start = int(np.asarray(count))
  return (lambda steps: extra(start + steps)), True


def count_plan(constant: str, rule: Callable[[int, int], bool], doc: str) -> Callable:
  """A ``host_plan`` method for a state whose schedule is ``rule(count, constant)``, with the
  state's field ``constant`` fixed at init (LookSAM's period, late-phase SAM's start step)."""
  def host_plan(self):
    value = int(np.asarray(getattr(self, constant)))
    return follow_count(self.count, lambda count: rule(count, value))

  host_plan.__doc__ = doc
  return host_plan
