"""Save and restore a training run (params, every optimizer state, batch stats) with orbax.

Every piece of sam_optax state is a pytree of arrays (int32 counters, float32
EMAs, raw uint32 PRNG key data, stored directions), so a restored run continues
bitwise-identically. :func:`restore` checks the checkpoint against the
structure it is restored into and names the leaves that differ.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable
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


_STEP_DIR = re.compile(r"^step_(\d+)$")


def _steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(directory)) if m)


def save_latest(directory: str | os.PathLike, step: int, tree: PyTree, *, keep: int = 3) -> str:
  """Atomically writes ``tree`` as ``directory/step_<step>`` and keeps the newest ``keep``.

  The checkpoint is written into a temporary folder and renamed into place only
  once orbax has finished, so a process killed in the middle of a write leaves
  no folder that :func:`restore_latest` would take for a checkpoint (the
  leftover temporary folder is removed by the next save).

  Args:
    directory: the run's checkpoint folder (created if missing).
    step: a non-negative int (an epoch or step number) naming this checkpoint.
    tree: the pytree to save (params, optimizer state, counters, histories).
    keep: how many of the newest checkpoints to keep (>= 1).

  Returns:
    The path of the written checkpoint.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from sam_optax import checkpoint
    >>> d = tempfile.mkdtemp()
    >>> for epoch in range(5):
    ...   _ = checkpoint.save_latest(d, epoch, {"w": jnp.full(3, epoch)}, keep=3)
    >>> sorted(os.listdir(d))
    ['step_2', 'step_3', 'step_4']
  """
  if int(keep) < 1:
    raise ValueError(f"`save_latest(keep=...)` must be >= 1, got {keep!r}.")
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):  # leftovers of a write that was killed
    if name.startswith(".tmp-step_"):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  final = os.path.join(directory, f"step_{int(step)}")
  tmp = os.path.join(directory, f".tmp-step_{int(step)}")
  save(tmp, tree)
  _crash_hook(step)
  if os.path.exists(final):
    shutil.rmtree(final)
  os.rename(tmp, final)
  for old in _steps(directory)[:-keep]:
    shutil.rmtree(os.path.join(directory, f"step_{old}"), ignore_errors=True)
  return final


def _crash_hook(step: int) -> None:
  """For the kill-and-resume test: SIGKILL this process after the data of checkpoint
  ``step`` is written but before it is committed (``SAM_OPTAX_CRASH_IN_SAVE=<step>``)."""
  if os.environ.get("SAM_OPTAX_CRASH_IN_SAVE") == str(int(step)):
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def restore_latest(directory: str | os.PathLike, like: PyTree, *,
                   log: Callable[[str], Any] | None = None) -> tuple[int, PyTree] | None:
  """The newest checkpoint in ``directory`` that restores, as ``(step, tree)``; None if none.

  A checkpoint that fails to restore (truncated or corrupted files, a missing
  file, a structure that does not match ``like``) is reported by name through
  ``log`` (default: standard error) and the previous one is tried; nothing is
  silently restarted from scratch: if checkpoints exist and none restores, it
  raises.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from sam_optax import checkpoint
    >>> d = tempfile.mkdtemp()
    >>> _ = checkpoint.save_latest(d, 7, {"w": jnp.ones(2)})
    >>> step, tree = checkpoint.restore_latest(d, {"w": jnp.zeros(2)})
    >>> step, tree["w"].tolist()
    (7, [1.0, 1.0])
  """
  directory = os.path.abspath(directory)
  log = log or (lambda msg: print(msg, file=sys.stderr))
  steps = _steps(directory)
  errors = []
  for step in reversed(steps):
    path = os.path.join(directory, f"step_{step}")
    try:
      return step, restore(path, like)
    except Exception as e:  # orbax raises many types for damaged files
      errors.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      log(f"checkpoint {path} could not be restored ({type(e).__name__}); "
          "falling back to the previous one")
  if steps:
    raise RuntimeError("no checkpoint in {} could be restored: {}".format(directory,
                                                                         "; ".join(errors)))
  return None


def digest(tree: PyTree) -> str:
  """SHA-256 of a pytree's leaf paths, dtypes, shapes and bytes: equal digests mean
  bitwise-equal trees.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import checkpoint
    >>> checkpoint.digest({"w": jnp.ones(2)}) == checkpoint.digest({"w": jnp.ones(2)})
    True
    >>> checkpoint.digest({"w": jnp.ones(2)}) == checkpoint.digest({"w": jnp.ones(2) + 1e-7})
    False
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()
