"""SAMPa, ESAM, the weight EMA and SAF's store: save mid-run, restore, continue bitwise-identically."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_apply, mlp_example_losses, mlp_init, mlp_loss
from sam_optax import checkpoint, trajectory

SGD = lambda: optax.sgd(0.05, momentum=0.9)
OPTIMIZERS = {
    "sampa": lambda: so.sampa(SGD()),
    "sampa_adamw": lambda: so.sampa(optax.adamw(1e-2, weight_decay=1e-3), rho=0.05, lam=0.0),
    "esam": lambda: optax.chain(so.esam(0.05, 0.5, seed=3), SGD()),
    "weight_ema": lambda: optax.chain(so.sam(SGD()), so.weight_ema(0.9)),
}


def make_step(opt):
  @jax.jit
  def step(p, s, batch):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn, per_example_loss_fn=mlp_example_losses,
                      batch=batch)
    return optax.apply_updates(p, u), s
  return step


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_is_bitwise_identical(name, tmp_path):
  opt = OPTIMIZERS[name]()
  step = make_step(opt)
  p, s = mlp_init(0), opt.init(mlp_init(0))
  for t in range(5):
    p, s = step(p, s, make_data(t))
  checkpoint.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
  p_ref, s_ref = p, s
  for t in range(5, 15):
    p_ref, s_ref = step(p_ref, s_ref, make_data(t))

  opt2 = OPTIMIZERS[name]()
  step2 = make_step(opt2)
  restored = checkpoint.restore(tmp_path / "ckpt", {"params": mlp_init(1), "opt_state": opt2.init(mlp_init(1))})
  p2, s2 = restored["params"], restored["opt_state"]
  for t in range(5, 15):
    p2, s2 = step2(p2, s2, make_data(t))
  np.testing.assert_array_equal(flat(p2), flat(p_ref))
  assert_same(s2, s_ref)


def test_saf_store_resumes_bitwise(tmp_path):
  n, steps_per_epoch, batch = 32, 4, 8
  xs, ys = make_data(0, n=n)
  opt = SGD()

  @jax.jit
  def step(p, s, store, idx, t):
    epoch = t // steps_per_epoch
    x, y = xs[idx], ys[idx]

    def loss(q):
      logits = mlp_apply(q, x)
      base = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
      reg, new_store = trajectory.saf_loss(store, logits, idx, epoch, start_epoch=1)
      return base + reg, new_store

    (_, new_store), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, new_store

  orders = [np.random.default_rng(e).permutation(n) for e in range(4)]
  idx_at = lambda t: jnp.asarray(orders[t // steps_per_epoch][(t % steps_per_epoch) * batch:][:batch])
  p, s, store = mlp_init(0), opt.init(mlp_init(0)), trajectory.saf_init(n, 3, lookback=1)
  for t in range(6):
    p, s, store = step(p, s, store, idx_at(t), t)
  checkpoint.save(tmp_path / "ckpt", {"params": p, "opt_state": s, "saf": store})
  ref = (p, s, store)
  for t in range(6, 16):
    ref = step(*ref, idx_at(t), t)
  like = {"params": mlp_init(1), "opt_state": opt.init(mlp_init(1)), "saf": trajectory.saf_init(n, 3, 1)}
  r = checkpoint.restore(tmp_path / "ckpt", like)
  got = (r["params"], r["opt_state"], r["saf"])
  for t in range(6, 16):
    got = step(*got, idx_at(t), t)
  assert_same(got, ref)
  assert bool(jnp.any(ref[2].epochs == 3))
