"""The closure contract: ``grad_fn``, ``value_and_grad_fn`` and ``objective=`` (with ``value=``);
the earlier keywords of ESAM and Functional-SAM still work for one release with a
DeprecationWarning that names the replacement, and give what the objective gives (the only
test that uses them)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_apply, mlp_example_losses, mlp_init, mlp_loss


def cross_entropy(logits, b):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), b[1][:, None], axis=1)[:, 0]


def test_earlier_esam_keywords_warn_and_equal_the_objective():
  params, batch = mlp_init(0), make_data(0, n=12)
  g = jax.grad(mlp_loss)(params, batch)
  tx = so.esam(0.05, 0.5, perturbation=so.l2())
  losses = mlp_example_losses(params, batch)
  objective = so.Objective(mlp_example_losses, lambda out, b: out, batch, clean_losses=losses)
  want, _ = tx.update(g, tx.init(params), params, objective=objective)
  with pytest.warns(DeprecationWarning,
                    match=r"`per_example_loss_fn=`, `batch=`, `example_losses=`.*"
                                              r"objective=sam_optax\.Objective"):
    got, _ = tx.update(g, tx.init(params), params, per_example_loss_fn=mlp_example_losses,
                       batch=batch, example_losses=losses)
  np.testing.assert_array_equal(flat(got), flat(want))
  # without batch=: the closure over the batch
  with pytest.warns(DeprecationWarning, match="per_example_loss_fn"):
    got, _ = tx.update(g, tx.init(params), params,
                       per_example_loss_fn=lambda q: mlp_example_losses(q, batch))
  np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-8)


def test_earlier_functional_keyword_warns_and_equals_clean_outputs():
  params, batch = mlp_init(1), make_data(1)
  g = jax.grad(mlp_loss)(params, batch)
  tx = so.functional_sam(0.05)
  objective = so.Objective(lambda q, b: mlp_apply(q, b[0]), cross_entropy, batch)
  want, _ = tx.update(g, tx.init(params), params,
                      objective=objective._replace(clean_outputs=mlp_apply(params, batch[0])))
  with pytest.warns(DeprecationWarning, match=r"model_outputs.*clean_outputs="):
    got, _ = tx.update(g, tx.init(params), params, objective=objective,
                       model_outputs=mlp_apply(params, batch[0]))
  np.testing.assert_array_equal(flat(got), flat(want))


def test_batch_alone_is_left_to_other_transformations():
  """``batch=`` without ``per_example_loss_fn=`` belongs to someone else in the chain: no
  warning, ignored like any extra argument."""
  params, batch = mlp_init(2), make_data(2)
  tx = optax.chain(so.sharpness_aware(0.05), optax.sgd(0.1))
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  a, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn, batch=batch)
  b, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  np.testing.assert_array_equal(flat(a), flat(b))


def test_the_objective_gives_every_closure_kind():
  """An objective alone serves a gradient method (value_and_grad_fn from its loss), the
  telemetry's perturbed loss included, and its subset takes the clean pass's fields along."""
  params, batch = mlp_init(3), make_data(3)
  objective = so.Objective(lambda q, b: mlp_apply(q, b[0]), cross_entropy, batch)
  tx = so.sharpness_aware(0.05)
  g = jax.grad(mlp_loss)(params, batch)
  a, state = tx.update(g, tx.init(params), params, objective=objective)
  b, _ = tx.update(g, tx.init(params), params, grad_fn=lambda q: jax.grad(mlp_loss)(q, batch))
  np.testing.assert_allclose(flat(a), flat(b), rtol=1e-5, atol=1e-7)
  assert "perturbed_loss" in so.metrics(state)
  clean = objective._replace(clean_losses=jnp.arange(32.0), clean_outputs=jnp.ones((32, 3)))
  sub = clean.subset(jnp.array([3, 5]))
  np.testing.assert_array_equal(sub.clean_losses, [3.0, 5.0])
  assert sub.clean_outputs.shape == (2, 3) and sub.batch[0].shape == (2, 8)


def test_closure_errors_name_the_fix():
  params = mlp_init(0)
  tx = so.sharpness_aware(0.05)
  with pytest.raises(TypeError, match="either `grad_fn=` or `value_and_grad_fn=`"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p, value_and_grad_fn=lambda p: p)
  with pytest.raises(TypeError, match="needs the loss gradient closure"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(TypeError, match="needs the loss at the perturbed points"):
    so.frob_sam().update(params, so.frob_sam().init(params), params, grad_fn=lambda p: p)
  with pytest.raises(TypeError, match="objective=` must be a `sam_optax.Objective"):
    tx.update(params, tx.init(params), params, objective=lambda p: p)
