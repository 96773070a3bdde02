"""Momentum-SAM against a hand-written loop."""

import jax
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat
from references import counted_grad_fn


def _momentum_of(state):
  return state.base[0].trace


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_msam_matches_hand_written_20_steps(base):
  rho, lr, mom = 0.3, 0.05, 0.9
  b1, b2, e, wd = 0.9, 0.999, 1e-8, 1e-2
  opt = so.msam(optax.sgd(lr, momentum=mom) if base == "sgd"
                else optax.adamw(lr, b1=b1, b2=b2, eps=e, weight_decay=wd), rho=rho)
  params = mlp_init(5)
  counter = []

  @jax.jit
  def lib_step(p, s, batch):
    g = jax.grad(mlp_loss)(p, batch)
    u, s = opt.update(g, s, p, grad_fn=counted_grad_fn(batch, counter))
    return optax.apply_updates(p, u), s

  def unit(v):
    n = np.linalg.norm(v)
    return v / n if n > 0 else 0 * v

  w = flat(params)
  m = np.zeros_like(w)
  v2 = np.zeros_like(w)
  p_lib, s = params, opt.init(params)
  for t in range(1, 21):
    batch = make_data(t)
    eps = -rho * unit(m)
    g = flat(jax.grad(mlp_loss)(unflat(w + eps, params), batch))
    if base == "sgd":
      m = mom * m + g
      w = w - lr * m
    else:
      m = b1 * m + (1 - b1) * g
      v2 = b2 * v2 + (1 - b2) * g * g
      w = w - lr * ((m / (1 - b1**t)) / (np.sqrt(v2 / (1 - b2**t)) + e) + wd * w)
    p_lib, s = lib_step(p_lib, s, batch)
    np.testing.assert_allclose(flat(p_lib), w - rho * unit(m), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(flat(so.msam_clean_params(p_lib, s)), w, rtol=1e-4, atol=1e-5)
  jax.effects_barrier()
  assert counter == []


def test_msam_requires_momentum():
  with pytest.raises(ValueError, match="needs an optimizer with a momentum buffer"):
    so.msam(optax.sgd(0.1)).init(mlp_init(0))
