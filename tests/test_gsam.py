"""GSAM against its decomposition by hand; GSAM's radius rule."""

import jax
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, random_tree, unflat


def sam_point_grad(params, g, rho, grad_of):
  gv = flat(g)
  return grad_of(unflat(flat(params) + rho * gv / np.linalg.norm(gv), params))


def test_gsam_matches_decomposition_on_random_pytrees():
  params, g, g_at = random_tree(0), random_tree(1), random_tree(2)
  rho, alpha = 0.1, 0.6
  tx = so.gsam(rho, alpha)
  out, _ = jax.jit(lambda s: tx.update(g, s, params, grad_fn=lambda p: g_at))(tx.init(params))
  gp, gv = flat(g_at), flat(g)
  unit = gp / np.linalg.norm(gp)
  g_perp = gv - (gv @ unit) * unit
  np.testing.assert_allclose(flat(out), gp - alpha * g_perp, rtol=1e-5, atol=1e-6)


def test_gsam_alpha_zero_is_sam():
  params, batch = mlp_init(0), make_data(0)
  grad_fn = lambda p: jax.grad(mlp_loss)(p, batch)
  a = so.gsam(0.05, 0.0)
  b = so.sharpness_aware(0.05)
  oa, _ = jax.jit(lambda s: a.update(grad_fn(params), s, params, grad_fn=grad_fn))(a.init(params))
  ob, _ = jax.jit(lambda s: b.update(grad_fn(params), s, params, grad_fn=grad_fn))(b.init(params))
  np.testing.assert_allclose(flat(oa), flat(ob), rtol=1e-6, atol=1e-7)


def test_rho_schedule_from_lr_is_linear_in_lr():
  lr = optax.cosine_decay_schedule(0.1, 100, alpha=0.1)  # from 0.1 to 0.01
  sched = so.rho_schedule_from_lr(lr, rho_max=0.6, rho_min=0.1, lr_max=0.1, lr_min=0.01)
  for t in (0, 30, 100):
    expected = 0.1 + 0.5 * (float(lr(t)) - 0.01) / 0.09
    np.testing.assert_allclose(float(sched(t)), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="`lr_max` and `lr_min` must differ"):
    so.rho_schedule_from_lr(lr, 0.6, 0.1, 0.1, 0.1)
