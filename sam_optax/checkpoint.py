"""Save and restore a training run (params, every optimizer state, batch stats) with orbax.

Every piece of sam_optax state is a pytree of arrays (int32 counters, float32
EMAs, raw uint32 PRNG key data, stored directions), so a restored run continues
bitwise-identically. :func:`restore` checks the checkpoint against the
structure it is restored into and names the leaves that differ.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

PyTree = Any


def _checkpointer():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # pragma: no cover
    raise ImportError("sam_optax.checkpoint needs orbax-checkpoint: "
                      "pip install 'sam_optax[checkpoint]'") from e
  return ocp, ocp.StandardCheckpointer()


def save(path: str | os.PathLike, tree: PyTree) -> None:
  """Writes ``tree`` (e.g. ``{'params': ..., 'opt_state': ..., 'batch_stats': ...}``)
  to the folder ``path`` (absolute or relative; it must not exist yet).

  Example:
    >>> import os, tempfile, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import checkpoint
    >>> params = {"w": jnp.arange(3.0)}
    >>> opt = sam_optax.looksam(0.05, k=5)
    >>> path = os.path.join(tempfile.mkdtemp(), "step_100")
    >>> checkpoint.save(path, {"params": params, "opt_state": opt.init(params)})
    >>> os.path.isdir(path)
    True
  """
  _, ckptr = _checkpointer()
  ckptr.save(os.path.abspath(path), tree)
  ckptr.wait_until_finished()


def _key(k) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _signature(tree: PyTree) -> dict:
  """{'opt_state/0/count': (shape, dtype)}: orbax stores NamedTuples as dicts, so
  paths are compared by their names alone."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in p): (tuple(np.shape(x)), str(getattr(x, "dtype", "")))
          for p, x in flat}


def restore(path: str | os.PathLike, like: PyTree) -> PyTree:
  """Reads a checkpoint written by :func:`save` into the structure of ``like``.

  ``like`` is a freshly initialized tree of the same run (``opt.init(params)``
  and so on). Raises ``ValueError`` naming the leaves whose path, shape or
  dtype differ, e.g. when the checkpoint was written by another optimizer.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, sam_optax
    >>> from sam_optax import checkpoint
    >>> params = {"w": jnp.arange(3.0)}
    >>> opt = sam_optax.looksam(0.05, k=5)
    >>> path = os.path.join(tempfile.mkdtemp(), "run")
    >>> checkpoint.save(path, {"params": params, "opt_state": opt.init(params)})
    >>> like = {"params": {"w": jnp.zeros(3)}, "opt_state": opt.init(params)}
    >>> restored = checkpoint.restore(path, like)
    >>> restored["params"]["w"].tolist(), type(restored["opt_state"]).__name__
    ([0.0, 1.0, 2.0], 'LookSAMState')
    >>> other = sam_optax.sharpness_aware(0.05).init(params)   # another optimizer's state
    >>> checkpoint.restore(path, {"params": params, "opt_state": other})
    Traceback (most recent call last):
    ValueError: the checkpoint at ... does not match the state it is restored into ...
  """
  ocp, ckptr = _checkpointer()
  path = os.path.abspath(path)
  meta = ckptr.metadata(path)
  meta_tree = getattr(meta, "item_metadata", meta)
  meta_tree = getattr(meta_tree, "tree", meta_tree)
  saved = {k: v[0] for k, v in _signature(meta_tree).items()}
  target = _signature(like)
  missing = sorted(set(target) - set(saved))
  extra = sorted(set(saved) - set(target))
  shapes = sorted(k for k in set(saved) & set(target) if tuple(saved[k]) != target[k][0])
  if missing or extra or shapes:
    raise ValueError(
        "the checkpoint at {} does not match the state it is restored into (was it written "
        "by another optimizer or model?). Missing in the checkpoint: {}; not in the target: "
        "{}; shape differs: {}. Rebuild the optimizer exactly as in the saved run.".format(
            path, missing[:5] or "none", extra[:5] or "none", shapes[:5] or "none"))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return ckptr.restore(path, abstract)
