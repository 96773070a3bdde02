"""Sharpness tools on quadratics with a known Hessian, and HVPs against jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat
from sam_optax import sharpness


def quadratic(seed=0, n=12, top_gap=2.0):
  """A PSD matrix with a known spectrum (a clear gap between the top two eigenvalues)."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eigs = np.sort(rng.uniform(0.1, 3.0, n))
  eigs[-1] = eigs[-2] * top_gap
  a = (q * eigs) @ q.T
  return a, eigs, q


def as_tree(vec):
  return {"a": jnp.asarray(vec[:5], jnp.float32),
          "b": jnp.asarray(vec[5:].reshape(-1, 7), jnp.float32)}


def loss_of(a, center):
  aj, cj = jnp.asarray(a, jnp.float32), jnp.asarray(center, jnp.float32)
  def loss(p):
    x = jnp.concatenate([p["a"], p["b"].ravel()]) - cj
    return 0.5 * x @ aj @ x
  return loss


def test_top_eigenvalue_and_vector_on_quadratic():
  a, eigs, q = quadratic()
  w = np.random.default_rng(1).normal(size=12)
  lam, v = jax.jit(lambda p: sharpness.hessian_top_eigenvalue(loss_of(a, np.zeros(12)), p,
                                                              num_iters=60))(as_tree(w))
  np.testing.assert_allclose(float(lam), eigs[-1], rtol=1e-4)
  np.testing.assert_allclose(abs(flat(v) @ q[:, -1]), 1.0, rtol=1e-4)


def test_top_eigenvalue_is_largest_magnitude():
  a = np.diag([1.0, -4.0, 2.0, 0.5] + [0.1] * 8)
  lam, _ = sharpness.hessian_top_eigenvalue(loss_of(a, np.zeros(12)), as_tree(np.ones(12)),
                                            num_iters=60)
  np.testing.assert_allclose(float(lam), -4.0, rtol=1e-4)


def test_hutchinson_trace_within_two_percent():
  a, eigs, _ = quadratic(2)
  est = jax.jit(lambda p: sharpness.hessian_trace(loss_of(a, np.zeros(12)), p, num_samples=4000,
                                                  key=jax.random.key(3)))(as_tree(np.zeros(12)))
  np.testing.assert_allclose(float(est), eigs.sum(), rtol=0.02)


