"""ESAM data selection: exactly ceil(gamma B) examples, the sharpest ones, their gradient at
w + eps."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat
from helpers import mlp_example_losses as example_losses
from sam_optax._src.methods.esam import num_selected

RHO = 0.5


def numpy_example_losses(vec, like, batch):
  """The MLP's per-example cross-entropy in float64 numpy (independent of the JAX model)."""
  layers = jax.tree.map(lambda a: np.asarray(a, np.float64), unflat(vec, like))
  x, y = np.asarray(batch[0], np.float64), np.asarray(batch[1])
  for layer in layers[:-1]:
    x = np.tanh(x @ layer["kernel"] + layer["bias"])
  z = x @ layers[-1]["kernel"] + layers[-1]["bias"]
  z = z - z.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return -logp[np.arange(len(y)), y]


def expected_update(params, batch, gamma, rho=RHO):
  """By hand: eps = rho g/|g|; s_i = l_i(w+eps) - l_i(w) in numpy; the ceil(gamma B) largest
  (ties to the lower index); the gradient of their mean loss at w + eps."""
  w = flat(params)
  g = flat(jax.grad(mlp_loss)(params, batch))
  w_eps = w + rho * g / np.linalg.norm(g)
  s = numpy_example_losses(w_eps, params, batch) - numpy_example_losses(w, params, batch)
  b = len(s)
  k = math.ceil(Fraction(str(gamma)) * b)
  keep = np.sort(np.argsort(-s, kind="stable")[:k])
  subset = (batch[0][keep], batch[1][keep])
  return flat(jax.grad(mlp_loss)(unflat(w_eps, params), subset)), keep


@pytest.mark.parametrize("b", [1, 5, 7, 10, 32, 64, 100, 128])
@pytest.mark.parametrize("gamma", [0.01, 0.1, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0])
def test_number_kept_is_exactly_ceil_gamma_b(gamma, b):
  expected = max(1, math.ceil(Fraction(str(gamma)) * b))
  assert num_selected(gamma, b) == expected
  assert int(jax.jit(lambda g: num_selected(g, b))(jnp.asarray(gamma, jnp.float32))) == expected


@pytest.mark.parametrize("mode", ["subset", "masked"])
@pytest.mark.parametrize("gamma", [0.5, 0.3, 0.7])
def test_selects_the_sharpest_and_returns_their_gradient_at_the_perturbed_point(mode, gamma):
  params = mlp_init(0)
  batch = make_data(5, n=10)
  expected, keep = expected_update(params, batch, gamma)
  assert len(keep) == math.ceil(Fraction(str(gamma)) * 10)
  tx = so.esam(RHO, gamma, perturbation=so.l2())
  seen = []

  def loss_fn(p, b=None):
    seen.append(int((batch if b is None else b)[0].shape[0]))
    return example_losses(p, batch if b is None else b)

  g = jax.grad(mlp_loss)(params, batch)
  kw = {"objective": losses_objective(loss_fn, batch) if mode == "subset" else
        losses_objective(lambda p: loss_fn(p))}
  out, state = jax.jit(lambda s: tx.update(g, s, params, **kw))(tx.init(params))
  np.testing.assert_allclose(flat(out), expected, rtol=1e-4, atol=1e-6)
  if mode == "subset":  # the forward-backward ran on exactly the kept examples
    assert seen[-1] == len(keep)
  # the selection matters: the whole batch's gradient at w + eps is different
  w = flat(params)
  gv = flat(g)
  full = flat(jax.grad(mlp_loss)(unflat(w + RHO * gv / np.linalg.norm(gv), params), batch))
  assert not np.allclose(expected, full, rtol=1e-3)
  m = so.metrics(state)
  np.testing.assert_allclose(float(m["clean_loss"]), float(mlp_loss(params, batch)), rtol=1e-5)


