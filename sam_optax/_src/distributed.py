"""Helpers for per-device (m-sharpness) SAM under shard_map, pmap and vmap."""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any


def local_params(params: PyTree, axis_name: str | tuple[str, ...]) -> PyTree:
  """Marks replicated params as device-varying inside ``jax.shard_map``.

  With ``shard_map``'s default ``check_vma=True``, the gradient with respect to
  replicated (invariant) params is summed over the axis automatically, so each
  device would see the *global* gradient and per-device perturbation
  (m-sharpness) would silently become global SAM. Differentiating with respect
  to ``local_params(params, axis)`` keeps each device's gradient local. A no-op
  under ``check_vma=False`` and ``pmap``, where gradients are local already.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> n = len(jax.devices())
    >>> mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)
    >>> def local_grad(w, x):  # each device: the gradient on its own shard only
    ...   return jax.grad(loss)(sam_optax.local_params(w, "data"), x)[None]
    >>> f = jax.jit(jax.shard_map(local_grad, mesh=mesh, in_specs=(P(), P("data")),
    ...                           out_specs=P("data")))
    >>> w, x = jnp.ones(3), jnp.arange(6.0 * n).reshape(-1, 3)
    >>> by_hand = jnp.stack([jax.grad(loss)(w, s) for s in x.reshape(n, -1, 3)])
    >>> out = f(jax.device_put(w, NamedSharding(mesh, P())),
    ...         jax.device_put(x, NamedSharding(mesh, P("data"))))
    >>> bool(jnp.allclose(out, by_hand))
    True
  """
  def cast(x):
    try:
      varying = jax.typeof(x).mat.varying
    except AttributeError:
      return x
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    missing = tuple(n for n in names if n not in varying)
    if not missing or not _vma_checked(names[0]):
      return x
    return jax.lax.pcast(x, missing, to="varying")
  return jax.tree.map(cast, params)


def _vma_checked(axis_name: str) -> bool:
  """True inside shard_map with check_vma=True (axis_index is then device-varying)."""
  try:
    return axis_name in jax.typeof(jax.lax.axis_index(axis_name)).mat.varying
  except (AttributeError, NameError, ValueError, TypeError):
    return False


def check_axis_name(axis_name: Any, fn: str) -> None:
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`{fn}(axis_name=...)` must be None, a mesh/pmap axis name or a "
                    f"tuple of names, got {axis_name!r}.")


def check_local_gradient(updates: PyTree, axis_name: Any, fn: str) -> None:
  """Raises when, under check_vma=True, the gradient is already reduced over the axis."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  try:
    if not _vma_checked(names[0]):
      return
    leaves = jax.tree.leaves(updates)
    if leaves and all(names[0] not in jax.typeof(x).mat.varying for x in leaves):
      raise ValueError(
          f"`{fn}(axis_name={axis_name!r})`: the gradient passed as `updates` is the same on "
          "every device (shard_map with check_vma=True sums the gradient of replicated params "
          "across the axis), so each device would perturb with the global gradient and "
          "m-sharpness would silently disappear. Differentiate with respect to "
          "`sam_optax.local_params(params, axis_name)`, or use shard_map(..., check_vma=False).")
  except AttributeError:
    return
