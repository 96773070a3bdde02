"""WSAM (coupled and decoupled) against the weighted-sharpness gradient by hand."""

import jax
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat
from references import RHO, sam_point, update
from sam_optax import wsam, wsam_optimizer


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
