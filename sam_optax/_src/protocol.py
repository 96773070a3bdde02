"""What a method declares: the protocol between a method module and the engine.

A method is a :class:`Method`: its state class, its own state fields (``init``), where
it evaluates the loss (``points``) and how it turns what it finds there into its output
(``combine``), and a few declarations the engine and the layers above it read instead of
looking at the method's type: which closure ``update`` needs, whether the engine or the
method evaluates the points, whether ``updates`` is the clean gradient, whether the
telemetry gets the cosine for free, and whether some steps skip the evaluation
(``gating``). :func:`sam_optax._src.engine.build` makes the optax transformation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from sam_optax._src.closures import Closures

PyTree = Any

CLOSURES = ("gradient", "loss", "objective", "none")
EVALUATORS = ("engine", "method")


class _Absent:
  """A telemetry entry the method knows to be absent (``Result(clean_loss=ABSENT)``)."""

  def __repr__(self) -> str:
    return "ABSENT"


ABSENT = _Absent()


class Step(NamedTuple):
  """One update call, as a method's ``points`` and ``combine`` see it.

  Attributes:
    fn: the transformation's name, for error messages.
    updates: the incoming ``updates`` (the clean gradient g for most methods).
    params: the current parameters.
    state: the method's state (its own NamedTuple).
    radius: :math:`\\rho_t` as a float32 scalar (fixed, a schedule at ``state.count``, or
      the ``"auto"`` rule's radius).
    closures: the checked :class:`~sam_optax._src.closures.Closures`.
    value: the clean loss :math:`L(w)` if the caller passed ``value=``, else None.
    extra_args: the other keyword arguments of ``update`` (forwarded to perturbations
      and base optimizers).
    closure_args: the closure keywords as the caller passed them (``grad_fn``,
      ``value_and_grad_fn``, ``objective``), for a method that wraps another transformation.
    eps: norms at or below this count as zero.
    axis_name: the per-device axis, or None.
  """
  fn: str
  updates: PyTree
  params: PyTree
  state: Any
  radius: jax.Array
  closures: Closures
  value: Any
  extra_args: dict
  closure_args: dict
  eps: float
  axis_name: Any

  @property
  def base_args(self) -> dict:
    """The extra arguments for a base optimizer inside the method (``value=`` included)."""
    return self.extra_args if self.value is None else {**self.extra_args, "value": self.value}

  @property
  def forward_args(self) -> dict:
    """Every keyword of the call, for a transformation the method wraps."""
    args = {**self.extra_args, **{k: v for k, v in self.closure_args.items() if v is not None}}
    return args if self.value is None else {**args, "value": self.value}

  def pmean(self, tree: PyTree) -> PyTree:
    return tree if self.axis_name is None else jax.lax.pmean(tree, self.axis_name)


class Points(NamedTuple):
  """Where a method evaluates the loss.

  Attributes:
    point: one point (a params-shaped pytree), points stacked on a leading axis
      (with ``how``), or None (no evaluation).
    how: None for one point, else ``"vmap"``, ``"loop"`` or ``"mesh"`` (see
      :meth:`Closures.stacked`).
    delta: the perturbation (telemetry's ``perturbation_norm``), or None.
    perturbation_norm: that norm directly, when there is no single delta.
    fields: state fields the points step already updated (a perturbation's state).
    aux: anything ``combine`` needs.
    mesh, mesh_axis: the mesh and its axis for ``how="mesh"``.
  """
  point: PyTree = None
  how: str | None = None
  delta: PyTree = None
  perturbation_norm: Any = None
  fields: dict = {}
  aux: Any = None
  mesh: Any = None
  mesh_axis: Any = None


class Result(NamedTuple):
  """What ``combine`` returns: the output, the state fields it changed, and (optionally)
  what the telemetry reports instead of the defaults.

  Attributes:
    output: the transformation's output (a params-shaped pytree).
    fields: the state fields the method changed.
    grad: telemetry's g_adv (default: the evaluated gradient, else the output).
    loss: telemetry's perturbed loss (default: the evaluated loss).
    clean_grad: telemetry's g (default: ``updates`` where it is the clean gradient;
      absent otherwise).
    clean_loss: telemetry's clean loss (default: ``value=``; ``ABSENT``: not known, as
      for MSAM, whose ``value=`` is the loss at the perturbed point).
    norms: telemetry's norms as scalars the method computed itself, instead of the norms
      of ``clean_grad``/``grad`` (m-sharpness: the per-group norms averaged): any of
      ``clean_grad_norm``, ``perturbed_grad_norm``, ``perturbation_norm``, ``cosine``.
  """
  output: PyTree
  fields: dict = {}
  grad: PyTree = None
  loss: Any = None
  clean_grad: PyTree = None
  clean_loss: Any = None
  norms: dict | None = None


def perturbed_gradient(s: Step, pts: Points, loss: Any, grad: PyTree) -> Result:
  """The combine rule of SAM and every geometry: the gradient at the perturbed point."""
  del s, pts, loss
  return Result(grad)


class Gating(NamedTuple):
  """Steps that skip the evaluation (LookSAM's reuse steps, the schedules' plain steps).

  Attributes:
    decide: ``Step -> (take, fields)``: a bool array, True where the step runs ``points``
      and ``combine``, and the state fields the decision itself changes (EMAs, draws).
    skip: ``Step -> Result`` for the other steps (no call of the closure).

  The state then has the fields ``sam_step`` and ``sam_step_fraction`` (filled by the
  engine) and, where the host can follow the decision (:func:`sam_optax.gated_jit`),
  ``gate`` with a ``host_plan`` method.
  """
  decide: Callable[[Step], tuple[jax.Array, dict]]
  skip: Callable[[Step], Result]


class Method(NamedTuple):
  """A sharpness-aware method: the declaration :func:`engine.build` turns into a transformation.

  Attributes:
    name: the public name (error messages).
    state: the state's NamedTuple class: the fields ``count``, ``telemetry`` (unless
      ``telemetry=False`` below), ``sam_step``/``sam_step_fraction`` with ``gating``,
      ``radius`` where ``rho="auto"`` is supported, and the method's own. The engine
      checks it when the method is built and names what is missing.
    init: ``params -> dict`` of the method's own state fields.
    points: ``Step -> Points``.
    combine: ``(Step, Points, loss, grad) -> Result``; ``loss`` and ``grad`` are what the
      closure returned at ``Points.point`` (None where the engine did not evaluate).
    closure: what ``update`` needs: ``"gradient"`` (``grad_fn``, ``value_and_grad_fn`` or
      ``objective``), ``"loss"`` (``value_and_grad_fn`` or ``objective``), ``"objective"``
      or ``"none"``.
    evaluates: ``"engine"``: the engine evaluates the closure at ``Points.point`` and hands
      the result to ``combine``; ``"method"``: ``combine`` evaluates by itself (ESAM's
      selected examples, Functional-SAM's VJP, a wrapped transformation) and gets None.
    clean_gradient: ``updates`` is the clean gradient: the chain order is checked on it
      and the telemetry reports its norm. False for the methods that take their own
      gradients (SAMPa, bSAM, m-sharpness) or whose gradient is taken elsewhere (MSAM);
      the Flax steps skip the clean backward pass where every method says False.
    keeps_gradient: ``combine`` uses g after the second pass, so the cosine is free.
    reports_g: the telemetry has a g: the clean gradient, or what the method reports in
      its place (``Result.clean_grad``, SAMPa's :math:`\nabla f(y_t)`). False: ``‖g‖`` and
      the cosine are absent (MSAM never sees the clean gradient).
    telemetry: the state records a :class:`~sam_optax.Telemetry` (False for the
      schedules, whose wrapped transformation records its own).
    gating: a :class:`Gating`, or None.
    averages: the engine averages the output over ``axis_name`` (False where the method
      averages what it returns itself).
  """
  name: str
  state: type
  init: Callable[[PyTree], dict]
  points: Callable[[Step], Points]
  combine: Callable[..., Result] = perturbed_gradient
  closure: str = "gradient"
  evaluates: str = "engine"
  clean_gradient: bool = True
  keeps_gradient: bool = False
  reports_g: bool = True
  telemetry: bool = True
  gating: Gating | None = None
  averages: bool = True


def no_points(s: Step) -> Points:
  """The ``points`` of a method that evaluates nothing through the engine."""
  del s
  return Points()


def required_fields(method: Method, auto_radius: bool = False) -> tuple[str, ...]:
  """The state fields the engine needs of ``method``'s state class."""
  fields = ["count"]
  if method.telemetry:
    fields.append("telemetry")
  if method.gating is not None:
    fields += ["sam_step", "sam_step_fraction"]
  if auto_radius:
    fields.append("radius")
  return tuple(fields)


def check_method(method: Method, auto_radius: bool = False) -> None:
  """Raises (for the method's author) when a declaration is incomplete: an unknown closure
  or evaluator, a state class that is not a NamedTuple or lacks a field the engine fills,
  a ``gate`` field without ``host_plan``."""
  name = method.name
  if method.closure not in CLOSURES:
    raise ValueError(f"`{name}`: Method(closure={method.closure!r}) must be one of {CLOSURES}.")
  if method.evaluates not in EVALUATORS:
    raise ValueError(f"`{name}`: Method(evaluates={method.evaluates!r}) must be one of "
                     f"{EVALUATORS}.")
  fields = getattr(method.state, "_fields", None)
  if not isinstance(method.state, type) or fields is None:
    raise TypeError(f"`{name}`: Method(state=...) must be a NamedTuple class, got "
                    f"{method.state!r}.")
  missing = [f for f in required_fields(method, auto_radius) if f not in fields]
  if missing:
    why = {"count": "the step count the engine advances",
           "telemetry": "the record of each step (or declare Method(telemetry=False))",
           "sam_step": "whether the step ran the evaluation (gated methods)",
           "sam_step_fraction": "the running share of evaluating steps (gated methods)",
           "radius": "the radius rule's state (rho='auto')"}
    raise TypeError(f"`{name}`: the state class {method.state.__name__} lacks the field(s) "
                    + ", ".join(f"`{f}` ({why[f]})" for f in missing) + ".")
  if "gate" in fields and not callable(getattr(method.state, "host_plan", None)):
    raise TypeError(f"`{name}`: the state class {method.state.__name__} has a `gate` field but no "
                    "`host_plan` method, which `gated_jit` needs to decide on the host.")


def clean_params(params: PyTree, opt_state: Any) -> PyTree:
  r"""The parameters to evaluate: the clean ones where a method keeps the training loop's
  parameters perturbed between steps (:func:`sam_optax.msam`), else ``params`` unchanged.

  A method whose state class defines ``clean_params(self, params)`` (MSAM's, which returns
  :math:`w = \tilde w - \epsilon`) is asked; the first such state found in ``opt_state``
  (outermost first, at any depth) answers. Call it before evaluating, checkpointing the
  weights for inference, or measuring sharpness, whatever the optimizer.

  Args:
    params: the parameters the training loop holds.
    opt_state: the optimizer state.

  Returns:
    A pytree shaped and typed like ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> w = jnp.array([1.0, -2.0])
    >>> sgd = optax.sgd(0.1, momentum=0.9)
    >>> plain = sam_optax.sam(sgd)
    >>> sam_optax.clean_params(w, plain.init(w)) is w   # SAM's params are clean already
    True
    >>> opt = sam_optax.msam(sgd, rho=0.3)
    >>> state = opt.init(w)
    >>> u, state = opt.update(jnp.array([1.0, 0.0]), state, w)
    >>> perturbed = optax.apply_updates(w, u)            # w - 0.1 g + eps, eps = -0.3 v/|v|
    >>> print(jnp.round(sam_optax.clean_params(perturbed, state), 4))
    [ 0.9 -2. ]
  """
  def declares(x):
    return (isinstance(x, tuple) and hasattr(x, "_fields")
            and callable(getattr(x, "clean_params", None)))
  for node in jax.tree_util.tree_leaves(opt_state, is_leaf=declares):
    if declares(node):
      return node.clean_params(params)
  return params
