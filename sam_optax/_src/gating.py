"""Skipping the second pass for real: ``lax.cond`` in the step, or two programs on CPU.

Inside ``jax.jit`` a step that does not need ``grad_fn`` skips it through
``jax.lax.cond``: on GPU and TPU the untaken branch costs nothing. XLA:CPU,
however, runs a convolution inside a conditional (or loop) body many times
slower than the same convolution at the top level (jax-ml/jax#12868; a small
Flax CNN's gradient here: 84 ms plain, 1920 ms in a taken ``lax.cond``), which
would make LookSAM slower than SAM on a CPU convnet.

:func:`gated_jit` removes the conditional on CPU: it compiles the step twice,
once with the gate statically open and once statically closed, reads the gate's
decision for the coming step from the optimizer state on the host (a few
microseconds; the decision of LookSAM and of the randomized schedule depends on
the state only), and runs the matching program. On other backends it is plain
``jax.jit`` and the ``lax.cond`` stays inside the step. The decision of
:func:`sam_optax.adaptive_policy` depends on the current gradient, so it always
uses ``lax.cond``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax

_STATIC_GATE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "sam_optax_static_gate", default=None)


@contextlib.contextmanager
def static_gate(value: bool | None):
  token = _STATIC_GATE.set(value)
  try:
    yield
  finally:
    _STATIC_GATE.reset(token)


def gate(pred: jax.Array, true_fn: Callable, false_fn: Callable, *operands,
         host_decidable: bool = True) -> Any:
  """``lax.cond(pred, true_fn, false_fn, *operands)``, or the static branch that
  :func:`gated_jit` chose while tracing (only for host-decidable gates)."""
  static = _STATIC_GATE.get() if host_decidable else None
  if static is True:
    return true_fn(*operands)
  if static is False:
    return false_fn(*operands)
  return jax.lax.cond(pred, true_fn, false_fn, *operands)


_DECIDERS: dict[type, Callable[[Any], jax.Array | bool]] = {}


def register_gate(state_type: type, decide: Callable[[Any], jax.Array | bool]) -> None:
  """Declares that ``decide(state)`` gives the next step's gate decision."""
  _DECIDERS[state_type] = decide


def _gated_states(tree: Any) -> list:
  found = []

  def visit(x):
    hit = type(x) in _DECIDERS
    if hit:
      found.append(x)
    return hit

  jax.tree_util.tree_leaves(tree, is_leaf=visit)
  return found


def gated_jit(step: Callable, *, host_gating: bool | None = None, **jit_kwargs) -> Callable:
  """``jax.jit`` for a train step whose optimizer skips passes on some steps.

  On CPU (or with ``host_gating=True``) the step is compiled once per branch
  of the single gated transform found in its arguments (LookSAM or
  randomized), and each call runs the program for the decision read from that
  state: a skipped step runs one pass, not a conditional. Elsewhere it is
  ``jax.jit(step, **jit_kwargs)`` with ``lax.cond`` inside the step. No gated
  state in the arguments: plain ``jax.jit``.

  Args:
    step: the train step; its arguments must contain the optimizer state.
    host_gating: force (True) or forbid (False) the two-program mode; default:
      on when JAX's default backend is CPU.
    **jit_kwargs: forwarded to ``jax.jit`` (e.g. ``donate_argnums``).

  Returns:
    A callable with the signature of ``step``.

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
    >>> bool(loss(w) < 0.1)
    True
  """
  plain = jax.jit(step, **jit_kwargs)
  use_host = (jax.default_backend() == "cpu") if host_gating is None else host_gating
  if not use_host:
    return plain

  def variant(flag: bool):
    @functools.wraps(step)
    def traced(*args, **kwargs):
      with static_gate(flag):
        return step(*args, **kwargs)
    return jax.jit(traced, **jit_kwargs)

  programs = {True: variant(True), False: variant(False)}

  @functools.wraps(step)
  def call(*args, **kwargs):
    states = _gated_states((args, kwargs))
    if not states:
      return plain(*args, **kwargs)
    if len(states) > 1:
      raise ValueError(
          "`gated_jit` found several gated optimizer states (LookSAM/randomized) in the "
          "step's arguments; it can pick a program for one gate only. Use "
          "`gated_jit(step, host_gating=False)` to keep `lax.cond` inside the step.")
    state = states[0]
    return programs[bool(_DECIDERS[type(state)](state))](*args, **kwargs)

  call.programs = programs  # type: ignore[attr-defined]
  return call
