"""Trace-, Det- and Frob-SAM against hand computations with the same noise draws."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat


def documented_noise(seed, t, params, n, kind="normal", h=1.0):
  """The noise of step t, drawn as the docstrings say: fold_in(key(seed), t), split per
  leaf, shape (n,) + leaf.shape; returned flat, one row per sample (float64)."""
  key = jax.random.fold_in(jax.random.key(seed), t)
  leaves = jax.tree.leaves(params)
  keys = jax.random.split(key, len(leaves))
  rows = []
  for k, w in zip(keys, leaves, strict=True):
    if kind == "uniform":
      z = jax.random.uniform(k, (n,) + w.shape, jnp.float32, minval=-1.0, maxval=1.0) * h
    else:
      z = jax.random.normal(k, (n,) + w.shape, jnp.float32)
    rows.append(np.asarray(z, np.float64).reshape(n, -1))
  z = np.concatenate(rows, axis=1)
  if kind == "sphere":
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
  return z


def loss_and_grad_at(vec, params, batch):
  loss, g = jax.value_and_grad(mlp_loss)(unflat(vec.astype(np.float32), params), batch)
  return float(loss), flat(g)


def run(tx, params, batch, steps=1, with_value=True, use_value_and_grad=True):
  vg = lambda p: jax.value_and_grad(mlp_loss)(p, batch)
  grad_fn = lambda p: jax.grad(mlp_loss)(p, batch)

  @jax.jit
  def step(s):
    value, g = vg(params)
    kw = {"value_and_grad_fn": vg} if use_value_and_grad else {"grad_fn": grad_fn}
    if with_value:
      kw["value"] = value
    return tx.update(g, s, params, **kw)

  state = tx.init(params)
  outs = []
  for _ in range(steps):
    out, state = step(state)
    outs.append(flat(out))
  return outs, state


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("distribution", ["normal", "sphere"])
def test_trace_sam_is_the_mean_gradient_at_the_drawn_points(n, distribution):
  params, batch, rho, seed = mlp_init(0), make_data(0), 0.05, 7
  outs, state = run(so.trace_sam(rho, n, seed, distribution=distribution), params, batch,
                    steps=2, use_value_and_grad=False)
  w = flat(params)
  for t, out in enumerate(outs):
    z = documented_noise(seed, t, params, n, distribution)
    expected = np.mean([loss_and_grad_at(w + rho * zi, params, batch)[1] for zi in z], axis=0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
  if distribution == "sphere":  # every sample has norm exactly rho
    np.testing.assert_allclose(float(so.metrics(state)["perturbation_norm"]), rho, rtol=1e-5)
  assert int(state.count) == 2


@pytest.mark.parametrize("n, rho, lam", [(2, 0.005, 0.005), (4, 0.1, 0.1)])
def test_frob_sam_is_g_plus_scaled_unbiased_covariance(n, rho, lam):
  params, batch, seed = mlp_init(1), make_data(1), 3
  outs, state = run(so.frob_sam(rho, lam, n, seed), params, batch, steps=2)
  w = flat(params)
  _, g = loss_and_grad_at(w, params, batch)
  for t, out in enumerate(outs):
    z = documented_noise(seed, t, params, n)
    pairs = [loss_and_grad_at(w + rho * zi, params, batch) for zi in z]
    losses = np.array([p[0] for p in pairs])
    grads = np.stack([p[1] for p in pairs])
    cov = sum((losses[i] - losses.mean()) * (grads[i] - grads.mean(0)) for i in range(n)) / (n - 1)
    expected = g + lam / rho ** 2 * cov
    # lam / rho^2 = 200 amplifies float32 rounding of the losses in the first case
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=2e-5)
    assert np.linalg.norm(expected - g) > 1e-3 * np.linalg.norm(g)  # the penalty matters
  np.testing.assert_allclose(float(so.metrics(state)["perturbed_loss"]), losses.mean(), rtol=1e-5)


@pytest.mark.parametrize("with_value", [True, False])
def test_det_sam_against_its_formula(with_value):
  params, batch, seed = mlp_init(2), make_data(2), 5
  rho, lam, h, n = 0.5, 0.3, 0.2, 3
  outs, _ = run(so.det_sam(rho, lam, h, n, seed), params, batch, steps=2, with_value=with_value)
  w = flat(params)
  l0, g = loss_and_grad_at(w, params, batch)
  for t, out in enumerate(outs):
    u = documented_noise(seed, t, params, n, "uniform", h)
    assert np.all(np.abs(u) <= h)
    pairs = [loss_and_grad_at(w + rho * ui, params, batch) for ui in u]
    delta = np.array([(p[0] - l0) / rho ** 2 for p in pairs])
    psi = np.exp(-delta / 2)
    x = psi.mean()
    # d/dw of lam * phi(mean psi(Delta_i)), phi(x) = x^-2, psi(x) = exp(-x/2):
    # phi'(x) psi'(D_i) = (-2 / x^3)(-psi(D_i) / 2) = psi(D_i) / x^3, dD_i/dw = (G_i - g) / rho^2
    penalty = sum(psi[i] / x ** 3 * (pairs[i][1] - g) for i in range(n)) / n / rho ** 2
    expected = g + lam * penalty
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    assert np.linalg.norm(expected - g) > 1e-3 * np.linalg.norm(g)


def test_samples_are_one_vmapped_call():
  """The closure is traced once per step whatever n is (one vmapped call), plus once
  more for Det-SAM's clean loss when `value=` is absent."""
  params, batch = mlp_init(0), make_data(0)

  def count_calls(tx, with_value):
    calls = []

    def vg(p):
      calls.append(1)
      return jax.value_and_grad(mlp_loss)(p, batch)

    value, g = jax.value_and_grad(mlp_loss)(params, batch)
    extra = {"value": value} if with_value else {}
    jax.jit(lambda s: tx.update(g, s, params, value_and_grad_fn=vg, **extra)).lower(
        tx.init(params))
    return len(calls)

  assert count_calls(so.trace_sam(0.01, 8), True) == 1
  assert count_calls(so.frob_sam(num_samples=8), True) == 1
  assert count_calls(so.det_sam(num_samples=8), True) == 1
  assert count_calls(so.det_sam(num_samples=8), False) == 2


