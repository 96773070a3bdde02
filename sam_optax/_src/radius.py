"""The radius ρ at each step: a number, a schedule of the step count, or a rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax._src.validation import check_real

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]
Rho = ScalarOrSchedule


AUTO_METHODS = ("sharpness_aware", "sam", "asam")


def check_rho(rho: Any, fn: str = "sharpness_aware", auto: float | None = None) -> Any:
  """Raises on a rho that is neither a schedule nor a finite number >= 0 (nor, where the
  method supports it, ``"auto"``); returns it (a concrete number as a Python float,
  ``"auto"`` as the :class:`AutoRho` rule whose starting radius is ``auto``)."""
  if isinstance(rho, str) and rho == AUTO or is_auto(rho):
    if auto is None:
      raise ValueError(f"`{fn}(rho={rho!r})`: the automatic radius is available for "
                       f"{', '.join(AUTO_METHODS)} (and sharpness_aware's geometries); "
                       f"give {fn} a number or a schedule.")
    return rho.resolved(auto) if is_auto(rho) else auto_rule(auto)
  if callable(rho):
    return rho
  try:
    return check_real("rho", rho, fn, low=0.0)
  except TypeError:
    also = ', or "auto"' if auto is not None else ""
    raise TypeError(f"`{fn}(rho=...)` must be a float or a schedule (a callable of the "
                    f"step count){also}, got {type(rho).__name__} {rho!r}.") from None
  except ValueError:
    raise ValueError(f"`{fn}(rho=...)` must be finite and >= 0, got {rho!r}; the usual "
                     "value is 0.05 for SAM (0.5 to 1.0 for ASAM).") from None


def at(value: ScalarOrSchedule, count: Any) -> jax.Array:
  """A float or a schedule of the step count, as a float32 scalar."""
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


# --------------------------------------------------------------------------------------
# rho="auto": a radius that follows the measured one-step sharpness
# --------------------------------------------------------------------------------------

AUTO = "auto"
SIGNALS = ("relsharp", "budget", "relgrad", "curvature")
DEFAULT_TARGET = 0.2
DEFAULT_CONVEXITY = 0.02
DEFAULT_RATE = 0.02


class RadiusState(NamedTuple):
  """State of the ``rho="auto"`` rule (the ``radius`` field of a sharpness-aware state).

  Attributes:
    rho: float32, the radius the next step uses.
    last: float32, the radius the last step used (:func:`sam_optax.metrics`' ``"rho"``).
    signal: float32, the rule's measurement on the last step.
    memory: float32 ``(3,)``, what the rule keeps between steps (for the curvature rule:
      the running average of the curvature along the ascent, its lowest value so far, and
      the number of steps averaged).

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> state = sam_optax.sam(optax.sgd(0.1), rho="auto").init(jnp.ones(3))
    >>> isinstance(state[0].radius, sam_optax.RadiusState), round(float(state[0].radius.rho), 4)
    (True, 0.05)
  """
  rho: jax.Array
  last: jax.Array
  signal: jax.Array
  memory: jax.Array


@dataclasses.dataclass(frozen=True)
class AutoRho:
  """The configuration of the ``rho="auto"`` controller (see :func:`sam_optax.auto_rho`);
  ``None`` fields take the method's values when it is built (:meth:`resolved`)."""
  target: float = DEFAULT_TARGET
  initial: float | None = None
  low: float | None = None
  high: float | None = None
  rate: float = DEFAULT_RATE
  signal: str = "relsharp"
  ratchet: bool = False
  convexity: float = DEFAULT_CONVEXITY
  decay: float = 0.99
  warmup: float = 50.0
  permit: float = 0.0

  def resolved(self, initial: float) -> AutoRho:
    """The rule with its unset radii filled in from the method's usual radius."""
    start = self.initial if self.initial is not None else initial
    low = self.low if self.low is not None else start / 50.0
    high = self.high if self.high is not None else start * 20.0
    return dataclasses.replace(self, initial=start, low=low, high=high)

  @property
  def needs_losses(self) -> bool:
    return self.signal in ("relsharp", "budget", "curvature", "kappa")

  @property
  def needs_clean_norm(self) -> bool:
    return (self.signal in ("budget", "curvature", "relgrad", "kappa") or self.convexity > 0
            or self.permit > 0)

  @property
  def needs_difference(self) -> bool:
    return self.signal == "relgrad"

  def init(self) -> RadiusState:
    rho = jnp.asarray(self.initial, jnp.float32)
    return RadiusState(rho, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32),
                       jnp.zeros([3], jnp.float32))

  def measure(self, rho: jax.Array, clean_loss: Any, perturbed_loss: Any, g_norm: Any,
              diff_norm: Any) -> jax.Array:
    """What one step measured, as float32 ``[signal, ratio]``: the signal the target is
    set on, and the rise of the loss over its first-order prediction,
    :math:`(L(w+\\epsilon) - L(w)) / (\\rho \\|g\\|)` (1 where the loss is linear along
    the ascent, below 1 where it bends down: the radius reaches past the bowl). Either
    is NaN where it is not defined."""
    nan = jnp.float32(jnp.nan)   # what a rule does not need may be absent: NaN stands in
    f32 = lambda x: nan if x is None else jnp.asarray(x, jnp.float32)
    tiny = jnp.float32(1e-12)
    loss = f32(clean_loss)
    rise = f32(perturbed_loss) - loss
    first = rho * f32(g_norm)
    if self.signal == "relgrad":
      signal = f32(diff_norm) / jnp.maximum(f32(g_norm), tiny)
    elif self.signal == "budget":
      signal = first / jnp.maximum(loss, tiny)
    elif self.signal == "relsharp":
      signal = rise / jnp.maximum(loss, tiny)
    elif self.signal == "kappa":   # the curvature along the ascent, from the two losses
      signal = 2.0 * (rise - first) / jnp.maximum(jnp.square(rho), tiny)
    else:   # "curvature": the second-order part against the first
      signal = 2.0 * (rise - first) / jnp.maximum(first, tiny)
    ratio = (rise / jnp.maximum(first, tiny) if self.convexity > 0
             else jnp.ones([], jnp.float32))
    kappa = (2.0 * (rise - first) / jnp.maximum(jnp.square(rho), tiny) if self.permit > 0
             else jnp.zeros([], jnp.float32))
    return jnp.stack([signal, ratio, kappa]).astype(jnp.float32)

  def observe(self, state: RadiusState, rho: jax.Array, measured: jax.Array) -> RadiusState:
    """One step of the controller: log rho moves by at most ``rate`` towards the target
    (and down where the loss bends down along the ascent, with ``convexity``)."""
    signal, ratio = measured[0], measured[1]
    memory = state.memory
    if self.signal == "kappa":
      error, memory = self._kappa_error(state.memory, signal, self.target)
    else:
      error = jnp.clip((self.target - signal) / self.target, -1.0, 1.0)
    if self.permit > 0:   # grow only while the curvature along the ascent is rising
      rising, memory = self._kappa_error(state.memory, measured[2], self.permit)
      error = jnp.minimum(error, jnp.maximum(rising, 0.0))
    if self.convexity > 0:
      error = jnp.minimum(error, jnp.clip((ratio - 1.0) / self.convexity, -1.0, 1.0))
    if self.ratchet:   # grows to the target and stays: no shrinking as the fit sharpens
      error = jnp.maximum(error, 0.0)
    ok = jnp.isfinite(error)
    moved = jnp.clip(state.rho * jnp.exp(self.rate * jnp.where(ok, error, 0.0)),
                     self.low, self.high)
    new_rho = jnp.where(ok, moved, state.rho).astype(jnp.float32)
    memory = jnp.where(jnp.isfinite(signal), memory, state.memory).astype(jnp.float32)
    return RadiusState(new_rho, jnp.asarray(rho, jnp.float32),
                       jnp.where(jnp.isfinite(signal), signal, 0.0).astype(jnp.float32), memory)

  def _kappa_error(self, memory: jax.Array, kappa: jax.Array, factor: float
                   ) -> tuple[jax.Array, jax.Array]:
    """The curvature rule: the radius grows while the averaged curvature along the ascent
    is above ``target`` times its lowest level so far (the curvature rises as a network
    starts to memorize) and shrinks otherwise."""
    average, lowest, n = memory[0], memory[1], memory[2]
    n = n + 1.0
    beta = jnp.minimum(self.decay, 1.0 - 1.0 / n)   # a plain mean over the first steps
    average = beta * average + (1.0 - beta) * kappa
    floor = jnp.float32(1e-6)
    warm = n >= self.warmup
    lowest = jnp.where(warm, jnp.where(n == self.warmup, average, jnp.minimum(lowest, average)),
                       average)
    ref = factor * jnp.maximum(lowest, floor)
    error = jnp.where(warm, jnp.clip((average - ref) / ref, -1.0, 1.0), 0.0)
    return error, jnp.stack([average, lowest, n])


