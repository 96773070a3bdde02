"""The NNX closures and steps: the clean pass's statistics and dropout masks, the optimizer's
``wrt``, every method through ``nnx_objective_update``; the equinox example."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax as so
from helpers import flat
from sam_optax import flax as ft

RHO, LR = 0.1, 0.1


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.lin1 = nnx.Linear(5, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.lin2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))


def nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_sam_update_clean_statistics_and_same_dropout_mask():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
  model = NNXNet(nnx.Rngs(0, dropout=1))
  reference = nnx.clone(model)
  optimizer = nnx.Optimizer(model, so.sam(optax.sgd(LR), RHO), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    return ft.nnx_sam_update(model, optimizer, nnx_loss, x, y)

  step(model, optimizer, x, y)

  # by hand on the clone: clean pass (statistics), then the gradient at w + eps with the same mask
  graphdef, params, rest = nnx.split(reference, nnx.Param, ...)
  def loss_at(p):
    m = nnx.merge(graphdef, p, rest, copy=True)
    out = nnx_loss(m, x, y)
    return out, nnx.state(m, nnx.BatchStat)
  (_, clean_stats), g = jax.value_and_grad(loss_at, has_aux=True)(params)
  n = np.linalg.norm(flat(g))
  perturbed = jax.tree.map(lambda w, gi: w + RHO * gi / n, params, g)
  g_adv = jax.grad(lambda p: loss_at(p)[0])(perturbed)
  expected = jax.tree.map(lambda w, gi: w - LR * gi, params, g_adv)
  np.testing.assert_allclose(flat(nnx.state(model, nnx.Param)), flat(expected), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(flat(nnx.state(model, nnx.BatchStat)), flat(clean_stats), rtol=1e-6)
  assert not np.allclose(flat(clean_stats), flat(nnx.state(reference, nnx.BatchStat)))


def test_nnx_closure_built_before_the_clean_pass_replays_its_dropout_mask():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin, self.drop = nnx.Linear(4, 3, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.drop(self.lin(x))

  model = Net(nnx.Rngs(0))
  x = jnp.ones((8, 4))
  loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grad_fn = ft.nnx_grad_fn(graphdef, rest, loss_fn, x)
  clean = nnx.grad(loss_fn)(model, x)  # advances the dropout RNG of the live model
  again = grad_fn(params)
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(again)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_nnx_step_trains_what_the_optimizer_is_built_for():
  """nnx_sam_update splits and differentiates by the optimizer's ``wrt``: with
  ``wrt=nnx.LoRAParam`` only the adapters move (it used to assume nnx.Param and fail)."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.LoRALinear(4, 3, lora_rank=2, rngs=rngs)

    def __call__(self, x):
      return self.lin(x)

  model = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, so.sam(optax.sgd(0.1)), wrt=nnx.LoRAParam)
  x, y = jnp.ones((8, 4)), jnp.zeros((8, 3))
  loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  before = jax.tree.map(jnp.copy, (nnx.state(model, base), nnx.state(model, nnx.LoRAParam)))
  step = nnx.jit(ft.nnx_sam_update, static_argnums=2)
  losses = [float(step(model, opt, loss_fn, x, y)) for _ in range(3)]
  assert losses[-1] < losses[0]
  for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(nnx.state(model, base))):
    np.testing.assert_array_equal(a, b)
  after = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[1]), after))


@pytest.mark.parametrize("method", ["esam", "functional_sam"])
def test_nnx_objective_update_matches_the_same_method_on_plain_functions(method):
  # e828a15 had no NNX route for the methods that need per-example losses or outputs
  from flax import nnx

  make = {"esam": lambda: so.esam(0.1, gamma=0.5),
          "functional_sam": lambda: so.functional_sam(0.1)}[method]
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, 4))
  y = jnp.argmax(x[:, :3] + 0.3 * x[:, 3:], -1)
  ce = lambda out, b: optax.softmax_cross_entropy_with_integer_labels(out, b[1])
  w = {"bias": jnp.array(model.bias[...]), "kernel": jnp.array(model.kernel[...])}

  opt = nnx.Optimizer(model, optax.chain(make(), optax.sgd(0.5)), wrt=nnx.Param)
  step = nnx.jit(ft.nnx_objective_update, static_argnums=(2, 3))
  for _ in range(3):
    step(model, opt, lambda m, b: m(b[0]), ce, (x, y))

  # the same transformation on a hand-written linear model
  tx = optax.chain(make(), optax.sgd(0.5))
  obj = so.Objective(lambda p, b: b[0] @ p["kernel"] + p["bias"], ce, (x, y))
  state = tx.init(w)
  for _ in range(3):
    value, g = jax.value_and_grad(obj.loss)(w)
    u, state = tx.update(g, state, w, objective=obj, value=value,
                         value_and_grad_fn=jax.value_and_grad(obj.loss))
    w = optax.apply_updates(w, u)
  np.testing.assert_allclose(model.kernel[...], w["kernel"], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(model.bias[...], w["bias"], rtol=2e-5, atol=1e-6)


def test_equinox_example_trains():
  import importlib.util
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / "examples" / "equinox_sam.py"
  spec = importlib.util.spec_from_file_location("equinox_sam", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  initial, final = mod.main(steps=150)
  assert final < 0.3 * initial
