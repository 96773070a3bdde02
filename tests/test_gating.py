"""``gated_jit``: one program per branch, the host following the step count, the skipped
passes skipped for real, the same numbers as the ``lax.cond`` program."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss
from references import counted_grad_fn
from sam_optax import flax as ft


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


class Dense3(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(x)


def test_gated_jit_around_a_jitted_linen_step_skips_for_real():
  x, y = make_data(5, n=16, d=4)
  model = Dense3()
  params = model.init(jax.random.key(0), x)["params"]

  def run(step, n=11):
    state = ft.TrainState.create(apply_fn=model.apply, params=params,
                                 tx=optax.chain(so.looksam(0.05, k=5), optax.sgd(0.1)))
    norms = []
    for i in range(n):
      state, m = step(state, (x, y), jax.random.key(i))
      norms.append(float(m["perturbed_grad_norm"]))
    return state, norms, m

  inner = ft.make_linen_train_step()  # jit=True: gated_jit wraps a jitted function
  traces = []

  def traced_step(*args):
    traces.append(1)
    return inner(*args)

  gated = so.gated_jit(traced_step)
  state, norms, m = run(gated)
  # the second pass ran on steps 0, 5, 10 only: the recorded norm changes there alone
  changed = [i for i in range(1, len(norms)) if norms[i] != norms[i - 1]]
  assert changed == [5, 10]
  np.testing.assert_allclose(float(m["sam_step_fraction"]), 3 / 11, rtol=1e-6)
  assert gated.reads == 1  # the host followed the count after one read
  assert len(traces) == 2  # one program per branch, each traced once
  # the same numbers as the lax.cond program
  ref_state, ref_norms, _ = run(jax.jit(ft.make_linen_train_step(jit=False)))
  np.testing.assert_array_equal(norms, ref_norms)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_array_equal(a, b)


def test_gated_jit_reads_again_after_a_restore():
  tx = optax.chain(so.looksam(0.05, k=2), optax.sgd(0.1))
  loss = lambda w: jnp.sum(w ** 2)

  def step(w, s):
    u, s = tx.update(jax.grad(loss)(w), s, w, grad_fn=jax.grad(loss))
    return optax.apply_updates(w, u), s

  gated = so.gated_jit(step)
  w = jnp.ones(3)
  s = tx.init(w)
  for _ in range(3):
    w, s = gated(w, s)
  restored = jax.tree.map(lambda a: jnp.array(a, copy=True), s)  # as from a checkpoint
  w, s = gated(w, restored)
  assert gated.reads == 2
  assert int(s[0].count) == 4 and float(s[0].sam_step) == 0.0  # step 3 of k=2 reused
