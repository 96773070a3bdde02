"""Save mid-run, restore into a fresh state, continue: identical to an uninterrupted run."""

import jax
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss
from sam_optax import checkpoint

SGD = lambda: optax.sgd(0.05, momentum=0.9)
OPTIMIZERS = {
    "sam": lambda: so.sam(SGD()),
    "looksam": lambda: optax.chain(so.looksam(0.05, k=3), SGD()),
    "randomized": lambda: optax.chain(so.randomized(so.sharpness_aware(0.05), 0.5, seed=4), SGD()),
    "adaptive_policy": lambda: optax.chain(so.adaptive_policy(so.sharpness_aware(0.05), total_steps=20),
                                           SGD()),
    "friendly_stochastic_sparse": lambda: optax.chain(
        so.sharpness_aware(0.05, perturbation=so.friendly()),
        so.sharpness_aware(0.05, perturbation=so.stochastic(0.5, seed=2)),
        so.sharpness_aware(0.05, perturbation=so.sparse(refresh_every=3)), SGD()),
    "msam": lambda: so.msam(optax.adamw(1e-2)),
}


def make_step(opt):
  @jax.jit
  def step(p, s, batch):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s
  return step


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_is_bitwise_identical(name, tmp_path):
  opt = OPTIMIZERS[name]()
  step = make_step(opt)
  params = mlp_init(0)
  p, s = params, opt.init(params)
  for t in range(5):
    p, s = step(p, s, make_data(t))
  checkpoint.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
  p_ref, s_ref = p, s
  for t in range(5, 15):
    p_ref, s_ref = step(p_ref, s_ref, make_data(t))

  opt2 = OPTIMIZERS[name]()  # a new process would rebuild everything
  step2 = make_step(opt2)
  fresh = {"params": mlp_init(1), "opt_state": opt2.init(mlp_init(1))}
  restored = checkpoint.restore(tmp_path / "ckpt", fresh)
  p2, s2 = restored["params"], restored["opt_state"]
  for t in range(5, 15):
    p2, s2 = step2(p2, s2, make_data(t))
  np.testing.assert_array_equal(flat(p2), flat(p_ref))
  for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s_ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
  params = mlp_init(0)
  checkpoint.save(tmp_path / "ckpt", {"params": params, "opt_state": so.sam(SGD()).init(params)})
  other = {"params": params, "opt_state": optax.chain(so.looksam(), SGD()).init(params)}
  with pytest.raises(ValueError, match="does not match the state it is restored into.*Missing"):
    checkpoint.restore(tmp_path / "ckpt", other)
