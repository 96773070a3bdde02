"""The optimizers of the long benchmarks, by name, each wrapping its task's base optimizer.

A :class:`Spec` names a method, its main value (ρ for the sharpness-aware methods, λ for
SAF and MESA, ``"auto"`` for the radius rule) and options (``epochs=`` to override the
task's run length, ``m=`` for m-sharpness); its string form (``sam@0.05``,
``sam@auto``, ``sam@0.2+m=8``, ``sgd+epochs=80``) names the run in the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

import sam_optax as so
from sam_optax._src import radius


class Spec(NamedTuple):
  name: str
  value: Any = None
  options: tuple = ()   # sorted (key, value) pairs

  @classmethod
  def parse(cls, text: str) -> Spec:
    head, *opts = text.split("+")
    name, _, value = head.partition("@")
    parsed: Any = None
    if value:
      parsed = value if value == "auto" else float(value)
    pairs = tuple(sorted((k, _number(v)) for k, v in (o.split("=", 1) for o in opts)))
    return cls(name, parsed, pairs)

  def __str__(self) -> str:
    head = self.name if self.value is None else f"{self.name}@{self.value:g}" if isinstance(
        self.value, float) else f"{self.name}@{self.value}"
    return head + "".join(f"+{k}={v:g}" if isinstance(v, float) else f"+{k}={v}"
                          for k, v in self.options)

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)


def _number(text: str) -> Any:
  try:
    f = float(text)
  except ValueError:
    return text
  return int(f) if f.is_integer() and "." not in text else f


class Built(NamedTuple):
  """A method made for one run: the optimizer, the train-step kind (``plain``, ``esam``,
  ``saf``, ``mesa``, ``sampa``), the step's options, whether it skips passes on some steps
  (``gated_jit`` in a Python loop), and its gradient evaluations per step (for the ETA)."""
  tx: optax.GradientTransformation
  kind: str = "plain"
  step_kwargs: dict = {}
  gated: bool = False
  passes: float = 1.0


Make = Callable[[Spec, optax.GradientTransformation, int, int, int], Built]


def _sharpness_aware(spec: Spec, **kw) -> optax.GradientTransformation:
  """SAM's transformation, telemetry with the cosine (the grid's per-step statistics);
  ``m=`` perturbs groups of m examples apart (m-sharpness)."""
  group = spec.option("m")
  if group is not None:
    kw["group_size"] = int(group)
  return so.sharpness_aware(_radius(spec, 0.5 if "perturbation" in kw else 0.05),
                            telemetry="full", **kw)


RULE_OPTIONS = ("signal", "target", "rate", "initial", "low", "high", "ratchet", "convexity",
                "decay", "warmup", "permit")


def _radius(spec: Spec, initial: float):
  """The spec's radius: a number, ``"auto"``, or ``auto`` with the rule's constants
  overridden (``sam@auto+signal=relgrad+target=0.3``: the rules that were tried)."""
  overrides = {k: v for k, v in spec.options if k in RULE_OPTIONS}
  if spec.value != "auto" or not overrides:
    return spec.value
  return radius.auto_rule(**{"initial": initial, **overrides})


def _window(epochs: int) -> int:
  return max(1, epochs // 5)   # SAF/MESA's term starts after a fifth of training


def _late_start(steps: int) -> int:
  return (3 * steps) // 4      # SAM for the last quarter of the steps


METHODS: dict[str, Make] = {
    "sgd": lambda s, base, n, spe, e: Built(base),
    "adamw": lambda s, base, n, spe, e: Built(
        optax.adamw(optax.cosine_decay_schedule(1e-3, n), weight_decay=1e-4)),
    "sam": lambda s, base, n, spe, e: Built(
        optax.chain(_sharpness_aware(s), base), passes=2,
        step_kwargs={"subset": True} if s.option("m") is not None else {}),
    "asam": lambda s, base, n, spe, e: Built(optax.chain(
        _sharpness_aware(s, perturbation=so.adaptive()), base), passes=2),
    "looksam": lambda s, base, n, spe, e: Built(optax.chain(so.looksam(s.value, k=5), base),
                                                gated=True, passes=1.2),
    "late_phase": lambda s, base, n, spe, e: Built(optax.chain(
        so.late_phase(so.sharpness_aware(s.value), _late_start(n)), base), gated=True, passes=1.25),
    "randomized": lambda s, base, n, spe, e: Built(optax.chain(
        so.randomized(so.sharpness_aware(s.value), 0.5), base), gated=True, passes=1.5),
    "msam": lambda s, base, n, spe, e: Built(so.msam(base, rho=s.value)),
    "mesa": lambda s, base, n, spe, e: Built(optax.chain(base, so.weight_ema(0.99)), "mesa", dict(
        steps_per_epoch=spe, weight=s.value, temperature=5.0, start_epoch=_window(e)), passes=1.3),
    "saf": lambda s, base, n, spe, e: Built(base, "saf", dict(
        steps_per_epoch=spe, weight=s.value, temperature=5.0, start_epoch=_window(e))),
    "esam": lambda s, base, n, spe, e: Built(optax.chain(so.esam(s.value, 0.5), base), "esam",
                                             passes=1.8),
    "sampa": lambda s, base, n, spe, e: Built(so.sampa(base, s.value, 0.2), "sampa", passes=2),
    "functional_sam": lambda s, base, n, spe, e: Built(
        optax.chain(so.functional_sam(s.value), base), passes=2),
    "wsam": lambda s, base, n, spe, e: Built(optax.chain(so.wsam(s.value, 0.9), base), passes=2),
}


def build(spec: Spec, base: optax.GradientTransformation, steps: int, steps_per_epoch: int,
          epochs: int) -> Built:
  if spec.name not in METHODS:
    raise KeyError(f"unknown method {spec.name!r}; known: {sorted(METHODS)}")
  return METHODS[spec.name](spec, base, steps, steps_per_epoch, epochs)