def test_rho_zero_returns_the_clean_gradient():
  params, batch = mlp_init(3), make_data(3)
  g = flat(jax.grad(mlp_loss)(params, batch))
  for tx in (so.trace_sam(0.0, 2), so.frob_sam(0.0), so.det_sam(0.0)):
    (out,), _ = run(tx, params, batch)
    np.testing.assert_allclose(out, g, rtol=1e-6, atol=1e-7)


def test_losses_are_required_where_the_rule_needs_them():
  params, batch = mlp_init(0), make_data(0)
  for tx in (so.frob_sam(), so.det_sam()):
    with pytest.raises(TypeError, match="value_and_grad_fn=lambda p"):
      run(tx, params, batch, use_value_and_grad=False)
  run(so.trace_sam(), params, batch, use_value_and_grad=False)  # Trace-SAM needs none


def test_constructor_checks():
  with pytest.raises(ValueError, match=r"frob_sam\(num_samples=...\)"):
    so.frob_sam(num_samples=1)
  with pytest.raises(ValueError, match=r"det_sam\(h=...\)"):
    so.det_sam(h=0.0)
  with pytest.raises(ValueError, match=r"trace_sam\(distribution=...\)"):
    so.trace_sam(distribution="cube")
  with pytest.raises(ValueError, match=r"frob_sam\(lam=...\)"):
    so.frob_sam(lam=-1.0)


@pytest.mark.slow
@pytest.mark.parametrize("factory, names, needs_loss", [
    (so.trace_sam, ("rho",), False),
    (so.frob_sam, ("rho", "lam"), True),
    (so.det_sam, ("rho", "lam", "h"), True),
])
def test_every_numeric_hyperparameter_can_be_injected(factory, names, needs_loss):
  params, batch = mlp_init(4), make_data(4)
  base = factory(num_samples=2)
  tx = optax.inject_hyperparams(factory, static_args=("num_samples",))(num_samples=2)
  vg = lambda p: jax.value_and_grad(mlp_loss)(p, batch)
  value, g = vg(params)
  kw = {"value_and_grad_fn": vg, "value": value} if needs_loss else {
      "grad_fn": lambda p: vg(p)[1]}
  traces = []

  @jax.jit
  def update(s):
    traces.append(1)
    return tx.update(g, s, params, **kw)

  state = tx.init(params)
  assert set(names) | {"seed"} <= set(state.hyperparams)
  out, _ = update(state)
  ref, _ = jax.jit(lambda s: base.update(g, s, params, **kw))(base.init(params))
  np.testing.assert_allclose(flat(out), flat(ref), rtol=1e-5, atol=1e-7)
  for name in names:
    state.hyperparams[name] = state.hyperparams[name] * 2 + 1
    out2, _ = update(state)
    assert not np.allclose(flat(out2), flat(out))
  assert len(traces) == 1
  # the seed is read by init (the key lives in the state)
  other = optax.inject_hyperparams(factory, static_args=("num_samples",))(num_samples=2, seed=1)
  out3, _ = jax.jit(lambda s_: other.update(g, s_, params, **kw))(other.init(params))
  assert not np.allclose(flat(out3), flat(out))
  with pytest.raises(TypeError, match="static_args"):
    bad = optax.inject_hyperparams(factory)(num_samples=2)
    jax.jit(lambda s: bad.update(g, s, params, **kw))(bad.init(params))
