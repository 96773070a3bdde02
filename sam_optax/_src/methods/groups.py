r"""m-sharpness on one device: SAM's ascent per group of m examples (``group_size=m``).

The batch of the :class:`~sam_optax.Objective` is split along its leading axis into
:math:`G = B/m` groups. Group :math:`k` gets its own gradient :math:`g_k = \nabla L_k(w)`,
its own perturbation :math:`\epsilon_k = \rho\, d(g_k)` and its own gradient at the
perturbed point; the output is their mean,

.. math:: \frac1G \sum_{k=1}^{G} \nabla L_k(w + \rho\, d(g_k)),

which is what ``sharpness_aware(rho, axis_name=...)`` computes with one group per device
(Foret et al. 2021, Section 4; Andriushchenko & Flammarion 2022). The groups run as one
``vmap`` (memory: G gradients at once) or, with ``group_chunk=c``, as a ``lax.scan`` over
chunks of c groups that sums as it goes (memory: c gradients).

The clean gradient ``updates`` is not read (each group takes its own), so inside a jitted
step XLA drops the caller's clean backward pass: m-SAM costs SAM's two backward passes,
spread over the groups.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.closures import Objective
from sam_optax._src.protocol import Method, Points, Result, Step
from sam_optax._src.validation import check_static_int

PyTree = Any


def check_group_size(group_size: Any, group_chunk: Any, ascent_steps: int, fn: str
                     ) -> tuple[int | None, int | None]:
  """``group_size`` (None or an int >= 1) and ``group_chunk`` (None or an int >= 1, only
  with ``group_size``), as Python ints."""
  if group_size is None:
    if group_chunk is not None:
      raise ValueError(f"`{fn}(group_chunk=...)` sets how many groups of `group_size` run at "
                       "once; give `group_size=m` too, or drop `group_chunk`.")
    return None, None
  m = int(check_static_int("group_size", group_size, fn, minimum=1,
                           hint="the number of examples per group, e.g. 32"))
  c = None if group_chunk is None else int(check_static_int(
      "group_chunk", group_chunk, fn, minimum=1, hint="the number of groups per chunk"))
  if ascent_steps != 1:
    raise ValueError(f"`{fn}(group_size=..., ascent_steps={ascent_steps})`: m-sharpness takes "
                     "one ascent step per group; leave `ascent_steps` at 1.")
  return m, c


def split_batch(objective: Objective | None, m: int, fn: str) -> tuple[Any, int]:
  """The objective's batch (and clean outputs and losses) reshaped to ``(G, m, ...)``."""
  if objective is None or objective.batch is None:
    raise ValueError(
        f"`{fn}(group_size={m})` splits the batch into groups: pass "
        "`objective=sam_optax.Objective(apply_fn, loss_fn, batch)` with the batch (the Flax "
        "steps carry it with `make_linen_train_step(subset=True)` and `nnx_objective`).")
  leaves = jax.tree.leaves(objective.batch)
  sizes = {int(jnp.shape(x)[0]) for x in leaves if jnp.ndim(x)}
  scalars = ["None"] if any(not jnp.ndim(x) for x in leaves) else []
  if len(sizes) != 1 or scalars:
    raise ValueError(f"`{fn}(group_size={m})`: every leaf of the objective's batch needs the "
                     f"same leading (example) axis, got leading sizes "
                     f"{sorted(map(str, sizes)) + scalars}.")
  size = sizes.pop()
  if size % m:
    raise ValueError(f"`{fn}(group_size={m})`: the batch of {size} examples does not split into "
                     f"groups of {m}; use a group size that divides the batch size (e.g. "
                     f"{_divisor_near(size, m)}) or a batch size that is a multiple of {m}.")
  groups = size // m
  reshape = lambda tree: None if tree is None else jax.tree.map(
      lambda x: jnp.reshape(x, (groups, m) + jnp.shape(x)[1:]), tree)
  return (reshape(objective.batch), reshape(objective.clean_outputs),
          reshape(objective.clean_losses)), groups


