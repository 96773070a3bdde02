"""The engine and its protocol: a geometry's projection reaches the engine through every
wrapper; a method's declaration is checked when it is built, naming what is missing; the
clear errors of the update call."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import make_data, mlp_init, mlp_loss


def test_projection_survives_inject_hyperparams_and_replace():
  params, batch = mlp_init(0), make_data(0)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  box = so.adaptive(0.01, base=so.linf())
  injected = optax.inject_hyperparams(so.adaptive, static_args=("base",))(eta=0.01, base=so.linf())

  def run(perturbation):
    tx = so.sharpness_aware(0.05, perturbation=perturbation, ascent_steps=3)
    return tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]

  expected = run(box)
  for p in (injected, box._replace()):
    for a, b in zip(jax.tree.leaves(run(p)), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
  # the box's projection, not the L2 ball's
  delta = jax.tree.map(lambda w: 10.0 * jnp.ones_like(w), params)
  projected = box._replace().project(delta, 0.1, params)
  t = jax.tree.map(lambda w: jnp.abs(w) + 0.01, params)
  for a, s in zip(jax.tree.leaves(projected), jax.tree.leaves(t)):
    np.testing.assert_allclose(a, 0.1 * s, rtol=1e-6)


def test_multi_step_ascent_draws_fresh_noise_for_every_pass():
  params, batch = mlp_init(0), make_data(0)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  p = so.stochastic(0.5, seed=3)
  tx = so.sharpness_aware(0.05, perturbation=p, ascent_steps=3)
  _, state = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  # three passes consumed three draws: the key advanced three times
  s = p.init(params)
  for _ in range(3):
    _, s = p.update(grad_fn(params), s, params)
  np.testing.assert_array_equal(state.perturbation_state.key, s.key)


def test_clear_errors_for_a_schedule_in_msam_and_integer_params():
  with pytest.raises(TypeError, match=r"msam\(rho=...\)"):
    so.msam(optax.sgd(0.1, momentum=0.9), rho=optax.linear_schedule(0.1, 0.3, 10))
  tx = so.sharpness_aware(0.05)
  params = {"w": jnp.ones(3), "steps": jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match=r"\['steps'\].*int32.*cannot be perturbed"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)
