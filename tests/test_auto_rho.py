"""rho="auto": the rule against a hand computation, and under every wrapper a step meets
(jit, export, inject_hyperparams, MultiSteps, gated_jit, shard_map over 8 devices, float16)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export as jax_export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax as so
from helpers import shard_map, typeof
from sam_optax._src import radius
from sam_optax._src.tree import find_states

X = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
Y = np.tanh(X @ np.array([1.0, -2.0, 0.5, 0.0], np.float32))


def loss(w, x=X, y=Y):
  return jnp.mean((jnp.tanh(x @ w["a"] + w["b"]) - y) ** 2)


def init():
  return {"a": jnp.array([0.3, -0.2, 0.1, 0.4]), "b": jnp.zeros(())}


def closures(w, x=X, y=Y):
  vg = jax.value_and_grad(lambda p: loss(p, x, y))
  value, g = vg(w)
  return g, {"value": value, "value_and_grad_fn": vg}


def by_hand(steps: int, lr: float = 0.5):
  """SAM with the controller written out in numpy: the radius of each step and the
  parameters after it."""
  rule = radius.auto_rule(0.05)
  rho, w, rhos = rule.initial, jax.tree.map(np.asarray, init()), []
  for _ in range(steps):
    value, g = jax.value_and_grad(loss)(w)
    gn = np.sqrt(sum(float(np.sum(np.square(v))) for v in jax.tree.leaves(g)))
    w_adv = jax.tree.map(lambda a, b: a + rho * b / gn, w, g)
    value_adv, g_adv = jax.value_and_grad(loss)(w_adv)
    rise = float(value_adv) - float(value)
    signal = rise / float(value)          # the relative one-step sharpness
    ratio = rise / (rho * gn)             # the rise over its first-order prediction
    rhos.append(rho)
    error = min(np.clip((rule.target - signal) / rule.target, -1.0, 1.0),
                np.clip((ratio - 1.0) / rule.convexity, -1.0, 1.0))
    rho = float(np.clip(rho * np.exp(rule.rate * error), rule.low, rule.high))
    w = jax.tree.map(lambda a, b: a - lr * np.asarray(b), w, g_adv)
  return rhos, rho, w


def test_rule_against_a_hand_computation():
  steps = 12
  rhos, next_rho, w_ref = by_hand(steps)
  tx = so.sam(optax.sgd(0.5), rho="auto")
  w, state = init(), tx.init(init())

  @jax.jit
  def step(w, state):
    g, kw = closures(w)
    updates, state = tx.update(g, state, w, **kw)
    return optax.apply_updates(w, updates), state

  seen = []
  for _ in range(steps):
    w, state = step(w, state)
    seen.append(float(so.metrics(state)["rho"]))
  np.testing.assert_allclose(seen, rhos, rtol=1e-5)
  np.testing.assert_allclose(float(state[0].radius.rho), next_rho, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(w_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert len(set(seen)) == steps   # the radius moved on every step


def test_the_radius_grows_where_the_sharpness_is_below_target_and_shrinks_above():
  """Signal below the target: the radius grows; above: it shrinks, by at most ``rate`` in
  log space per step, within [low, high]."""
  rule = radius.auto_rule(0.05)
  state = rule.init()
  measured = lambda signal: jnp.array([signal, 1.5, 0.0], jnp.float32)   # a convex ascent
  up = rule.observe(state, state.rho, measured(0.0))
  down = rule.observe(state, state.rho, measured(10 * rule.target))
  np.testing.assert_allclose(float(up.rho), 0.05 * np.exp(rule.rate), rtol=1e-6)
  np.testing.assert_allclose(float(down.rho), 0.05 * np.exp(-rule.rate), rtol=1e-6)
  stuck = rule.observe(state._replace(rho=jnp.float32(rule.high)), jnp.float32(rule.high),
                       measured(0.0))
  assert float(stuck.rho) == pytest.approx(rule.high)
  # flatter than the target, but the loss bends down along the ascent (it rose by less
  # than its first-order prediction): the radius reaches past the bowl and shrinks
  concave = rule.observe(state, state.rho, jnp.array([0.0, 0.9, 0.0], jnp.float32))
  np.testing.assert_allclose(float(concave.rho), 0.05 * np.exp(-rule.rate), rtol=1e-6)
  nan = rule.observe(state, state.rho, measured(np.nan))
  assert float(nan.rho) == pytest.approx(0.05) and np.isfinite(float(nan.signal))


def test_asam_starts_at_its_own_radius():
  tx = so.asam(optax.sgd(0.1), rho="auto")
  assert float(tx.init(init())[0].radius.rho) == pytest.approx(0.5)
  assert float(so.sam(optax.sgd(0.1), rho="auto").init(init())[0].radius.rho) == pytest.approx(0.05)


def test_no_recompilation_and_stable_types():
  tx = so.sam(optax.sgd(0.1, momentum=0.9), rho="auto")
  traces = []

  @jax.jit
  def step(w, state):
    traces.append(1)
    g, kw = closures(w)
    updates, state = tx.update(g, state, w, **kw)
    return optax.apply_updates(w, updates), state

  w, state = init(), tx.init(init())
  before = jax.tree.map(typeof, state)
  for _ in range(4):
    w, state = step(w, state)
  assert len(traces) == 1
  assert jax.tree.map(typeof, state) == before
  # eager too
  g, kw = closures(w)
  _, eager = tx.update(g, state, w, **kw)
  assert jax.tree.map(typeof, eager) == before


def test_export_round_trip():
  tx = so.sam(optax.sgd(0.1), rho="auto")
  leaves, treedef = jax.tree.flatten((init(), tx.init(init())))

  def step(*flat):
    w, state = jax.tree.unflatten(treedef, flat)
    g, kw = closures(w)
    updates, state = tx.update(g, state, w, **kw)
    return jax.tree.leaves((optax.apply_updates(w, updates), state))

  exported = jax_export.export(jax.jit(step))(*leaves)
  got = jax_export.deserialize(exported.serialize()).call(*leaves)
  want = jax.jit(step)(*leaves)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a, b)
  assert "callback" not in exported.mlir_module()


def test_under_inject_hyperparams_and_multisteps():
  w = init()
  g, kw = closures(w)
  injected = optax.inject_hyperparams(so.sharpness_aware)(rho="auto")
  plain = so.sharpness_aware("auto")
  out_i, st_i = injected.update(g, injected.init(w), w, **kw)
  out_p, st_p = plain.update(g, plain.init(w), w, **kw)
  for a, b in zip(jax.tree.leaves(out_i), jax.tree.leaves(out_p), strict=True):
    np.testing.assert_array_equal(a, b)
  assert float(so.metrics(st_i)["rho"]) == float(so.metrics(st_p)["rho"])
  # MultiSteps: the rule advances once per applied update (the k-th micro-step)
  ms = optax.MultiSteps(so.sam(optax.sgd(0.1), rho="auto"), 2)
  state = ms.init(w)
  radii = []
  for _ in range(4):
    _, state = ms.update(g, state, w, **kw)
    radii.append(float(state.inner_opt_state[0].radius.rho))
  assert radii[0] == pytest.approx(0.05) and radii[1] != radii[0]
  assert radii[2] == radii[1] and radii[3] != radii[2]


def test_under_gated_jit_the_radius_waits_for_the_sam_steps():
  """In ``late_phase`` the plain steps before the start do not move the radius."""
  tx = optax.chain(so.late_phase(so.sharpness_aware("auto"), start_step=2), optax.sgd(0.1))
  w, state = init(), tx.init(init())

  def step(w, state):
    g, kw = closures(w)
    updates, state = tx.update(g, state, w, **kw)
    return optax.apply_updates(w, updates), state

  stepper = so.gated_jit(step)
  rho = lambda s: float(so.metrics(s).get("rho", 0.0))
  radii = []
  for _ in range(4):
    w, state = stepper(w, state)
    (found,) = find_states(state, so.RadiusState)
    radii.append(float(found.rho))
  assert radii[0] == radii[1] == pytest.approx(0.05)   # plain SGD steps
  assert radii[2] != radii[1] and radii[3] != radii[2]
  assert rho(state) == pytest.approx(radii[2])


def test_shard_map_same_radius_on_every_device():
  """With ``axis_name`` the signal is averaged over the devices, so every device keeps the
  same radius: the mean of the per-device relative sharpness moves it."""
  n = 8
  mesh = jax.make_mesh((n,), ("d",))
  tx = so.sharpness_aware("auto", axis_name="d")
  w = init()
  state = tx.init(w)

  def local(x, y):
    w_local = so.local_params(w, "d")   # the device's own gradient
    g, kw = closures(w_local, x, y)
    _, s = tx.update(g, state, w_local, **kw)
    return s.radius.rho[None]

  x, y = (jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (X, Y))
  radii = np.asarray(shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")),
                                   out_specs=P("d"))(x, y))
  assert np.unique(np.asarray(radii)).size == 1
  rule = radius.auto_rule(0.05)
  signals, ratios = [], []
  for x, y in zip(np.split(X, n), np.split(Y, n), strict=True):
    value, g = jax.value_and_grad(loss)(w, x, y)
    gn = np.sqrt(sum(float(np.sum(np.square(v))) for v in jax.tree.leaves(g)))
    adv = loss(jax.tree.map(lambda a, b: a + 0.05 * b / gn, w, g), x, y)
    signals.append((float(adv) - float(value)) / float(value))
    ratios.append((float(adv) - float(value)) / (0.05 * gn))
  # the devices' measurements are averaged before the rule reads them
  error = min(np.clip((rule.target - np.mean(signals)) / rule.target, -1, 1),
              np.clip((np.mean(ratios) - 1.0) / rule.convexity, -1, 1))
  np.testing.assert_allclose(float(radii[0]), 0.05 * np.exp(rule.rate * error), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_and_a_zero_gradient_stay_finite(dtype):
  w = jax.tree.map(lambda x: x.astype(dtype), init())
  tx = so.sam(optax.sgd(0.1), rho="auto")
  state = tx.init(w)
  half_loss = lambda p: loss(jax.tree.map(lambda x: x.astype(jnp.float32), p))
  vg = jax.value_and_grad(half_loss)
  before = jax.tree.map(typeof, state)
  for _ in range(3):
    value, g = vg(w)
    updates, state = tx.update(g, state, w, value=value, value_and_grad_fn=vg)
    w = optax.apply_updates(w, updates)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((w, state)))
  assert jax.tree.map(typeof, state) == before
  # a zero gradient at a zero loss: no NaN in the update or the radius
  flat = lambda p: 0.0 * jnp.sum(p["a"].astype(jnp.float32))
  vg0 = jax.value_and_grad(flat)
  value, g = vg0(w)
  updates, state = tx.update(g, state, w, value=value, value_and_grad_fn=vg0)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((updates, state)))


def test_errors_name_the_argument_and_the_fix():
  w = init()
  g, kw = closures(w)
  tx = so.sharpness_aware("auto")
  with pytest.raises(ValueError, match="value_and_grad_fn"):
    tx.update(g, tx.init(w), w, grad_fn=jax.grad(loss))
  with pytest.raises(ValueError, match="value="):
    tx.update(g, tx.init(w), w, value_and_grad_fn=kw["value_and_grad_fn"])
  with pytest.raises(ValueError, match="automatic radius is available for"):
    so.gsam(rho="auto")
  with pytest.raises(ValueError, match="automatic radius"):
    so.looksam("auto")
  with pytest.raises(TypeError, match='or "auto"'):
    so.sharpness_aware("Auto!")
  state = tx.init(w)
  copy = jax.tree.map(np.array, state)
  with pytest.raises(ValueError):
    tx.update(g, state, w, grad_fn=jax.grad(loss))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(copy), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_fixed_radius_keeps_no_radius_state():
  """``radius`` is None (no leaves) for a number or a schedule: states and checkpoints of
  fixed-radius SAM are unchanged."""
  state = so.sharpness_aware(0.05).init(init())
  assert state.radius is None
  assert "rho" not in so.metrics(state)
