"""Telemetry in the state (issue 12): every entry against a hand computation, the
accessor through every optax wrapper, the chain-order guard and the closure errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import make_data, mlp_init, mlp_loss

RNG = np.random.default_rng(0)
_B = RNG.normal(size=(5, 5))
A = _B @ _B.T + np.eye(5)  # SPD Hessian of the quadratic
W0 = RNG.normal(size=5)


def quad(w):
  return 0.5 * w @ (jnp.asarray(A, w.dtype) @ w)


def sam_step_fn(tx, with_losses=True):
  @jax.jit
  def step(w, state):
    value, g = jax.value_and_grad(quad)(w)
    if with_losses:
      u, state = tx.update(g, state, w, value_and_grad_fn=jax.value_and_grad(quad), value=value)
    else:
      u, state = tx.update(g, state, w, grad_fn=jax.grad(quad))
    return optax.apply_updates(w, u), state, so.metrics(state)
  return step


def test_every_entry_matches_a_hand_computation_over_jitted_steps():
  rho, lr = 0.1, 0.05
  tx = optax.chain(so.sharpness_aware(rho, telemetry="full"), optax.sgd(lr))
  step = sam_step_fn(tx)
  w, state = jnp.asarray(W0, jnp.float32), tx.init(jnp.asarray(W0, jnp.float32))
  w_ref = W0.copy()
  for _ in range(5):
    w, state, m = step(w, state)
    g = A @ w_ref
    eps = rho * g / np.linalg.norm(g)
    g_adv = A @ (w_ref + eps)
    L = lambda v: 0.5 * v @ A @ v
    expected = {
        "clean_grad_norm": np.linalg.norm(g), "perturbation_norm": rho,
        "perturbed_grad_norm": np.linalg.norm(g_adv),
        "cosine": g @ g_adv / (np.linalg.norm(g) * np.linalg.norm(g_adv)),
        "clean_loss": L(w_ref), "perturbed_loss": L(w_ref + eps),
        "sharpness": L(w_ref + eps) - L(w_ref)}
    for name, value in expected.items():
      assert m[name].dtype == jnp.float32, name
      np.testing.assert_allclose(float(m[name]), value, rtol=2e-4, atol=1e-6, err_msg=name)
    w_ref = w_ref - lr * g_adv
  np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-4, atol=1e-6)


def test_loss_entries_absent_without_losses_and_never_nan():
  tx = so.sam(optax.sgd(0.05), 0.1)
  step = sam_step_fn(tx, with_losses=False)
  w = jnp.asarray(W0, jnp.float32)
  w, state, _ = step(w, tx.init(w))
  m = so.metrics(state)
  assert {"clean_loss", "perturbed_loss", "sharpness"}.isdisjoint(m)
  # the default records no cosine (it would keep g alive through the second pass)
  assert {"clean_grad_norm", "perturbation_norm", "perturbed_grad_norm"} == set(m)
  # zero gradient: every entry finite (cosine 0, perturbation 0)
  zero = jnp.zeros(5)
  full = so.sharpness_aware(0.1, telemetry="full")
  _, state = full.update(zero, full.init(zero), zero, grad_fn=lambda p: jnp.zeros_like(p))
  m = so.metrics(state)
  assert all(np.isfinite(float(v)) for v in m.values())
  assert float(m["cosine"]) == 0.0 and float(m["perturbation_norm"]) == 0.0


def test_only_the_perturbed_loss_without_value():
  tx = so.sharpness_aware(0.1)
  w = jnp.asarray(W0, jnp.float32)
  _, state = tx.update(jax.grad(quad)(w), tx.init(w), w, value_and_grad_fn=jax.value_and_grad(quad))
  m = so.metrics(state)
  assert "perturbed_loss" in m and "clean_loss" not in m and "sharpness" not in m


def test_looksam_and_randomized_report_their_schedule():
  w = jnp.asarray(W0, jnp.float32)
  for tx, expected in [(so.looksam(0.05, k=2), [1, 0, 1, 0]),
                       (so.randomized(so.sharpness_aware(0.05), 1.0), [1, 1, 1, 1]),
                       (so.randomized(so.sharpness_aware(0.05), 0.0), [0, 0, 0, 0])]:
    opt = optax.chain(tx, optax.sgd(0.01))
    step = sam_step_fn(opt)
    state, seen = opt.init(w), []
    ww = w
    for _ in range(4):
      ww, state, m = step(ww, state)
      seen.append(float(m["sam_step"]))
    assert seen == expected
    np.testing.assert_allclose(float(m["sam_step_fraction"]), np.mean(expected), atol=1e-6)


def test_ae_sam_fraction_counts_its_sam_steps():
  w = jnp.asarray(W0, jnp.float32)
  opt = optax.chain(so.ae_sam(so.sharpness_aware(0.05), total_steps=20), optax.sgd(0.01))
  step = sam_step_fn(opt)
  state, steps = opt.init(w), []
  for _ in range(10):
    w, state, m = step(w, state)
    steps.append(float(m["sam_step"]))
  assert int(state[0].sharp_steps) == sum(steps)
  np.testing.assert_allclose(float(m["sam_step_fraction"]), np.mean(steps), atol=1e-6)


def _wrappers():
  base = lambda: so.sam(optax.sgd(0.05), 0.1)
  return {
      "chain": base,
      "nested_chain": lambda: optax.chain(optax.chain(so.sharpness_aware(0.1)),
                                          optax.chain(optax.clip_by_global_norm(1.0),
                                                      optax.sgd(0.05))),
      "inject_hyperparams": lambda: optax.chain(
          optax.inject_hyperparams(so.sharpness_aware)(rho=0.1), optax.sgd(0.05)),
      "multi_steps": lambda: optax.MultiSteps(base(), every_k_schedule=1),
      "apply_if_finite": lambda: optax.apply_if_finite(base(), max_consecutive_errors=3),
      "masked": lambda: optax.chain(optax.masked(so.sharpness_aware(0.1), {"a": True, "b": False}),
                                    optax.sgd(0.05)),
  }


@pytest.mark.parametrize("name", sorted(_wrappers()))
def test_metrics_found_through_every_wrapper_and_jittable(name):
  params = {"a": jnp.asarray(W0[:3], jnp.float32), "b": jnp.asarray(W0[3:], jnp.float32)}
  loss = lambda p: jnp.sum(p["a"] ** 2) + 2 * jnp.sum(p["b"] ** 2)
  opt = _wrappers()[name]()
  value, g = jax.value_and_grad(loss)(params)
  vg = jax.value_and_grad(loss)
  if name == "masked":  # optax.masked hands the closure the masked subtree ('b' is a MaskedNode)
    def vg(p):
      value, ga = jax.value_and_grad(lambda a: loss({"a": a, "b": params["b"]}))(p["a"])
      return value, {"a": ga, "b": p["b"]}
  _, state = jax.jit(lambda s: opt.update(g, s, params, value=value,
                                          value_and_grad_fn=vg))(opt.init(params))
  eager = so.metrics(state)
  jitted = jax.jit(so.metrics)(state)
  both = np.concatenate([np.asarray(g["a"]), np.asarray(g["b"])])
  ga = np.asarray(g["a"]) if name == "masked" else both
  np.testing.assert_allclose(float(eager["clean_grad_norm"]), np.linalg.norm(ga), rtol=1e-5)
  np.testing.assert_allclose(float(eager["perturbation_norm"]), 0.1, rtol=1e-5)
  assert float(eager["sharpness"]) > 0
  for key in eager:
    np.testing.assert_allclose(np.asarray(jitted[key]), np.asarray(eager[key]), rtol=1e-6)


def test_metrics_after_checkpoint_restore(tmp_path):
  from sam_optax import checkpoint
  w = jnp.asarray(W0, jnp.float32)
  opt = optax.chain(so.looksam(0.1, k=2), optax.sgd(0.05))
  step = sam_step_fn(opt)
  w, state, m = step(w, opt.init(w))
  checkpoint.save(tmp_path / "ck", {"opt": state})
  restored = checkpoint.restore(tmp_path / "ck", {"opt": opt.init(w)})["opt"]
  r = so.metrics(restored)
  assert set(r) == set(m)
  for key in m:
    np.testing.assert_array_equal(np.asarray(r[key]), np.asarray(m[key]))


def test_optax_apply_if_finite_misses_a_nan_at_the_perturbed_point():
  """The pitfall sam_optax.skip_if_nonfinite exists for: optax's checks the input only."""
  w = jnp.asarray(W0, jnp.float32)
  opt = optax.apply_if_finite(so.sam(optax.sgd(0.05), 0.1), max_consecutive_errors=5)
  u, state = opt.update(jax.grad(quad)(w), opt.init(w), w,
                        grad_fn=lambda p: jnp.full_like(p, jnp.nan))
  assert np.all(np.isnan(np.asarray(u))) and int(state.total_notfinite) == 0