def auto_rule(initial: float = 0.05, **overrides: Any) -> AutoRho:
  """The ``"auto"`` rule for a method whose usual radius is ``initial`` (``overrides``: the
  constants of the rules that were tried, for the benchmarks)."""
  return AutoRho(**overrides).resolved(initial)


def auto_rho(target: float = DEFAULT_TARGET, *, convexity: float = DEFAULT_CONVEXITY,
             initial: float | None = None, low: float | None = None,
             high: float | None = None, rate: float = DEFAULT_RATE) -> AutoRho:
  r"""The ``rho="auto"`` rule with its constants spelled out, to pass as ``rho=``.

  ``rho="auto"`` is ``rho=auto_rho()``. SAM's second pass gives two numbers for free: the
  relative one-step sharpness :math:`s_t = (L(w_t+\epsilon_t) - L(w_t))/L(w_t)` and the
  rise of the loss over its first-order prediction,
  :math:`r_t = (L(w_t+\epsilon_t) - L(w_t))/(\rho_t\|g_t\|)` (above 1 while the loss
  curves up along the ascent, below 1 where the radius reaches past the bowl). After each
  step

  .. math::
     e_t = \min\Big(\mathrm{clip}\big(\tfrac{\tau - s_t}{\tau}, -1, 1\big),\
                    \mathrm{clip}\big(\tfrac{r_t - 1}{\delta}, -1, 1\big)\Big),\qquad
     \rho_{t+1} = \mathrm{clip}\big(\rho_t e^{\eta e_t},\ \rho_{\min}, \rho_{\max}\big),

  so the radius grows while the neighbourhood is flatter than the target :math:`\tau` and
  the loss still curves up over it, and shrinks otherwise, by at most a factor
  :math:`e^{\eta}` per step. A step whose measurements are not finite leaves the radius
  as it was. ``update`` needs the clean loss (``value=``) and a closure that returns the
  loss (``value_and_grad_fn=`` or ``objective=``); under ``axis_name`` the devices'
  measurements are averaged, so every device keeps the same radius.

  Where it helps and where it does not (``benchmarks/auto_rho.json``, the "Choosing ρ"
  guide): it finds the large radii that label noise over many epochs needs, and it is
  too large for one-pass training and short clean runs, whose best radius is 0.01-0.05.

  Args:
    target: :math:`\tau`, the relative rise of the loss at the perturbed point.
    convexity: :math:`\delta`, how far below 1 the rise ratio may fall before the radius
      shrinks (0 turns the check off).
    initial: :math:`\rho_0` (None: the method's usual radius, 0.05 for SAM, 0.5 for
      ASAM).
    low, high: :math:`\rho_{\min}, \rho_{\max}` (None: :math:`\rho_0/50` and
      :math:`20\rho_0`).
    rate: :math:`\eta`, the largest change of :math:`\log\rho` per step.

  Returns:
    The rule, for ``sharpness_aware(rho=...)``, ``sam(..., rho=...)`` or
    ``asam(..., rho=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(w ** 2) + jnp.sum(jnp.cos(3 * w))
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=sam_optax.auto_rho(target=0.1))
    >>> w = jnp.array([1.0, -0.5]); state = tx.init(w)
    >>> value, g = jax.value_and_grad(loss)(w)
    >>> updates, state = tx.update(g, state, w, value=value,
    ...                            value_and_grad_fn=jax.value_and_grad(loss))
    >>> round(float(sam_optax.metrics(state)["rho"]), 4)   # the radius of this step
    0.05

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (the one-step
    sharpness estimate).
  """
  fn = "auto_rho"
  target = check_real("target", target, fn, low=0.0, hint="e.g. 0.2")
  rate = check_real("rate", rate, fn, low=0.0, hint="e.g. 0.02")
  if target <= 0 or rate <= 0:
    raise ValueError(f"`auto_rho`: `target` and `rate` must be > 0, got target={target}, "
                     f"rate={rate}.")
  for name, value in (("initial", initial), ("low", low), ("high", high)):
    if value is not None and check_real(name, value, fn, low=0.0) <= 0:
      raise ValueError(f"`auto_rho({name}=...)` must be > 0 (or None for the method's value), "
                       f"got {value}.")
  if low is not None and high is not None and low > high:
    raise ValueError(f"`auto_rho`: `low` ({low}) must not exceed `high` ({high}).")
  convexity = check_real("convexity", convexity, fn, low=0.0, hint="e.g. 0.02; 0 turns it off")
  return AutoRho(target=target, initial=initial, low=low, high=high, rate=rate,
                 convexity=convexity)


def is_auto(rho: Any) -> bool:
  return isinstance(rho, AutoRho)
