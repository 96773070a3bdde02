"""SAMPa against a hand-written loop; depth one (no data dependency); one gradient per device."""

import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat

LR, RHO, LAM = 0.05, 0.1, 0.2


def hand_sampa(grad, x0, steps, *, lr=LR, rho=RHO, lam=LAM, momentum=0.0):
  """SAMPa with an SGD(+momentum) base, written out in float64 numpy.

  grad(x, t) is the gradient on step t's batch. Momentum as optax.sgd: buf <- mu buf + g,
  x <- x - lr buf; the would-be step y uses mu buf + g_y without committing buf."""
  x, buf, g_y = np.asarray(x0, np.float64), np.zeros_like(x0, np.float64), np.zeros_like(x0,
                                                                                         np.float64)
  for t in range(steps):
    n = np.linalg.norm(g_y)
    x_tilde = x + (rho * g_y / n if n > 1e-12 else 0.0)
    y_next = x - lr * (momentum * buf + g_y)
    g_tilde, g_y = grad(x_tilde, t), grad(y_next, t)
    buf = momentum * buf + ((1 - lam) * g_tilde + lam * g_y)
    x = x - lr * buf
  return x


def run_sampa(opt, params, steps, batch_of, **kw):
  @jax.jit
  def step(p, s, batch):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, batch) if batch is not None else None
    u, s = opt.update(p, s, p, grad_fn=grad_fn, **kw)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  for t in range(steps):
    params, state = step(params, state, batch_of(t))
  return params, state


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_quadratic_matches_hand_loop(vectorize, momentum):
  rng = np.random.default_rng(0)
  m = rng.normal(size=(5, 5))
  a = m @ m.T / 5 + np.eye(5)
  b = rng.normal(size=5)
  grad = lambda x, t: a @ x - b
  x0 = rng.normal(size=5)
  expected = hand_sampa(grad, x0, 20, momentum=momentum)

  base = optax.sgd(LR, momentum=momentum) if momentum else optax.sgd(LR)
  opt = so.sampa(base, RHO, LAM, vectorize=vectorize)
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  @jax.jit
  def step(x, s):
    u, s = opt.update(x, s, x, grad_fn=lambda q: a32 @ q - b32)
    return optax.apply_updates(x, u), s

  x, s = jnp.asarray(x0, jnp.float32), opt.init(jnp.asarray(x0, jnp.float32))
  for _ in range(20):
    x, s = step(x, s)
  np.testing.assert_allclose(np.asarray(x), expected, rtol=2e-5, atol=2e-6)
  # the hand loop differs from plain SGD and from SAM: the comparison is not vacuous
  sgd = np.asarray(x0, np.float64)
  for _ in range(20):
    sgd = sgd - LR * grad(sgd, 0)
  assert np.max(np.abs(expected - sgd)) > 1e-3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_mlp_matches_hand_loop(momentum):
  params = mlp_init(0)
  batches = [make_data(t) for t in range(20)]
  grad = lambda x, t: flat(jax.grad(mlp_loss)(unflat(x, params), batches[t]))
  expected = hand_sampa(grad, flat(params), 20, momentum=momentum)
  base = optax.sgd(LR, momentum=momentum) if momentum else optax.sgd(LR)
  got, _ = run_sampa(so.sampa(base, RHO, LAM), params, 20, lambda t: batches[t])
  np.testing.assert_allclose(flat(got), expected, rtol=1e-4, atol=1e-5)


