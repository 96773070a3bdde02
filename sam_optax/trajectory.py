"""SAF and MESA: sharpness-aware training at one gradient pass per step, through the loss.

Du et al. (NeurIPS 2022) replace SAM's second pass by a *trajectory loss*: a
KL term that keeps the current logits close to reference logits taken from
the training trajectory, which penalizes the sharpness the weights'
movement reveals. Both live on the loss side, so they are small functional
pieces for a jitted train step, not gradient transformations:

* :func:`trajectory_loss`: :math:`\\lambda T^2 \\mathrm{KL}(\\mathrm{softmax}(z_{ref}/T)
  \\,\\|\\, \\mathrm{softmax}(z/T))`, computed with ``log_softmax``;
* SAF (Sharpness-Aware training for Free): the reference is the example's own
  logits from :math:`\\tilde E` epochs earlier, kept in a store indexed by
  example (:func:`saf_init`, :func:`saf_reference`, :func:`saf_update`,
  :func:`saf_loss`);
* MESA (Memory-Efficient Sharpness-Aware training): the reference is the
  logits of an exponential moving average of the weights, which
  :func:`weight_ema` keeps in the optimizer state (:func:`ema_params` reads it)
  and :func:`mesa_loss` uses;
* :func:`active`: the epoch window in which the term is on.

:mod:`sam_optax.flax` has ready-made linen train steps
(``make_linen_saf_train_step``, ``make_linen_mesa_train_step``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree as tu
from sam_optax._src.validation import check_int, check_real

PyTree = Any

__all__ = ("SAFState", "WeightEMAState", "active", "ema_params", "mesa_loss", "saf_init",
           "saf_loss",
           "saf_reference", "saf_update", "trajectory_loss", "weight_ema")


def trajectory_loss(logits: jax.Array, ref_logits: jax.Array, *, temperature: float = 5.0,
                    weight: float = 1.0, where: jax.Array | None = None) -> jax.Array:
  r"""The trajectory (distillation) term of SAF and MESA.

  .. math::
     R = \lambda\, T^2\, \frac{1}{|S|}\sum_{i \in S} \sum_c p_{ic}
     \big(\log p_{ic} - \log q_{ic}\big),\quad
     p_i = \mathrm{softmax}(z^{ref}_i/T),\ q_i = \mathrm{softmax}(z_i/T)

  i.e. :math:`\lambda T^2` times the mean over the examples :math:`S` (all, or
  those where ``where`` is true) of :math:`\mathrm{KL}(p_i \| q_i)`. Both
  log-probabilities come from ``log_softmax`` (the reference code takes the log
  of a softmax, which underflows to ``-inf`` for confident logits); the
  reference logits get no gradient; the sum runs in float32.

  Args:
    logits: ``(B, C)`` current logits :math:`z`.
    ref_logits: ``(B, C)`` reference logits :math:`z^{ref}`.
    temperature: :math:`T > 0` (the paper: 5).
    weight: :math:`\lambda \ge 0`.
    where: optional ``(B,)`` boolean mask of the examples that count; none
      counting gives 0.

  Returns:
    The scalar :math:`R`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import trajectory
    >>> z = jnp.array([[2.0, 0.0, -1.0]])
    >>> float(trajectory.trajectory_loss(z, z))
    0.0
    >>> round(float(trajectory.trajectory_loss(z, jnp.zeros((1, 3)), temperature=1.0)), 4)
    0.7379

  References:
    Du, Yan, Feng, Zhou, Tan, Goh, `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
  """
  temperature = check_real("temperature", temperature, "trajectory_loss", low=0.0, low_open=True,
             hint="the paper uses 5")
  weight = check_real("weight", weight, "trajectory_loss", low=0.0)
  logits = jnp.asarray(logits).astype(jnp.float32)
  ref = jax.lax.stop_gradient(jnp.asarray(ref_logits).astype(jnp.float32))
  if logits.shape != ref.shape or logits.ndim != 2:
    raise ValueError(f"`trajectory_loss`: `logits` and `ref_logits` must both be (batch, classes), "
                     f"got {logits.shape} and {ref.shape}.")
  t = jnp.asarray(temperature, jnp.float32)
  log_p = jax.nn.log_softmax(ref / t, axis=-1)
  log_q = jax.nn.log_softmax(logits / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  if where is None:
    mean = jnp.mean(kl)
  else:
    w = jnp.asarray(where).astype(jnp.float32)
    mean = jnp.sum(w * kl) / jnp.maximum(jnp.sum(w), 1.0)
  return jnp.asarray(weight, jnp.float32) * t * t * mean


def active(epoch: Any, start_epoch: int, end_epoch: int | None = None) -> jax.Array:
  """Whether the trajectory term is on at ``epoch`` (0-based): ``start_epoch <= epoch <
  end_epoch`` (no end when ``end_epoch`` is None). The reference code's ``epoch >
  kl_start_epoch`` is ``start_epoch = kl_start_epoch + 1`` here.

  Example:
    >>> from sam_optax import trajectory
    >>> [bool(trajectory.active(e, 2, 4)) for e in range(5)]
    [False, False, True, True, False]
  """
  epoch = jnp.asarray(epoch)
  on = epoch >= start_epoch
  if end_epoch is not None:
    on = on & (epoch < end_epoch)
  return on


# ------------------------------------------------------------------------ SAF


class SAFState(NamedTuple):
  r"""SAF's logit store (a pytree: checkpoint it with the rest of the run).

  Attributes:
    logits: ``(N, lookback + 1, C)`` logits per example and slot; epoch e
      writes slot ``e % (lookback + 1)``.
    epochs: ``(N, lookback + 1)`` int32 epoch each slot was written in (-1:
      never), so an example not seen in the epoch :math:`\tilde E` back (the
      last, partial batch of an epoch is often dropped) gets no reference
      instead of a stale or empty one.

  Example:
    >>> from sam_optax import trajectory
    >>> isinstance(trajectory.saf_init(num_examples=8, num_classes=3), trajectory.SAFState)
    True
  """
  logits: jax.Array
  epochs: jax.Array


def saf_init(num_examples: int, num_classes: int, lookback: int = 2,
             dtype: Any = jnp.float32) -> SAFState:
  r"""An empty SAF store for ``num_examples`` training examples.

  Memory: ``num_examples * (lookback + 1) * num_classes`` floats of ``dtype``
  plus ``num_examples * (lookback + 1)`` int32 (ImageNet-1k with
  :math:`\tilde E = 2`: 1.28M x 3 x 1000 x 4 bytes = 15 GB in float32, 7.7 GB
  in bfloat16; CIFAR-10: 50k x 3 x 10 x 4 bytes = 6 MB). Keep it on the device
  for small problems; for large ones store it in bfloat16 or on the host.

  Args:
    num_examples: N, the size of the training set (examples are addressed by
      their index in it).
    num_classes: C.
    lookback: :math:`\tilde E \ge 1`, how many epochs back the reference logits
      are taken (the paper: 2; its code's default is 3).
    dtype: storage dtype of the logits.

  Example:
    >>> from sam_optax import trajectory
    >>> store = trajectory.saf_init(4000, 10, lookback=2)
    >>> store.logits.shape, store.logits.nbytes
    ((4000, 3, 10), 480000)

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
  """
  num_examples = check_int("num_examples", num_examples, "saf_init", minimum=1)
  num_classes = check_int("num_classes", num_classes, "saf_init", minimum=1)
  lookback = check_int("lookback", lookback, "saf_init", minimum=1, hint="the paper uses 2")
  slots = int(lookback) + 1
  return SAFState(jnp.zeros((num_examples, slots, num_classes), dtype),
                  jnp.full((num_examples, slots), -1, jnp.int32))


def _lookback(state: SAFState) -> int:
  return state.logits.shape[1] - 1


def saf_reference(state: SAFState, indices: jax.Array, epoch: Any) -> tuple[jax.Array, jax.Array]:
  r"""The logits the examples ``indices`` had :math:`\tilde E` epochs before ``epoch``.

  Returns:
    ``(ref_logits, valid)``: ``(B, C)`` float32 logits from slot ``(epoch -
    lookback) % (lookback + 1)``, and a ``(B,)`` bool that is true where that
    slot was really written in epoch ``epoch - lookback``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import trajectory
    >>> s = trajectory.saf_init(5, 2, lookback=1)
    >>> s = trajectory.saf_update(s, jnp.array([3]), jnp.array([[1.0, 2.0]]), epoch=0)
    >>> ref, valid = trajectory.saf_reference(s, jnp.array([3, 4]), epoch=1)
    >>> ref.tolist(), valid.tolist()
    ([[1.0, 2.0], [0.0, 0.0]], [True, False])
  """
  back = _lookback(state)
  source = jnp.asarray(epoch, jnp.int32) - back
  slot = source % (back + 1)
  indices = jnp.asarray(indices)
  ref = state.logits[indices, slot].astype(jnp.float32)
  valid = (state.epochs[indices, slot] == source) & (source >= 0)
  return ref, valid


def saf_update(state: SAFState, indices: jax.Array, logits: jax.Array, epoch: Any) -> SAFState:
  """Writes the examples' current logits into the slot of ``epoch`` (no gradient).

  Each example should appear once per batch (duplicates write one of their rows).

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import trajectory
    >>> state = trajectory.saf_init(num_examples=4, num_classes=3)
    >>> state = trajectory.saf_update(state, jnp.array([0, 2]), jnp.ones((2, 3)), epoch=0)
    >>> isinstance(state, trajectory.SAFState)
    True
  """
  slot = jnp.asarray(epoch, jnp.int32) % state.logits.shape[1]
  indices = jnp.asarray(indices)
  logits = jax.lax.stop_gradient(jnp.asarray(logits)).astype(state.logits.dtype)
  return SAFState(state.logits.at[indices, slot].set(logits),
                  state.epochs.at[indices, slot].set(jnp.asarray(epoch, jnp.int32)))


def saf_loss(state: SAFState, logits: jax.Array, indices: jax.Array, epoch: Any, *,
             weight: float = 0.3, temperature: float = 5.0, start_epoch: int = 5,
             end_epoch: int | None = None) -> tuple[jax.Array, SAFState]:
  r"""SAF's regularizer for a batch, and the store with the batch's logits written.

  .. math::
     R = \lambda T^2 \,\mathrm{mean}_i\, \mathrm{KL}\big(\mathrm{softmax}(z_i^{(e - \tilde E)}/T)
     \,\|\, \mathrm{softmax}(z_i/T)\big)

  over the examples that have logits from epoch :math:`e - \tilde E`, and 0
  outside the window (:func:`active`). Add :math:`R` to the training loss; the
  step still takes one gradient pass. Call it inside the loss function being
  differentiated, with ``has_aux`` to get the store out.

  Args:
    state: the store (:func:`saf_init`).
    logits: ``(B, C)`` logits of the batch at the current weights.
    indices: ``(B,)`` int indices of the batch's examples in the training set.
    epoch: the current 0-based epoch (may be traced, e.g.
      ``step // steps_per_epoch``).
    weight: :math:`\lambda` (the paper: 0.3).
    temperature: :math:`T` (the paper: 5).
    start_epoch, end_epoch: the window (the paper: from epoch 5).

  Returns:
    ``(R, new_state)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import trajectory
    >>> store = trajectory.saf_init(8, 3, lookback=1)
    >>> idx = jnp.arange(4); z = jnp.ones((4, 3))
    >>> r0, store = trajectory.saf_loss(store, z, idx, epoch=0, start_epoch=1)
    >>> r1, store = trajectory.saf_loss(store, 2 * z, idx, epoch=1, start_epoch=1)
    >>> float(r0), float(r1)
    (0.0, 0.0)

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
  """
  ref, valid = saf_reference(state, indices, epoch)
  reg = trajectory_loss(logits, ref, temperature=temperature, weight=weight,
                        where=valid & active(epoch, start_epoch, end_epoch))
  return reg, saf_update(state, indices, logits, epoch)


# ----------------------------------------------------------------------- MESA


def mesa_loss(logits: jax.Array, ema_logits: jax.Array, epoch: Any, *, weight: float = 0.8,
              temperature: float = 5.0, start_epoch: int = 5,
              end_epoch: int | None = None) -> jax.Array:
  r"""MESA's regularizer: the trajectory loss towards the EMA model's logits.

  .. math::
     R = \lambda T^2\,\mathrm{mean}_i\,\mathrm{KL}\big(\mathrm{softmax}(z_i^{EMA}/T)
     \,\|\, \mathrm{softmax}(z_i/T)\big)

  inside the window (:func:`active`), 0 outside. ``ema_logits`` come from a
  forward pass of the :func:`weight_ema` weights without gradient (one extra
  forward per step, no extra backward).

  Args:
    logits: ``(B, C)`` logits at the current weights.
    ema_logits: ``(B, C)`` logits of the EMA weights on the same batch.
    epoch: the current 0-based epoch (may be traced).
    weight: :math:`\lambda` (the paper: 0.8).
    temperature: :math:`T` (the paper: 5).
    start_epoch, end_epoch: the window (the paper: from epoch 5).

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import trajectory
    >>> z = jnp.array([[1.0, 0.0]])
    >>> float(trajectory.mesa_loss(z, z, epoch=9))
    0.0

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
  """
  reg = trajectory_loss(logits, ema_logits, temperature=temperature, weight=weight)
  return jnp.where(active(epoch, start_epoch, end_epoch), reg, 0.0)


class WeightEMAState(NamedTuple):
  """State of :func:`weight_ema`.

  Attributes:
    count: int32 number of updates seen.
    ema: the moving average of the weights (float32 for bf16/fp16/float32
      params, float64 for float64 ones).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> state = sam_optax.weight_ema(0.9).init(jnp.ones(3))
    >>> isinstance(state, sam_optax.WeightEMAState), state.ema.tolist()
    (True, [1.0, 1.0, 1.0])
  """
  count: jax.Array
  ema: PyTree


def _ema_dtype(x: jax.Array) -> Any:
  dt = jnp.result_type(x)
  return jnp.promote_types(dt, jnp.float32) if jnp.issubdtype(dt, jnp.inexact) else dt


def weight_ema(decay: float = 0.9998) -> optax.GradientTransformationExtraArgs:
  r"""An exponential moving average of the weights, kept in the optimizer state.

  Put it **last** in the chain, so that it sees the final updates: with
  :math:`w_{t+1} = w_t + u_t`,

  .. math:: \bar w_0 = w_0,\qquad \bar w_{t+1} = \delta\, \bar w_t + (1 - \delta)\, w_{t+1}

  The updates pass through unchanged. Read the average with
  :func:`ema_params`. The average is kept in at least float32, so a bf16
  model's EMA does not stall (a bf16 number cannot move by
  :math:`(1-\delta) = 2\cdot 10^{-4}` of itself). Choose :math:`\delta` for the
  run's length: its horizon is about :math:`1/(1-\delta)` steps (0.9998 is
  5,000 steps, the paper's ImageNet setting; a run of a thousand steps wants
  about 0.99).

  Args:
    decay: :math:`\delta \in [0, 1)`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` needs
    ``params`` and ignores extra arguments.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sam_optax import trajectory
    >>> opt = optax.chain(optax.sgd(0.1), trajectory.weight_ema(0.5))
    >>> w = jnp.ones(2); state = opt.init(w)
    >>> u, state = opt.update(jnp.ones(2), state, w)
    >>> w = optax.apply_updates(w, u)                     # 0.9
    >>> trajectory.ema_params(state).tolist()             # 0.5 * 1 + 0.5 * 0.9
    [0.949999988079071, 0.949999988079071]

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022 (MESA).
  """
  decay = check_real("decay", decay, "weight_ema", low=0.0, high=1.0, high_open=True,
             hint="0.9998 in the paper; about 1 - 1/steps for a short run")

  def init(params):
    if params is None:
      raise ValueError("`weight_ema.init(params)` needs the parameters, not None.")
    # a copy, not the params' own buffers: the caller may donate params and state together
    return WeightEMAState(jnp.zeros([], jnp.int32),
                          jax.tree.map(lambda w: jnp.array(w, dtype=_ema_dtype(w), copy=True),
                                       params))

  def update(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("`weight_ema.update` needs the current parameters: call "
                       "`update(updates, state, params)`, with `weight_ema` last in the chain.")
    d = jnp.asarray(decay, jnp.float32)
    ema = jax.tree.map(
        lambda e, w, u: (d * e + (1.0 - d) * (w.astype(e.dtype) + u.astype(e.dtype))
                         ).astype(e.dtype),
        state.ema, params, updates)
    return updates, WeightEMAState(optax.safe_increment(state.count), ema)

  return optax.GradientTransformationExtraArgs(init, update)


def ema_params(opt_state: optax.OptState, like: PyTree | None = None) -> PyTree:
  """The :func:`weight_ema` average found anywhere in an optimizer state.

  Args:
    opt_state: any optimizer state containing a :class:`WeightEMAState`
      (inside ``chain``, ``inject_hyperparams``, ``MultiSteps``, ...).
    like: optional params whose dtypes the result is cast to.

  Returns:
    The averaged weights.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import trajectory
    >>> opt = optax.chain(optax.sgd(0.1), sam_optax.weight_ema(0.9))
    >>> trajectory.ema_params(opt.init({"w": jnp.ones(2)}))["w"].tolist()
    [1.0, 1.0]
  """
  found = []
  jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, WeightEMAState) and not found.append(x))
  if not found:
    raise ValueError("`ema_params`: no WeightEMAState in `opt_state`; put "
                     "`sam_optax.weight_ema(decay)` last in the optimizer chain.")
  ema = found[0].ema
  return ema if like is None else tu.cast_like(ema, like)
