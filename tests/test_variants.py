"""Descent rules and schedules against hand-written references, and real pass counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, random_tree, unflat


def counted_grad_fn(batch, counter):
  def grad_fn(p):
    jax.debug.callback(lambda: counter.append(1))
    return jax.grad(mlp_loss)(p, batch)
  return grad_fn


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


def test_looksam_over_two_periods_matches_reference_and_counts_passes():
  k, rho, alpha = 5, 0.05, 0.7
  params = mlp_init(1)
  batches = [make_data(i) for i in range(2 * k)]
  tx = so.looksam(rho, k, alpha)
  counter = []

  @jax.jit
  def step(s, batch):
    grad_fn = counted_grad_fn(batch, counter)
    return tx.update(jax.grad(mlp_loss)(params, batch), s, params, grad_fn=grad_fn)

  state = tx.init(params)
  g_v = None
  for t, batch in enumerate(batches):
    out, state = step(state, batch)
    g = flat(jax.grad(mlp_loss)(params, batch))
    if t % k == 0:
      gs = flat(sam_point_grad(params, unflat(g, params), rho,
                               lambda p, b=batch: jax.grad(mlp_loss)(p, b)))
      g_v = gs - (gs @ g) / (g @ g) * g
      expected = gs
    else:
      expected = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    np.testing.assert_allclose(flat(out), expected, rtol=1e-4, atol=1e-6)
  jax.effects_barrier()
  assert len(counter) == 2


def counted_step(opt, counter, host_gating):
  """A gated train step whose grad_fn records each time it really executes."""
  def train_step(p, s, batch):
    grad_fn = counted_grad_fn(batch, counter)
    u, s = opt.update(jax.grad(mlp_loss)(p, batch), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s
  return so.gated_jit(train_step, host_gating=host_gating)


@pytest.mark.parametrize("host_gating", [False, True])
def test_pass_counts_in_a_jitted_loop(host_gating):
  params = mlp_init(2)
  opt = optax.chain(so.looksam(0.05, k=5), optax.sgd(0.1))
  counter = []
  step = counted_step(opt, counter, host_gating)
  p, s = params, opt.init(params)
  for t in range(20):
    p, s = step(p, s, make_data(t))
  jax.effects_barrier()
  assert len(counter) == 4

  # randomized p = 0.5 over 200 steps: the count is Binomial(200, 0.5)
  opt2 = optax.chain(so.randomized(so.sharpness_aware(0.05), 0.5, seed=1), optax.sgd(0.1))
  counter.clear()
  step2 = counted_step(opt2, counter, host_gating)
  p, s = params, opt2.init(params)
  batch = make_data(0)
  for _ in range(200):
    p, s = step2(p, s, batch)
  jax.effects_barrier()
  assert 70 <= len(counter) <= 130  # mean 100, sd ~7: over 4 sd either way


def test_gated_jit_matches_plain_jit_bitwise():
  params = mlp_init(3)
  for opt in (optax.chain(so.looksam(0.05, k=3), optax.sgd(0.1)),
              optax.chain(so.randomized(so.sharpness_aware(0.05), 0.5), optax.sgd(0.1))):
    def train_step(p, s, batch, opt=opt):
      grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
      u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s
    a = so.gated_jit(train_step, host_gating=True)
    b = jax.jit(train_step)
    pa, sa = params, opt.init(params)
    pb, sb = params, opt.init(params)
    for t in range(7):
      pa, sa = a(pa, sa, make_data(t))
      pb, sb = b(pb, sb, make_data(t))
    np.testing.assert_allclose(flat(pa), flat(pb), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("p, expect", [(0.0, "base"), (1.0, "inner")])
def test_randomized_extremes(p, expect):
  params = mlp_init(4)
  inner = so.sharpness_aware(0.05)
  tx = so.randomized(inner, p)
  counter = []
  s, si = tx.init(params), inner.init(params)
  for t in range(5):
    batch = make_data(t)
    g = jax.grad(mlp_loss)(params, batch)
    grad_fn = counted_grad_fn(batch, counter)
    out, s = jax.jit(lambda s, g=g, grad_fn=grad_fn: tx.update(g, s, params, grad_fn=grad_fn))(s)
    ref, si = inner.update(g, si, params, grad_fn=lambda q, b=batch: jax.grad(mlp_loss)(q, b))
    np.testing.assert_allclose(flat(out), flat(g if expect == "base" else ref), rtol=1e-5, atol=1e-7)
  jax.effects_barrier()
  assert len(counter) == (0 if expect == "base" else 5)


def test_adaptive_policy_decisions_match_reference():
  rng = np.random.default_rng(0)
  params = [jnp.zeros(3)]
  scales = np.concatenate([rng.uniform(0.5, 2.0, 30), [5.0, 0.1, 3.0]])
  grads = [[jnp.asarray(rng.normal(size=3) * s, jnp.float32)] for s in scales]
  total, decay, l1, l2 = 20, 0.8, -1.0, 1.0
  tx = so.adaptive_policy(so.sharpness_aware(0.1), total_steps=total, decay=decay,
                          lambda_start=l1, lambda_end=l2)
  s = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=lambda p: [p[0] + 100.0]))
  mu = var = None
  decisions, ref = [], []
  for t, g in enumerate(grads):
    out, s = step(g, s)
    decisions.append(bool(np.any(np.asarray(out[0]) >= 99.0)))
    sq = float(np.sum(np.asarray(g[0], np.float64) ** 2))
    if t == 0:
      mu, var = sq, 0.0
    else:
      mu = decay * mu + (1 - decay) * sq
      var = decay * var + (1 - decay) * (sq - mu) ** 2
    c = l1 + (l2 - l1) * min(t / total, 1.0)
    ref.append(sq >= mu + c * np.sqrt(var))
  assert decisions == ref
  assert 0 < sum(ref) < len(ref)
  assert int(s.sharp_steps) == sum(ref)


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
