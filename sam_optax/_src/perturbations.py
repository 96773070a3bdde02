"""Perturbation directions: small transformations that map the clean gradient to d.

A perturbation is an :class:`optax.GradientTransformationExtraArgs` whose
``update(g, state, params, **extra_args)`` returns the direction ``d`` (a pytree
shaped like ``params``) and its new state. :func:`sam_optax.sharpness_aware`
then evaluates the gradient at ``w + rho * d``. Perturbations built here also
carry ``project(delta, radius, params)``, the projection onto their ball of the
given radius, which multi-step ascent uses; a user-written perturbation without
one is projected onto the L2 ball.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.validation import check_int, check_real

PyTree = Any
Projection = Callable[[PyTree, jax.Array, PyTree], PyTree]


class Perturbation(optax.GradientTransformationExtraArgs):
  """A perturbation transformation (``init``/``update``) plus its ball's projection.

  It is an ordinary :class:`optax.GradientTransformationExtraArgs`; the extra
  attribute ``project(delta, radius, params)`` maps ``delta`` onto the ball of
  ``radius`` in the perturbation's own geometry.

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.l2()
    >>> isinstance(p, sam_optax.Perturbation)
    True
    >>> print(np.asarray(p.project(jnp.array([3.0, 4.0]), 1.0, None)))  # onto the unit ball
    [0.6 0.8]
  """

  project: Projection


def make_perturbation(init: Callable, update: Callable, project: Projection | None = None
                      ) -> Perturbation:
  """Builds a :class:`Perturbation` from its pure functions.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, sam_optax
    >>> def init(params):
    ...   return optax.EmptyState()
    >>> def update(g, state, params=None, **extra_args):  # d = g / max|g|
    ...   return jax.tree.map(lambda x: x / jnp.max(jnp.abs(x)), g), state
    >>> tx = sam_optax.sharpness_aware(0.1, perturbation=sam_optax.make_perturbation(init, update))
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 3))
    >>> w = jnp.array([1.0, 2.0])   # g = 3 w^2 = [3, 12], d = [0.25, 1]
    >>> out, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> print(np.round(np.asarray(out), 4))   # 3 (w + 0.1 d)^2
    [ 3.1519 13.23  ]
  """
  p = Perturbation(init, update)
  p.project = project if project is not None else project_l2
  return p


def projection_of(perturbation: optax.GradientTransformation) -> Projection:
  """The projection a perturbation declares, or the L2 ball's."""
  return getattr(perturbation, "project", project_l2)


def project_l2(delta: PyTree, radius: jax.Array, params: PyTree) -> PyTree:
  """Radial projection onto the L2 ball {||delta|| <= radius}."""
  del params
  n = tu.norm(delta)
  return tu.scale(delta, jnp.minimum(1.0, radius * tu.safe_inverse(n, 0.0)))


def _check_nonneg(name: str, value: float, fn: str, hint: str) -> Any:
  return check_real(name, value, fn, low=0.0, hint=hint.rstrip("."))


def _check_unit(name: str, value: float, fn: str, *, open_left: bool = True) -> Any:
  return check_real(name, value, fn, low=0.0, high=1.0, low_open=open_left)


def _check_decay(name: str, value: float, fn: str) -> Any:
  return check_real(name, value, fn, low=0.0, high=1.0, high_open=True)


def _need_params(params: PyTree, fn: str) -> None:
  if params is None:
    raise ValueError(f"`{fn}()` needs the current parameters: call "
                     f"`update(updates, state, params, ...)` with `params`.")


def _stateless_init(params: PyTree) -> optax.EmptyState:
  del params
  return optax.EmptyState()


# --------------------------------------------------------------------------- l2


