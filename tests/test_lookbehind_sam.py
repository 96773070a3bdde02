"""Lookbehind-SAM against its algorithm written out by hand (numpy, the paper's loop as the
authors' code runs it): the ascent point keeps its perturbations for k steps, the descent
gradients move the fast weights with SGD + momentum, every k steps the slow weights step
alpha of the way to the fast ones and the next cycle starts there."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat

LR, MOMENTUM, RHO = 0.05, 0.9, 0.05


def by_hand(params, steps, k, alpha):
  """The algorithm on the flat parameter vector, gradients from jax.grad of the MLP's loss."""
  grad = lambda v, t: flat(jax.grad(mlp_loss)(unflat(v, params), make_data(t)))
  slow = fast = point = flat(params)
  first, trace, out = None, np.zeros_like(slow), []
  for t in range(steps):
    g = grad(point, t)
    point = point + RHO * g / np.linalg.norm(g)             # the ascent accumulates
    trace = MOMENTUM * trace + grad(point, t)               # SGD + momentum on the fast weights
    fast = fast - LR * trace
    if t % k == 0:
      first = fast
    if t % k == k - 1:                                      # one step back
      a = alpha
      if alpha == "adaptive":
        u, v = first - slow, fast - slow
        a = 0.5 * (1.0 + u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
      slow = fast = point = slow + a * (fast - slow)
    out.append((point, slow))
  return out


@pytest.mark.parametrize("k, alpha", [(3, 0.5), (2, 0.8), (3, "adaptive")])
def test_lookbehind_matches_the_algorithm_by_hand(k, alpha):
  params = mlp_init(0)
  opt = so.lookbehind_sam(optax.sgd(LR, momentum=MOMENTUM), RHO, k=k, alpha=alpha)

  @jax.jit
  def step(p, s, batch):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  p, s = params, opt.init(params)
  expected = by_hand(params, 3 * k, k, alpha)
  for t in range(3 * k):
    p, s = step(p, s, make_data(t))
    point, slow = expected[t]
    np.testing.assert_allclose(flat(p), point, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(flat(so.clean_params(p, s)), slow, rtol=2e-5, atol=2e-6)


def test_one_step_cycles_with_alpha_one_are_sam():
  params, batch = mlp_init(1), make_data(1)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  look = so.lookbehind_sam(optax.sgd(LR, momentum=MOMENTUM), RHO, k=1, alpha=1.0)
  sam = so.sam(optax.sgd(LR, momentum=MOMENTUM), RHO)
  a, b, sa, sb = params, params, look.init(params), sam.init(params)
  for _ in range(4):
    u, sa = look.update(grad_fn(a), sa, a, grad_fn=grad_fn)
    a = optax.apply_updates(a, u)
    u, sb = sam.update(grad_fn(b), sb, b, grad_fn=grad_fn)
    b = optax.apply_updates(b, u)
  np.testing.assert_allclose(flat(a), flat(b), rtol=1e-5, atol=1e-7)


def test_argument_errors_name_the_fix():
  with pytest.raises(ValueError, match=r"lookbehind_sam\(alpha=...\)"):
    so.lookbehind_sam(optax.sgd(0.1), alpha=0.0)
  with pytest.raises(ValueError, match="adaptive"):
    so.lookbehind_sam(optax.sgd(0.1), alpha="auto")
  with pytest.raises(ValueError, match=r"k=\.\.\.\)"):
    so.lookbehind_sam(optax.sgd(0.1), k=0)
  with pytest.raises(TypeError, match="base_optimizer"):
    so.lookbehind_sam(0.1)
  with pytest.raises(TypeError, match="grad_fn"):
    w = jnp.ones(2)
    opt = so.lookbehind_sam(optax.sgd(0.1))
    opt.update(w, opt.init(w), w)