def test_skip_if_nonfinite_counts_skipped_steps():
  w = jnp.asarray(W0, jnp.float32)
  opt = so.skip_if_nonfinite(so.sam(optax.sgd(0.05), 0.1), max_consecutive_errors=5)
  state = opt.init(w)
  nan_at_perturbed = lambda p: jnp.full_like(p, jnp.nan)
  for _ in range(2):
    _, state = opt.update(jax.grad(quad)(w), state, w, grad_fn=nan_at_perturbed)
  _, state = opt.update(jax.grad(quad)(w), state, w, grad_fn=jax.grad(quad))
  m = so.metrics(state)
  assert int(m["skipped_steps"]) == 2
  assert np.isfinite(float(m["perturbed_grad_norm"]))


def test_msam_reports_what_applies():
  params, batch = mlp_init(0), make_data(0)
  opt = so.msam(optax.sgd(0.05, momentum=0.9), rho=0.3)
  state = opt.init(params)
  for _ in range(2):
    g = jax.grad(mlp_loss)(params, batch)
    u, state = opt.update(g, state, params)
    params = optax.apply_updates(params, u)
  m = so.metrics(state)
  assert set(m) == {"perturbation_norm", "perturbed_grad_norm"}
  np.testing.assert_allclose(float(m["perturbation_norm"]), 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(m["perturbed_grad_norm"]),
                             float(optax.tree.norm(g)), rtol=1e-5)