def l2(eps: float = 1e-12) -> Perturbation:
  r"""The SAM direction: the gradient normalized by its global L2 norm.

  .. math:: d = g / \|g\|_2 ,\qquad \epsilon = \rho\, d

  The norm runs over every leaf of the pytree (accumulated in float32); a
  gradient whose norm is at most ``eps`` gives ``d = 0``.

  Args:
    eps: norms at or below this count as zero.

  Returns:
    A :class:`Perturbation`.

  Example:
    >>> import sam_optax
    >>> tx = sam_optax.sharpness_aware(0.05, perturbation=sam_optax.l2())

  References:
    Foret, Kleiner, Mobahi, Neyshabur, `Sharpness-Aware Minimization for
    Efficiently Improving Generalization <https://arxiv.org/abs/2010.01412>`_,
    ICLR 2021.
  """
  eps = _check_nonneg("eps", eps, "l2", "use a small positive value such as 1e-12.")

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return tu.normalize(updates, eps), state

  return make_perturbation(_stateless_init, update, project_l2)


def unnormalized() -> Perturbation:
  r"""USAM: the raw gradient as direction, :math:`\epsilon = \rho\, g`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, sam_optax
    >>> tx = sam_optax.sharpness_aware(0.1, perturbation=sam_optax.unnormalized())
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 3))
    >>> w = jnp.array([1.0, 2.0])   # g = 3 w^2 = [3, 12]
    >>> out, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> print(np.round(np.asarray(out), 4))   # 3 (w + 0.1 g)^2
    [ 5.07 30.72]

  References:
    Andriushchenko, Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022.
  """
  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return updates, state

  return make_perturbation(_stateless_init, update, project_l2)


def _project_linf(delta, radius, params):
  del params
  return jax.tree.map(lambda x: jnp.clip(x, -radius, radius).astype(x.dtype), delta)


def linf() -> Perturbation:
  r"""The :math:`\ell_\infty` ball: :math:`d = \mathrm{sign}(g)`.

  Compose with :func:`adaptive` for the adaptive box
  :math:`\epsilon = \rho\, T \odot \mathrm{sign}(g)`:
  ``adaptive(eta, base=linf())``.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax, sam_optax
    >>> d, _ = sam_optax.linf().update(jnp.array([0.3, -2.0, 0.0]), optax.EmptyState())
    >>> print(np.asarray(d))
    [ 1. -1.  0.]

  References:
    Mueller, Vlaar, Rolnick, Hein, `Normalization Layers Are All That
    Sharpness-Aware Minimization Needs <https://arxiv.org/abs/2306.04226>`_,
    NeurIPS 2023 (the :math:`\ell_\infty` option of its SAM variants).
  """
  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.tree.map(jnp.sign, updates), state

  return make_perturbation(_stateless_init, update, _project_linf)


# --------------------------------------------------------------------- adaptive


class AdaptiveState(NamedTuple):
  """State of :func:`adaptive`: the state of its base geometry.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.adaptive().init(jnp.ones(2))
    >>> isinstance(state, sam_optax.AdaptiveState)
    True
  """
  base: optax.OptState


