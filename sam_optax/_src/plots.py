"""Matplotlib figures of :mod:`sam_optax.sharpness`'s measurements (re-exported there).

matplotlib is an optional dependency: it is imported when a function creates its own axes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_landscape_1d", "plot_landscape_2d", "plot_spectrum"]


def _axes(ax):
  if ax is not None:
    return ax
  import matplotlib.pyplot as plt
  return plt.subplots(figsize=(5, 3.5))[1]


def plot_landscape_1d(curves: dict[str, tuple[Any, Any]], ax=None, *, xlabel: str = r"$\alpha$"):
  """One axis, one line per solution: ``curves = {name: (alphas, losses)}``. Returns the axes.

  Example:
    >>> import jax.numpy as jnp, matplotlib
    >>> matplotlib.use("Agg")
    >>> from sam_optax import sharpness
    >>> curve = sharpness.loss_landscape_1d(lambda w: jnp.sum(w ** 2), jnp.ones(3))
    >>> ax = sharpness.plot_landscape_1d({"w = 1": curve})
    >>> ax.get_ylabel(), len(ax.get_lines())
    ('loss', 1)
  """
  ax = _axes(ax)
  for name, (a, loss) in curves.items():
    ax.plot(np.asarray(a), np.asarray(loss), label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("loss")
  ax.legend()
  ax.grid(alpha=0.3)
  return ax


def plot_landscape_2d(alphas, betas, losses, ax=None, *, levels: int = 30, log: bool = True):
  """Contour plot of :func:`sam_optax.sharpness.loss_landscape_2d`'s output. Returns the axes.

  Example:
    >>> import jax.numpy as jnp, matplotlib
    >>> matplotlib.use("Agg")
    >>> from sam_optax import sharpness
    >>> params = jnp.ones((2, 2))
    >>> ax = sharpness.plot_landscape_2d(*sharpness.loss_landscape_2d(
    ...     lambda w: jnp.sum(w ** 2), params, alphas=jnp.linspace(-1, 1, 9)))
    >>> ax.get_title()
    'log loss'
  """
  ax = _axes(ax)
  z = np.asarray(losses)
  z = np.log(np.maximum(z, 1e-12)) if log else z
  cs = ax.contour(np.asarray(alphas), np.asarray(betas), z.T, levels=levels)
  ax.clabel(cs, inline=True, fontsize=6)
  ax.set_xlabel(r"$\alpha$")
  ax.set_ylabel(r"$\beta$")
  ax.set_title("log loss" if log else "loss")
  return ax


def plot_spectrum(spectrum: dict[str, Any], ax=None, *, label: str | None = None):
  """Eigenvalue density from :func:`sam_optax.sharpness.hessian_spectrum` (log scale). Returns the
  axes.

  Example:
    >>> import jax.numpy as jnp, matplotlib
    >>> matplotlib.use("Agg")
    >>> from sam_optax import sharpness
    >>> loss = lambda w: jnp.sum(jnp.arange(1.0, 5.0) * w ** 2)
    >>> spec = sharpness.hessian_spectrum(loss, jnp.ones(4))
    >>> ax = sharpness.plot_spectrum(spec, label="quadratic")
    >>> ax.get_xlabel(), ax.get_yscale()
    ('eigenvalue', 'log')
  """
  ax = _axes(ax)
  ax.semilogy(np.asarray(spectrum["grid"]), np.asarray(spectrum["density"]) + 1e-12, label=label)
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density")
  if label:
    ax.legend()
  ax.grid(alpha=0.3)
  return ax
