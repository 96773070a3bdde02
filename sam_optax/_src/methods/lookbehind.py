"""Lookbehind-SAM: k ascent steps, the descent gradients gathered along the way, one step back."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine, radius
from sam_optax._src import tree as tu
from sam_optax._src.methods import sam as sam_method
from sam_optax._src.protocol import Method, Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_int, check_real, check_transform

PyTree = Any


class LookbehindSAMState(NamedTuple):
  r"""State of :func:`lookbehind_sam`.

  The training loop holds the current ascent point :math:`\phi_t + \delta_j`; the state holds
  the slow weights :math:`\phi_t`, the fast weights :math:`\tilde\phi_{t,j}` the descent
  gradients move, the base optimizer's state (it persists across cycles) and, with the
  adaptive :math:`\alpha`, the fast weights after the first descent step of the cycle.
  Evaluate with :func:`sam_optax.clean_params` (the slow weights).

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> state = sam_optax.lookbehind_sam(optax.sgd(0.1), k=3).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.LookbehindSAMState), state.slow.tolist()
    (True, [1.0, 1.0])
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: Telemetry | None
  base: optax.OptState
  slow: PyTree
  fast: PyTree
  first: PyTree = None

  def clean_params(self, params: PyTree) -> PyTree:
    """The slow weights :math:`\\phi_t` (the caller's params are an ascent point mid-cycle)."""
    return jax.tree.map(lambda s, p: s.astype(p.dtype), self.slow, params)


def lookbehind_sam(base_optimizer: optax.GradientTransformation,
                   rho: radius.Rho = 0.05, k: int = 5, alpha: float | str = 0.5, *,
                   perturbation: optax.GradientTransformation | None = None,
                   eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  r"""Lookbehind-SAM: k ascent steps, each descent gradient on the fast weights, one step back.

  A cycle of k steps starts from the slow weights :math:`\phi_t`. Step j (j = 1..k, one batch
  each) takes the caller's gradient :math:`g_j` at the current ascent point
  :math:`\phi_t + \delta_{j-1}` (:math:`\delta_0 = 0`), ascends along it and takes the descent
  gradient there:

  .. math::
     \delta_j = \delta_{j-1} + \rho\, d(g_j),\qquad
     \tilde\phi_{t,j} = \tilde\phi_{t,j-1} + u\big(\nabla L(\phi_t + \delta_j)\big),\quad
     \tilde\phi_{t,0} = \phi_t,

  with :math:`u` the base optimizer's update (its state persists across cycles). After the
  k-th step the slow weights move part of the way to the fast ones and the next cycle starts
  there:

  .. math:: \phi_{t+1} = \phi_t + \alpha\,(\tilde\phi_{t,k} - \phi_t)

  (``alpha="adaptive"``: :math:`\alpha = (1 + \cos(\tilde\phi_{t,1} - \phi_t,\,
  \tilde\phi_{t,k} - \phi_t))/2`, the paper's adaptive rule). The update returned moves the
  caller's parameters to the next ascent point (to :math:`\phi_{t+1}` at the end of a cycle),
  so the training loop is SAM's: one clean gradient and one ``grad_fn`` call per step, two
  passes. Evaluate with :func:`sam_optax.clean_params`, which returns the slow weights.
  It costs two params-sized buffers (three with the adaptive :math:`\alpha`).

  Args:
    base_optimizer: the optimizer of the fast weights (e.g. ``optax.sgd(lr, momentum=0.9)``).
    rho: the radius of each ascent step (a float or a schedule).
    k: the steps of a cycle (the paper: 2 to 10; k = 1 with alpha = 1 is SAM).
    alpha: the slow weights' step towards the fast ones, in (0, 1], or ``"adaptive"``.
    perturbation: the ascent geometry (default :func:`l2`).
    eps: norms at or below this count as zero.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (a complete optimizer) whose
    ``update(grads, state, params, *, grad_fn)`` needs the params and the closure.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> opt = sam_optax.lookbehind_sam(optax.sgd(0.1), rho=0.05, k=2, alpha=0.5)
    >>> w = jnp.zeros(2)
    >>> state = opt.init(w)
    >>> for _ in range(40):
    ...   u, state = opt.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    ...   w = optax.apply_updates(w, u)
    >>> bool(jnp.allclose(sam_optax.clean_params(w, state), 1.0, atol=0.05))
    True

  References:
    Mordido, Malviya, Baratin, Chandar, `Lookbehind-SAM: k steps back, 1 step forward
    <https://arxiv.org/abs/2307.16704>`_, ICML 2024.
  """
  fn = "lookbehind_sam"
  check_transform("base_optimizer", base_optimizer, fn)
  rho = radius.check_rho(rho, fn)
  k = check_int("k", k, fn, minimum=1, hint="the paper uses 2 to 10")
  adaptive = isinstance(alpha, str)
  if adaptive and alpha != "adaptive":
    raise ValueError(f"`{fn}(alpha=...)` must be a number in (0, 1] or \"adaptive\", "
                     f"got {alpha!r}.")
  if not adaptive:
    alpha = check_real("alpha", alpha, fn, low=0.0, high=1.0, low_open=True,
                       hint="the paper uses 0.5, or \"adaptive\"")
  eps, perturbation, ascent = sam_method.check_geometry(fn, eps, None, perturbation)
  base = optax.with_extra_args_support(base_optimizer)

  def init(params):
    # fresh buffers (the state can then be donated), in at least float32
    copy = lambda: jax.tree.map(
        lambda w: jnp.array(w, dtype=jnp.promote_types(w.dtype, jnp.float32), copy=True), params)
    fast = copy()   # the base optimizer moves the fast weights: its state is theirs
    return {"perturbation_state": perturbation.init(params), "base": base_optimizer.init(fast),
            "slow": copy(), "fast": fast, "first": copy() if adaptive else None}

  def combine(s, pts, loss, g_adv):
    state, step = s.state, s.state.count % k   # step j - 1 of the cycle
    u, base_state = base.update(tu.cast_like(g_adv, state.fast), state.base, state.fast,
                                **s.base_args)
    fast = optax.apply_updates(state.fast, u)
    first = None if not adaptive else tu.select(step == 0, fast, state.first)
    back = jax.tree.map(lambda a, b: a - b, fast, state.slow)   # fast - slow
    if adaptive:
      ahead = jax.tree.map(lambda a, b: a - b, first, state.slow)
      a = 0.5 * (1.0 + tu.cosine(ahead, back, eps))
    else:
      a = jnp.asarray(alpha, jnp.float32)
    last = step == k - 1
    slow = tu.select(last, tu.add_scaled(state.slow, a, back), state.slow)
    fast = tu.select(last, slow, fast)
    # the caller's params move to the next ascent point, or to the new slow weights
    target = jax.tree.map(lambda new, p: new.astype(p.dtype), slow, s.params)
    out = tu.select(last, jax.tree.map(lambda t, p: t - p, target, s.params),
                    jax.tree.map(lambda x, p: x - p, pts.point, s.params))
    # a non-finite descent step would only show at the cycle's end: show it now, so that
    # `skip_if_nonfinite` rejects this step and keeps the fast weights as they were
    broken = ~jnp.isfinite(tu.sq_norm(u))
    out = jax.tree.map(lambda o: jnp.where(broken, jnp.nan, o).astype(o.dtype), out)
    return Result(out, {"base": base_state, "slow": slow, "fast": fast, "first": first},
                  grad=g_adv)

  m = Method(fn, LookbehindSAMState, init, ascent, combine)
  return engine.build(m, rho=rho, eps=eps)
