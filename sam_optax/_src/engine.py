"""The engine: one ``update`` for every sharpness-aware method.

:func:`build` turns a :class:`~sam_optax._src.protocol.Method` declaration into an optax
transformation and owns everything a method module should not repeat: the checks of the
update call, the closure contract (:mod:`sam_optax._src.closures`), evaluating the
method's points, casting back to the params' dtypes, the radius at each step
(:mod:`sam_optax._src.radius`), the ``axis_name`` reduction, the telemetry, the
chain-order check and the gating of the steps that skip the evaluation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import distributed, gating, radius
from sam_optax._src import telemetry as tm
from sam_optax._src import tree as tu
from sam_optax._src.closures import Closures, check_params, describe_mismatch, from_earlier_keywords
from sam_optax._src.protocol import ABSENT, Method, Points, Result, Step, check_method

PyTree = Any

# The chain-order check looks at the first few steps only.
ORDER_CHECK_STEPS = 3
ORDER_COSINE = -0.1


def check_telemetry(telemetry: Any, fn: str) -> Any:
  if telemetry not in (True, False, "full"):
    raise ValueError(f"`{fn}(telemetry=...)` must be True (norms and losses), 'full' (also "
                     f"the cosine, which keeps g alive) or False, got {telemetry!r}.")
  return telemetry


def guard_cosine(g: PyTree, g_adv: PyTree, eps: float = 1e-12, budget: int = 4096) -> jax.Array:
  """cos(g, g_adv) over the smallest leaves only (at least one, at most ``budget``
  entries beyond the first): enough to see the sign flip of a chain in the wrong order,
  and cheap to keep alive through the second pass, unlike a full copy of g."""
  leaves = jax.tree.leaves(g)
  order = sorted(range(len(leaves)), key=lambda i: leaves[i].size)
  keep, total = [], 0
  for i in order:
    if keep and total + leaves[i].size > budget:
      break
    keep.append(i)
    total += leaves[i].size
  adv = jax.tree.leaves(g_adv)
  return tu.cosine([leaves[i] for i in keep], [adv[i] for i in keep], eps)


def build(method: Method, *, rho: radius.Rho = 0.0, eps: float = 1e-12, axis_name: Any = None,
          telemetry: Any = True) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of a :class:`Method` (checked here, when it is built)."""
  check_method(method, auto_radius=radius.is_auto(rho))
  engine = _Engine(method, rho, eps, axis_name, telemetry)
  return optax.GradientTransformationExtraArgs(engine.init, engine.update)


