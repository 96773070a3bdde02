"""Each perturbation geometry against its formula, written independently in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, random_tree, unflat
from references import RHO, sam_point, update


def direction(pert, grads_seq, params):
  """Runs the perturbation over a sequence of gradients (jitted); returns the directions."""
  state = pert.init(params)
  step = jax.jit(lambda g, s: pert.update(g, s, params))
  out = []
  for g in grads_seq:
    d, state = step(g, state)
    out.append(flat(d))
  return out, state


def test_unnormalized_linf_fisher():
  params, g = random_tree(0), random_tree(1)
  gv = flat(g)
  np.testing.assert_allclose(direction(so.unnormalized(), [g], params)[0][0], gv, rtol=1e-6)
  np.testing.assert_array_equal(direction(so.linf(), [g], params)[0][0], np.sign(gv))
  eta = 0.7
  f = gv / (1 + eta * gv**2)
  np.testing.assert_allclose(direction(so.fisher(eta), [g], params)[0][0],
                             f / np.sqrt(gv @ f), rtol=1e-5)


def test_adaptive_linf_is_t_times_sign():
  params, g = random_tree(2), random_tree(3)
  eta = 0.05
  d = direction(so.adaptive(eta, base=so.linf()), [g], params)[0][0]
  np.testing.assert_allclose(d, (np.abs(flat(params)) + eta) * np.sign(flat(g)), rtol=1e-6)


def test_friendly_over_several_steps():
  params = random_tree(4)
  gs = [random_tree(10 + i) for i in range(4)]
  sigma, lam = 0.8, 0.6
  out, state = direction(so.friendly(sigma, lam), gs, params)
  m = None
  for g, d in zip(gs, out, strict=False):
    gv = flat(g)
    raw = gv if m is None else gv - sigma * m
    np.testing.assert_allclose(d, raw / np.linalg.norm(raw), rtol=1e-4, atol=1e-6)
    m = gv if m is None else lam * m + (1 - lam) * gv
  np.testing.assert_allclose(flat(state.momentum), m, rtol=1e-5)


def test_friendly_zero_momentum_and_zero_gradient_no_nan():
  params = random_tree(5)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, _ = direction(so.friendly(), [zeros, zeros, zeros], params)
  assert all(np.all(np.isfinite(d)) and np.all(d == 0) for d in out)


def test_variance_suppressed_over_several_steps():
  params = random_tree(6)
  gs = [random_tree(20 + i) for i in range(4)]
  theta = 0.4
  out, _ = direction(so.variance_suppressed(theta), gs, params)
  d = None
  for g, got in zip(gs, out, strict=False):
    gv = flat(g)
    d = gv if d is None else (1 - theta) * d + theta * gv
    np.testing.assert_allclose(got, d / np.linalg.norm(d), rtol=1e-5, atol=1e-7)


def test_stochastic_masks_whole_tensors_and_is_reproducible():
  params = random_tree(7)
  gs = [random_tree(30 + i) for i in range(6)]
  beta = 0.5
  out, state = direction(so.stochastic(beta, seed=3), gs, params)
  out2, _ = direction(so.stochastic(beta, seed=3), gs, params)
  np.testing.assert_array_equal(np.stack(out), np.stack(out2))
  sizes = [x.size for x in jax.tree.leaves(params)]
  kept_counts = []
  for g, d in zip(gs, out, strict=False):
    gv = flat(g)
    pieces = np.split(d, np.cumsum(sizes)[:-1])
    gpieces = np.split(gv, np.cumsum(sizes)[:-1])
    kept = [bool(np.any(p != 0)) for p in pieces]
    kept_counts.append(sum(kept))
    masked_g = np.concatenate([gp if k else 0 * gp for gp, k in zip(gpieces, kept, strict=False)])
    if any(kept):
      np.testing.assert_allclose(d, masked_g / (beta * np.linalg.norm(masked_g)), rtol=1e-5)
  assert 0 < np.mean(kept_counts) < len(sizes)  # some tensors kept, some dropped
  # resuming from the state continues the same key sequence
  more = [random_tree(40)]
  d_cont, _ = direction(so.stochastic(beta, seed=3), gs + more, params)
  pert = so.stochastic(beta, seed=3)
  d_res, _ = jax.jit(lambda g, s: pert.update(g, s, params))(more[0], state)
  np.testing.assert_array_equal(d_cont[-1], flat(d_res))


def test_sparse_keeps_top_fisher_entries_and_refreshes():
  params = random_tree(8)
  gs = [random_tree(50 + i) for i in range(5)]
  s, every, decay = 0.5, 2, 0.9
  out, state = direction(so.sparse(s, refresh_every=every, decay=decay), gs, params)
  n = flat(params).size
  k = int(np.ceil((1 - s) * n))
  fisher, mask = None, None
  for t, (g, d) in enumerate(zip(gs, out, strict=False)):
    gv = flat(g)
    fisher = gv**2 if fisher is None else decay * fisher + (1 - decay) * gv**2
    if t % every == 0:
      mask = np.zeros(n, bool)
      mask[np.argsort(-fisher, kind="stable")[:k]] = True
    kept = np.where(mask, gv, 0)
    np.testing.assert_allclose(d, kept / np.linalg.norm(kept), rtol=1e-5, atol=1e-7)
  assert int(np.sum(flat(state.mask))) == k


def test_random_weight_is_filterwise_gaussian():
  params = {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(300, 4)) *
                                  np.array([1.0, 2.0, 0.5, 3.0]), jnp.float32),
            "bias": jnp.asarray(np.random.default_rng(1).normal(size=(5000,)), jnp.float32)}
  sigma = 0.1
  pert = so.random_weight(sigma, seed=0)
  d, state = pert.update(None, pert.init(params), params)
  col_norm = np.linalg.norm(np.asarray(params["kernel"]), axis=0)
  std = np.std(np.asarray(d["kernel"]), axis=0)
  np.testing.assert_allclose(std, sigma * col_norm, rtol=0.15)
  np.testing.assert_allclose(np.std(np.asarray(d["bias"])),
                             sigma * np.linalg.norm(np.asarray(params["bias"])), rtol=0.05)
  d2, _ = pert.update(None, state, params)
  assert not np.allclose(d2["kernel"], d["kernel"])


def test_normalization_mask_linen_and_nnx_names():
  import flax.linen as nn
  from flax import nnx

  class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(4)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.LayerNorm()(x)
      x = nn.Dense(4, name="head")(x)
      return nn.RMSNorm(name="final")(x)

  v = LinenNet().init(jax.random.key(0), jnp.ones((2, 3)))
  mask = so.normalization_mask(v["params"])
  sel = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
  assert sel == {"['BatchNorm_0']['bias']", "['BatchNorm_0']['scale']",
                 "['LayerNorm_0']['bias']", "['LayerNorm_0']['scale']", "['final']['scale']"}

  class NNXNet(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(3, 4, rngs=rngs)
      self.bn1 = nnx.BatchNorm(4, rngs=rngs)
      self.gate = nnx.LayerNorm(4, rngs=rngs)  # named freely: owns a scale, no kernel

  state = nnx.state(NNXNet(nnx.Rngs(0)), nnx.Param)
  mask = so.normalization_mask(state)
  sel = {jax.tree_util.keystr(p).replace(".value", "")
         for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
  assert sel == {"['bn1']['bias']", "['bn1']['scale']", "['gate']['bias']", "['gate']['scale']"}


def quad_setup(seed, n=6):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  a = m @ m.T + np.eye(n)
  w = rng.normal(size=n)
  return a, w


def test_ascent_steps_one_is_sam_to_the_bit():
  a, w = quad_setup(0)
  aj = jnp.asarray(a, jnp.float32)
  grad_fn = lambda p: aj @ p
  w = jnp.asarray(w, jnp.float32)
  f1 = jax.jit(lambda: so.sharpness_aware(0.1).update(grad_fn(w), so.sharpness_aware(0.1).init(w),
                                                       w, grad_fn=grad_fn)[0])
  tx = so.sharpness_aware(0.1, ascent_steps=1)
  f2 = jax.jit(lambda: tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)[0])
  np.testing.assert_array_equal(f1(), f2())


@pytest.mark.parametrize("geometry", ["l2", "linf", "unnormalized"])
def test_multi_step_ascent_matches_hand_written_projected_ascent(geometry):
  a, w0 = quad_setup(1)
  rho, k = 0.3, 4
  aj = jnp.asarray(a, jnp.float32)
  calls = []
  grad_fn = lambda p: (calls.append(1), aj @ p)[1]
  pert = {"l2": so.l2(), "linf": so.linf(), "unnormalized": so.unnormalized()}[geometry]
  tx = so.sharpness_aware(rho, perturbation=pert, ascent_steps=k)
  w = jnp.asarray(w0, jnp.float32)
  out, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
  assert len(calls) == 1 + k  # the clean gradient above, then K inside

  def d_of(g):
    if geometry == "l2":
      return g / np.linalg.norm(g)
    return np.sign(g) if geometry == "linf" else g

  def proj(x):
    if geometry == "linf":
      return np.clip(x, -rho, rho)
    n = np.linalg.norm(x)
    return x * min(1.0, rho / n)

  delta = np.zeros_like(w0)
  g = a @ w0
  for _ in range(k):
    delta = proj(delta + rho / k * d_of(g))
    g = a @ (w0 + delta)
  np.testing.assert_allclose(np.asarray(out), g, rtol=2e-5)


# ------------------------------------------------------------ Monge, preconditioned


def test_monge_closed_form_and_unit_length_in_its_metric():
  g = np.array([0.3, -1.2, 2.0])
  d, _ = so.monge().update(jnp.asarray(g, jnp.float32), optax.EmptyState())
  n = np.linalg.norm(g)
  np.testing.assert_allclose(np.asarray(d), g / (n * np.sqrt(1 + n * n)), rtol=1e-6)
  metric = np.eye(3) + np.outer(g, g)   # G = I + g g^T: d^T G d = 1
  np.testing.assert_allclose(np.asarray(d) @ metric @ np.asarray(d), 1.0, rtol=1e-5)


def test_sharpness_aware_with_monge_evaluates_at_the_monge_point():
  params, batch = mlp_init(5), make_data(5, n=8)
  g = flat(jax.grad(mlp_loss)(params, batch))
  n = np.linalg.norm(g)
  point, _ = sam_point(params, batch, direction=g / (n * np.sqrt(1 + n * n)), rho=0.5)
  out, _ = update(so.sharpness_aware(0.5, perturbation=so.monge()), params, batch)
  np.testing.assert_allclose(flat(out), flat(jax.grad(mlp_loss)(point, batch)), rtol=1e-5,
                             atol=1e-7)
  # multi-step ascent stays in the Euclidean ball of radius rho
  _, state = update(so.sharpness_aware(0.5, perturbation=so.monge(), ascent_steps=3), params, batch)
  assert float(state.telemetry.perturbation_norm) <= 0.5 * (1 + 1e-6)




def test_preconditioned_matches_a_numpy_ema_with_bias_correction():
  b2, eps = 0.9, 1e-3
  rng = np.random.default_rng(0)
  p = so.preconditioned(b2=b2, adam_eps=eps)
  state = p.init({"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)})
  v = np.zeros(10)
  for t in range(1, 6):
    g = rng.normal(size=10) * (t % 3 + 0.5)
    tree = {"a": jnp.asarray(g[:6].reshape(3, 2), jnp.float32),
            "b": jnp.asarray(g[6:], jnp.float32)}
    d, state = p.update(tree, state)
    v = b2 * v + (1 - b2) * g * g
    u = g / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(flat(d), u / np.linalg.norm(u), rtol=1e-5, atol=1e-7)
    assert int(state.count) == t
  np.testing.assert_allclose(flat(state.nu), v, rtol=1e-5)


def test_preconditioned_costs_one_params_sized_buffer_and_composes_with_sharpness_aware():
  params, batch = mlp_init(6), make_data(6)
  tx = so.sharpness_aware(RHO, perturbation=so.preconditioned(b2=0.99))
  out, state = update(tx, params, batch)
  pre = state.perturbation_state
  assert isinstance(pre, so.PreconditionedState)
  assert jax.tree.structure(pre.nu) == jax.tree.structure(params)
  g = flat(jax.grad(mlp_loss)(params, batch))
  u = g / (np.abs(g) + 1e-8)   # step 1: v^ = g^2
  point, _ = sam_point(params, batch, direction=u / np.linalg.norm(u))
  np.testing.assert_allclose(flat(out), flat(jax.grad(mlp_loss)(point, batch)), rtol=1e-5,
                             atol=1e-7)


def test_preconditioned_can_read_the_base_adams_second_moment():
  """moments="adam": no buffer; d from the base Adam's nu of the previous step (an EMA of the
  perturbed gradients Adam consumed), bias-corrected with Adam's count. By hand over 3 steps."""
  params, b2, lr, eps = mlp_init(7), 0.95, 1e-2, 1e-8
  tx = optax.chain(so.sharpness_aware(RHO, perturbation=so.preconditioned(b2, moments="adam")),
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
