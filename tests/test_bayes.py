"""bSAM against a hand-written numpy loop of the paper's update with the same noise draws."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 5))
Y = RNG.integers(0, 3, size=64)


def init_params():
  rng = np.random.default_rng(1)
  return {"kernel": jnp.asarray(rng.normal(size=(5, 3)) * 0.3, jnp.float32),
          "bias": jnp.zeros((3,), jnp.float32)}


def loss_jax(p):
  logits = jnp.asarray(X, jnp.float32) @ p["kernel"] + p["bias"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(Y)[:, None], 1))


def grad_np(kernel, bias):
  """Softmax-regression gradient in float64 numpy, independent of JAX."""
  logits = X @ kernel + bias
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(Y)), Y] -= 1.0
  return X.T @ p / len(Y), p.mean(0)


def noise_np(seed, t, params):
  """e ~ N(0, I) of step t as documented: fold_in(key(seed), t), split per leaf."""
  key = jax.random.fold_in(jax.random.key(seed), t)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  draws = [np.asarray(jax.random.normal(k, w.shape, jnp.float32), np.float64)
           for k, w in zip(keys, leaves, strict=True)]
  return treedef.unflatten(draws)


def reference_loop(params, steps, lr, rho, n, prior, b1, b2, damping, s0, seed):
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  s = {k: np.full_like(v, s0) for k, v in w.items()}
  delta = prior / n
  for t in range(steps):
    e = noise_np(seed, t, params)
    noisy = {k: w[k] + e[k] / np.sqrt(n * s[k]) for k in w}
    gk, gb = grad_np(noisy["kernel"], noisy["bias"])
    g = {"kernel": gk, "bias": gb}
    adv = {k: w[k] + rho * g[k] / s[k] for k in w}
    ak, ab = grad_np(adv["kernel"], adv["bias"])
    g_adv = {"kernel": ak, "bias": ab}
    eta = lr(t)
    for k in w:
      m[k] = b1 * m[k] + (1 - b1) * (g_adv[k] + delta * w[k])
      w[k] = w[k] - eta * m[k] / s[k]  # with the previous step's precision
      s[k] = b2 * s[k] + (1 - b2) * (np.sqrt(s[k]) * np.abs(g[k]) + damping + delta)
  return w, s


def run_bsam(tx, params, steps):
  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss_jax)(p), s, p, grad_fn=jax.grad(loss_jax))
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for _ in range(steps):
    p, s = step(p, s)
  return p, s


@pytest.mark.parametrize("hp", [
    dict(rho=0.01, prior=10.0, b1=0.9, b2=0.999, damping=0.1, s0=1.0),   # the paper's
    dict(rho=0.2, prior=2.0, b1=0.8, b2=0.9, damping=0.01, s0=0.5),      # everything moves
])
def test_twenty_steps_match_the_papers_update(hp):
  params, n, seed = init_params(), 64, 3
  lr = optax.cosine_decay_schedule(0.3, 20)
  tx = so.bsam(lr, rho=hp["rho"], num_data=n, prior_precision=hp["prior"], b1=hp["b1"],
               b2=hp["b2"], damping=hp["damping"], init_precision=hp["s0"], seed=seed)
  p, state = run_bsam(tx, params, 20)
  w_ref, s_ref = reference_loop(params, 20, lambda t: float(lr(t)), hp["rho"], n, hp["prior"],
                                hp["b1"], hp["b2"], hp["damping"], hp["s0"], seed)
  np.testing.assert_allclose(flat(p), flat(w_ref), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(flat(state.precision), flat(s_ref), rtol=1e-4, atol=1e-6)
  assert np.abs(flat(p) - flat(params)).max() > 1e-2  # it trained
  # the posterior: mean w, std 1/sqrt(N s)
  mean, std = so.bsam_posterior(p, (optax.EmptyState(), {"inner": state}))
  np.testing.assert_array_equal(flat(mean), flat(p))
  np.testing.assert_allclose(flat(std), 1.0 / np.sqrt(n * flat(s_ref)), rtol=1e-4)
  np.testing.assert_allclose(flat(std), 1.0 / np.sqrt(n * flat(state.precision)), rtol=1e-6)


def test_two_closure_calls_per_step_and_the_clean_gradient_is_unused():
  params, calls = init_params(), []
  tx = so.bsam(0.1, num_data=64)

  def grad_fn(p):
    calls.append(1)
    return jax.grad(loss_jax)(p)

  state = tx.init(params)
  step = jax.jit(lambda s: tx.update(jax.grad(loss_jax)(params), s, params, grad_fn=grad_fn))
  u1, _ = step(state)
  assert len(calls) == 2
  zeros = jax.tree.map(jnp.zeros_like, params)
  u2, _ = jax.jit(lambda s: tx.update(zeros, s, params, grad_fn=grad_fn))(state)
  np.testing.assert_array_equal(flat(u1), flat(u2))


def test_samples_follow_the_posterior():
  params, n = init_params(), 64
  tx = so.bsam(0.1, num_data=n, init_precision=2.0)
  p, state = run_bsam(tx, params, 5)
  _, std = so.bsam_posterior(p, state)
  key = jax.random.key(11)
  sample = so.bsam_sample(p, state, key)
  keys = jax.random.split(key, 2)  # per leaf, jax.tree.leaves order: bias, kernel
  np.testing.assert_allclose(
      np.asarray(sample["bias"]),
      np.asarray(p["bias"])
      + np.asarray(std["bias"]) * np.asarray(jax.random.normal(keys[0], (3,))),
      rtol=1e-6)
  many = jax.vmap(lambda k: so.bsam_sample(p, state, k))(jax.random.split(key, 4000))
  np.testing.assert_allclose(flat(jax.tree.map(lambda x: x.mean(0), many)), flat(p), atol=0.01)
  np.testing.assert_allclose(flat(jax.tree.map(lambda x: x.std(0), many)), flat(std), rtol=0.06)


def test_every_numeric_hyperparameter_can_be_injected():
  params = init_params()
  names = ("learning_rate", "rho", "num_data", "prior_precision", "b1", "b2", "damping")
  kwargs = dict(learning_rate=0.1, rho=0.05, num_data=64, prior_precision=10.0, b1=0.9, b2=0.99,
                damping=0.1, init_precision=1.0, seed=0)
  tx = optax.inject_hyperparams(so.bsam)(**kwargs)
  traces = []

  @jax.jit
  def step(s):
    traces.append(1)
    return tx.update(jax.grad(loss_jax)(params), s, params, grad_fn=jax.grad(loss_jax))

  state = tx.init(params)
  ref_tx = so.bsam(**kwargs)
  ref, _ = jax.jit(lambda s: ref_tx.update(jax.grad(loss_jax)(params), s, params,
                                           grad_fn=jax.grad(loss_jax)))(ref_tx.init(params))
  out, s1 = step(state)
  np.testing.assert_allclose(flat(out), flat(ref), rtol=1e-5, atol=1e-8)
  for name in names:
    changed = dict(state.hyperparams)
    v = changed[name]
    changed[name] = v // 2 if jnp.issubdtype(v.dtype, jnp.integer) else v * 0.5
    out2, _ = step(state._replace(hyperparams=changed))
    _, s2 = step(s1._replace(hyperparams=changed))  # b2, damping act on the next step
    _, s1b = step(s1)
    moved = not np.allclose(flat(out2), flat(out)) or not np.allclose(
        flat(s2.inner_state.precision), flat(s1b.inner_state.precision))
    assert moved, name
  assert len(traces) == 1
  for name, value in (("init_precision", 3.0), ("seed", 5)):  # read by init
    other = optax.inject_hyperparams(so.bsam)(**{**kwargs, name: value})
    out3, _ = jax.jit(lambda s, t=other: t.update(jax.grad(loss_jax)(params), s, params,
                                                  grad_fn=jax.grad(loss_jax)))(other.init(params))
    assert not np.allclose(flat(out3), flat(out)), name


def test_errors():
  with pytest.raises(TypeError, match="num_data"):
    so.bsam(0.1)  # num_data is required
  with pytest.raises(ValueError, match=r"bsam\(num_data=...\)"):
    so.bsam(0.1, num_data=0)
  with pytest.raises(ValueError, match=r"bsam\(b2=...\)"):
    so.bsam(0.1, num_data=10, b2=1.0)
  with pytest.raises(ValueError, match="no BayesianSAMState"):
    so.bsam_posterior(init_params(), optax.sgd(0.1).init(init_params()))
  with pytest.raises(TypeError, match="real parameters"):
    so.bsam(0.1, num_data=10).init(jnp.ones(2, jnp.complex64))
  params = init_params()
  tx = so.bsam(0.1, num_data=64)
  with pytest.raises(TypeError, match="needs the loss gradient closure"):
    tx.update(params, tx.init(params), params)
