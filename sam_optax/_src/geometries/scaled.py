"""Geometries that rescale or restrict another: ASAM's adaptive ball, masks (SAM-ON, kernels
only)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.geometries import base as geo_base
from sam_optax._src.geometries.base import Perturbation, make_perturbation, project, select_leaves
from sam_optax._src.geometries.basic import l2

PyTree = Any


# --------------------------------------------------------------------- adaptive


class AdaptiveState(NamedTuple):
  """State of :func:`adaptive`: the state of its base geometry.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.adaptive(base=sam_optax.friendly()).init(jnp.ones(2))
    >>> type(state.base).__name__   # the base geometry's own state, nested
    'FriendlyState'
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
  eta = geo_base.check_nonneg("eta", eta, "adaptive", "the paper uses eta=0.01.")
  inner = l2() if base is None else base
  inner_update = optax.with_extra_args_support(inner).update

  def scale_of(params):
    flags = [True] * len(jax.tree.leaves(params)) if where is None else select_leaves(
        where, params)
    leaves, treedef = jax.tree.flatten(params)
    scale = lambda w: (jnp.abs(w) + eta).astype(tu.real_dtype(w.dtype))
    return treedef.unflatten([scale(w) if f else jnp.ones_like(w)
                              for w, f in zip(leaves, flags, strict=False)])

  def init(params):
    return AdaptiveState(inner.init(params))

  def update(updates, state, params=None, **extra_args):
    geo_base.need_params(params, "adaptive")
    t = scale_of(params)
    scaled = jax.tree.map(lambda g, s: g * s.astype(g.dtype), updates, t)
    d, base_state = inner_update(scaled, state.base, params, **extra_args)
    return jax.tree.map(lambda x, s: x * s.astype(x.dtype), d, t), AdaptiveState(base_state)

  def project_adaptive(delta, radius, params, state):
    t = scale_of(params)
    base_state = state.base if isinstance(state, AdaptiveState) else optax.EmptyState()
    inside = project(inner, base_state, jax.tree.map(lambda x, s: x / s.astype(x.dtype), delta, t),
                     radius, params)
    return jax.tree.map(lambda x, s: x * s.astype(x.dtype), inside, t)

  return make_perturbation(init, update, project_adaptive, project_with_state=True)


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

  def split(tree, flags):
    leaves = jax.tree.leaves(tree)
    return [x for x, f in zip(leaves, flags, strict=False) if f]

  def merge(selected, like, flags):
    leaves, treedef = jax.tree.flatten(like)
    it = iter(selected)
    return treedef.unflatten([next(it) if f else jnp.zeros_like(x)
                              for x, f in zip(leaves, flags, strict=False)])

  def init(params):
    flags = select_leaves(mask, params)
    return MaskedState(perturbation.init(split(params, flags)))

  def update(updates, state, params=None, **extra_args):
    flags = select_leaves(mask, params if params is not None else updates)
    sub_params = None if params is None else split(params, flags)
    d, inner_state = inner_update(split(updates, flags), state.inner, sub_params, **extra_args)
    return merge(d, updates, flags), MaskedState(inner_state)

  def project_masked(delta, radius, params, state):
    flags = select_leaves(mask, params if params is not None else delta)
    sub_params = None if params is None else split(params, flags)
    inner_state = state.inner if isinstance(state, MaskedState) else optax.EmptyState()
    return merge(project(perturbation, inner_state, split(delta, flags), radius, sub_params),
                 delta, flags)

  return make_perturbation(init, update, project_masked, project_with_state=True)


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
    >>> params = {"embed": {"embedding": jnp.ones((5, 2))}, "ln": {"scale": jnp.ones(2)}}
    >>> sam_optax.kernel_mask(params)
    {'embed': {'embedding': True}, 'ln': {'scale': False}}
    >>> sam_optax.kernel_mask([jnp.ones((2, 3)), jnp.zeros(3)])   # no names: rank >= 2 is a weight
    [True, False]
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
