"""The gradient-norm penalty against its formula, SAM (alpha = 1) and the base (alpha = 0)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, random_tree, unflat


def nonlinear_grad(p):
  """A stand-in for a loss gradient that depends nonlinearly on the point."""
  return jax.tree.map(lambda x: jnp.sin(3.0 * x) + x ** 2, p)


def nonlinear_grad_np(v):
  return np.sin(3.0 * v) + v ** 2


# g and the closure are unrelated random trees, so the chain-order guard may fire
@pytest.mark.filterwarnings("ignore:.*point away from the gradient")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_matches_formula_on_random_pytrees(seed, alpha):
  params, g = random_tree(seed), random_tree(seed + 10)
  rho = 0.1
  tx = so.gradient_norm_penalty(rho, alpha)
  out, _ = jax.jit(lambda s: tx.update(g, s, params, grad_fn=nonlinear_grad))(tx.init(params))
  gv, wv = flat(g), flat(params)
  point = wv + rho * gv / np.linalg.norm(gv)
  expected = (1 - alpha) * gv + alpha * nonlinear_grad_np(point)
  np.testing.assert_allclose(flat(out), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_alpha_one_is_sam_to_the_bit(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), mlp_init(0))
  a, b = so.gradient_norm_penalty(0.05, 1.0), so.sharpness_aware(0.05)
  sa, sb = a.init(params), b.init(params)
  for t in range(3):
    batch = make_data(t)
    grad_fn = lambda p, batch=batch: jax.grad(mlp_loss)(p, batch)
    g = grad_fn(params)
    oa, sa = jax.jit(lambda s: a.update(g, s, params, grad_fn=grad_fn))(sa)
    ob, sb = jax.jit(lambda s: b.update(g, s, params, grad_fn=grad_fn))(sb)
    for x, y in zip(jax.tree.leaves(oa), jax.tree.leaves(ob), strict=True):
      assert x.dtype == y.dtype == dtype
      np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_alpha_zero_is_the_base_optimizer():
  params, batch = mlp_init(1), make_data(1)
  grad_fn = lambda p: jax.grad(mlp_loss)(p, batch)
  base = optax.sgd(0.1, momentum=0.9)
  a = optax.chain(so.gradient_norm_penalty(0.1, 0.0), base)
  sa, sb = a.init(params), base.init(params)
  pa = pb = params
  for _ in range(3):
    ua, sa = a.update(grad_fn(pa), sa, pa, grad_fn=grad_fn)
    ub, sb = base.update(grad_fn(pb), sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  np.testing.assert_array_equal(flat(pa), flat(pb))


def test_alpha_schedule_is_read_at_the_step_count():
  params, batch = mlp_init(2), make_data(2)
  grad_fn = lambda p: jax.grad(mlp_loss)(p, batch)
  sched = optax.linear_schedule(0.0, 0.8, 4)
  tx = so.gradient_norm_penalty(0.1, sched)
  state = tx.init(params)
  g = flat(grad_fn(params))
  point = flat(params) + 0.1 * g / np.linalg.norm(g)
  g_adv = flat(grad_fn(unflat(point, params)))
  step = jax.jit(lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn))
  for t in range(6):
    out, state = step(state)
    a = float(sched(t))
    np.testing.assert_allclose(flat(out), (1 - a) * g + a * g_adv, rtol=1e-5, atol=1e-7)


def test_alpha_injected_changes_without_recompiling():
  params, batch = mlp_init(3), make_data(3)
  grad_fn = lambda p: jax.grad(mlp_loss)(p, batch)
  tx = optax.inject_hyperparams(so.gradient_norm_penalty)(rho=0.1, alpha=0.0)
  traces = []

  @jax.jit
  def update(s):
    traces.append(1)
    return tx.update(grad_fn(params), s, params, grad_fn=grad_fn)

  state = tx.init(params)
  out0, _ = update(state)
  np.testing.assert_allclose(flat(out0), flat(grad_fn(params)), rtol=1e-6, atol=1e-7)
  state.hyperparams["alpha"] = jnp.ones_like(state.hyperparams["alpha"])
  out1, _ = update(state)
  sam, _ = so.sharpness_aware(0.1).update(grad_fn(params), so.sharpness_aware(0.1).init(params),
                                          params, grad_fn=grad_fn)
  np.testing.assert_allclose(flat(out1), flat(sam), rtol=1e-6, atol=1e-7)
  assert len(traces) == 1


def test_metrics_and_bad_arguments():
  params, batch = mlp_init(0), make_data(0)
  tx = so.gradient_norm_penalty(0.1, 0.5)
  vg = lambda p: jax.value_and_grad(mlp_loss)(p, batch)
  value, g = vg(params)
  _, state = tx.update(g, tx.init(params), params, value_and_grad_fn=vg, value=value)
  m = so.metrics(state)
  np.testing.assert_allclose(float(m["perturbation_norm"]), 0.1, rtol=1e-6)
  assert float(m["sharpness"]) > 0
  with pytest.raises(ValueError, match=r"gradient_norm_penalty\(alpha=...\)"):
    so.gradient_norm_penalty(0.1, 1.5)
  with pytest.raises(ValueError, match=r"gradient_norm_penalty\(rho=...\)"):
    so.gradient_norm_penalty(-0.1)
  with pytest.raises(TypeError, match="needs the loss gradient closure"):
    tx.update(g, tx.init(params), params)
