"""Geometries from a metric on the loss: Monge-SAM's I + g gᵀ and Adam's diagonal
(preconditioned SAM)."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.geometries import base
from sam_optax._src.geometries.base import Perturbation, make_perturbation, stateless_init

PyTree = Any
ADAM_STATE = "adam_state"


# ------------------------------------------------------------------------ monge


def monge(eps: float = 1e-12) -> Perturbation:
  r"""Monge-SAM: the unit ball of the Monge metric :math:`G = I + g g^\top`.

  The loss surface :math:`(w, L(w))` embedded in :math:`\mathbb{R}^{n+1}` has the
  pull-back metric :math:`G = I + g g^\top`; the ascent step of length :math:`\rho` in
  that metric along g is

  .. math:: d = \frac{g/\|g\|}{\sqrt{1 + \|g\|^2}},\qquad \epsilon = \rho\, d,

  so :math:`\epsilon^\top G\, \epsilon = \rho^2`: SAM's step where the gradient is small,
  shrinking towards plain gradient descent where it is large. A zero gradient gives
  ``d = 0``. Multi-step ascent projects onto the Euclidean ball of radius :math:`\rho`:
  the metric is that of the gradient at each ascent step, so no one G-ball holds the
  accumulated step, and since :math:`G \succeq I` the Euclidean ball contains every
  G-ball of the same radius.

  Args:
    eps: gradient norms at or below this count as zero.

  Returns:
    A :class:`Perturbation` for ``sharpness_aware(rho, perturbation=monge())``.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> g = jnp.array([3.0, 4.0])   # |g| = 5
    >>> d, _ = sam_optax.monge().update(g, optax.EmptyState())
    >>> bool(jnp.allclose(d, g / (5.0 * jnp.sqrt(26.0))))
    True

  References:
    Jacobsen, Arvanitidis, `Monge SAM: Robust Reparameterization-Invariant
    Sharpness-Aware Minimization Based on Loss Geometry
    <https://arxiv.org/abs/2502.08448>`_, 2025.
  """
  eps = base.check_nonneg("eps", eps, "monge", "use a small positive value such as 1e-12.")

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    n = tu.norm(updates)
    return tu.scale(updates, tu.safe_inverse(n, eps) * jax.lax.rsqrt(1.0 + n * n)), state

  return make_perturbation(stateless_init, update)


# ------------------------------------------------------------- preconditioned


class PreconditionedState(NamedTuple):
  """State of :func:`preconditioned`: the updates taken and the EMA ``nu`` of the squared
  gradient (float32, float64 for float64 params; ``None`` with ``moments="adam"``, which
  reads the base Adam's).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.preconditioned().init(jnp.zeros(2))
    >>> isinstance(state, sam_optax.PreconditionedState), int(state.count), state.nu.shape
    (True, 0, (2,))
  """
  count: jax.Array
  nu: PyTree


def _nu_dtype(x: jax.Array) -> Any:
  return jnp.promote_types(tu.real_dtype(x.dtype), jnp.float32)


def _adam_moments(extra_args: dict, params_like: PyTree) -> tuple[PyTree, jax.Array]:
  fn = 'preconditioned(moments="adam")'
  tree = extra_args.get(ADAM_STATE)
  hint = (f"pass the optimizer state as `tx.update(grads, opt_state, params, grad_fn=..., "
          f"{ADAM_STATE}=opt_state)`, with an Adam-family base optimizer (`optax.adam`, "
          "`optax.adamw`) in it, or use `preconditioned()` to keep its own second moment")
  found = tu.find_states(tree, optax.ScaleByAdamState) if tree is not None else []
  if not found:
    raise ValueError(f"`{fn}` reads the base Adam's second moment but "
                     + ("got no `adam_state=`" if tree is None else
                        "found no `optax.ScaleByAdamState` in `adam_state=`") + f"; {hint}.")
  state = found[0]
  if jax.tree.structure(state.nu) != jax.tree.structure(params_like):
    raise ValueError(f"`{fn}`: the Adam state's `nu` does not have the structure of the "
                     "gradient (a masked or partitioned base optimizer?); use `preconditioned()` "
                     "to keep its own second moment.")
  return state.nu, state.count


def preconditioned(b2: float = 0.999, adam_eps: float = 1e-8, *, eps: float = 1e-12,
                   moments: str | None = None, norm_eps: float | None = None) -> Perturbation:
  r"""Preconditioned SAM: the ascent step in Adam's diagonal geometry.

  With :math:`v_t = b_2 v_{t-1} + (1 - b_2)\, g_t^2` (:math:`v_0 = 0`), Adam's bias
  correction :math:`\hat v_t = v_t / (1 - b_2^t)` (t counts the updates, this one
  included) and

  .. math:: u = \frac{g}{\sqrt{\hat v_t} + \epsilon_A},\qquad d = \frac{u}{\|u\|},

  ``sharpness_aware(rho, perturbation=preconditioned())`` evaluates at
  :math:`w + \rho\, d`. It composes with :func:`functional_sam` (the paper's best
  combination). The first step (:math:`\hat v_1 = g^2`) perturbs along about
  :math:`\mathrm{sign}(g)`. The EMA costs one params-sized buffer (float32, float64 for
  float64 params) in :class:`PreconditionedState`. Multi-step ascent projects onto the
  Euclidean ball, the one :math:`\rho\, d` lies on.

  ``moments="adam"`` keeps no buffer and reads the base optimizer's own second moment:
  a perturbation cannot see the state of the optimizer after it in the chain, so the
  train step passes the optimizer state through ``update``:
  ``tx.update(grads, opt_state, params, grad_fn=..., adam_state=opt_state)`` (the first
  ``optax.ScaleByAdamState`` found in it is used, at any depth). That moment is the one of
  the previous step (the base has not yet seen this step's gradient) and is an EMA of the
  *perturbed* gradients Adam consumes; its bias correction uses Adam's own count and this
  ``b2``, which must be the base Adam's. At Adam's count 0 (:math:`v = 0`) the step is
  SAM's :math:`g/\|g\|`.

  Args:
    b2: decay :math:`b_2 \in [0, 1)` of the squared-gradient EMA (Adam's ``b2``).
    adam_eps: :math:`\epsilon_A \ge 0` added to :math:`\sqrt{\hat v}` (Adam's ``eps``).
    eps: norms of u at or below this count as zero (a zero gradient gives d = 0), the
      meaning ``eps`` has everywhere in sam_optax.
    moments: ``None`` (own EMA) or ``"adam"`` (the base Adam's, see above).
    norm_eps: the earlier name of ``eps`` (deprecated; it warns and is removed in the
      next release). Before this release ``eps`` was Adam's, now ``adam_eps``.

  Returns:
    A :class:`Perturbation` with state :class:`PreconditionedState`.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> p = sam_optax.preconditioned(b2=0.5, adam_eps=0.0)
    >>> state = p.init(jnp.zeros(2))
    >>> _, state = p.update(jnp.array([2.0, 1.0]), state)   # v = [2, 0.5], v^ = [4, 1]
    >>> d, state = p.update(jnp.array([1.0, 1.0]), state)   # v = [1.5, 0.75], v^ = [2, 1]
    >>> u = jnp.array([1.0, 1.0]) / jnp.sqrt(jnp.array([2.0, 1.0]))
    >>> bool(jnp.allclose(d, u / jnp.linalg.norm(u))), int(state.count)
    (True, 2)

  References:
    Singh, Mobahi, Agarwala, Dauphin, `Avoiding spurious sharpness minimization broadens
    applicability of SAM <https://arxiv.org/abs/2502.02407>`_, ICML 2025.
  """
  fn = "preconditioned"
  if norm_eps is not None:
    warnings.warn("`preconditioned(norm_eps=...)` is deprecated and will be removed in the next "
                  "release; pass `eps=` (the zero threshold of the norm, as everywhere in "
                  "sam_optax); Adam's epsilon is `adam_eps=`.", DeprecationWarning, stacklevel=2)
    eps = norm_eps
  b2 = base.check_decay("b2", b2, fn)
  adam_eps = base.check_nonneg("adam_eps", adam_eps, fn, "Adam's default is 1e-8.")
  eps = base.check_nonneg("eps", eps, fn, "use a small positive value such as 1e-12.")
  if moments not in (None, "adam"):
    raise ValueError(f"`{fn}(moments=...)` must be None (keep an EMA of g^2 here) or \"adam\" "
                     f"(read the base Adam's `nu`, passed as `{ADAM_STATE}=`), got {moments!r}.")

  def init(params):
    nu = None if moments == "adam" else jax.tree.map(
        lambda x: jnp.zeros_like(x, dtype=_nu_dtype(x)), params)   # keeps x's sharding
    return PreconditionedState(jnp.zeros([], jnp.int32), nu)

  def update(updates, state, params=None, **extra_args):
    del params
    count = optax.safe_increment(state.count)
    if moments == "adam":
      nu, t = _adam_moments(extra_args, updates)
      new_nu = None
    else:
      nu = jax.tree.map(lambda v, g: (b2 * v + (1.0 - b2) * tu.abs2(g, v.dtype)).astype(v.dtype),
                        state.nu, updates)
      t, new_nu = count, nu
    t = jnp.asarray(t, jnp.float32)
    correction = jnp.where(t > 0, 1.0 - jnp.power(jnp.float32(b2), t), 1.0)
    u = jax.tree.map(lambda g, v: _precondition(g, v, correction, adam_eps), updates, nu)
    d = tu.normalize(u, eps)
    return tu.cast_like(d, updates), PreconditionedState(count, new_nu)

  return make_perturbation(init, update)


def _precondition(g: jax.Array, v: jax.Array, correction: jax.Array, eps: float) -> jax.Array:
  """g / (sqrt(v / correction) + eps) in at least float32."""
  acc = jnp.promote_types(jnp.result_type(g), jnp.float32)
  v = v.astype(tu.real_dtype(acc)) / correction.astype(tu.real_dtype(acc))
  return g.astype(acc) / (jnp.sqrt(v) + eps)
