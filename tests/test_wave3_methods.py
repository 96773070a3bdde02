"""Wave 3 methods (issue 21), each against a hand-written reference of its paper's rule:
late-phase SAM, Functional-SAM, preconditioned SAM, WSAM (coupled and decoupled), StableSAM and
Monge-SAM. The references recompute the rule from the formula in numpy or plain JAX, not through
the library."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_apply, mlp_example_losses, mlp_init, mlp_loss, unflat
from sam_optax._src.geometries.metric import PreconditionedState, monge, preconditioned
from sam_optax._src.methods.functional import functional_sam
from sam_optax._src.methods.late_phase import LatePhaseState, late_phase
from sam_optax._src.methods.weighted import stable_sam, wsam, wsam_optimizer

RHO = 0.05


def grad_np(params, batch):
  return [{k: np.asarray(v, np.float64) for k, v in layer.items()}
          for layer in jax.grad(mlp_loss)(params, batch)]


def sam_point(params, batch, direction=None, rho=RHO):
  """w + rho d with d = g/|g| (or the given flat direction), by hand."""
  g = flat(jax.grad(mlp_loss)(params, batch))
  d = g / np.linalg.norm(g) if direction is None else direction
  return unflat(flat(params) + rho * d, params), g


def objective(batch):
  return so.Objective(lambda p, b: mlp_apply(p, b[0]), cross_entropy, batch)


def cross_entropy(logits, b):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), b[1][:, None], axis=1)[:, 0]


def update(tx, params, batch, state=None, **kw):
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  state = tx.init(params) if state is None else state
  closure = {"objective": objective(batch)} if kw.pop("objective", False) else {"grad_fn": grad_fn}
  return tx.update(grad_fn(params), state, params, **closure, **kw)


# ------------------------------------------------------------------------- WSAM


@pytest.mark.parametrize("gamma", [0.0, 0.8, 0.9])
def test_wsam_matches_the_weighted_sharpness_gradient(gamma):
  params, batch = mlp_init(0), make_data(0)
  point, g = sam_point(params, batch)
  g_tilde = flat(jax.grad(mlp_loss)(point, batch))
  expected = g + gamma / (1 - gamma) * (g_tilde - g)
  out, _ = update(wsam(RHO, gamma), params, batch)
  np.testing.assert_allclose(flat(out), expected, rtol=2e-5, atol=1e-6)


def test_wsam_gamma_half_is_sam_bitwise():
  params = mlp_init(1)
  runs = []
  for first in (wsam(RHO, 0.5), so.sharpness_aware(RHO)):
    tx = optax.chain(first, optax.sgd(0.05, momentum=0.9))

    @jax.jit
    def step(p, s, b, tx=tx):
      grad_fn = lambda q: jax.grad(mlp_loss)(q, b)
      u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s, u

    p, s, outs = params, tx.init(params), []
    for i in range(3):
      p, s, u = step(p, s, make_data(i))
      outs.append(u)
    runs.append((p, outs))
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_wsam_decoupled_applies_the_sharpness_term_outside_the_base_momentum():
  """Hand-written momentum SGD on g plus -lr_t c (g~ - g), over three steps with an lr schedule."""
  params, gamma, mom = mlp_init(2), 0.9, 0.9
  lr = optax.linear_schedule(0.1, 0.05, 3)
  c = gamma / (1 - gamma)
  opt = wsam_optimizer(optax.sgd(lr, momentum=mom), RHO, gamma, decoupled=True, learning_rate=lr)
  state, p, w_ref, trace = opt.init(params), params, flat(params), np.zeros(flat(params).size)
  for t in range(3):
    batch = make_data(t)
    out, state = update(opt, p, batch, state)
    p = optax.apply_updates(p, out)
    w_tree = unflat(w_ref, params)
    point, g = sam_point(w_tree, batch)
    g_tilde = flat(jax.grad(mlp_loss)(point, batch))
    trace = mom * trace + g
    w_ref = w_ref - float(lr(t)) * trace - float(lr(t)) * c * (g_tilde - g)
    np.testing.assert_allclose(flat(p), w_ref, rtol=1e-5, atol=1e-6)


def test_wsam_decoupled_with_plain_sgd_is_the_coupled_step():
  params, batch = mlp_init(3), make_data(3)
  coupled = wsam_optimizer(optax.sgd(0.1), RHO, 0.8)
  decoupled = wsam_optimizer(optax.sgd(0.1), RHO, 0.8, decoupled=True, learning_rate=0.1)
  a, _ = update(coupled, params, batch)
  b, _ = update(decoupled, params, batch)
  np.testing.assert_allclose(flat(a), flat(b), rtol=1e-5, atol=1e-7)


def test_wsam_argument_errors_name_the_fix():
  with pytest.raises(ValueError, match="gamma"):
    wsam(RHO, gamma=1.0)
  with pytest.raises(ValueError, match="learning_rate"):
    wsam_optimizer(optax.sgd(0.1), decoupled=True)
  with pytest.raises(ValueError, match="decoupled=True"):
    wsam_optimizer(optax.sgd(0.1), learning_rate=0.1)
  with pytest.raises(TypeError, match="base_optimizer"):
    wsam_optimizer(0.1)


# --------------------------------------------------------------------- StableSAM


def test_stable_sam_renormalizes_to_the_clean_norm():
  params, batch = mlp_init(4), make_data(4)
  point, g = sam_point(params, batch)
  g_tilde = flat(jax.grad(mlp_loss)(point, batch))
  expected = g_tilde * np.linalg.norm(g) / np.linalg.norm(g_tilde)
  out, _ = update(stable_sam(RHO), params, batch)
  np.testing.assert_allclose(flat(out), expected, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(flat(out)), np.linalg.norm(g), rtol=1e-5)


# ------------------------------------------------------------------------ Monge


def test_monge_closed_form_and_unit_length_in_its_metric():
  g = np.array([0.3, -1.2, 2.0])
  d, _ = monge().update(jnp.asarray(g, jnp.float32), optax.EmptyState())
  n = np.linalg.norm(g)
  np.testing.assert_allclose(np.asarray(d), g / (n * np.sqrt(1 + n * n)), rtol=1e-6)
  metric = np.eye(3) + np.outer(g, g)   # G = I + g g^T: d^T G d = 1
  np.testing.assert_allclose(np.asarray(d) @ metric @ np.asarray(d), 1.0, rtol=1e-5)


def test_sharpness_aware_with_monge_evaluates_at_the_monge_point():
  params, batch = mlp_init(5), make_data(5, n=8)
  g = flat(jax.grad(mlp_loss)(params, batch))
  n = np.linalg.norm(g)
  point, _ = sam_point(params, batch, direction=g / (n * np.sqrt(1 + n * n)), rho=0.5)
  out, _ = update(so.sharpness_aware(0.5, perturbation=monge()), params, batch)
  np.testing.assert_allclose(flat(out), flat(jax.grad(mlp_loss)(point, batch)), rtol=1e-5, atol=1e-7)
  # multi-step ascent stays in the Euclidean ball of radius rho
  _, state = update(so.sharpness_aware(0.5, perturbation=monge(), ascent_steps=3), params, batch)
  assert float(state.telemetry.perturbation_norm) <= 0.5 * (1 + 1e-6)


# --------------------------------------------------------------- preconditioned


def test_preconditioned_matches_a_numpy_ema_with_bias_correction():
  b2, eps = 0.9, 1e-3
  rng = np.random.default_rng(0)
  p = preconditioned(b2=b2, eps=eps)
  state = p.init({"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)})
  v = np.zeros(10)
  for t in range(1, 6):
    g = rng.normal(size=10) * (t % 3 + 0.5)
    tree = {"a": jnp.asarray(g[:6].reshape(3, 2), jnp.float32), "b": jnp.asarray(g[6:], jnp.float32)}
    d, state = p.update(tree, state)
    v = b2 * v + (1 - b2) * g * g
    u = g / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(flat(d), u / np.linalg.norm(u), rtol=1e-5, atol=1e-7)
    assert int(state.count) == t
  np.testing.assert_allclose(flat(state.nu), v, rtol=1e-5)


def test_preconditioned_costs_one_params_sized_buffer_and_composes_with_sharpness_aware():
  params, batch = mlp_init(6), make_data(6)
  tx = so.sharpness_aware(RHO, perturbation=preconditioned(b2=0.99))
  out, state = update(tx, params, batch)
  pre = state.perturbation_state
  assert isinstance(pre, PreconditionedState)
  assert jax.tree.structure(pre.nu) == jax.tree.structure(params)
  g = flat(jax.grad(mlp_loss)(params, batch))
  u = g / (np.abs(g) + 1e-8)   # step 1: v^ = g^2
  point, _ = sam_point(params, batch, direction=u / np.linalg.norm(u))
  np.testing.assert_allclose(flat(out), flat(jax.grad(mlp_loss)(point, batch)), rtol=1e-5, atol=1e-7)


def test_preconditioned_can_read_the_base_adams_second_moment():
  """moments="adam": no buffer; d from the base Adam's nu of the previous step (an EMA of the
  perturbed gradients Adam consumed), bias-corrected with Adam's count. By hand over 3 steps."""
  params, b2, lr, eps = mlp_init(7), 0.95, 1e-2, 1e-8
  tx = optax.chain(so.sharpness_aware(RHO, perturbation=preconditioned(b2, moments="adam")),
                   optax.adam(lr, b2=b2))
  state = tx.init(params)
  assert state[0].perturbation_state.nu is None
  w, m, v = flat(params), 0.0, np.zeros(flat(params).size)
  p = params
  for t in range(3):
    batch = make_data(t)
    grad_fn = lambda q, b=batch: jax.grad(mlp_loss)(q, b)
    out, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn, adam_state=state)
    p = optax.apply_updates(p, out)
    g = flat(grad_fn(unflat(w, params)))
    u = g if t == 0 else g / (np.sqrt(v / (1 - b2 ** t)) + eps)
    point = unflat(w + RHO * u / np.linalg.norm(u), params)
    g_tilde = flat(grad_fn(point))
    m = 0.9 * m + 0.1 * g_tilde
    v = b2 * v + (1 - b2) * g_tilde ** 2
    w = w - lr * (m / (1 - 0.9 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    np.testing.assert_allclose(flat(p), w, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="adam_state"):
    tx.update(grad_fn(p), state, p, grad_fn=grad_fn)


# ---------------------------------------------------------------- Functional-SAM


def functional_reference(params, batch, d):
  """J_F(w+eps)^T dl/dF(F(w)) for the 2-layer tanh MLP and mean cross-entropy, in numpy:
  the cotangent softmax(F(w)) - onehot(y), over B, at w; the backward pass at w + eps."""
  x, y = (np.asarray(a, np.float64) for a in batch)
  w = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
  forward = lambda w: (np.tanh(x @ w[0]["kernel"] + w[0]["bias"]),)
  h = forward(w)[0]
  logits = h @ w[1]["kernel"] + w[1]["bias"]
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  c = (prob - np.eye(logits.shape[1])[y.astype(int)]) / len(y)
  we = unflat(flat(params) + RHO * d, params)
  we = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in we]
  h = forward(we)[0]
  dh = c @ we[1]["kernel"].T * (1 - h ** 2)
  return np.concatenate([dh.sum(0), (x.T @ dh).ravel(), c.sum(0), (h.T @ c).ravel()])  # leaf order


def test_functional_sam_is_the_jacobian_at_the_perturbed_point_times_the_clean_cotangent():
  params, batch = mlp_init(8), make_data(8)
  g = flat(jax.grad(mlp_loss)(params, batch))
  expected = functional_reference(params, batch, g / np.linalg.norm(g))
  out, state = update(functional_sam(0.05), params, batch, objective=True)
  np.testing.assert_allclose(flat(out), expected, rtol=1e-4, atol=1e-6)
  sam_out, _ = update(so.sharpness_aware(0.05), params, batch)
  assert np.max(np.abs(flat(sam_out) - expected)) > 1e-4   # the logit path is really dropped
  point, _ = sam_point(params, batch)
  assert int(state.telemetry.has_perturbed_loss) == 1
  np.testing.assert_allclose(float(state.telemetry.perturbed_loss), float(mlp_loss(point, batch)),
                             rtol=1e-5)
  # the clean pass's outputs given as model_outputs= save the forward at w, same result
  reused, _ = update(functional_sam(0.05), params, batch, objective=True,
                     model_outputs=mlp_apply(params, batch[0]))
  np.testing.assert_allclose(flat(reused), flat(out), rtol=1e-6, atol=1e-8)


def test_functional_sam_with_the_preconditioned_geometry():
  params, batch = mlp_init(9), make_data(9)
  g = flat(jax.grad(mlp_loss)(params, batch))
  u = g / (np.abs(g) + 1e-8)   # preconditioned, step 1
  out, _ = update(functional_sam(0.05, perturbation=preconditioned()), params, batch, objective=True)
  np.testing.assert_allclose(flat(out), functional_reference(params, batch, u / np.linalg.norm(u)),
                             rtol=1e-4, atol=1e-6)


def test_functional_sam_of_a_linear_model_is_the_clean_gradient_also_for_complex_params():
  """F linear in w has a constant Jacobian, so Functional-SAM returns g exactly as the caller
  gives it (for complex params the conjugate of JAX's gradient, the descent direction)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 3)) + 1j * rng.normal(size=(6, 3)), jnp.complex64)
  y = jnp.asarray(rng.normal(size=6), jnp.complex64)
  w = jnp.asarray(rng.normal(size=3) + 1j * rng.normal(size=3), jnp.complex64)
  obj = so.Objective(lambda p, b: b[0] @ p, lambda out, b: jnp.abs(out - b[1]) ** 2, (x, y))
  g = jnp.conj(jax.grad(obj.loss)(w))
  tx = functional_sam(0.5)
  out, _ = tx.update(g, tx.init(w), w, objective=obj)
  np.testing.assert_allclose(np.asarray(out), np.asarray(g), rtol=1e-5, atol=1e-6)


def test_functional_sam_needs_the_objective_and_with_per_example_losses_is_sam():
  params, batch = mlp_init(10), make_data(10)
  with pytest.raises(TypeError, match="objective"):
    update(functional_sam(), params, batch)
  tx = functional_sam(RHO)
  out, _ = tx.update(jax.grad(mlp_loss)(params, batch), tx.init(params), params,
                     per_example_loss_fn=lambda q: mlp_example_losses(q, batch))
  sam_out, _ = update(so.sharpness_aware(RHO), params, batch)
  np.testing.assert_allclose(flat(out), flat(sam_out), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------- late-phase SAM


def test_late_phase_plain_steps_skip_the_closure_then_run_the_transform():
  params, start = mlp_init(11), 3
  inner = so.sharpness_aware(RHO)
  tx = late_phase(inner, start)
  calls, traces = [], []

  def step(p, s, b):
    traces.append(len(calls))
    def grad_fn(q):
      calls.append(1)   # at trace time: one per program that calls the closure
      return jax.grad(mlp_loss)(q, b)
    g = jax.grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, jax.tree.map(lambda x: -0.1 * x, u)), s, u, g

  run = so.gated_jit(step, host_gating=True)
  p, s = params, tx.init(params)
  for t in range(6):
    batch = make_data(t)
    inner_before = s.inner
    p_before = p
    p, s, u, g = run(p, s, batch)
    if t < start:
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g), strict=True):
        np.testing.assert_array_equal(a, b)
      assert not calls and float(s.sam_step) == 0.0
    else:
      ref, _ = inner.update(g, inner_before, p_before, grad_fn=lambda q, b=batch: jax.grad(mlp_loss)(q, b))
      np.testing.assert_allclose(flat(u), flat(ref), rtol=1e-6, atol=1e-8)
      point, _ = sam_point(p_before, batch)
      np.testing.assert_allclose(flat(u), flat(jax.grad(mlp_loss)(point, batch)), rtol=1e-5, atol=1e-7)
      assert float(s.sam_step) == 1.0
  assert len(traces) == 2 and len(calls) == 1   # one program per branch, one closure call in all
  assert run.reads == 1                          # the count was read from the device once
  assert int(s.inner.count) == 6 - start
  np.testing.assert_allclose(float(s.sam_step_fraction), (6 - start) / 6, rtol=1e-6)


def test_late_phase_under_jit_uses_lax_cond_and_compiles_once():
  params = mlp_init(12)
  tx = late_phase(so.sharpness_aware(RHO), 2)
  traces = []

  @jax.jit
  def step(p, s, b):
    traces.append(1)
    grad_fn = lambda q: jax.grad(mlp_loss)(q, b)
    return (*tx.update(grad_fn(p), s, p, grad_fn=grad_fn), grad_fn(p))

  s = tx.init(params)
  for t in range(4):
    u, s, g = step(params, s, make_data(t))
    assert np.array_equal(flat(u), flat(g)) == (t < 2)
  assert len(traces) == 1 and isinstance(s, LatePhaseState)
  jaxpr = str(jax.make_jaxpr(lambda s: step.__wrapped__(params, s, make_data(0)))(s))
  assert "cond" in jaxpr


def test_late_phase_argument_errors():
  with pytest.raises(ValueError, match="start_step"):
    late_phase(so.sharpness_aware(), -1)
  with pytest.raises(TypeError, match="transform"):
    late_phase(0.05, 10)


def test_late_phase_removes_the_large_rho_stall_tiny():
  """Issue 21 item 1 in miniature (the full run: benchmarks/late_phase_stall.py): the demo CNN
  with the unnormalized ReLU head on MNIST-5k at 40% noise, batch 64, SGD + momentum 0.9 at lr
  0.05. SAM at rho = 0.2 from the start kills the head: its loss sits at ln 10. With two epochs
  of plain SGD first (124 steps; 20 or 62 are too few here, see the benchmark) the same SAM keeps
  training. Steps 124 to 153 are SAM steps in both runs' last window."""
  from sam_optax import demo
  from sam_optax import flax_training as ft

  x, y, _, _ = demo.load_mnist5k(0, 0.4)
  model = demo.make_model("cnn", head="relu")
  start, sam_steps = 124, 30

  def train(first, steps):
    variables = model.init({"params": jax.random.key(0)}, jnp.asarray(x[:2]), train=False)
    state = ft.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                 batch_stats=variables["batch_stats"],
                                 tx=optax.chain(first, optax.sgd(0.05, momentum=0.9)))
    step = so.gated_jit(ft.make_linen_train_step(jit=False))
    order = np.concatenate([np.random.default_rng(e).permutation(len(y)) for e in range(3)])
    losses = []
    for i in range(steps):
      idx = order[i * 64:(i + 1) * 64]
      state, m = step(state, (jnp.asarray(x[idx]), jnp.asarray(y[idx])), jax.random.key(i))
      losses.append(float(m["loss"]))
    return float(np.mean(losses[-10:])), state

  stalled, _ = train(so.sharpness_aware(0.2), sam_steps)
  trained, state = train(late_phase(so.sharpness_aware(0.2), start), start + sam_steps)
  late = tu_find(state.opt_state, LatePhaseState)
  assert int(late.inner.count) == sam_steps   # the last 30 steps were SAM steps
  assert stalled > 0.98 * np.log(10), stalled
  assert trained < 0.9 * np.log(10), trained


