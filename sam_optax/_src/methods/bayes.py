"""Bayesian SAM (bSAM): SAM as a relaxation of Bayesian learning, with a Gaussian posterior."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import engine
from sam_optax._src import tree as tu
from sam_optax._src.methods.universal import draw_noise
from sam_optax._src.protocol import Method, Points, Result
from sam_optax._src.telemetry import Telemetry
from sam_optax._src.validation import check_int, check_real

PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]
_HINT = ("pass the state of an optimizer built with `sam_optax.bsam` (at any depth, e.g. inside "
         "`inject_hyperparams` or `chain`).")


class BayesianSAMState(NamedTuple):
  """State of :func:`bsam`.

  Attributes:
    count: int32 steps taken; step ``t`` draws its posterior sample from
      ``fold_in(key, t)``.
    key: raw PRNG key data of ``jax.random.key(seed)`` (constant).
    momentum: :math:`m`, the EMA of the perturbed gradient plus the prior term
      (float32, or the params' dtype when that is float64).
    precision: :math:`s`, the per-parameter precision; the posterior is
      :math:`N(w, 1/(N s))` (same dtype as ``momentum``).
    num_data: float32 :math:`N`, kept so that :func:`bsam_posterior` needs
      only the state.
    telemetry: a :class:`Telemetry` of the last step: ``clean_grad_norm`` is
      the norm of the gradient at the posterior sample, ``perturbation_norm``
      that of :math:`\\rho g/s`, ``perturbed_grad_norm`` that of the gradient at
      the ascent point.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.bsam(0.1, num_data=100).init(jnp.ones(3))
    >>> isinstance(state, sam_optax.BayesianSAMState)
    True
  """
  count: jax.Array
  key: jax.Array
  momentum: PyTree
  precision: PyTree
  num_data: jax.Array
  telemetry: Telemetry


def _buffer_dtype(x: jax.Array) -> Any:
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _check_real_params(params: PyTree, fn: str) -> None:
  for x in jax.tree.leaves(params):
    if jnp.iscomplexobj(x):
      raise TypeError(f"`{fn}` needs real parameters: its precision |g| and posterior are "
                      "defined for real weights; split complex parameters into real and "
                      "imaginary parts.")


def bsam(learning_rate: ScalarOrSchedule, *, rho: float = 0.01, num_data: int,
         prior_precision: float = 10.0, b1: float = 0.9, b2: float = 0.999,
         damping: float = 0.1, init_precision: float = 1.0, seed: int = 0
         ) -> optax.GradientTransformationExtraArgs:
  r"""Bayesian SAM: an Adam-like optimizer for a Gaussian posterior, with a SAM step.

  bSAM learns a mean :math:`w` and a per-parameter precision :math:`s`; the
  posterior is :math:`N(w, \mathrm{diag}(1/(N s)))` with N the number of
  training examples. With :math:`\delta = \text{prior\_precision}/N`, each step
  draws :math:`e \sim N(0, I)` and does

  .. math::
     \tilde w = w + e/\sqrt{N s},\quad g = \nabla \ell(\tilde w),\quad
     g_{adv} = \nabla \ell(w + \rho\, g/s),

     m \leftarrow \beta_1 m + (1-\beta_1)(g_{adv} + \delta w),\quad
     w \leftarrow w - \eta_t\, m/s,

     s \leftarrow \beta_2 s + (1-\beta_2)(\sqrt{s}\,|g| + \text{damping} + \delta)

  where :math:`\ell` is the mean training loss (the prior enters through
  :math:`\delta w`, so do not add weight decay to the loss), the ascent
  :math:`\rho g/s` is elementwise and not normalized, and the weights move
  with the precision of the previous step (the update of :math:`s` comes
  last). It is a complete optimizer (it owns the step size, like
  ``optax.adam``): the returned updates are :math:`-\eta_t m/s`.

  It calls the gradient closure twice per step: at the posterior sample
  :math:`\tilde w`, then at :math:`w + \rho g/s`. The incoming ``updates``
  (the caller's clean gradient) are not used, only their structure is
  checked; under ``jit`` XLA drops a clean backward pass whose result nothing
  uses. Posterior samples: at step t the key is ``fold_in(jax.random.key(seed),
  t)``, split per leaf as in :func:`trace_sam`. Predict with the average over
  posterior samples (:func:`bsam_sample`; the paper uses 32).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule (the paper: 0.5
      with cosine decay for ResNet-18 on CIFAR-10).
    rho: SAM radius :math:`\rho` (unnormalized ascent); the paper's 0.01.
    num_data: N, the number of training examples (times the augmentation
      factor when data augmentation multiplies the data).
    prior_precision: precision of the Gaussian prior :math:`N(0, 1/\text{prior
      precision})`; :math:`\delta = \text{prior\_precision}/N`.
    b1, b2: EMA decays of :math:`m` and :math:`s`.
    damping: added to the precision every step (keeps :math:`s` away from 0).
    init_precision: :math:`s_0`.
    seed: seed of the posterior samples.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose
    ``update(updates, state, params, *, grad_fn)`` (or ``value_and_grad_fn=``)
    returns :math:`-\eta_t m/s`. State: :class:`BayesianSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> x = jnp.linspace(-1.0, 1.0, 32)[:, None]; y = 2.0 * x[:, 0]
    >>> loss = lambda w: jnp.mean((x @ w - y) ** 2)
    >>> tx = sam_optax.bsam(0.1, num_data=1000, prior_precision=1.0)
    >>> w = jnp.zeros(1); state = tx.init(w)
    >>> @jax.jit
    ... def step(w, state):
    ...   # bSAM takes its own two gradients; the clean one is not used
    ...   updates, state = tx.update(jnp.zeros_like(w), state, w, grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(w, updates), state
    >>> for _ in range(200):
    ...   w, state = step(w, state)
    >>> mean, std = sam_optax.bsam_posterior(w, state)
    >>> bool(abs(mean[0] - 2.0) < 0.2), std.shape
    (True, (1,))

  References:
    Möllenhoff, Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  fn = "bsam"
  if not callable(learning_rate):
    learning_rate = check_real("learning_rate", learning_rate, fn, low=0.0,
                               hint="the paper uses 0.5")
  rho = check_real("rho", rho, fn, low=0.0, hint="the paper uses 0.01")
  num_data = check_int("num_data", num_data, fn, minimum=1,
            hint="the number of training examples (times the augmentation factor)")
  prior_precision = check_real("prior_precision", prior_precision, fn, low=0.0,
                               hint="the paper uses 10")
  for name, value in (("b1", b1), ("b2", b2)):
    check_real(name, value, fn, low=0.0, high=1.0, high_open=True)
  damping = check_real("damping", damping, fn, low=0.0, hint="the paper uses 0.1")
  init_precision = check_real("init_precision", init_precision, fn, low=0.0, low_open=True,
             hint="the paper uses 1.0")
  seed = check_int("seed", seed, fn)

  def init(params):
    _check_real_params(params, fn)
    # *_like: the buffers take the params' sharding (a sharded weight gets sharded moments)
    return {"key": jax.random.key_data(jax.random.key(seed)),
            "momentum": jax.tree.map(lambda w: jnp.zeros_like(w, _buffer_dtype(w)), params),
            "precision": jax.tree.map(lambda w: jnp.full_like(w, init_precision, _buffer_dtype(w)),
                                      params),
            "num_data": jnp.asarray(num_data, jnp.float32)}

  def points(s):
    _check_real_params(s.params, fn)
    n = jnp.asarray(num_data, jnp.float32)
    e = draw_noise(s.state.key, s.state.count, s.params, None, "normal")
    sample = jax.tree.map(lambda w, z, p: (w + z / jnp.sqrt(n * p)).astype(w.dtype),
                          s.params, e, s.state.precision)
    _, g = s.closures(sample)
    ascent = jax.tree.map(lambda gi, p: rho * gi / p, g, s.state.precision)
    return Points(tu.add_scaled(s.params, 1.0, ascent), delta=ascent, aux=g)

  def combine(s, pts, loss_adv, g_adv):
    g, state, params = pts.aux, s.state, s.params
    n = jnp.asarray(num_data, jnp.float32)
    delta = jnp.asarray(prior_precision, jnp.float32) / n
    momentum = jax.tree.map(lambda m, ga, w: b1 * m + (1 - b1) * (ga + delta * w),
                            state.momentum, g_adv, params)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    out = jax.tree.map(lambda m, p, w: (-lr * m / p).astype(jnp.result_type(w)),
                       momentum, state.precision, params)
    precision = jax.tree.map(
        lambda p, gi: b2 * p + (1 - b2) * (jnp.sqrt(p) * jnp.abs(gi) + damping + delta),
        state.precision, g)
    return Result(out, {"momentum": tu.cast_like(momentum, state.momentum),
                        "precision": tu.cast_like(precision, state.precision), "num_data": n},
                  clean_grad=g)

  m = Method(fn, BayesianSAMState, init, points, combine, clean_gradient=False, keeps_gradient=True)
  return engine.build(m)


def bsam_posterior(params: PyTree, opt_state: optax.OptState) -> tuple[PyTree, PyTree]:
  r"""The Gaussian posterior of a :func:`bsam` run: its mean and standard deviation.

  .. math:: q(w) = N\big(\mu, \mathrm{diag}(\sigma^2)\big),\qquad \mu = w,\quad
            \sigma = 1/\sqrt{N s}

  Args:
    params: the parameters the training loop holds (the posterior mean).
    opt_state: the optimizer state containing a :class:`BayesianSAMState`
      (at any depth).

  Returns:
    ``(mean, std)``, two pytrees shaped like ``params`` (std in float32, or
    float64 for float64 params).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> w = jnp.zeros(2)
    >>> state = sam_optax.bsam(0.1, num_data=100, init_precision=4.0).init(w)
    >>> mean, std = sam_optax.bsam_posterior(w, state)
    >>> [round(float(x), 6) for x in std]  # 1 / sqrt(100 * 4)
    [0.05, 0.05]

  References:
    Möllenhoff, Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  state = tu.find_state(opt_state, BayesianSAMState, "bsam_posterior", _HINT)
  std = jax.tree.map(lambda s: 1.0 / jnp.sqrt(state.num_data.astype(s.dtype) * s), state.precision)
  return params, std


def bsam_sample(params: PyTree, opt_state: optax.OptState, key: jax.Array) -> PyTree:
  r"""One sample :math:`w + \sigma \odot e`, :math:`e \sim N(0, I)`, from a :func:`bsam` posterior.

  Average the model's predicted probabilities over several samples (the
  paper uses 32) for bSAM's predictive distribution.

  Args:
    params: the posterior mean (the parameters the training loop holds).
    opt_state: the optimizer state containing a :class:`BayesianSAMState`.
    key: a PRNG key (typed or raw); it is split into one key per leaf
      (``jax.random.split(key, num_leaves)``, ``jax.tree.leaves`` order).

  Returns:
    A pytree shaped and typed like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> w = jnp.zeros(3)
    >>> state = sam_optax.bsam(0.1, num_data=100).init(w)
    >>> keys = jax.random.split(jax.random.key(0), 32)
    >>> samples = jax.vmap(lambda k: sam_optax.bsam_sample(w, state, k))(keys)
    >>> samples.shape
    (32, 3)

  References:
    Möllenhoff, Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  _, std = bsam_posterior(params, opt_state)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  stds = treedef.flatten_up_to(std)
  out = [(w + sd * jax.random.normal(keys[i], jnp.shape(w), sd.dtype)).astype(jnp.result_type(w))
         for i, (w, sd) in enumerate(zip(leaves, stds, strict=True))]
  return treedef.unflatten(out)