def adaptive(eta: float = 0.01, *, base: optax.GradientTransformation | None = None,
             where: PyTree | Callable[[PyTree], PyTree] | None = None) -> Perturbation:
  r"""ASAM: a scale-invariant ball, the base geometry in coordinates ``w / T``.

  With :math:`T = |w| + \eta` (elementwise), the base perturbation is applied
  to :math:`T \odot g` and its direction is mapped back by :math:`T`:

  .. math:: d = T \odot \mathrm{base}(T \odot g)

  With the default L2 base this is :math:`d = T^2 \odot g / \|T \odot g\|`;
  with ``base=linf()`` it is :math:`d = T \odot \mathrm{sign}(g)`. The official
  ASAM code rescales only weight tensors and gives biases T = 1, normalizing
  all leaves jointly: ``adaptive(eta, where=kernel_mask)`` (what
  ``sam_optax.asam(..., kernels_only=True)`` uses).

  Args:
    eta: the offset :math:`\eta \ge 0` keeping the scale of zero weights positive.
    base: the geometry applied in scaled coordinates (default :func:`l2`).
    where: optional mask (pytree of bools or callable of params) of the leaves
      that get :math:`T = |w| + \eta`; the others get :math:`T = 1`.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> w, g = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0])
    >>> p = sam_optax.adaptive(eta=0.01)
    >>> d, _ = p.update(g, p.init(w), w)
    >>> t = jnp.abs(w) + 0.01
    >>> bool(jnp.allclose(d, t ** 2 * g / jnp.linalg.norm(t * g)))
    True

  References:
    Kwon, Kim, Park, Choi, `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  eta = _check_nonneg("eta", eta, "adaptive", "the paper uses eta=0.01.")
  inner = l2() if base is None else base
  inner_update = optax.with_extra_args_support(inner).update
  inner_project = projection_of(inner)

  def scale_of(params):
    flags = [True] * len(jax.tree.leaves(params)) if where is None else _select_leaves(
        where, params)
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([(jnp.abs(w) + eta).astype(tu.real_dtype(w.dtype)) if f else jnp.ones_like(w)
                              for w, f in zip(leaves, flags, strict=False)])

  def init(params):
    return AdaptiveState(inner.init(params))

  def update(updates, state, params=None, **extra_args):
    _need_params(params, "adaptive")
    t = scale_of(params)
    scaled = jax.tree.map(lambda g, s: g * s.astype(g.dtype), updates, t)
    d, base_state = inner_update(scaled, state.base, params, **extra_args)
    return jax.tree.map(lambda x, s: x * s.astype(x.dtype), d, t), AdaptiveState(base_state)

  def project(delta, radius, params):
    t = scale_of(params)
    inside = inner_project(jax.tree.map(lambda x, s: x / s.astype(x.dtype), delta, t),
                           radius, params)
    return jax.tree.map(lambda x, s: x * s.astype(x.dtype), inside, t)

  return make_perturbation(init, update, project)


# ------------------------------------------------------------------------ masked


class MaskedState(NamedTuple):
  """State of :func:`masked`: the inner perturbation's state over selected leaves.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> p = sam_optax.masked(sam_optax.l2(), {"kernel": False, "bias": True})
    >>> state = p.init({"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)})
    >>> isinstance(state, sam_optax.MaskedState)
    True
  """
  inner: optax.OptState


def _select_leaves(mask, params):
  """Flat list of booleans, one per leaf of params (mask may be a prefix tree)."""
  m = mask(params) if callable(mask) else mask
  treedef = jax.tree.structure(params)
  try:
    flags = treedef.flatten_up_to(m)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "`masked(mask=...)` must be a pytree of bools with the structure of the "
        "parameters (or a prefix of it), or a callable returning one; "
        f"got a mask that does not match: {e}") from None
  out = []
  for f in flags:
    if isinstance(f, (bool, jnp.bool_)) or (hasattr(f, "dtype") and f.shape == ()):
      out.append(bool(f))
    else:
      raise TypeError(f"`masked(mask=...)` leaves must be Python bools, got {f!r}.")
  return out


def masked(perturbation: optax.GradientTransformation,
           mask: PyTree | Callable[[PyTree], PyTree]) -> Perturbation:
  r"""Restricts a perturbation to the leaves where ``mask`` is True.

  The inner perturbation sees only the selected leaves (so its norm runs over
  them alone); every other leaf gets :math:`d = 0` and is not perturbed.
  ``mask`` is a pytree of bools shaped like the parameters (or a prefix), or a
  callable of the parameters returning one, as in :func:`optax.masked`.

  Uses: SAM-ON (``masked(l2(), sam_optax.normalization_mask)``), ASAM on
  kernels only (``masked(adaptive(), sam_optax.kernel_mask)``).

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> grads = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.array([3.0, 4.0])}
    >>> p = sam_optax.masked(sam_optax.l2(), {"kernel": False, "bias": True})
    >>> d, _ = p.update(grads, p.init(params), params)
    >>> print(np.asarray(d["bias"]), np.asarray(d["kernel"]).sum())  # norm over the bias only
    [0.6 0.8] 0.0

  References:
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware
    Minimization Needs <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023.
  """
  inner_update = optax.with_extra_args_support(perturbation).update
  inner_project = projection_of(perturbation)

  def split(tree, flags):
    leaves = jax.tree.leaves(tree)
    return [x for x, f in zip(leaves, flags, strict=False) if f]

  def merge(selected, like, flags):
    leaves, treedef = jax.tree.flatten(like)
    it = iter(selected)
    return treedef.unflatten([next(it) if f else jnp.zeros_like(x)
                              for x, f in zip(leaves, flags, strict=False)])

  def init(params):
    flags = _select_leaves(mask, params)
    return MaskedState(perturbation.init(split(params, flags)))

  def update(updates, state, params=None, **extra_args):
    flags = _select_leaves(mask, params if params is not None else updates)
    sub_params = None if params is None else split(params, flags)
    d, inner_state = inner_update(split(updates, flags), state.inner, sub_params, **extra_args)
    return merge(d, updates, flags), MaskedState(inner_state)

  def project(delta, radius, params):
    flags = _select_leaves(mask, params if params is not None else delta)
    sub_params = None if params is None else split(params, flags)
    return merge(inner_project(split(delta, flags), radius, sub_params), delta, flags)

  return make_perturbation(init, update, project)


_NORM_MODULE = re.compile(r"(norm|^bn|_bn|bn\d|^ln|_ln|ln\d|^gn|_gn)", re.IGNORECASE)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_paths(params):
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [tuple(_key_name(k) for k in path) for path, _ in flat], treedef


def normalization_mask(params: PyTree) -> PyTree:
  """A pytree of bools selecting normalization-layer scales and biases.

  A leaf is selected when its name is ``scale`` or ``bias`` and it belongs to a
  normalization layer: a module whose name says so (Flax's ``BatchNorm_0``,
  ``LayerNorm_1``, ``GroupNorm_0``, ``RMSNorm_0``, or user names such as
  ``bn1``, ``ln_f``, ``norm``), or any module that owns a ``scale`` and no
  ``kernel``/``embedding`` (NNX attributes named freely). Works on linen
  ``params`` dicts and NNX ``State`` trees. Use it for SAM-ON:
  ``masked(l2(), normalization_mask)``.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
    ...           "BatchNorm_0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
    >>> sam_optax.normalization_mask(params)
    {'BatchNorm_0': {'bias': True, 'scale': True}, 'Dense_0': {'bias': False, 'kernel': False}}

  References:
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware
    Minimization Needs <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023.
  """
  paths, treedef = _leaf_paths(params)
  # Drop NNX's trailing 'value'/'raw_value' keys so the layer name is the parent.
  names = [p[:-1] if p and p[-1] in ("value", "raw_value") else p for p in paths]
  owners: dict[tuple, set] = {}
  for p in names:
    if p:
      owners.setdefault(p[:-1], set()).add(p[-1])
  flags = []
  for p in names:
    if not p or p[-1] not in ("scale", "bias"):
      flags.append(False)
      continue
    module, siblings = p[:-1], owners.get(p[:-1], set())
    named_norm = bool(module) and bool(_NORM_MODULE.search(module[-1]))
    owns_scale = "scale" in siblings and not ({"kernel", "embedding"} & siblings)
    flags.append(named_norm or owns_scale)
  return treedef.unflatten(flags)


def kernel_mask(params: PyTree) -> PyTree:
  """A pytree of bools selecting weight tensors (leaves named ``kernel``/``embedding``,
  or any leaf of rank >= 2 when names are absent): ASAM's kernels-only setting.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
    ...           "BatchNorm_0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
    >>> sam_optax.kernel_mask(params)
    {'BatchNorm_0': {'bias': False, 'scale': False}, 'Dense_0': {'bias': False, 'kernel': True}}
  """
  paths, treedef = _leaf_paths(params)
  leaves = jax.tree.leaves(params)
  flags = []
  for p, x in zip(paths, leaves, strict=False):
    names = [n for n in p if n not in ("value", "raw_value")]
    if names and names[-1] in ("kernel", "embedding", "weight", "w"):
      flags.append(True)
    else:
      flags.append(jnp.ndim(x) >= 2)
  return treedef.unflatten(flags)


# ------------------------------------------------------------------------ fisher


def fisher(eta: float = 1.0, eps: float = 1e-12) -> Perturbation:
  r"""Fisher-SAM: the ball of the diagonal Fisher metric :math:`F = 1 + \eta g^2`.

  .. math:: f = g / (1 + \eta g^2),\qquad d = f / \sqrt{g \cdot f}

  so that :math:`d^\top F d = 1`. Multi-step ascent projects onto the L2 ball
  (the metric changes with every gradient).

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> g = jnp.array([1.0, 2.0])
    >>> d, _ = sam_optax.fisher(eta=1.0).update(g, optax.EmptyState())
    >>> f = g / (1 + g ** 2)
    >>> bool(jnp.allclose(d, f / jnp.sqrt(g @ f)))
    True

  References:
    Kim, Li, Hu, Hospedales, `Fisher SAM: Information Geometry and Sharpness
    Aware Minimisation <https://arxiv.org/abs/2206.04920>`_, ICML 2022.
  """
  eta = _check_nonneg("eta", eta, "fisher", "the paper uses eta=1.0.")

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    f = jax.tree.map(lambda g: (g / (1 + eta * tu.abs2(g))).astype(g.dtype), updates)
    s = tu.safe_inverse(jnp.sqrt(jnp.maximum(tu.vdot(updates, f), 0.0)), eps)
    return tu.scale(f, s), state

  return make_perturbation(_stateless_init, update, project_l2)


# ---------------------------------------------------------------- friendly (F-SAM)


class FriendlyState(NamedTuple):
  """State of :func:`friendly`: the EMA ``m`` of past gradients and a step count.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.friendly().init(jnp.zeros(2))
    >>> isinstance(state, sam_optax.FriendlyState), int(state.count)
    (True, 0)
  """
  count: jax.Array
  momentum: PyTree


def friendly(sigma: float = 1.0, decay: float = 0.9, eps: float = 1e-12) -> Perturbation:
  r"""F-SAM: remove the full-gradient component estimated by an EMA.

  .. math::
     d_t = \frac{g_t - \sigma m_{t-1}}{\|g_t - \sigma m_{t-1}\|},\qquad
     m_t = \lambda m_{t-1} + (1-\lambda) g_t,\qquad m_0 = g_0

  The first step has no history and perturbs along :math:`g_0` (plain SAM).

  Args:
    sigma: weight :math:`\sigma` of the removed EMA.
    decay: EMA decay :math:`\lambda` in [0, 1).

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.friendly(sigma=1.0, decay=0.9)
    >>> state = p.init(jnp.zeros(2))
    >>> d0, state = p.update(jnp.array([1.0, 0.0]), state)  # first step: m = g_0, d = g_0/|g_0|
    >>> d1, state = p.update(jnp.array([1.0, 1.0]), state)  # d = (g_1 - m)/|g_1 - m|
    >>> print(np.asarray(d0), np.asarray(d1))
    [1. 0.] [0. 1.]

  References:
    Li, Zhou, Cheng, Pan, Yang, `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
  """
  sigma = _check_nonneg("sigma", sigma, "friendly", "the paper uses sigma=1.0.")
  decay = _check_decay("decay", decay, "friendly")

  def init(params):
    return FriendlyState(jnp.zeros([], jnp.int32), tu.zeros_like(params))

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    first = state.count == 0
    d = jax.tree.map(lambda g, m: g - jnp.where(first, 0.0, sigma) * m.astype(g.dtype),
                     updates, state.momentum)
    new_m = jax.tree.map(
        lambda g, m: jnp.where(first, g.astype(m.dtype), decay * m + (1 - decay) * g
                               ).astype(m.dtype), updates, state.momentum)
    return tu.normalize(d, eps), FriendlyState(optax.safe_increment(state.count), new_m)

  return make_perturbation(init, update, project_l2)


# ----------------------------------------------------------------- VaSSO


class VarianceSuppressedState(NamedTuple):
  """State of :func:`variance_suppressed`: the smoothed direction ``d`` and a count.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.variance_suppressed().init(jnp.zeros(2))
    >>> isinstance(state, sam_optax.VarianceSuppressedState), int(state.count)
    (True, 0)
  """
  count: jax.Array
  direction: PyTree


def variance_suppressed(theta: float = 0.9, eps: float = 1e-12) -> Perturbation:
  r"""VaSSO: perturb along an exponential average of gradients.

  .. math:: d_t = (1-\theta) d_{t-1} + \theta g_t,\quad d_0 = g_0,\qquad
            \epsilon = \rho\, d_t / \|d_t\|

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.variance_suppressed(theta=0.5)
    >>> state = p.init(jnp.zeros(2))
    >>> _, state = p.update(jnp.array([2.0, 0.0]), state)  # d_0 = g_0
    >>> d, state = p.update(jnp.array([0.0, 2.0]), state)  # d_1 = 0.5 d_0 + 0.5 g_1 = [1, 1]
    >>> print(np.round(np.asarray(d), 4))
    [0.7071 0.7071]

  References:
    Li, Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
  """
  theta = _check_unit("theta", theta, "variance_suppressed")

  def init(params):
    return VarianceSuppressedState(jnp.zeros([], jnp.int32), tu.zeros_like(params))

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    first = state.count == 0
    new_d = jax.tree.map(
        lambda g, d: jnp.where(first, g.astype(d.dtype),
                               (1 - theta) * d + theta * g).astype(d.dtype),
        updates, state.direction)
    return (tu.normalize(new_d, eps),
            VarianceSuppressedState(optax.safe_increment(state.count), new_d))

  return make_perturbation(init, update, project_l2)


# ---------------------------------------------------------------- ESAM SWP


class StochasticState(NamedTuple):
  """State of :func:`stochastic`: the PRNG key for the next tensor mask.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.stochastic(seed=0).init(jnp.zeros(2))
    >>> isinstance(state, sam_optax.StochasticState), state.key.dtype.name
    (True, 'uint32')
  """
  key: jax.Array


def stochastic(keep_prob: float = 0.5, seed: int = 0, eps: float = 1e-12) -> Perturbation:
  r"""ESAM's stochastic weight perturbation: perturb a random subset of tensors.

  Each tensor (leaf) is kept with probability :math:`\beta`; with the mask
  :math:`M`,

  .. math:: d = \frac{M \odot g}{\beta\, \|M \odot g\|}

  so :math:`\epsilon = (\rho/\beta)\, M\odot g/\|M\odot g\|`. The key lives in
  the state, so runs are reproducible and resume exactly.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> p = sam_optax.stochastic(keep_prob=0.5, seed=0)
    >>> g = {"a": jnp.ones(3), "b": jnp.ones(4), "c": jnp.ones(5)}
    >>> d, state = p.update(g, p.init(g))
    >>> kept = {k: bool(jnp.any(v != 0)) for k, v in d.items()}  # whole tensors kept or dropped
    >>> norm = float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in d.values())))
    >>> round(norm, 4) == (2.0 if any(kept.values()) else 0.0)  # |d| = 1 / keep_prob
    True

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh, Tan, `Efficient Sharpness-aware
    Minimization for Improved Training of Neural Networks
    <https://arxiv.org/abs/2110.03141>`_, ICLR 2022.
  """
  keep_prob = _check_unit("keep_prob", keep_prob, "stochastic")
  seed = check_int("seed", seed, "stochastic")

  def init(params):
    del params
    return StochasticState(jax.random.key_data(jax.random.key(seed)))

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    leaves, treedef = jax.tree.flatten(updates)
    keep = jax.random.bernoulli(sub, keep_prob, (len(leaves),))
    kept = treedef.unflatten([jnp.where(keep[i], g, jnp.zeros_like(g))
                              for i, g in enumerate(leaves)])
    d = tu.scale(kept, tu.safe_inverse(tu.norm(kept), eps) / keep_prob)
    return d, StochasticState(jax.random.key_data(key))

  def project(delta, radius, params):
    return project_l2(delta, radius / keep_prob, params)

  return make_perturbation(init, update, project)


# ---------------------------------------------------------------- SSAM


class SparseState(NamedTuple):
  """State of :func:`sparse`: step count, the running g² estimate and the mask.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.sparse().init(jnp.zeros(4))
    >>> isinstance(state, sam_optax.SparseState), state.mask.dtype.name
    (True, 'bool')
  """
  count: jax.Array
  fisher: PyTree
  mask: PyTree


def sparse(sparsity: float = 0.5, refresh_every: int = 100, decay: float = 0.9,
           eps: float = 1e-12) -> Perturbation:
  r"""SSAM-style sparse perturbation from a running Fisher estimate.

  A running estimate :math:`\hat F \leftarrow \beta \hat F + (1-\beta) g^2` of
  the diagonal empirical Fisher is kept; every ``refresh_every`` steps (and at
  step 0, from :math:`g_0^2`) the binary mask :math:`M` is reset to keep the
  :math:`\lceil (1-s) N \rceil` entries with the largest :math:`\hat F`
  (globally, over the whole pytree). Then

  .. math:: d = \frac{M \odot g}{\|M \odot g\|}

  Relation to SSAM-F (Mi et al.): the paper scores entries by the squared
  gradients of a sampled subset of the data and recomputes the mask every
  :math:`T_m` iterations; here the score is an EMA of the training
  mini-batches' own :math:`g^2`, so no extra passes are spent, and the refresh
  runs inside the jitted step.

  Args:
    sparsity: fraction :math:`s \in [0, 1)` of entries left unperturbed.
    refresh_every: steps between mask refreshes.
    decay: EMA decay of the Fisher estimate.

  Example:
    >>> import jax.numpy as jnp, numpy as np, sam_optax
    >>> p = sam_optax.sparse(sparsity=0.5, refresh_every=10)
    >>> g = jnp.array([4.0, -1.0, 3.0, 0.5])
    >>> d, state = p.update(g, p.init(g))  # keeps the half of the entries with the largest g^2
    >>> print(np.asarray(state.mask), np.round(np.asarray(d), 4))
    [ True False  True False] [0.8 0.  0.6 0. ]

  References:
    Mi, Shen, Ren, Zhou, Sun, Ji, Tao, `Make Sharpness-Aware Minimization
    Stronger: A Sparsified Perturbation Approach
    <https://arxiv.org/abs/2210.05177>`_, NeurIPS 2022.
  """
  sparsity = _check_decay("sparsity", sparsity, "sparse")
  refresh_every = check_int("refresh_every", refresh_every, "sparse", minimum=1)
  decay = _check_decay("decay", decay, "sparse")

  def init(params):
    return SparseState(jnp.zeros([], jnp.int32),
                       jax.tree.map(lambda w: jnp.zeros_like(w, jnp.float32), params),
                       jax.tree.map(lambda w: jnp.ones_like(w, jnp.bool_), params))

  def top_mask(score):
    # The k-th largest score by bisection on the float32 bit patterns (monotone for
    # scores >= 0): 32 passes of counts, each a sum per leaf. No flattening, sort or
    # gather, so it runs on params sharded over an Explicit or Auto mesh alike, and
    # k may be traced (an injected `sparsity`). Ties at the threshold are all kept.
    leaves = jax.tree.leaves(score)
    n = sum(x.size for x in leaves)
    k = jnp.maximum(1, jnp.ceil((1.0 - jnp.asarray(sparsity, jnp.float32)) * n)).astype(jnp.int32)
    bits = [jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) for x in leaves]

    def count_at_least(t):
      return sum((jnp.sum(b >= t, dtype=jnp.int32) for b in bits), jnp.zeros([], jnp.int32))

    def halve(_, bounds):
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      ok = count_at_least(mid) >= k
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    # invariant: count(>= lo) >= k > count(>= hi); +inf's bits + 1 bounds every finite score
    lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros([], jnp.int32),
                                             jnp.asarray(0x7F800001, jnp.int32)))
    return jax.tree.unflatten(jax.tree.structure(score), [b >= lo for b in bits])

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    first = state.count == 0
    sq = jax.tree.map(lambda g: tu.abs2(g, jnp.float32), updates)
    fisher_est = jax.tree.map(lambda f, s: jnp.where(first, s, decay * f + (1 - decay) * s),
                              state.fisher, sq)
    refresh = (state.count % refresh_every) == 0
    mask = jax.lax.cond(refresh, top_mask, lambda _: state.mask, fisher_est)
    kept = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), updates, mask)
    return (tu.normalize(kept, eps),
            SparseState(optax.safe_increment(state.count), fisher_est, mask))

  return make_perturbation(init, update, project_l2)


# ---------------------------------------------------------------- RWP


class RandomWeightState(NamedTuple):
  """State of :func:`random_weight`: the PRNG key for the next draw.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.random_weight(seed=0).init(jnp.zeros(2))
    >>> isinstance(state, sam_optax.RandomWeightState)
    True
  """
  key: jax.Array


def random_weight(sigma: float = 0.015, seed: int = 0) -> Perturbation:
  r"""Random weight perturbation: filter-wise Gaussian noise, independent of g.

  For a leaf of rank >= 2 (a Flax kernel, output filters on the last axis) the
  noise of filter :math:`i` has std :math:`\sigma \|W_i\|`; a leaf of rank
  <= 1 uses its whole norm. Use with ``rho=1.0`` for the paper's
  :math:`\epsilon_i \sim N(0, \sigma^2\|W_i\|^2)`; ``rho`` scales it otherwise.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> w = {"kernel": jnp.full((3, 1000), 2.0), "bias": jnp.ones(2)}
    >>> p = sam_optax.random_weight(sigma=0.015, seed=0)
    >>> eps, _ = p.update(w, p.init(w), w)  # ignores the gradient (here: w)
    >>> filter_norm = float(jnp.linalg.norm(w["kernel"][:, 0]))  # |W_i| = sqrt(3 * 2^2)
    >>> round(filter_norm, 4)
    3.4641
    >>> bool(abs(float(jnp.std(eps["kernel"])) / (0.015 * filter_norm) - 1) < 0.05)  # sigma |W_i|
    True

  References:
    Li, Tang, Wu, Yang, Huang, `Revisiting Random Weight Perturbation for
    Efficiently Improving Generalization <https://arxiv.org/abs/2404.00357>`_,
    TMLR 2024.
  """
  sigma = _check_nonneg("sigma", sigma, "random_weight", "the paper uses sigma=0.015.")
  seed = check_int("seed", seed, "random_weight")

  def init(params):
    del params
    return RandomWeightState(jax.random.key_data(jax.random.key(seed)))

  def filter_norm(w):
    sq = tu.abs2(w)
    if w.ndim >= 2:
      return jnp.sqrt(jnp.sum(sq, axis=tuple(range(w.ndim - 1)), keepdims=True))
    return jnp.sqrt(jnp.sum(sq))

  def noise_dtype(w):  # complex params get complex noise (both parts perturbed)
    return w.dtype if jnp.iscomplexobj(w) else jnp.promote_types(w.dtype, jnp.float32)

  def update(updates, state, params=None, **extra_args):
    del updates, extra_args
    _need_params(params, "random_weight")
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(sub, max(len(leaves), 1))
    noise = [(sigma * filter_norm(w) * jax.random.normal(keys[i], w.shape, noise_dtype(w))
              ).astype(w.dtype) for i, w in enumerate(leaves)]
    return treedef.unflatten(noise), RandomWeightState(jax.random.key_data(key))

  return make_perturbation(init, update, project_l2)