def tu_find(tree, kind):
  return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)][0]


# ------------------------------------------------------------- shared contracts


FACTORIES = {
    "wsam": lambda: optax.chain(wsam(RHO, 0.9), optax.sgd(0.05, momentum=0.9)),
    "wsam_decoupled": lambda: wsam_optimizer(optax.adamw(1e-3), RHO, 0.9, decoupled=True,
                                             learning_rate=1e-3),
    "stable_sam": lambda: optax.chain(stable_sam(RHO), optax.sgd(0.05)),
    "monge": lambda: optax.chain(so.sharpness_aware(RHO, perturbation=monge()), optax.sgd(0.05)),
    "preconditioned": lambda: optax.chain(so.sharpness_aware(RHO, perturbation=preconditioned()),
                                          optax.adam(1e-3)),
    "functional_sam": lambda: optax.chain(functional_sam(RHO), optax.sgd(0.05)),
    "functional_preconditioned": lambda: optax.chain(
        functional_sam(RHO, perturbation=preconditioned()), optax.adam(1e-3)),
    "late_phase": lambda: optax.chain(late_phase(so.sharpness_aware(RHO), 2), optax.sgd(0.05)),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_jit_compiles_once_and_zero_gradient_gives_no_nan(name):
  params = mlp_init(13)
  for zero in (False, True):
    opt, traces = FACTORIES[name](), []

    @jax.jit
    def step(p, s, b, opt=opt, zero=zero):
      traces.append(1)
      scale = 0.0 if zero else 1.0
      grad_fn = lambda q: jax.tree.map(lambda x: x * scale, jax.grad(mlp_loss)(q, b))
      obj = so.Objective(lambda q, bb: scale * mlp_apply(q, bb[0]), cross_entropy, b)
      u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn, objective=obj)
      return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    for t in range(4):
      p, s = step(p, s, make_data(t))
    assert len(traces) == 1, name
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((p, s)))
    moved = not np.allclose(flat(p), flat(params))
    assert moved != zero or name == "wsam_decoupled", name   # adamw's weight decay moves zeros too