def test_spectrum_nodes_recover_eigenvalues():
  a, eigs, _ = quadratic(4)
  spec = sharpness.hessian_spectrum(loss_of(a, np.zeros(12)), as_tree(np.zeros(12)), num_iters=12)
  np.testing.assert_allclose(np.sort(np.asarray(spec["nodes"][0])), eigs, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(float(np.sum(spec["weights"])), 1.0, rtol=1e-4)
  area = np.trapezoid(np.asarray(spec["density"]), np.asarray(spec["grid"]))
  assert 0.9 < area < 1.1


@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_max_sharpness_at_minimum_is_half_rho_squared_lambda_max(rho):
  a, eigs, _ = quadratic(5)
  center = np.random.default_rng(6).normal(size=12)
  loss = loss_of(a, center)
  value = jax.jit(lambda p: sharpness.max_sharpness(loss, p, rho, steps=60))(as_tree(center))
  np.testing.assert_allclose(float(value), 0.5 * rho**2 * eigs[-1], rtol=1e-3)


def test_max_sharpness_linf_ball_on_diagonal_quadratic():
  # for a diagonal PSD Hessian the l_inf-ball maximum is at a corner: 1/2 rho^2 sum(diag)
  d = np.linspace(0.5, 2.0, 12)
  loss = loss_of(np.diag(d), np.zeros(12))
  value = sharpness.max_sharpness(loss, as_tree(np.zeros(12)), 0.1, perturbation=so.linf(),
                                  steps=30)
  np.testing.assert_allclose(float(value), 0.5 * 0.01 * d.sum(), rtol=1e-3)


def test_one_dimensional_slice_along_eigenvector_is_the_right_parabola():
  a, eigs, q = quadratic(7)
  center = np.random.default_rng(8).normal(size=12)
  alphas, losses = sharpness.loss_landscape_1d(loss_of(a, center), as_tree(center),
                                               direction=as_tree(q[:, -1]),
                                               alphas=jnp.linspace(-2, 2, 21))
  np.testing.assert_allclose(np.asarray(losses), 0.5 * eigs[-1] * np.asarray(alphas) ** 2,
                             rtol=1e-4, atol=1e-5)


def test_two_dimensional_grid_matches_pointwise_evaluation():
  a, _, q = quadratic(9)
  center = np.zeros(12)
  loss = loss_of(a, center)
  d1, d2 = as_tree(q[:, 0]), as_tree(q[:, 1])
  al, be, grid = sharpness.loss_landscape_2d(loss, as_tree(center), directions=(d1, d2),
                                             alphas=jnp.linspace(-1, 1, 5),
                                             betas=jnp.linspace(-1, 1, 4))
  assert grid.shape == (5, 4)
  i, j = 3, 1
  x = float(al[i]) * q[:, 0] + float(be[j]) * q[:, 1]
  np.testing.assert_allclose(float(grid[i, j]), 0.5 * x @ a @ x, rtol=1e-5)


def test_hvp_on_mlp_matches_full_hessian():
  params = mlp_init(0, sizes=(4, 5, 3))
  batch = make_data(0, n=16, d=4)
  loss = lambda p: mlp_loss(p, batch)
  w = flat(params)
  full = jax.hessian(lambda x: loss(unflat(x, params)))(jnp.asarray(w, jnp.float32))
  v = np.random.default_rng(1).normal(size=w.size)
  hv = sharpness.hessian_vector_product(loss, params, unflat(v, params))
  np.testing.assert_allclose(flat(hv), np.asarray(full) @ v, rtol=1e-4, atol=1e-5)


def test_filter_normalized_direction_norms():
  params = {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32),
            "bias": jnp.ones(4)}
  d = sharpness.filter_normalized_direction(params, jax.random.key(0))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(d["kernel"]), axis=0),
                             np.linalg.norm(np.asarray(params["kernel"]), axis=0), rtol=1e-5)
  np.testing.assert_array_equal(d["bias"], 0.0)


@pytest.mark.slow
def test_m_sharpness_is_mean_of_group_sharpness():
  params = mlp_init(2, sizes=(8, 6, 3))
  batch = make_data(2, n=12)
  groups = [(batch[0][i:i + 4], batch[1][i:i + 4]) for i in range(0, 12, 4)]
  of_group = lambda g: float(sharpness.max_sharpness(lambda p: mlp_loss(p, g), params, 0.1,
                                                     steps=5))
  expected = np.mean([of_group(g) for g in groups])
  got = sharpness.m_sharpness(mlp_loss, params, batch, 0.1, 4, steps=5)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="divisible by m=5"):
    sharpness.m_sharpness(mlp_loss, params, batch, 0.1, 5)


def test_ascent_gap_is_one_on_a_quadratic_along_its_gradient_and_below_one_otherwise():
  # gradient along the top eigenvector: SAM's step is the worst case
  a, eigs, q = quadratic(10)
  center = np.zeros(12)
  w = 0.5 * q[:, -1]
  gap = sharpness.ascent_gap(loss_of(a, center), as_tree(w), 0.1, steps=60)
  np.testing.assert_allclose(float(gap), 1.0, atol=1e-3)
  w2 = 0.5 * q[:, 0] + 0.01 * q[:, -1]  # gradient mostly along a flat direction
  gap2 = sharpness.ascent_gap(loss_of(a, center), as_tree(w2), 0.1, steps=60)
  assert 0.0 <= float(gap2) < 0.9


def test_plots_render(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  a, _, _ = quadratic(11)
  loss = loss_of(a, np.zeros(12))
  p = as_tree(np.zeros(12))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3))
  sharpness.plot_landscape_1d({"quad": sharpness.loss_landscape_1d(loss, p,
                                                                   key=jax.random.key(0))}, axes[0])
  sharpness.plot_landscape_2d(*sharpness.loss_landscape_2d(loss, p,
                                                           alphas=jnp.linspace(-1, 1, 11)), axes[1])
  sharpness.plot_spectrum(sharpness.hessian_spectrum(loss, p, num_iters=12), axes[2], label="quad")
  fig.savefig(tmp_path / "plots.png")
  assert (tmp_path / "plots.png").stat().st_size > 10_000