def _wide(x: jax.Array) -> jax.Array:
  """At least float32 (sums over groups of float16 gradients)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _divisor_near(n: int, m: int) -> int:
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - m), d))


def grouped_ascent(perturbation: optax.GradientTransformation, m: int, chunk: int | None,
                   record_cosine: bool):
  """The ``combine`` of m-SAM (it evaluates by itself: ``evaluates="method"``)."""
  p_update = optax.with_extra_args_support(perturbation).update

  def combine(s: Step, pts: Points, loss: Any, grad: PyTree) -> Result:
    del pts, loss, grad
    objective = s.closures.objective
    (batches, outputs, losses), groups = split_batch(objective, m, s.fn)
    assert objective is not None   # split_batch raised otherwise
    params, radius = s.params, s.radius
    zero = tu.zeros_like(params)

    def one(parts):
      batch, clean_outputs, clean_losses = parts
      obj = objective._replace(batch=batch, clean_outputs=clean_outputs,
                               clean_losses=clean_losses)
      # conjugated, like the gradients optax descends along (complex weights)
      clean_loss, g = jax.value_and_grad(obj.loss)(params)
      g = tu.cast_like(tu.conj(g), params)
      direction, _ = p_update(g, s.state.perturbation_state, params, **s.extra_args)
      delta = tu.scale(direction, radius)
      adv_loss, g_adv = jax.value_and_grad(obj.loss)(tu.add_scaled(params, 1.0, delta))
      g_adv = tu.cast_like(tu.conj(g_adv), params)
      g_norm, adv_norm = tu.norm(g), tu.norm(g_adv)
      stats = {"clean_loss": clean_loss, "perturbed_loss": adv_loss, "clean_grad_norm": g_norm,
               "perturbed_grad_norm": adv_norm, "perturbation_norm": tu.norm(delta)}
      if record_cosine:
        stats["cosine"] = tu.cosine(g, g_adv, s.eps)
      stats = {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}
      return jax.tree.map(_wide, g_adv), stats

    parts = (batches, outputs, losses)
    if groups == 1:   # one group (m = B): no vmap, whose batched matmuls run slower on CPU
      total, stats = one(jax.tree.map(lambda x: x[0], parts))
      sums = stats
    elif chunk is None or chunk >= groups:
      grads, stats = jax.vmap(one)(parts)
      total = jax.tree.map(lambda x: jnp.sum(x, axis=0), grads)
      sums = {k: jnp.sum(v) for k, v in stats.items()}
    else:
      if groups % chunk:
        raise ValueError(f"`{s.fn}(group_chunk={chunk})`: the {groups} groups do not split "
                         f"into chunks of {chunk}; use a chunk size that divides {groups}.")
      chunked = jax.tree.map(lambda x: jnp.reshape(x, (groups // chunk, chunk) + x.shape[1:]),
                             parts)

      def body(carry, part):
        acc, sums = carry
        g, st = jax.vmap(one)(part)
        acc = jax.tree.map(lambda a, x: a + jnp.sum(x, axis=0), acc, g)
        return (acc, {k: sums[k] + jnp.sum(v) for k, v in st.items()}), None

      start = {k: jnp.zeros([], jnp.float32) for k in
               ("clean_loss", "perturbed_loss", "clean_grad_norm", "perturbed_grad_norm",
                "perturbation_norm") + (("cosine",) if record_cosine else ())}
      (total, sums), _ = jax.lax.scan(body, (jax.tree.map(_wide, zero),
                                             start), chunked)
    mean = {k: v / groups for k, v in sums.items()}
    out = tu.cast_like(jax.tree.map(lambda x: x / groups, total), params)
    return Result(out, loss=mean["perturbed_loss"], clean_loss=mean["clean_loss"],
                  norms=mean)

  return combine


def method(name: str, perturbation: optax.GradientTransformation, state: type, m: int,
           chunk: int | None, record_cosine: bool) -> Method:
  """m-SAM as a :class:`~sam_optax._src.protocol.Method`."""

  def init(params):
    p_state = perturbation.init(params)
    if jax.tree.leaves(p_state):
      raise ValueError(f"`{name}(group_size=...)` needs a geometry without state (l2, adaptive, "
                       "masked, ...): every group perturbs from the same state, and a state "
                       "that advances per group (EMAs, random keys) has no single next value.")
    return {"perturbation_state": p_state}

  return Method(name, state, init, lambda s: Points(), grouped_ascent(
      perturbation, m, chunk, record_cosine), closure="objective", evaluates="method",
      clean_gradient=False, reports_g=True)
