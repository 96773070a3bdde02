"""PGN, Trace/Det/Frob-SAM and bSAM resume bitwise from a checkpoint (save mid-run, restore
into a freshly built optimizer, continue: identical to the uninterrupted run)."""

import jax
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss
from sam_optax import checkpoint

SGD = lambda: optax.sgd(0.05, momentum=0.9)
OPTIMIZERS = {
    "gradient_norm_penalty": lambda: optax.chain(
        so.gradient_norm_penalty(0.1, optax.linear_schedule(0.0, 0.8, 8)), SGD()),
    "trace_sam": lambda: optax.chain(so.trace_sam(0.01, num_samples=2, seed=3), SGD()),
    "det_sam": lambda: optax.chain(so.det_sam(num_samples=2, seed=4), SGD()),
    "frob_sam": lambda: optax.chain(so.frob_sam(0.05, 0.05, seed=5), SGD()),
    "bsam": lambda: so.bsam(optax.cosine_decay_schedule(0.05, 15), num_data=32, seed=6),
}


def make_step(opt):
  @jax.jit
  def step(p, s, batch):
    vg = lambda q: jax.value_and_grad(mlp_loss)(q, batch)
    value, g = vg(p)
    u, s = opt.update(g, s, p, value_and_grad_fn=vg, value=value)
    return optax.apply_updates(p, u), s
  return step


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

  opt2 = OPTIMIZERS[name]()  # a new process would rebuild everything
  step2 = make_step(opt2)
  fresh = {"params": mlp_init(1), "opt_state": opt2.init(mlp_init(1))}
  restored = checkpoint.restore(tmp_path / "ckpt", fresh)
  p2, s2 = restored["params"], restored["opt_state"]
  for t in range(5, 15):
    p2, s2 = step2(p2, s2, make_data(t))
  np.testing.assert_array_equal(flat(p2), flat(p_ref))
  for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s_ref), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if name == "bsam":  # the posterior comes back too
    for a, b in zip(jax.tree.leaves(so.bsam_posterior(p2, s2)),
                    jax.tree.leaves(so.bsam_posterior(p_ref, s_ref)), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