class _Engine:
  """The configuration of one built method (static: nothing here changes after ``build``;
  everything a step keeps lives in the state) and the steps of ``init`` and ``update``."""

  def __init__(self, method: Method, rho: radius.Rho, eps: float, axis_name: Any,
               telemetry: Any):
    self.method, self.rho, self.eps, self.axis_name = method, rho, eps, axis_name
    self.auto: radius.AutoRho | None = rho if isinstance(rho, radius.AutoRho) else None
    self.recording = bool(telemetry) and method.telemetry
    self.record_cosine = method.reports_g and (
        telemetry == "full" or (bool(telemetry) and method.keeps_gradient))

  def init(self, params: PyTree) -> Any:
    method = self.method
    if params is None:
      raise ValueError(f"`{method.name}.init(params)` needs the parameters, not None.")
    fields = dict(method.init(params))
    fields["count"] = jnp.zeros([], jnp.int32)
    if "radius" in method.state._fields:
      fields["radius"] = None if self.auto is None else self.auto.init()
    if method.telemetry:
      fields["telemetry"] = (tm.empty(self.record_cosine, method.reports_g) if self.recording
                             else None)
    if method.gating is not None:
      fields["sam_step"] = jnp.zeros([], jnp.float32)
      fields["sam_step_fraction"] = jnp.zeros([], jnp.float32)
      if "gate" in method.state._fields:
        fields["gate"] = gating.Gate()
    return method.state(**fields)

  def update(self, updates, state, params=None, *, grad_fn=None, value_and_grad_fn=None,
             value=None, objective=None, **extra_args):
    method = self.method
    name = f"{method.name}.update"
    objective = from_earlier_keywords(name, objective, extra_args)
    check_params(params, name)
    closures = Closures(name, params, grad_fn=grad_fn, value_and_grad_fn=value_and_grad_fn,
                        objective=objective, needs=method.closure)
    describe_mismatch(updates, params, "`updates`", name)
    if self.axis_name is not None and method.clean_gradient and method.averages:
      distributed.check_local_gradient(updates, self.axis_name, method.name)
    closure_args = {"grad_fn": grad_fn, "value_and_grad_fn": value_and_grad_fn,
                    "objective": objective}
    rho = state.radius.rho if self.auto is not None else radius.at(self.rho, state.count)
    s = Step(method.name, updates, params, state, rho, closures, value, extra_args,
             closure_args, self.eps, self.axis_name)
    out, fields = self._full(s) if method.gating is None else self._gated(s)
    if method.averages:
      out = s.pmean(out)
    fields["count"] = optax.safe_increment(state.count)
    return tu.cast_like(out, updates), state._replace(**fields)

  def _full(self, s: Step) -> tuple[PyTree, dict]:
    """The step that evaluates: points, the closure there, combine, the telemetry."""
    method = self.method
    pts = method.points(s)
    # ||g|| before the second pass: reduced after it, g would stay alive through it
    wants_norm = self.recording or (self.auto is not None and self.auto.needs_clean_norm)
    g_norm = tu.norm(s.updates) if wants_norm and method.clean_gradient else None
    loss, grad = self._evaluate(s, pts)
    res = method.combine(s, pts, loss, grad)
    fields = {**pts.fields, **res.fields}
    if self.auto is not None:
      fields["radius"] = self._auto_radius(s, res, loss, grad, g_norm)
    if self.recording and s.state.telemetry is not None:
      fields["telemetry"] = self._telemetry(s, pts, res, loss, grad, g_norm)
    return tu.cast_like(res.output, s.updates), fields

  def _evaluate(self, s: Step, pts: Points) -> tuple[Any, PyTree]:
    if self.method.evaluates == "method" or pts.point is None:
      return None, None
    if pts.how is None:
      return s.closures(pts.point)
    return s.closures.stacked(pts.point, pts.how, pts.mesh, pts.mesh_axis)

  def _gated(self, s: Step) -> tuple[PyTree, dict]:
    """The gated step: the full step where the method's decision holds, its ``skip`` elsewhere,
    under ``lax.cond`` or the branch :func:`gating.gated_jit` fixed."""
    method, gate_rule = self.method, self.method.gating
    assert gate_rule is not None   # _gated runs for a gated method only
    take, decided = gate_rule.decide(s)

    def skip(_):
      res = gate_rule.skip(s)
      kept = {"telemetry": s.state.telemetry} if method.telemetry else {}
      return tu.cast_like(res.output, s.updates), {**res.fields, **kept}

    gate = getattr(s.state, "gate", gating.Gate())
    out, fields = gating.branch(gate, take, lambda _: self._full(s), skip, None)
    fields.update(decided)
    fields["sam_step"], fields["sam_step_fraction"] = gating.took_pass(
        s.state.count, s.state.sam_step_fraction, take)
    return out, fields

  def _auto_radius(self, s: Step, res: Result, loss: Any, grad: PyTree,
                   g_norm: Any) -> radius.RadiusState:
    """The ``rho="auto"`` controller's step: its signal measured on this step (averaged over
    ``axis_name``, so that every device keeps the same radius) moves the next radius."""
    rule, name = self.auto, self.method.name
    assert rule is not None
    clean_loss = s.value if res.clean_loss is None else res.clean_loss
    if clean_loss is None and s.closures.objective is not None:
      losses = s.closures.objective.clean_losses
      clean_loss = None if losses is None else jnp.mean(jnp.asarray(losses, jnp.float32))
    perturbed_loss = loss if res.loss is None else res.loss
    if rule.needs_losses and (clean_loss is None or clean_loss is ABSENT
                              or perturbed_loss is None):
      raise ValueError(
          f"`{name}(rho='auto')` measures the one-step sharpness L(w + eps) - L(w): pass the "
          "clean loss as `value=` and the closure as `value_and_grad_fn=` (or `objective=`) "
          f"to `{name}.update`.")
    if res.norms is not None and "clean_grad_norm" in res.norms:
      g_norm = res.norms["clean_grad_norm"]
    diff = None
    if rule.needs_difference:
      g_adv = res.grad if res.grad is not None else (grad if grad is not None else res.output)
      diff = tu.norm(tu.add_scaled(g_adv, -1.0, s.updates))
    signal = rule.measure(s.radius, clean_loss, perturbed_loss, g_norm, diff)
    if s.axis_name is not None:
      signal = jax.lax.pmean(signal, s.axis_name)
    return rule.observe(s.state.radius, s.radius, signal)

  def _telemetry(self, s: Step, pts: Points, res: Result, loss: Any, grad: PyTree,
                 g_norm: Any) -> tm.Telemetry:
    method, eps = self.method, self.eps
    g = s.updates if res.clean_grad is None else res.clean_grad
    g_norm = g_norm if res.clean_grad is None else None
    g_adv = res.grad if res.grad is not None else (grad if grad is not None else res.output)
    norms = res.norms or {}
    pert_norm = norms.get("perturbation_norm", pts.perturbation_norm)
    if pert_norm is None:
      pert_norm = tu.norm(pts.delta) if pts.delta is not None else jnp.zeros([], jnp.float32)
    misordered = None
    if method.clean_gradient:
      cos = guard_cosine(s.updates, g_adv, eps)
      early = s.state.count < ORDER_CHECK_STEPS
      misordered = s.state.telemetry.misordered | (early & (cos < ORDER_COSINE)).astype(jnp.int32)
    clean_loss = s.value if res.clean_loss is None else res.clean_loss
    rec = tm.record(g, g_adv, perturbation_norm=pert_norm,
                    clean_loss=None if clean_loss is ABSENT else clean_loss,
                    perturbed_loss=loss if res.loss is None else res.loss,
                    cosine=self.record_cosine, misordered=misordered, eps=eps, g_norm=g_norm,
                    previous=s.state.telemetry, clean=method.reports_g, given=norms)
    return tm.mean_over(rec, s.axis_name)
