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
               hint: str = "") -> Any:
  """A finite real scalar within [low, high] (ends open where asked).

  Returns it as a Python float (a traced value unchanged), so that an int such
  as 2**31 or a product of ints never overflows the int32 a jitted step would
  give it.
  """
  v = _concrete_scalar(value, name, fn, "a real number")
  if v is None:
    return value
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
  return v


INT32_MAX = 2**31 - 1


def check_int(name: str, value: Any, fn: str, *, minimum: int | None = None,
              maximum: int = INT32_MAX, hint: str = "") -> Any:
  """An integer scalar (Python, numpy or a concrete int array) in [minimum, maximum].

  Returns it as a Python int (a traced value unchanged). The default maximum is
  the int32 range, which is what a jitted step holds it in.
  """
  v = _concrete_scalar(value, name, fn, "an int")
  if v is None:
    return value
  if not isinstance(v, numbers.Integral):
    raise TypeError(f"`{fn}({name}=...)` must be an int, got {type(v).__name__} {value!r}"
                    + (f"; {hint}." if hint else "."))
  v = int(v)
  if minimum is not None and v < minimum:
    raise ValueError(f"`{fn}({name}=...)` must be an int >= {minimum}, got {value!r}"
                     + (f"; {hint}." if hint else "."))
  if v > maximum:
    raise ValueError(f"`{fn}({name}=...)` must be an int <= {maximum}"
                     + (" (it is held as an int32 in the jitted step)" if maximum == INT32_MAX
                        else "") + f", got {value!r}" + (f"; {hint}." if hint else "."))
  return v


MAX_PASSES = 1024


def check_static_int(name: str, value: Any, fn: str, *, minimum: int = 1, hint: str = "",
                     maximum: int = MAX_PASSES) -> Any:
  """An int that fixes the program's structure (a number of passes): never traced.

  Capped at ``maximum``: each pass is unrolled in the trace or held in memory
  at once (vmapped samples), so a count in the millions would hang the trace
  or exhaust memory instead of failing with a message.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"`{fn}({name}=...)` sets how many gradient passes the step traces and "
                    "cannot be a traced value; with `optax.inject_hyperparams` list it in "
                    f"`static_args=('{name}',)`.")
  v = check_int(name, value, fn, minimum=minimum, hint=hint)
  if v > maximum:
    raise ValueError(f"`{fn}({name}=...)` must be an int <= {maximum} (each pass is traced or "
                     f"held in memory at once), got {value!r}; average over several steps "
                     "instead of asking for more passes in one.")
  return v


def check_transform(name: str, value: Any, fn: str) -> None:
  if not (hasattr(value, "init") and hasattr(value, "update")):
    raise TypeError(f"`{fn}({name}=...)` must be an optax GradientTransformation (with "
                    f"`init` and `update`), such as `sam_optax.sharpness_aware(0.05)`; got "
                    f"{type(value).__name__}.")
