"""The core transform and the foundation perturbations against closed forms and hand-written
steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sam_optax
from helpers import flat, make_data, mlp_init, mlp_loss, random_tree, unflat


def apply_once(tx, grads, params, grad_fn, **kw):
  state = tx.init(params)
  return jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn, **kw))(grads, state, params)


def quadratic(seed, n):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  return m @ m.T + n * np.eye(n)


def test_sam_gradient_on_quadratic_matches_closed_form():
  params = random_tree(0)
  n = flat(params).size
  a = quadratic(1, n)
  a_j = jnp.asarray(a, jnp.float32)
  vec = lambda q: jnp.concatenate([x.ravel() for x in jax.tree.leaves(q)])
  grad_fn = jax.grad(lambda q: 0.5 * jnp.dot(vec(q), a_j @ vec(q)))
  w = flat(params)
  rho = 0.3
  out, _ = apply_once(sam_optax.sharpness_aware(rho), grad_fn(params), params, grad_fn)
  aw = a @ w
  expected = a @ (w + rho * aw / np.linalg.norm(aw))
  np.testing.assert_allclose(flat(out), expected, rtol=2e-5)


def test_asam_direction_matches_formula():
  params, grads = random_tree(2), random_tree(3)
  eta, rho = 0.01, 0.5
  grad_fn = lambda p: p  # returns the point it is evaluated at

  point, _ = apply_once(sam_optax.sharpness_aware(rho, perturbation=sam_optax.adaptive(eta)),
                        grads, params, grad_fn)
  w, g = flat(params), flat(grads)
  t = np.abs(w) + eta
  expected = w + rho * t**2 * g / np.linalg.norm(t * g)
  np.testing.assert_allclose(flat(point), expected, rtol=1e-5)


def test_masked_perturbs_selected_leaves_only_and_normalizes_over_them():
  params, grads = random_tree(4), random_tree(5)
  mask = {"dense": {"kernel": True, "bias": False}, "out": [True, False]}
  grad_fn = lambda p: p  # returns the point it is evaluated at

  rho = 0.2
  point, _ = apply_once(
      sam_optax.sharpness_aware(rho, perturbation=sam_optax.masked(sam_optax.l2(), mask)),
      grads, params, grad_fn)
  eps = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), point, params)
  np.testing.assert_array_equal(eps["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(eps["out"][1], 0.0)
  sel = np.concatenate([np.asarray(grads["dense"]["kernel"]).ravel(),
                        np.asarray(grads["out"][0]).ravel()])
  np.testing.assert_allclose(eps["dense"]["kernel"],
                             rho * np.asarray(grads["dense"]["kernel"]) / np.linalg.norm(sel),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(eps["out"][0], rho * np.asarray(grads["out"][0]) / np.linalg.norm(sel),
                             rtol=1e-5, atol=1e-7)


def test_masked_accepts_callable_mask_and_asam_kernels_only():
  params, grads = random_tree(6), random_tree(7)
  grad_fn = lambda p: p  # returns the point it is evaluated at

  eta, rho = 0.01, 0.5
  tx = sam_optax.sharpness_aware(rho,
                                 perturbation=sam_optax.adaptive(eta, where=sam_optax.kernel_mask))
  point, _ = apply_once(tx, grads, params, grad_fn)
  # kernels (rank >= 2 or named kernel) get T = |w| + eta, the rest T = 1; one joint norm
  leaves_w = jax.tree.leaves(params)
  leaves_g = jax.tree.leaves(grads)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  is_kernel = ["kernel" in n or np.ndim(x) >= 2 for n, x in zip(names, leaves_w, strict=False)]
  t = [np.abs(np.asarray(w)) + eta if k else np.ones_like(np.asarray(w))
       for w, k in zip(leaves_w, is_kernel, strict=False)]
  tg = np.concatenate([(ti * np.asarray(g)).ravel() for ti, g in zip(t, leaves_g, strict=False)])
  scale = rho / np.linalg.norm(tg)
  expected = np.concatenate([(np.asarray(w) + scale * ti**2 * np.asarray(g)).ravel()
                             for w, ti, g in zip(leaves_w, t, leaves_g, strict=False)])
  np.testing.assert_allclose(flat(point), expected, rtol=1e-5)


def _hand_sam_grad(params, batch, rho):
  g = jax.grad(mlp_loss)(params, batch)
  n = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
  return jax.grad(mlp_loss)(jax.tree.map(lambda w, gi: w + rho * gi / n, params, g), batch)


def _hand_asam_grad(params, batch, rho, eta):
  g = jax.grad(mlp_loss)(params, batch)
  t = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
  n = jnp.sqrt(sum(jnp.sum((ti * gi) ** 2) for ti, gi in zip(jax.tree.leaves(t),
                                                             jax.tree.leaves(g), strict=False)))
  point = jax.tree.map(lambda w, ti, gi: w + rho * ti * ti * gi / n, params, t, g)
  return jax.grad(mlp_loss)(point, batch)


@pytest.mark.parametrize("variant", ["sam", "asam"])
@pytest.mark.parametrize("base", ["momentum", "adamw"])
def test_matches_hand_written_training_loop(variant, base):
  lr, rho, eta, mom, wd, b1, b2, e = 0.05, 0.1, 0.01, 0.9, 1e-2, 0.9, 0.999, 1e-8
  base_opt = (optax.sgd(lr, momentum=mom) if base == "momentum"
              else optax.adamw(lr, b1=b1, b2=b2, eps=e, weight_decay=wd))
  opt = (sam_optax.sam(base_opt, rho) if variant == "sam"
         else sam_optax.asam(base_opt, rho, eta))
  params = mlp_init(0)
  batches = [make_data(s) for s in range(20)]

  @jax.jit
  def lib_step(p, s, batch):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  @jax.jit
  def hand_step(p, buf, t, batch):
    g = _hand_sam_grad(p, batch, rho) if variant == "sam" else _hand_asam_grad(p, batch, rho, eta)
    if base == "momentum":
      m = jax.tree.map(lambda b, gi: mom * b + gi, buf[0], g)
      return jax.tree.map(lambda w, mi: w - lr * mi, p, m), (m, buf[1])
    m = jax.tree.map(lambda a, gi: b1 * a + (1 - b1) * gi, buf[0], g)
    v = jax.tree.map(lambda a, gi: b2 * a + (1 - b2) * gi * gi, buf[1], g)
    mh = jax.tree.map(lambda a: a / (1 - b1 ** t), m)
    vh = jax.tree.map(lambda a: a / (1 - b2 ** t), v)
    new = jax.tree.map(lambda w, a, b: w - lr * (a / (jnp.sqrt(b) + e) + wd * w), p, mh, vh)
    return new, (m, v)

  p_lib, s = params, opt.init(params)
  p_hand = params
  buf = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))
  for t, batch in enumerate(batches, start=1):
    p_lib, s = lib_step(p_lib, s, batch)
    p_hand, buf = hand_step(p_hand, buf, t, batch)
  np.testing.assert_allclose(flat(p_lib), flat(p_hand), rtol=2e-5, atol=2e-6)
  assert not np.allclose(flat(p_lib), flat(params))


def test_rho_zero_is_exactly_the_clean_gradient():
  params, batch = mlp_init(1), make_data(1)
  grad_fn = lambda p: jax.grad(mlp_loss)(p, batch)
  out, _ = apply_once(sam_optax.sharpness_aware(0.0), grad_fn(params), params, grad_fn)
  ref = jax.jit(grad_fn)(params)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=False):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [sam_optax.l2, sam_optax.adaptive])
def test_zero_gradient_gives_zero_perturbation_and_no_nan(make):
  params = random_tree(8)
  zeros = jax.tree.map(jnp.zeros_like, params)
  point, _ = apply_once(sam_optax.sharpness_aware(0.05, perturbation=make()), zeros, params,
                        lambda p: p)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(point))
  np.testing.assert_array_equal(flat(point), flat(params))


@pytest.mark.parametrize("dtype, scale", [(jnp.bfloat16, 1.0), (jnp.float16, 1e3)])
def test_low_precision_leaves_keep_dtype_and_norm_is_reduced_in_f32(dtype, scale):
  # float16 gradients of size 1e3 have squares above float16's max (65504): a norm
  # reduced in float16 would be inf and the perturbation zero.
  params = random_tree(9, dtype)
  grads = random_tree(10, dtype, scale=scale)
  rho = 0.5
  point, state = apply_once(sam_optax.sharpness_aware(rho), grads, params, lambda p: p)
  assert all(x.dtype == dtype for x in jax.tree.leaves(point))
  assert state.count.dtype == jnp.int32
  g = flat(grads)
  expected = flat(unflat(flat(params) + rho * g / np.linalg.norm(g), params))
  np.testing.assert_allclose(flat(point), expected, atol=2e-2)
  assert np.linalg.norm(flat(point) - flat(params)) > 0.4


def test_rho_schedule_is_evaluated_at_the_step_count():
  params, grads = random_tree(11), random_tree(12)
  points = []
  tx = sam_optax.sharpness_aware(lambda count: 0.1 * (count + 1))
  state = tx.init(params)

  def grad_fn(p):
    points.append(p)
    return grads

  for _ in range(3):
    _, state = tx.update(grads, state, params, grad_fn=grad_fn)
  flat(grads)
  for i, p in enumerate(points):
    np.testing.assert_allclose(np.linalg.norm(flat(p) - flat(params)), 0.1 * (i + 1), rtol=1e-4)


# ------------------------------------------------------------------ properties

leaf_shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(shapes=leaf_shapes, rho=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_property_l2_perturbation_has_norm_rho(shapes, rho, seed):
  rng = np.random.default_rng(seed)
  params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  grads = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  d, _ = sam_optax.l2().update(grads, sam_optax.l2().init(params), params)
  np.testing.assert_allclose(np.linalg.norm(rho * flat(d)), rho, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(shapes=leaf_shapes, seed=st.integers(0, 2**16), lr=st.floats(1e-3, 1.0))
def test_property_rho_zero_is_the_base_optimizer(shapes, seed, lr):
  rng = np.random.default_rng(seed)
  params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  target = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  grad_fn = lambda p: jax.tree.map(lambda a, b: a - b, p, target)
  base = optax.sgd(lr, momentum=0.9)
  opt = sam_optax.sam(base, 0.0)
  u1, _ = opt.update(grad_fn(params), opt.init(params), params, grad_fn=grad_fn)
  u2, _ = base.update(grad_fn(params), base.init(params), params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=False):
    np.testing.assert_array_equal(a, b)


@settings(max_examples=25, deadline=None)
@given(shapes=leaf_shapes, rho=st.floats(0.0, 10.0), seed=st.integers(0, 2**16),
       which=st.sampled_from(["l2", "adaptive", "fisher", "linf", "unnormalized"]))
def test_property_zero_gradient_never_nan(shapes, rho, seed, which):
  rng = np.random.default_rng(seed)
  params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  zeros = [jnp.zeros(s, jnp.float32) for s in shapes]
  pert = getattr(sam_optax, which)()
  tx = sam_optax.sharpness_aware(rho, perturbation=pert)
  out, _ = tx.update(zeros, tx.init(params), params, grad_fn=lambda p: p)
  np.testing.assert_array_equal(flat(out), flat(params))  # grad_fn(w) at w: eps = 0


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("rho, match", [(-0.1, r"rho=\.\.\.\)` must be finite and >= 0"),
                                        (float("nan"), "finite"), (float("inf"), "finite")])
def test_bad_rho_is_rejected_at_construction(rho, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.sharpness_aware(rho)


def test_bad_rho_type():
  with pytest.raises(TypeError, match="rho=...\\)` must be a float or a schedule"):
    sam_optax.sharpness_aware("big")


def test_negative_eta_is_rejected():
  with pytest.raises(ValueError, match=r"`adaptive\(eta=...\)` must be finite and >= 0"):
    sam_optax.adaptive(-0.01)


def test_missing_or_bad_grad_fn_and_params():
  params, grads = random_tree(13), random_tree(14)
  tx = sam_optax.sharpness_aware()
  state = tx.init(params)
  before = jax.tree.map(np.asarray, (params, state))
  with pytest.raises(TypeError, match="needs the loss gradient closure.*grad_fn="):
    tx.update(grads, state, params)
  with pytest.raises(TypeError, match="`grad_fn` must be callable"):
    tx.update(grads, state, params, grad_fn=3)
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(grads, state, None, grad_fn=lambda p: p)
  after = jax.tree.map(np.asarray, (params, state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=False):
    np.testing.assert_array_equal(a, b)


def test_grad_fn_with_wrong_structure_or_shapes_names_the_leaves():
  params, grads = random_tree(15), random_tree(16)
  tx = sam_optax.sharpness_aware()
  state = tx.init(params)
  bad_structure = lambda p: {"dense": p["dense"]}
  with pytest.raises(ValueError,
                     match=r"missing leaves: \['out'\]\[0\], \['out'\]\[1\]; unexpected leaves: "
                            "none"):
    jax.jit(lambda s: tx.update(grads, s, params, grad_fn=bad_structure))(state)
  bad_shape = lambda p: {**p, "dense": {"kernel": jnp.zeros((3, 4)), "bias": p["dense"]["bias"]}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]: \(3, 4\) vs \(4, 3\)"):
    jax.jit(lambda s: tx.update(grads, s, params, grad_fn=bad_shape))(state)


def test_bad_ascent_steps_and_perturbation():
  with pytest.raises(ValueError, match="ascent_steps=...\\)` must be an int >= 1"):
    sam_optax.sharpness_aware(ascent_steps=0)
  with pytest.raises(TypeError, match="perturbation=...\\)` must be an optax"):
    sam_optax.sharpness_aware(perturbation="l2")
