r"""Diagnostics of a model under training: dead (never active) units.

A ReLU unit whose pre-activation is non-positive on every input of a batch outputs 0 and
passes no gradient to its weights, so nothing on that batch can revive it. When a whole
layer dies, every input reaches the next layer as the same vector: the logits stop
depending on the input, and the loss stays at the entropy of the label marginal
(:math:`\ln 10` for ten balanced classes). SAM makes this more likely: its gradient is
taken at :math:`w + \epsilon` with :math:`\|\epsilon\| = \rho`, and a step that is harmless
at :math:`w` can push a layer without normalization over the edge at :math:`w+\epsilon`.

* :func:`dead_unit_fraction`: the share of units of one activation array that are
  inactive on the whole batch.
* :func:`linen_dead_unit_fractions`: the same for every layer of a Flax linen model,
  from one forward pass (``capture_intermediates`` and anything the model ``sow``\ s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["dead_unit_fraction", "linen_dead_unit_fractions"]


def _unit_axis(ndim: int, axis: int) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"`dead_unit_fraction(axis=...)`: axis {axis} is out of range for an "
                     f"activation of {ndim} dimensions; pass the axis of the units (features, "
                     f"channels), e.g. -1.")
  return axis % ndim


def dead_unit_fraction(activations: jax.Array, axis: int = -1, *,
                       threshold: float = 0.0) -> jax.Array:
  r"""The fraction of units inactive on every example of a batch.

  For activations :math:`a_{n,j}` (examples and positions :math:`n`, units :math:`j`,
  :math:`J` units), unit :math:`j` is dead on the batch when it is at most ``threshold``
  everywhere, and

  .. math::

     \mathrm{dead}(a) = \frac{1}{J} \sum_{j=1}^{J} \mathbb{1}\Big[\max_n a_{n,j} \le \tau\Big].

  Every axis except ``axis`` counts as "examples": for a convolution's
  :math:`(B, H, W, C)` output a channel is dead when it is inactive at every position of
  every image. Pass the pre-activation :math:`z` (a ``Dense`` or ``BatchNorm`` output) or
  the ReLU's output :math:`\max(z, 0)`: both give the same value at :math:`\tau = 0`. With
  ``leaky_relu`` or GELU the unit still passes gradient, so the value then measures
  inactivity, not death.

  Args:
    activations: an array with at least one axis; a batch of one example gives the
      fraction inactive on that example.
    axis: the axis of the units (``-1`` for channels-last layouts).
    threshold: :math:`\tau`; a unit is inactive where its value is :math:`\le \tau`.

  Returns:
    A float32 scalar in :math:`[0, 1]`; NaNs count as active (they are not a dead unit's
    symptom, and :func:`sam_optax.skip_if_nonfinite` is the tool for them).

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.diagnostics import dead_unit_fraction
    >>> z = jnp.array([[-1.0, 2.0, 0.0, -3.0],
    ...                [-0.5, -1.0, 0.0, 4.0]])   # 2 examples, 4 units
    >>> float(dead_unit_fraction(z))              # units 0 and 2 never fire
    0.5
    >>> feature_map = jnp.ones((8, 5, 5, 3)).at[..., 1].set(-1.0)  # (B, H, W, C): channel 1 is off
    >>> round(float(dead_unit_fraction(feature_map)), 4)
    0.3333

  References:
    L. Lu, Y. Shin, Y. Su, G. E. Karniadakis, `Dying ReLU and initialization: theory and
    numerical examples <https://arxiv.org/abs/1903.06733>`_, 2019.

    A. L. Maas, A. Y. Hannun, A. Y. Ng, `Rectifier nonlinearities improve neural network
    acoustic models <https://ai.stanford.edu/~amaas/papers/relu_hybrid_icml2013_final.pdf>`_
    (the leaky ReLU), ICML 2013.
  """
  a = jnp.asarray(activations)
  if a.ndim == 0:
    raise ValueError("`dead_unit_fraction(activations=...)` got a scalar; pass a batch of "
                     "activations with a units axis, e.g. shape (batch, units).")
  unit = _unit_axis(a.ndim, axis)
  others = tuple(i for i in range(a.ndim) if i != unit)
  active = jnp.any(~(a.astype(jnp.float32) <= threshold), axis=others)  # NaN counts as active
  return 1.0 - jnp.mean(active.astype(jnp.float32))


def _recorded(tree: Any, prefix: tuple = ()):
  """``(path, values)`` of a Flax ``intermediates`` collection, depth first, in the order the
  layers were called (not sorted, as ``jax.tree`` would)."""
  for key, value in tree.items():
    if isinstance(value, tuple):
      yield prefix + (key,), value
    elif hasattr(value, "items"):
      yield from _recorded(value, prefix + (key,))


def linen_dead_unit_fractions(apply_fn: Callable[..., Any], variables: Any, x: Any, *,
                              capture: bool | Callable[[Any, str], bool] = True, axis: int = -1,
                              threshold: float = 0.0, mutable: Sequence[str] = (),
                              **apply_kwargs) -> dict[str, jax.Array]:
  r"""Per-layer dead-unit fractions of a Flax linen model on one batch.

  Runs ``apply_fn(variables, x, capture_intermediates=capture, mutable=['intermediates',
  *mutable], **apply_kwargs)`` and applies :func:`dead_unit_fraction` to every floating
  array the pass records: the output of each submodule's ``__call__`` that ``capture``
  selects, and each value the model stores with ``self.sow('intermediates', name, value)``.
  The model's own output (the logits) is left out.

  Since :math:`\mathrm{relu}(z) \le 0 \iff z \le 0`, the output of a ``Dense`` or
  ``BatchNorm`` followed by a ReLU already tells whether that ReLU is dead; ``sow`` the
  activation itself where the nonlinearity is not a ReLU or not the next operation.

  Args:
    apply_fn: ``model.apply`` (or a :class:`~sam_optax.flax.TrainState`'s ``apply_fn``).
    variables: ``{'params': ..., 'batch_stats': ...}`` as ``apply_fn`` takes them.
    x: the batch; use one large enough to be representative (a unit alive on one example
      in a thousand is alive).
    capture: Flax's ``capture_intermediates``: ``True`` for every submodule, ``False`` for
      sown values only, or a filter ``(module, method_name) -> bool``.
    axis: the units' axis in every recorded array.
    threshold: see :func:`dead_unit_fraction`.
    mutable: further collections the call must be allowed to write, e.g.
      ``('batch_stats',)`` with ``train=True`` (batch statistics; the updated statistics are
      discarded).
    **apply_kwargs: passed on, e.g. ``train=False`` or ``rngs={'dropout': key}``.

  Returns:
    ``{layer path: fraction}``, a path such as ``'Dense_0'`` or ``'Block_1/Conv_0'`` (a sown
    value: its module's path and its name), in the order Flax records them. Recorded values
    of more than one call of a layer get a ``#i`` suffix.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from sam_optax.diagnostics import linen_dead_unit_fractions
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     h = nn.relu(nn.Dense(4, name="hidden")(x))
    ...     return nn.Dense(2, name="out")(h)
    >>> model = Net()
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> params["hidden"]["bias"] = jnp.array([-100.0, -100.0, -100.0, 100.0])  # 3 of 4 dead
    >>> x = jax.random.normal(jax.random.key(1), (64, 3))
    >>> fractions = linen_dead_unit_fractions(model.apply, {"params": params}, x)
    >>> float(fractions["hidden"]), sorted(fractions)   # "out" (the logits layer) is there too
    (0.75, ['hidden', 'out'])
    >>> only_hidden = lambda module, method: module.name == "hidden"
    >>> list(linen_dead_unit_fractions(model.apply, {"params": params}, x, capture=only_hidden))
    ['hidden']

  References:
    S. Park, J. Jang, E. K. Ryu, I. Yang, `SAM can hallucinate minimizers
    <https://arxiv.org/abs/2509.21818>`_ (stalls of SAM at large :math:`\rho`), 2025.
  """
  if "capture_intermediates" in apply_kwargs or "mutable" in apply_kwargs:
    raise TypeError("`linen_dead_unit_fractions` sets `capture_intermediates` and `mutable` "
                    "itself; pass `capture=` and `mutable=` (extra collections) instead.")
  out = apply_fn(variables, x, capture_intermediates=capture, mutable=["intermediates", *mutable],
                 **apply_kwargs)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError("`linen_dead_unit_fractions(apply_fn=...)` must be a linen `apply` that "
                    "returns (output, mutated collections) when called with `mutable=`; pass "
                    "`model.apply`.")
  recorded = out[1].get("intermediates", {})
  fractions: dict[str, jax.Array] = {}
  for path, values in _recorded(recorded):
    name = "/".join(k for k in path if k != "__call__")
    if not name:  # the model's own output
      continue
    arrays = [v for v in values if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)
              and v.ndim >= 1]
    for i, value in enumerate(arrays):
      fractions[name if len(arrays) == 1 else f"{name}#{i}"] = dead_unit_fraction(
          value, axis, threshold=threshold)
  return fractions