def losses_objective(fn, batch=None):
  """The per-example losses as the objective's "outputs": ``fn(p, b)`` on the batch in the
  objective (a subset can be taken), or ``fn(p)`` closing over it (``batch=None``)."""
  if batch is None:
    return so.Objective(lambda p, b: fn(p), lambda out, b: out, None)
  return so.Objective(fn, lambda out, b: out, batch)


def test_ties_keep_exactly_k_lowest_indices():
  """rho = 0: every score is 0; exactly ceil(gamma B) examples are kept, the first ones."""
  params = mlp_init(1)
  batch = make_data(6, n=9)
  g = jax.grad(mlp_loss)(params, batch)
  for mode in ("subset", "masked"):
    tx = so.esam(0.0, 0.5, perturbation=so.l2())
    kw = {"objective": losses_objective(example_losses, batch) if mode == "subset" else
          losses_objective(lambda p: example_losses(p, batch))}
    out, _ = tx.update(g, tx.init(params), params, **kw)
    first5 = (batch[0][:5], batch[1][:5])
    np.testing.assert_allclose(flat(out), flat(jax.grad(mlp_loss)(params, first5)), rtol=1e-5,
                               atol=1e-7)


def test_gamma_one_with_the_stochastic_perturbation_is_sam_with_it():
  params = mlp_init(2)
  batch = make_data(7)
  g = jax.grad(mlp_loss)(params, batch)
  esam = so.esam(0.05, 1.0, seed=3)  # default perturbation: stochastic(0.6, seed)
  sam = so.sharpness_aware(0.05, perturbation=so.stochastic(0.6, seed=3))
  es, ss = esam.init(params), sam.init(params)
  for _ in range(3):  # the key advances alike
    a, es = esam.update(g, es, params, objective=losses_objective(example_losses, batch))
    b, ss = sam.update(g, ss, params, grad_fn=lambda q: jax.grad(mlp_loss)(q, batch))
    np.testing.assert_allclose(flat(a), flat(b), rtol=1e-5, atol=1e-7)


def test_injected_gamma_falls_back_to_the_weighted_batch_with_the_same_result():
  params = mlp_init(3)
  batch = make_data(8, n=12)
  g = jax.grad(mlp_loss)(params, batch)
  tx = optax.inject_hyperparams(so.esam)(rho=RHO, gamma=0.5, perturbation=so.l2())
  out, _ = jax.jit(lambda s: tx.update(g, s, params, objective=losses_objective(
      example_losses, batch)))(tx.init(params))
  expected, _ = expected_update(params, batch, 0.5)
  np.testing.assert_allclose(flat(out), expected, rtol=1e-4, atol=1e-6)


def test_clean_losses_in_the_objective_replace_the_clean_forward():
  params = mlp_init(4)
  batch = make_data(9)
  g = jax.grad(mlp_loss)(params, batch)
  calls = []

  def loss_fn(p, b):
    calls.append(1)
    return example_losses(p, b)

  tx = so.esam(RHO, 0.5, perturbation=so.l2())
  objective = losses_objective(loss_fn, batch)
  a, _ = tx.update(g, tx.init(params), params, objective=objective)
  n_without = len(calls)
  clean = objective._replace(clean_losses=example_losses(params, batch))
  b, _ = tx.update(g, tx.init(params), params, objective=clean)
  assert len(calls) - n_without == n_without - 1
  np.testing.assert_allclose(flat(a), flat(b), rtol=1e-6)


def test_missing_closure_is_a_clear_error():
  params = mlp_init(0)
  tx = so.esam()
  with pytest.raises(TypeError, match="objective=sam_optax.Objective"):
    tx.update(params, tx.init(params), params, grad_fn=lambda q: q)
  with pytest.raises(ValueError, match=r"esam\(gamma=...\)"):
    so.esam(gamma=0.0)
  with pytest.raises(ValueError, match="one loss per example"):
    tx.update(params, tx.init(params), params,
              objective=losses_objective(lambda p: jnp.zeros(())))
