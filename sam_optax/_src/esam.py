"""ESAM: the second pass on the examples whose loss rises most under the perturbation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import core
from sam_optax._src import perturbations as pert
from sam_optax._src import tree as tu
from sam_optax._src.validation import check_real

PyTree = Any

# γB is an integer up to rounding (0.7 * 10 = 7.000000000000001); a fractional part
# below this counts as rounding, so ⌈γB⌉ is not one too many.
_ROUNDING = 1e-3


class ESAMState(NamedTuple):
  """State of :func:`esam`.

  Attributes:
    count: int32 number of updates applied so far (the argument of a ``rho``
      schedule).
    perturbation_state: the perturbation's state (the PRNG key of the default
      :func:`stochastic` weight perturbation).
    telemetry: a :class:`Telemetry` of the last step (``None`` with
      ``telemetry=False``); its losses are batch means at :math:`w` and
      :math:`w + \\epsilon` over the whole batch (both come from passes that run
      anyway), and ``perturbed_grad_norm`` is the norm of the selected
      examples' gradient.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> isinstance(sam_optax.esam().init(jnp.ones(3)), sam_optax.ESAMState)
    True
  """
  count: jax.Array
  perturbation_state: optax.OptState
  telemetry: core.Telemetry | None = None


def num_selected(gamma: Any, batch_size: int) -> Any:
  """:math:`\\lceil \\gamma B \\rceil`, at least 1 and at most B (traced when gamma is)."""
  if isinstance(gamma, jax.core.Tracer):
    k = jnp.ceil(jnp.asarray(gamma, jnp.float32) * batch_size - _ROUNDING).astype(jnp.int32)
    return jnp.clip(k, 1, batch_size)
  return max(1, min(batch_size, math.ceil(float(gamma) * batch_size - _ROUNDING)))


def top_mask(scores: jax.Array, k: Any) -> jax.Array:
  """float32 mask of the k largest scores (ties: the lower index first); k may be traced."""
  n = scores.shape[0]
  order = jnp.argsort(-scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return (rank < k).astype(jnp.float32)


def esam(rho: core.ScalarOrSchedule = 0.05, gamma: float = 0.5, *,
         perturbation: optax.GradientTransformation | None = None, seed: int = 0,
         eps: float = 1e-12, telemetry: bool = True) -> optax.GradientTransformationExtraArgs:
  r"""ESAM: the sharpness-aware pass on the fraction γ of the batch that is sharpest.

  With :math:`\epsilon = \rho\, d` from the perturbation (by default ESAM's
  stochastic weight perturbation, :func:`stochastic` with :math:`\beta = 0.6`)
  and the per-example losses :math:`l_i`, the score of example i is the rise of
  its loss under the perturbation, from a forward pass without gradient:

  .. math:: s_i = l_i(w + \epsilon) - l_i(w),

  the :math:`k = \lceil \gamma B \rceil` examples with the largest :math:`s_i`
  form the set :math:`S` (exactly k: ties go to the lower index), and the output
  is their mean loss's gradient at the perturbed point,

  .. math:: \frac{1}{k} \sum_{i \in S} \nabla l_i(w + \epsilon).

  ESAM needs per-example losses, so it takes its own closure, passed as a
  keyword of ``update`` (``grad_fn`` is not used):

  * ``per_example_loss_fn``: ``params -> (B,) losses`` (the loss's per-example
    terms, before the mean). The selected examples' gradient is then taken
    through one forward at :math:`w + \epsilon` that serves both the scores and
    the gradient, with a 0/1 weight per example in the backward pass: exact,
    but as costly as SAM's second pass.
  * ``per_example_loss_fn``: ``(params, batch) -> (len(batch),) losses`` with
    ``batch=`` (a pytree of arrays whose leading axis is the example): the
    scores come from a forward on the whole batch, and the forward-backward
    runs on the k gathered examples only, ESAM's saving (about 1 + 1/3 + γ
    passes per step instead of 2). With a traced ``gamma``
    (``optax.inject_hyperparams``) k is not static: the step falls back to the
    weighted full batch (same result without batch-dependent layers such as
    BatchNorm, whose statistics then come from the whole batch).

  ``example_losses=`` (the :math:`l_i(w)` the caller's clean pass already
  computed, e.g. as ``has_aux`` output) saves the forward at :math:`w`.

  Args:
    rho: radius :math:`\rho`, a float or a schedule (the paper: 0.05).
    gamma: fraction :math:`\gamma \in (0, 1]` of the batch kept for the second
      pass (the paper: 0.5). The reference code keeps one example fewer than
      :math:`\lceil\gamma B\rceil` (a strict comparison with the k-th score);
      this keeps exactly :math:`\lceil\gamma B\rceil`.
    perturbation: the ascent direction; default ``stochastic(0.6, seed)``
      (ESAM's weight perturbation). Pass :func:`l2` for data selection alone.
    seed: seed of the default perturbation's tensor mask.
    eps: norms at or below this count as zero.
    telemetry: record a :class:`Telemetry` of each step in the state.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates,
    state, params, *, per_example_loss_fn, batch=None, example_losses=None,
    **extra_args)`` returns the selected examples' gradient at the perturbed
    point; put it first in a chain, before the base optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def per_example_loss(w, batch):
    ...   x, y = batch
    ...   return (x @ w - y) ** 2
    >>> x = jnp.arange(12.0).reshape(6, 2) / 10; y = jnp.ones(6); w = jnp.zeros(2)
    >>> opt = optax.chain(sam_optax.esam(rho=0.05, gamma=0.5), optax.sgd(0.1))
    >>> state = opt.init(w)
    >>> @jax.jit
    ... def step(w, state):
    ...   losses, vjp = jax.vjp(lambda p: per_example_loss(p, (x, y)), w)
    ...   grads, = vjp(jnp.ones_like(losses) / losses.size)      # clean gradient
    ...   updates, state = opt.update(grads, state, w, per_example_loss_fn=per_example_loss,
    ...                               batch=(x, y), example_losses=losses)
    ...   return optax.apply_updates(w, updates), state
    >>> w, state = step(w, state)
    >>> w.shape
    (2,)

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh, Tan, `Efficient Sharpness-aware
    Minimization for Improved Training of Neural Networks
    <https://arxiv.org/abs/2110.03141>`_, ICLR 2022.
  """
  fn = "esam"
  rho = core.check_rho(rho, fn)
  gamma = check_real("gamma", gamma, fn, low=0.0, high=1.0, low_open=True,
             hint="the fraction of the batch kept for the second pass; the paper uses 0.5")
  eps = check_real("eps", eps, fn, low=0.0)
  if perturbation is None:
    perturbation = pert.stochastic(0.6, seed=seed, eps=eps)
  core.check_transform("perturbation", perturbation, fn)
  p_update = optax.with_extra_args_support(perturbation).update

  def init_fn(params):
    if params is None:
      raise ValueError("`esam.init(params)` needs the parameters, not None.")
    return ESAMState(jnp.zeros([], jnp.int32), perturbation.init(params),
                     core.empty_telemetry() if telemetry else None)

  def update_fn(updates, state, params=None, *, per_example_loss_fn: Callable | None = None,
                batch: PyTree = None, example_losses: jax.Array | None = None, value=None,
                **extra_args):
    name = f"{fn}.update"
    if per_example_loss_fn is None or not callable(per_example_loss_fn):
      raise TypeError(
          f"`{name}` selects examples, so it needs per-example losses: call `update(grads, "
          "state, params, per_example_loss_fn=f)` with `f(p)` returning the (B,) losses of the "
          "batch (or `f(p, batch)` together with `batch=`, which lets the second pass run on "
          "the selected examples only); `grad_fn` is not used. With Flax, "
          "`sam_optax.flax_training.make_linen_esam_train_step` builds this step.")
    if params is None:
      raise ValueError(f"`{name}` needs the current parameters: call `update(grads, state, "
                       "params, per_example_loss_fn=...)`.")
    core._describe_mismatch(updates, params, "`updates`", name)
    extra_args.pop("grad_fn", None)
    extra_args.pop("value_and_grad_fn", None)
    if batch is None:
      losses_at = per_example_loss_fn
    else:
      losses_at = lambda p: per_example_loss_fn(p, batch)

    def per_example(p):
      out = jnp.asarray(losses_at(p))
      if out.ndim != 1:
        raise ValueError(f"`{name}`: `per_example_loss_fn` must return one loss per example, a "
                         f"vector, got shape {out.shape}; return the terms before the mean.")
      return out.astype(jnp.float32)

    clean = (per_example(params) if example_losses is None
             else jnp.asarray(example_losses).astype(jnp.float32))
    radius = core.rho_at(rho, state.count)
    direction, p_state = p_update(updates, state.perturbation_state, params, **extra_args)
    delta = tu.scale(direction, radius)
    point = tu.add_scaled(params, 1.0, delta)
    b = clean.shape[0]
    k = num_selected(gamma, b)
    if batch is not None and not isinstance(k, jax.Array):
      # score with a forward only, then forward-backward on the k gathered examples
      perturbed = jax.lax.stop_gradient(per_example(point))
      scores = perturbed - clean
      _, idx = jax.lax.top_k(scores, k)  # exactly k; ties go to the lower index
      subset = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), batch)
      g_adv = jax.grad(lambda p: jnp.mean(per_example_loss_fn(p, subset).astype(jnp.float32)))(point)
    else:
      # one forward at w + eps for the scores and the gradient; unselected examples get weight 0
      perturbed, vjp = jax.vjp(per_example, point)
      mask = top_mask(perturbed - clean, k)
      (g_adv,) = vjp(mask / jnp.asarray(k, jnp.float32))
    core._describe_mismatch(g_adv, params, "the gradient of `per_example_loss_fn`", name)
    # JAX's gradient of a real loss in complex weights is the conjugate of the ascent
    # direction; the gradients optax descends along (and the caller's `updates`) are not
    g_adv = jax.tree.map(lambda x: jnp.conj(x) if jnp.iscomplexobj(x) else x, g_adv)
    g_adv = tu.cast_like(g_adv, updates)
    record = None
    if telemetry:
      clean_loss = jnp.mean(clean) if value is None else value
      record = core.make_telemetry(updates, delta, g_adv, clean_loss, jnp.mean(perturbed), eps)
    return g_adv, ESAMState(optax.safe_increment(state.count), p_state, record)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