def test_first_step_is_unperturbed_and_lambda_zero_keeps_the_perturbation():
  params = mlp_init(1)
  batches = [make_data(t) for t in range(2)]
  g = lambda p, t: jax.grad(mlp_loss)(p, batches[t])
  opt = so.sampa(optax.sgd(LR), RHO, lam=0.0)
  p1, s1 = run_sampa(opt, params, 1, lambda t: batches[t])
  # step 0: stored gradient 0, so both points are x_0 and the update is -lr * grad f(x_0)
  np.testing.assert_allclose(flat(p1), flat(params) - LR * flat(g(params, 0)), rtol=1e-6, atol=1e-7)
  assert float(so.metrics(s1)["perturbation_norm"]) == 0.0
  # lambda = 0: the second step descends along grad f(x_1 + rho g_y / |g_y|), not grad f(x_1)
  p2, s2 = run_sampa(opt, params, 2, lambda t: batches[t])
  g_y = flat(s1.y_grad)
  x_tilde = unflat(flat(p1) + RHO * g_y / np.linalg.norm(g_y), params)
  np.testing.assert_allclose(flat(p2), flat(p1) - LR * flat(g(x_tilde, 1)), rtol=1e-5, atol=1e-6)
  assert not np.allclose(flat(p2), flat(p1) - LR * flat(g(p1, 1)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(so.metrics(s2)["perturbation_norm"]), RHO, rtol=1e-6)
  # the stored gradient is the one at y_1 = x_0 - lr * 0 = x_0 on batch 0
  np.testing.assert_allclose(g_y, flat(g(params, 0)), rtol=1e-6, atol=1e-7)


def _oracle_calls(jaxpr, name="oracle_grad"):
  return [e for e in jaxpr.eqns if e.primitive.name in ("jit",
                                                        "pjit") and e.params.get("name") == name]


def _depends_on(jaxpr, sources, targets):
  """Whether any var in ``targets`` is computed (transitively) from a var in ``sources``."""
  tainted = set(sources)
  for e in jaxpr.eqns:
    if any(not isinstance(v, jax.extend.core.Literal) and v in tainted for v in e.invars):
      tainted.update(e.outvars)
  return any(v in tainted for v in targets)


def oracle_grad(q, batch):
  return jax.grad(mlp_loss)(q, batch)


_named_grad = jax.jit(oracle_grad)  # shows up in the jaxpr as one `jit` equation per call


def _traced_update(vectorize):
  params = mlp_init(0)
  batch = make_data(0)
  opt = so.sampa(optax.sgd(LR, momentum=0.9), vectorize=vectorize)

  def step(p, s):
    return opt.update(p, s, p, grad_fn=lambda q: _named_grad(q, batch))

  state = opt.init(params)
  # a step after the first, so the stored gradient (hence the perturbation) is non-zero
  state = jax.jit(step)(params, state)[1]
  return jax.make_jaxpr(step)(params, state).jaxpr


def test_vmapped_gradients_are_one_call_over_the_stacked_points():
  jaxpr = _traced_update(vectorize=True)
  calls = _oracle_calls(jaxpr)
  assert len(calls) == 1, "both gradients must come from one (vmapped) call"
  # every parameter input of the call carries the two points on a leading axis
  param_inputs = [v for v in calls[0].invars if v.aval.ndim >= 1 and v.aval.shape[0] == 2]
  assert len(param_inputs) == len(jax.tree.leaves(mlp_init(0)))


def test_unvectorized_gradients_have_no_data_dependency():
  jaxpr = _traced_update(vectorize=False)
  calls = _oracle_calls(jaxpr)
  assert len(calls) == 2
  first, second = calls
  assert not _depends_on(jaxpr, first.outvars, second.invars)
  assert not _depends_on(jaxpr, second.outvars, first.invars)
  # the check can fail: the update itself does depend on both calls
  assert _depends_on(jaxpr, first.outvars, jaxpr.outvars)


def _mesh2():
  return jax.make_mesh((2,), ("pair",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_two_device_mesh_one_gradient_per_device():
  params = mlp_init(2)
  batches = [make_data(t) for t in range(5)]
  expected, _ = run_sampa(so.sampa(optax.sgd(LR, momentum=0.9)), params, 5, lambda t: batches[t])
  mesh = _mesh2()
  opt = so.sampa(optax.sgd(LR, momentum=0.9), mesh=mesh)
  got, state = run_sampa(opt, params, 5, lambda t: batches[t])
  np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-5, atol=1e-6)

  def step(p, s, b):
    u, s = opt.update(p, s, p, grad_fn=lambda q: jax.grad(mlp_loss)(q, b))
    return optax.apply_updates(p, u), s

  # the traced step: the stacked points enter a shard_map split over the 2-device axis, and
  # each device's body sees one point
  jaxpr = jax.make_jaxpr(step)(params, state, batches[0]).jaxpr
  maps = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
  assert len(maps) == 1
  body = maps[0].params["jaxpr"]
  split = [(spec, v.aval.shape) for spec, v in zip(maps[0].params["in_specs"], body.invars)
           if spec == jax.sharding.PartitionSpec("pair")]
  assert len(split) == len(jax.tree.leaves(params))
  assert all(shape[0] == 1 for _, shape in split)
  # the compiled program: two partitions, and its matmuls are one point's (none batched over 2)
  hlo = jax.jit(step).lower(params, state, batches[0]).compile().as_text()
  assert "num_partitions=2" in hlo
  dots = re.findall(r"= (f32\[[0-9,]*\])[^ ]* dot\(", hlo)
  assert dots and not any(d.startswith("f32[2,") for d in dots)
  # without the mesh the same step batches the two points on one device
  hlo1 = jax.jit(lambda p, s, b: so.sampa(optax.sgd(LR)).update(
      p, s, p, grad_fn=lambda q: jax.grad(mlp_loss)(q, b))).lower(
          params, so.sampa(optax.sgd(LR)).init(params), batches[0]).compile().as_text()
  assert "num_partitions=2" not in hlo1


def test_inject_hyperparams_rho_and_lam():
  params = mlp_init(3)
  batch = make_data(3)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  tx = optax.inject_hyperparams(so.sampa)(base_optimizer=optax.sgd(LR), rho=RHO, lam=LAM)
  traces = []

  @jax.jit
  def update(s):
    traces.append(1)
    return tx.update(params, s, params, grad_fn=grad_fn)

  s = tx.init(params)
  _, s = update(s)  # stores a gradient
  u1, _ = update(s)
  s.hyperparams["lam"] = jnp.asarray(0.7, jnp.float32)
  u2, _ = update(s)
  assert len(traces) == 1
  ref = so.sampa(optax.sgd(LR), RHO, 0.7)
  rs = ref.init(params)
  _, rs = ref.update(params, rs, params, grad_fn=grad_fn)
  r2, _ = ref.update(params, rs, params, grad_fn=grad_fn)
  np.testing.assert_allclose(flat(u2), flat(r2), rtol=1e-6, atol=1e-7)
  assert not np.allclose(flat(u1), flat(u2))


def test_value_and_grad_fn_records_the_loss_at_the_perturbed_point():
  params = mlp_init(4)
  batch = make_data(4)
  opt = so.sampa(optax.sgd(LR))
  s = opt.init(params)
  vg = lambda q: jax.value_and_grad(mlp_loss)(q, batch)
  _, s = opt.update(params, s, params, value_and_grad_fn=vg)
  _, s2 = opt.update(params, s, params, value_and_grad_fn=vg, value=mlp_loss(params, batch))
  g_y = flat(s.y_grad)
  x_tilde = unflat(flat(params) + RHO * g_y / np.linalg.norm(g_y), params)
  m = so.metrics(s2)
  np.testing.assert_allclose(float(m["perturbed_loss"]), float(mlp_loss(x_tilde, batch)), rtol=1e-5)
  assert float(m["sharpness"]) > 0


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match=r"sampa\(lam=...\)"):
    so.sampa(optax.sgd(0.1), lam=1.5)
  with pytest.raises(TypeError, match="base_optimizer"):
    so.sampa("sgd")
  with pytest.raises(ValueError, match="size 2"):
    so.sampa(optax.sgd(0.1), mesh=jax.make_mesh((1,), ("pair",), devices=jax.devices()[:1]))
  opt = so.sampa(optax.sgd(0.1))
  with pytest.raises(TypeError, match="grad_fn"):
    opt.update(mlp_init(0), opt.init(mlp_init(0)), mlp_init(0))
