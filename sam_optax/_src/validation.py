"""Eager checks of constructor arguments: clear errors that name the argument.

Each check accepts a traced value silently (``optax.inject_hyperparams`` hands
hyperparameters in as arrays, inside ``jit`` as tracers): those are checked by
the caller's own code or not at all, never by a crash deep inside JAX.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np


def _concrete_scalar(value: Any, name: str, fn: str, kind: str) -> Any:
  """The Python number in ``value``, None if it is traced; TypeError if not a scalar number."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{fn}({name}=...)` must be {kind}, got the bool {value!r}.")
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if np.ndim(value) != 0:
      raise TypeError(f"`{fn}({name}=...)` must be a scalar ({kind}), got an array of shape "
                      f"{np.shape(value)}.")
    value = np.asarray(value).item()
  if isinstance(value, complex) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{fn}({name}=...)` must be {kind}, got {type(value).__name__} "
                    f"{value!r}.")
  return value


def check_real(name: str, value: Any, fn: str, *, low: float | None = None,
               high: float | None = None, low_open: bool = False, high_open: bool = False,
               hint: str = "") -> None:
  """A finite real scalar within [low, high] (ends open where asked)."""
  v = _concrete_scalar(value, name, fn, "a real number")
  if v is None:
    return
  v = float(v)
  bad = not math.isfinite(v)
  if low is not None:
    bad |= v <= low if low_open else v < low
  if high is not None:
    bad |= v >= high if high_open else v > high
  if bad:
    if low is not None and high is not None:
      where = (f" and lie in {'(' if low_open else '['}{low:g}, {high:g}"
               f"{')' if high_open else ']'}")
    elif low is not None:
      where = f" and {'>' if low_open else '>='} {low:g}"
    elif high is not None:
      where = f" and {'<' if high_open else '<='} {high:g}"
    else:
      where = ""
    raise ValueError(f"`{fn}({name}=...)` must be finite{where}, got {value!r}"
                     + (f"; {hint}." if hint else "."))


def check_int(name: str, value: Any, fn: str, *, minimum: int | None = None,
              hint: str = "") -> None:
  """An integer scalar (Python, numpy or a concrete int array) >= minimum."""
  v = _concrete_scalar(value, name, fn, "an int")
  if v is None:
    return
  if not isinstance(v, numbers.Integral):
    raise TypeError(f"`{fn}({name}=...)` must be an int, got {type(v).__name__} {value!r}"
                    + (f"; {hint}." if hint else "."))
  if minimum is not None and v < minimum:
    raise ValueError(f"`{fn}({name}=...)` must be an int >= {minimum}, got {value!r}"
                     + (f"; {hint}." if hint else "."))


def check_static_int(name: str, value: Any, fn: str, *, minimum: int = 1, hint: str = "") -> None:
  """An int that fixes the program's structure (a number of passes): never traced."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"`{fn}({name}=...)` sets how many gradient passes the step traces and "
                    "cannot be a traced value; with `optax.inject_hyperparams` list it in "
                    f"`static_args=('{name}',)`.")
  check_int(name, value, fn, minimum=minimum, hint=hint)


def check_transform(name: str, value: Any, fn: str) -> None:
  if not (hasattr(value, "init") and hasattr(value, "update")):
    raise TypeError(f"`{fn}({name}=...)` must be an optax GradientTransformation (with "
                    f"`init` and `update`), such as `sam_optax.sharpness_aware(0.05)`; got "
                    f"{type(value).__name__}.")