def _run_order(opt, steps=5):
  w = jnp.asarray(W0, jnp.float32)
  state = opt.init(w)

  @jax.jit
  def step(w, state):
    g = jax.grad(quad)(w)
    u, state = opt.update(g, state, w, grad_fn=jax.grad(quad))
    return optax.apply_updates(w, u), state

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(steps):
      w, state = step(w, state)
    so.metrics(state)  # the program is pure: the host warns when it reads the state
  return [str(c.message) for c in caught if issubclass(c.category, UserWarning)]


def test_wrong_chain_order_warns_once_and_the_right_order_does_not():
  wrong = _run_order(optax.chain(optax.sgd(0.05), so.sharpness_aware(0.05)))
  assert len([m for m in wrong if "must come first" in m]) == 1
  assert "sharpness_aware(rho), <base optimizer>" in wrong[0]
  wrong_adam = _run_order(optax.chain(optax.adam(0.01), so.sharpness_aware(0.05)))
  assert any("must come first" in m for m in wrong_adam)
  assert not any("must come first" in m for m in _run_order(so.sam(optax.sgd(0.05), 0.05)))
  assert not any("must come first" in m for m in _run_order(so.sam(optax.adam(0.01), 0.05)))


def test_grad_fn_returning_a_pair_points_to_value_and_grad_fn():
  w = jnp.asarray(W0, jnp.float32)
  tx = so.sharpness_aware(0.05)
  with pytest.raises(TypeError, match="value_and_grad_fn="):
    tx.update(jax.grad(quad)(w), tx.init(w), w, grad_fn=jax.value_and_grad(quad))
  # a params tree that is itself a pair is not mistaken for (loss, grads)
  pair = (jnp.ones(()), jnp.ones(3))
  loss2 = lambda p: p[0] ** 2 + jnp.sum(p[1] ** 2)
  out, _ = tx.update(jax.grad(loss2)(pair), tx.init(pair), pair, grad_fn=jax.grad(loss2))
  assert jax.tree.structure(out) == jax.tree.structure(pair)
  with pytest.raises(TypeError, match="either `grad_fn=` or `value_and_grad_fn=`"):
    tx.update(jax.grad(quad)(w), tx.init(w), w, grad_fn=jax.grad(quad),
              value_and_grad_fn=jax.value_and_grad(quad))


def test_linen_step_reports_the_perturbed_loss_of_the_second_pass():
  import flax.linen as nn

  from sam_optax import flax as ft
  model = nn.Dense(3)
  x, y = make_data(3, n=16, d=4)
  params = model.init(jax.random.key(0), x)["params"]
  apply = lambda v, x, train, rngs, mutable: (model.apply(v, x), {})
  rho = 0.2
  state = ft.TrainState.create(apply_fn=apply, params=params, tx=so.sam(optax.sgd(0.1), rho))
  _, m = ft.make_linen_train_step()(state, (x, y), jax.random.key(1))
  loss = lambda p: ft.softmax_cross_entropy(model.apply({"params": p}, x), y)
  g = jax.grad(loss)(params)
  gn = float(optax.tree.norm(g))
  eps = jax.tree.map(lambda a: rho * a / gn, g)
  expected = float(loss(jax.tree.map(jnp.add, params, eps)))
  np.testing.assert_allclose(float(m["perturbed_loss"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m["sharpness"]), expected - float(loss(params)), rtol=1e-4)


def test_metrics_inside_jit_omit_what_was_not_recorded():
  # e828a15: inside jit `metrics()` read `clean_loss`, `perturbed_loss` and
  # `sharpness` as 0 when the step was given no loss (a plausible but wrong 0).
  loss = lambda w: jnp.sum(w ** 4)
  w = jnp.array([1.0, -2.0])
  tx = so.sam(optax.sgd(0.1), 0.05)

  @jax.jit
  def bare(w, state):
    _, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    return so.metrics(state)

  @jax.jit
  def full(w, state):
    value, g = jax.value_and_grad(loss)(w)
    _, state = tx.update(g, state, w, value=value, value_and_grad_fn=jax.value_and_grad(loss))
    return so.metrics(state)

  m = bare(w, tx.init(w))
  assert not {"clean_loss", "perturbed_loss", "sharpness"} & set(m)
  m = full(w, tx.init(w))
  g = jax.grad(loss)(w)
  by_hand = loss(w + 0.05 * g / jnp.linalg.norm(g)) - loss(w)
  np.testing.assert_allclose(m["sharpness"], by_hand, rtol=1e-6)
  # outside jit the flags are concrete as well
  state = tx.init(w)
  _, state = tx.update(g, state, w, grad_fn=jax.grad(loss))
  assert "sharpness" not in so.metrics(state) and "perturbed_grad_norm" in so.metrics(state)
