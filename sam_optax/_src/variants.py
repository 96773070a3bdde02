"""Descent rules and schedules built around the core: GSAM, LookSAM, RST, AE-SAM, MSAM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import core, gating
from sam_optax._src import tree as tu
from sam_optax._src.validation import check_int, check_real, check_transform

PyTree = Any


def _pmean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _took_pass(count: jax.Array, fraction: jax.Array, took: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """``sam_step`` (1.0 if this step ran the second pass) and the running mean of it."""
  step = took.astype(jnp.float32)
  return step, fraction + (step - fraction) / (count.astype(jnp.float32) + 1.0)


def _zero_f32() -> jax.Array:
  return jnp.zeros([], jnp.float32)


# ------------------------------------------------------------------------ GSAM


class GSAMState(NamedTuple):
  """State of :func:`gsam`: the core's state.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.gsam(0.05).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.GSAMState), int(state.inner.count)
    (True, 0)
  """
  inner: core.SharpnessAwareState


def gsam(rho: core.ScalarOrSchedule = 0.05, alpha: float = 0.6, *,
         perturbation: optax.GradientTransformation | None = None, eps: float = 1e-12,
         axis_name: str | tuple[str, ...] | None = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""GSAM: the SAM gradient minus a multiple of g's part orthogonal to it.

  .. math::
     g_p = \nabla L(w + \rho_t\, d),\quad
     g_\perp = g - (g \cdot \hat g_p)\, \hat g_p,\quad
     \text{output} = g_p - \alpha\, g_\perp

  ``alpha = 0`` with a constant ``rho`` is SAM exactly. For the paper's
  :math:`\rho_t` that follows the learning rate, pass
  ``rho=rho_schedule_from_lr(...)``.

  Args:
    rho: radius, a float or a schedule.
    alpha: weight :math:`\alpha` of the orthogonal (surrogate-gap) term.
    perturbation: the ascent geometry (default :func:`l2`).
    axis_name: per-device perturbation, as in :func:`sharpness_aware`; g is
      averaged over the axis before the decomposition.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> g = grad_fn(w)
    >>> tx = sam_optax.gsam(0.05, alpha=0.5)
    >>> out, _ = tx.update(g, tx.init(w), w, grad_fn=grad_fn)
    >>> g_p = grad_fn(w + 0.05 * g / jnp.linalg.norm(g))   # by hand
    >>> u = g_p / jnp.linalg.norm(g_p)
    >>> bool(jnp.allclose(out, g_p - 0.5 * (g - (g @ u) * u), rtol=1e-5))
    True

  References:
    Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu,
    `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  alpha = check_real("alpha", alpha, "gsam", low=0.0, hint="the paper uses 0.01 to 0.3")
  inner = core.sharpness_aware(rho, perturbation=perturbation, eps=eps, axis_name=axis_name)

  def init(params):
    return GSAMState(inner.init(params))

  def update(updates, state, params=None, **extra_args):
    g_p, inner_state = inner.update(updates, state.inner, params, **extra_args)
    g = _pmean(updates, axis_name)
    # g_p - alpha * (g - (g.u) u), u = g_p/|g_p|, as one combination of g_p and g:
    # two reductions over g_p and one elementwise pass.
    coef = 1.0 + alpha * tu.vdot(g, g_p) * tu.safe_inverse(tu.sq_norm(g_p), eps * eps)
    return tu.combine(g_p, coef, g, -alpha), GSAMState(inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def rho_schedule_from_lr(lr_schedule: optax.Schedule, rho_max: float,
                         rho_min: float, lr_max: float, lr_min: float
                         ) -> Callable[[jax.Array], jax.Array]:
  r"""GSAM's radius schedule: :math:`\rho_t` moves linearly with the learning rate.

  .. math:: \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
            \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}}

  Args:
    lr_schedule: the optax learning-rate schedule ``count -> lr``.
    rho_max, rho_min: radii at the largest and smallest learning rate
      (the paper: 0.6 and 0.1 for ViT-B/32).
    lr_max, lr_min: the schedule's largest and smallest learning rates.

  Example:
    >>> import optax, sam_optax
    >>> lr = optax.cosine_decay_schedule(0.1, decay_steps=100)
    >>> rho = sam_optax.rho_schedule_from_lr(lr, rho_max=0.1, rho_min=0.02, lr_max=0.1, lr_min=0.0)
    >>> [round(float(rho(t)), 4) for t in (0, 50, 100)]
    [0.1, 0.06, 0.02]
    >>> tx = sam_optax.gsam(rho=rho, alpha=0.3)   # or sharpness_aware(rho=rho)

  References:
    Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  if not callable(lr_schedule):
    raise TypeError("`rho_schedule_from_lr(lr_schedule=...)` must be an optax schedule "
                    "(a callable of the step count).")
  if lr_max == lr_min:
    raise ValueError("`rho_schedule_from_lr`: `lr_max` and `lr_min` must differ; with a "
                     "constant learning rate use a constant `rho`.")
  rho_max = core.check_rho(rho_max, "rho_schedule_from_lr")
  rho_min = core.check_rho(rho_min, "rho_schedule_from_lr")

  def schedule(count):
    lr = jnp.asarray(lr_schedule(count), jnp.float32)
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)

  return schedule


