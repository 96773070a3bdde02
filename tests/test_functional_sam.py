"""Functional-SAM against the Jacobian at the perturbed point times the clean cotangent, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_apply, mlp_example_losses, mlp_init, mlp_loss, unflat
from references import RHO, sam_point, update
from sam_optax import functional_sam, preconditioned


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
  # the clean pass's outputs given in the objective save the forward at w, same result
  reused, _ = update(functional_sam(0.05), params, batch, objective=True,
                     clean_outputs=mlp_apply(params, batch[0]))
  np.testing.assert_allclose(flat(reused), flat(out), rtol=1e-6, atol=1e-8)


def test_functional_sam_with_the_preconditioned_geometry():
  params, batch = mlp_init(9), make_data(9)
  g = flat(jax.grad(mlp_loss)(params, batch))
  u = g / (np.abs(g) + 1e-8)   # preconditioned, step 1
  out, _ = update(functional_sam(0.05, perturbation=preconditioned()), params, batch,
                  objective=True)
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
  losses_as_outputs = so.Objective(lambda q, b: mlp_example_losses(q, batch), lambda o, b: o)
  out, _ = tx.update(jax.grad(mlp_loss)(params, batch), tx.init(params), params,
                     objective=losses_as_outputs)
  sam_out, _ = update(so.sharpness_aware(RHO), params, batch)
  np.testing.assert_allclose(flat(out), flat(sam_out), rtol=1e-5, atol=1e-7)