# --------------------------------------------------------------------- LookSAM


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: int32 steps taken; the SAM pass runs when ``count % k == 0``.
    inner: the core's state.
    g_v: the stored component of the SAM gradient orthogonal to g.
    g_v_norm: norm of ``g_v`` (kept so the reuse steps skip a reduction), in the
      params' reduction dtype (float32, float64 for float64 params).
    period: int32 k (constant; lets :func:`gated_jit` decide on the host).
    sam_step: float32 1.0 if the last step ran the second pass, else 0.0.
    sam_step_fraction: float32 running mean of ``sam_step``: the passes the
      schedule really cost (1 + this fraction per step).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.looksam(k=5).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.LookSAMState), int(state.count), int(state.period)
    (True, 0, 5)
  """
  count: jax.Array
  inner: core.SharpnessAwareState
  g_v: PyTree
  g_v_norm: jax.Array
  period: jax.Array
  sam_step: jax.Array
  sam_step_fraction: jax.Array


def looksam(rho: core.ScalarOrSchedule = 0.05, k: int = 5, alpha: float = 0.7, *,
            perturbation: optax.GradientTransformation | None = None, eps: float = 1e-12,
            axis_name: str | tuple[str, ...] | None = None
            ) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: the SAM pass every k-th step, its direction reused in between.

  On steps 0, k, 2k, ... (a call of ``grad_fn``):

  .. math:: g_s = \nabla L(w + \rho\, d),\quad
            g_v = g_s - \frac{g_s \cdot g}{\|g\|^2} g,\quad \text{output } g_s

  On the other steps (no call of ``grad_fn``):
  :math:`g + \alpha \frac{\|g\|}{\|g_v\|} g_v`. Use :func:`gated_jit` on CPU so
  the skipped steps run one pass (see :mod:`sam_optax` docs on gating).

  Args:
    rho: radius.
    k: period of the SAM pass (k=1 is SAM).
    alpha: weight of the reused component.
    perturbation: ascent geometry (default :func:`l2`).
    axis_name: per-device perturbation; the output is averaged over the axis.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> g = grad_fn(w)
    >>> tx = sam_optax.looksam(0.05, k=2, alpha=0.7)
    >>> state = tx.init(w)
    >>> out0, state = tx.update(g, state, w, grad_fn=grad_fn)  # step 0: SAM pass, stores g_v
    >>> out1, state = tx.update(g, state, w, grad_fn=grad_fn)  # step 1: reuses g_v
    >>> g_v = state.g_v
    >>> bool(jnp.allclose(out1, g + 0.7 * jnp.linalg.norm(g) / jnp.linalg.norm(g_v) * g_v))
    True

  References:
    Liu, Mai, Chen, Hsieh, You, `Towards Efficient and Scalable Sharpness-Aware
    Minimization <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  k = check_int("k", k, "looksam", minimum=1, hint="the paper uses 5")
  alpha = check_real("alpha", alpha, "looksam", low=0.0, hint="the paper uses 0.7")
  inner = core.sharpness_aware(rho, perturbation=perturbation, eps=eps)

  def init(params):
    return LookSAMState(jnp.zeros([], jnp.int32), inner.init(params), tu.zeros_like(params),
                        jnp.zeros([], tu.reduction_dtype(params)), jnp.asarray(k, jnp.int32),
                        _zero_f32(), _zero_f32())

  def update(updates, state, params=None, *, grad_fn=None, value_and_grad_fn=None,
             **extra_args):
    core.check_update_call("looksam.update", params, grad_fn, value_and_grad_fn)

    def sam_step(_):
      g_s, inner_state = inner.update(updates, state.inner, params, grad_fn=grad_fn,
                                      value_and_grad_fn=value_and_grad_fn, **extra_args)
      coef = tu.vdot(g_s, updates) * tu.safe_inverse(tu.sq_norm(updates), eps * eps)
      g_v = tu.cast_like(tu.add_scaled(g_s, -coef, updates), state.g_v)
      return g_s, inner_state, g_v, tu.norm(g_v)

    def reuse_step(_):
      ratio = tu.norm(updates) * tu.safe_inverse(state.g_v_norm, eps)
      out = tu.add_scaled(updates, alpha * ratio, state.g_v)
      return out, state.inner, state.g_v, state.g_v_norm

    took = state.count % state.period == 0
    out, inner_state, g_v, g_v_norm = gating.gate(took, sam_step, reuse_step, None)
    sam_step_now, fraction = _took_pass(state.count, state.sam_step_fraction, took)
    return (_pmean(out, axis_name),
            LookSAMState(optax.safe_increment(state.count), inner_state, g_v, g_v_norm,
                         state.period, sam_step_now, fraction))

  return optax.GradientTransformationExtraArgs(init, update)


# Host-side decisions read only the scalars they need (passing the whole state to a
# jitted function would flatten and transfer every stored direction each step).
gating.register_gate(LookSAMState, lambda s: int(s.count) % int(s.period) == 0)


# ------------------------------------------------------------------ randomized


class RandomizedState(NamedTuple):
  """State of :func:`randomized`.

  Attributes:
    count: int32 steps taken.
    key: raw PRNG key data; step t's draw uses ``fold_in(key, t)``.
    probability: float32 probability used for the current step's draw.
    inner: the wrapped transform's state (advanced only on steps it runs).
    sam_step: float32 1.0 if the last step ran ``transform``, else 0.0.
    sam_step_fraction: float32 running mean of ``sam_step``.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.randomized(sam_optax.sharpness_aware(0.05)).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.RandomizedState), float(state.probability)
    (True, 0.5)
  """
  count: jax.Array
  key: jax.Array
  probability: jax.Array
  inner: optax.OptState
  sam_step: jax.Array
  sam_step_fraction: jax.Array


def _bernoulli_at(key_data, count, p):
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), count)
  return jax.random.uniform(key, (), jnp.float32) < p


def randomized(transform: optax.GradientTransformation,
               probability: core.ScalarOrSchedule = 0.5, seed: int = 0, *,
               axis_name: str | tuple[str, ...] | None = None
               ) -> optax.GradientTransformationExtraArgs:
  r"""RST: each step runs ``transform`` with probability p, else passes g through.

  A Bernoulli(:math:`p_t`) draw per step (``probability`` a float or a
  schedule of the step count) picks a sharpness-aware step (``transform``,
  which calls ``grad_fn``) or a plain step (output ``g``, no call of
  ``grad_fn``). Expected passes per step: :math:`1 + p`. The key is in the
  state, so runs are reproducible and resume exactly.

  Args:
    transform: any sharpness-aware transformation (e.g. :func:`sharpness_aware`).
    probability: :math:`p \in [0, 1]` or a schedule.
    seed: PRNG seed of the draws.
    axis_name: averages the pass-through g over this axis (give the wrapped
      transform the same ``axis_name``).

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> g = grad_fn(w)
    >>> never = sam_optax.randomized(sam_optax.sharpness_aware(0.05), probability=0.0)
    >>> out, _ = never.update(g, never.init(w), w, grad_fn=grad_fn)
    >>> bool(jnp.array_equal(out, g))   # p = 0: always the plain gradient
    True
    >>> always = sam_optax.randomized(sam_optax.sharpness_aware(0.05), probability=1.0)
    >>> out, _ = always.update(g, always.init(w), w, grad_fn=grad_fn)
    >>> bool(jnp.allclose(out, grad_fn(w + 0.05 * g / jnp.linalg.norm(g))))   # p = 1: SAM
    True

  References:
    Zhao, Zhang, Hu, `Randomized Sharpness-Aware Training for Boosting
    Computational Efficiency in Deep Learning <https://arxiv.org/abs/2203.09962>`_,
    2022.
  """
  check_transform("transform", transform, "randomized")
  if not callable(probability):
    probability = check_real("probability", probability, "randomized", low=0.0, high=1.0,
                    hint="0.5 runs the second pass on half the steps")
  seed = check_int("seed", seed, "randomized")
  inner_update = optax.with_extra_args_support(transform).update

  def prob_at(count):
    value = probability(count) if callable(probability) else probability
    return jnp.asarray(value, jnp.float32)

  def init(params):
    return RandomizedState(jnp.zeros([], jnp.int32),
                           jax.random.key_data(jax.random.key(seed)),
                           prob_at(jnp.zeros([], jnp.int32)), transform.init(params),
                           _zero_f32(), _zero_f32())

  def update(updates, state, params=None, **extra_args):
    take = _bernoulli_at(state.key, state.count, state.probability)

    def run(_):
      return inner_update(updates, state.inner, params, **extra_args)

    def skip(_):
      return _pmean(updates, axis_name), state.inner

    out, inner_state = gating.gate(take, run, skip, None)
    count = optax.safe_increment(state.count)
    sam_step, fraction = _took_pass(state.count, state.sam_step_fraction, take)
    return out, RandomizedState(count, state.key, prob_at(count), inner_state, sam_step, fraction)

  return optax.GradientTransformationExtraArgs(init, update)


_decide_randomized = jax.jit(_bernoulli_at)
gating.register_gate(RandomizedState, lambda s: _decide_randomized(s.key, s.count, s.probability))


# ---------------------------------------------------------------------- AE-SAM


class AdaptivePolicyState(NamedTuple):
  """State of :func:`adaptive_policy`.

  Attributes:
    count: int32 steps taken.
    mean: EMA of :math:`\\|g\\|^2` (params' reduction dtype: float32, or
      float64 for float64 params).
    var: EMA of its squared deviation (same dtype).
    sharp_steps: int32 number of steps that ran ``transform``.
    inner: the wrapped transform's state.
    sam_step: float32 1.0 if the last step ran ``transform``, else 0.0.
    sam_step_fraction: float32 running mean of ``sam_step``.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> tx = sam_optax.adaptive_policy(sam_optax.sharpness_aware(0.05), total_steps=100)
    >>> state = tx.init(jnp.ones(2))
    >>> isinstance(state, sam_optax.AdaptivePolicyState), int(state.sharp_steps)
    (True, 0)
  """
  count: jax.Array
  mean: jax.Array
  var: jax.Array
  sharp_steps: jax.Array
  inner: optax.OptState
  sam_step: jax.Array
  sam_step_fraction: jax.Array


def adaptive_policy(transform: optax.GradientTransformation, *, total_steps: int,
                    decay: float = 0.9, lambda_start: float = -1.0, lambda_end: float = 1.0,
                    axis_name: str | tuple[str, ...] | None = None
                    ) -> optax.GradientTransformationExtraArgs:
  r"""AE-SAM: run ``transform`` only where the loss looks sharp.

  With :math:`s_t = \|g_t\|^2`,

  .. math::
     \mu_t = \delta \mu_{t-1} + (1-\delta) s_t,\quad
     \sigma^2_t = \delta \sigma^2_{t-1} + (1-\delta)(s_t - \mu_t)^2,

  the step runs ``transform`` iff :math:`s_t \ge \mu_t + c_t \sigma_t`, with
  :math:`c_t` moving linearly from ``lambda_start`` to ``lambda_end`` over
  ``total_steps`` (a rising threshold: more SAM steps early). At step 0 the
  statistics start at :math:`\mu_0 = s_0, \sigma_0 = 0`, so step 0 is a SAM
  step when ``lambda_start <= 0``. The decision needs the current gradient,
  so it is taken with ``lax.cond`` inside the step.

  Args:
    transform: the sharpness-aware transformation to run on sharp steps.
    total_steps: training length T over which :math:`c_t` moves.
    decay: EMA decay :math:`\delta`.
    lambda_start, lambda_end: :math:`\lambda_1, \lambda_2`, the ends of
      :math:`c_t`.
    axis_name: averages the pass-through g (and :math:`\|g\|^2`) over the axis.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> grad_fn = jax.grad(lambda w: jnp.sum(w ** 4))
    >>> w = jnp.array([1.0, -2.0])
    >>> tx = sam_optax.adaptive_policy(sam_optax.sharpness_aware(0.05), total_steps=100,
    ...                                lambda_start=0.0, lambda_end=0.0)   # SAM iff s_t >= mu_t
    >>> state = tx.init(w)
    >>> for scale in (1.0, 2.0, 0.5):   # s_t = scale^2 s_0: mu_1 = 1.3 s_0, mu_2 = 1.195 s_0
    ...   _, state = tx.update(scale * grad_fn(w), state, w, grad_fn=grad_fn)
    >>> int(state.count), int(state.sharp_steps)   # the last step (0.25 s_0 < mu_2) skips SAM
    (3, 2)

  References:
    Jiang, Yang, Zhang, Kwok, `An Adaptive Policy to Employ Sharpness-Aware
    Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR 2023.
  """
  check_transform("transform", transform, "adaptive_policy")
  total_steps = check_int("total_steps", total_steps, "adaptive_policy", minimum=1,
                 hint="pass the training length in steps")
  decay = check_real("decay", decay, "adaptive_policy", low=0.0, high=1.0, high_open=True)
  lambda_start = check_real("lambda_start", lambda_start, "adaptive_policy")
  lambda_end = check_real("lambda_end", lambda_end, "adaptive_policy")
  inner_update = optax.with_extra_args_support(transform).update

  def init(params):
    dtype = tu.reduction_dtype(params)  # separate buffers, so the state can be donated
    return AdaptivePolicyState(jnp.zeros([], jnp.int32), jnp.zeros([], dtype), jnp.zeros([], dtype),
                               jnp.zeros([], jnp.int32),
                               transform.init(params), _zero_f32(), _zero_f32())

  def update(updates, state, params=None, **extra_args):
    s = tu.sq_norm(updates)
    if axis_name is not None:
      s = jax.lax.pmean(s, axis_name)
    first = state.count == 0
    mean = jnp.where(first, s, decay * state.mean + (1 - decay) * s)
    var = jnp.where(first, 0.0, decay * state.var + (1 - decay) * jnp.square(s - mean))
    frac = jnp.minimum(state.count.astype(s.dtype) / total_steps, 1.0)
    c = lambda_start + (lambda_end - lambda_start) * frac
    sharp = s >= mean + c * jnp.sqrt(var)

    def run(_):
      return inner_update(updates, state.inner, params, **extra_args)

    def skip(_):
      return _pmean(updates, axis_name), state.inner

    out, inner_state = gating.gate(sharp, run, skip, None, host_decidable=False)
    sam_step, fraction = _took_pass(state.count, state.sam_step_fraction, sharp)
    return out, AdaptivePolicyState(optax.safe_increment(state.count), mean.astype(state.mean.dtype),
                                    var.astype(state.var.dtype),
                                    state.sharp_steps + sharp.astype(jnp.int32), inner_state,
                                    sam_step, fraction)

  return optax.GradientTransformationExtraArgs(init, update)


# ------------------------------------------------------------------------ MSAM


class MomentumSAMState(NamedTuple):
  """State of :func:`msam`: step count and the base optimizer's state.

  The parameters the caller holds are the perturbed ones, :math:`\\tilde w =
  w - \\rho\\, v/\\|v\\|` with ``v`` the momentum found in ``base``; use
  :func:`msam_clean_params` for the clean ones. ``momentum_norm`` is in the
  params' reduction dtype; ``perturbation_norm`` (the length of the perturbation
  the last gradient was taken at) and ``perturbed_grad_norm`` (that gradient's
  norm) are float32 telemetry.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> state = sam_optax.msam(optax.sgd(0.1, momentum=0.9)).init(jnp.ones(2))
    >>> isinstance(state, sam_optax.MomentumSAMState), round(float(state.rho), 4)
    (True, 0.3)
  """
  count: jax.Array
  base: optax.OptState
  rho: jax.Array
  momentum_norm: jax.Array
  perturbation_norm: jax.Array
  perturbed_grad_norm: jax.Array


def _momentum_path(state: Any, params: Any) -> tuple | None:
  """Path to the first NamedTuple field named 'trace' or 'mu' shaped like params."""
  target = jax.tree.structure(params)

  def search(node, path):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      for name in ("trace", "mu"):
        if name in node._fields:
          value = getattr(node, name)
          if jax.tree.structure(value) == target:
            return path + (name,)
      for name in node._fields:
        hit = search(getattr(node, name), path + (name,))
        if hit is not None:
          return hit
    elif isinstance(node, (tuple, list)):
      for i, child in enumerate(node):
        hit = search(child, path + (i,))
        if hit is not None:
          return hit
    return None

  return search(state, ())


def _get_path(node, path):
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


def msam(base_optimizer: optax.GradientTransformation, rho: float = 0.3, *,
         eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM: perturb along the normalized momentum, one gradient per step.

  The caller's parameters are kept at the perturbed point
  :math:`\tilde w_t = w_t + \epsilon_t`, :math:`\epsilon_t = -\rho\,
  v_t/\|v_t\|` with :math:`v_t` the base optimizer's momentum (``trace`` of
  :func:`optax.sgd` with momentum, ``mu`` of the Adam family). The caller's
  ordinary gradient :math:`g = \nabla L(\tilde w_t)` is the only gradient:

  .. math:: w_{t+1} = w_t + u_t(g),\qquad \tilde w_{t+1} = w_{t+1} + \epsilon_{t+1}

  where :math:`u_t` is the base update computed at the clean :math:`w_t` (so
  decoupled weight decay acts on clean weights). ``grad_fn`` is accepted and
  ignored, so one train step serves every variant. Evaluate and checkpoint
  with :func:`msam_clean_params`. With :math:`v_0 = 0` the first step is
  unperturbed.

  Args:
    base_optimizer: an optimizer with a momentum buffer (sgd with momentum,
      adam, adamw, nadam, lion, ...).
    rho: radius (the paper: about 0.3 with SGD, 1 with AdamW).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> opt = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> for _ in range(3):   # one gradient per step, taken at the perturbed params
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> clean = sam_optax.msam_clean_params(params, state)
    >>> round(float(jnp.linalg.norm(params - clean)), 4)   # |eps| = rho
    0.3

  References:
    Becker, Altrock, Risse, `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
  """
  rho = core.check_rho(rho, "msam")
  base = optax.with_extra_args_support(base_optimizer)
  path_cache: dict[str, tuple] = {}

  def eps_of(base_state, params, v_norm):
    v = _get_path(base_state, path_cache["path"])
    coef = -jnp.asarray(rho, jnp.float32) * tu.safe_inverse(v_norm, eps)
    return tu.cast_like(tu.scale(v, coef), params)

  def init(params):
    base_state = base_optimizer.init(params)
    path = _momentum_path(base_state, params)
    if path is None:
      raise ValueError("`msam(base_optimizer=...)` needs an optimizer with a momentum buffer "
                       "(a state field named `trace` or `mu` shaped like the params): use "
                       "`optax.sgd(lr, momentum=0.9)` or an Adam-family optimizer.")
    path_cache["path"] = path
    v_norm = tu.norm(_get_path(base_state, path))
    return MomentumSAMState(jnp.zeros([], jnp.int32), base_state,
                            jnp.asarray(rho, jnp.float32), v_norm, _zero_f32(), _zero_f32())

  def update(updates, state, params=None, **extra_args):
    extra_args.pop("grad_fn", None)
    if params is None:
      raise ValueError("`msam.update` needs the current (perturbed) parameters: call "
                       "`update(grads, state, params)`.")
    if "path" not in path_cache:
      init(params)
    # the norm of v_t was stored last step: one reduction per step, not two
    eps_now = eps_of(state.base, params, state.momentum_norm)
    clean = jax.tree.map(lambda p, e: p - e, params, eps_now)
    u, base_state = base.update(updates, state.base, clean, **extra_args)
    v_norm = tu.norm(_get_path(base_state, path_cache["path"]))
    eps_next = eps_of(base_state, params, v_norm)
    out = jax.tree.map(lambda a, e0, e1: (a - e0 + e1).astype(a.dtype), u, eps_now, eps_next)
    pert_norm = jnp.where(state.momentum_norm > eps, jnp.abs(jnp.asarray(rho, jnp.float32)), 0.0)
    return out, MomentumSAMState(optax.safe_increment(state.count), base_state, state.rho, v_norm,
                                 pert_norm.astype(jnp.float32),
                                 tu.norm(updates).astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init, update)


def msam_clean_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
  """The clean parameters :math:`w = \\tilde w - \\epsilon` of an :func:`msam` run.

  Args:
    params: the perturbed parameters the training loop holds.
    opt_state: the optimizer state containing a :class:`MomentumSAMState`
      (at any depth, e.g. inside ``inject_hyperparams`` or ``chain``).

  Returns:
    The parameters to evaluate and to export.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> opt = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.array([1.0, 0.0]), state, params)
    >>> params = optax.apply_updates(params, updates)   # now w - 0.1 g + eps, eps = -0.3 v/|v|
    >>> print(jnp.round(sam_optax.msam_clean_params(params, state), 4))
    [ 0.9 -2. ]
  """
  found = []
  jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, MomentumSAMState) and not found.append(x))
  if not found:
    raise ValueError("`msam_clean_params`: no MomentumSAMState in `opt_state`; pass the "
                     "state of an optimizer built with `sam_optax.msam`.")
  state = found[0]
  v = _get_path(state.base, _momentum_path(state.base, params))
  e = tu.scale(v, -state.rho * tu.safe_inverse(state.momentum_norm, 1e-12))
  return jax.tree.map(lambda p, x: (p - x).astype(p.dtype), params, e)
