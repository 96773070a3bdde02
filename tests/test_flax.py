"""Flax linen and NNX: BatchNorm statistics from the clean pass, the same dropout mask in both passes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sam_optax as so
from helpers import flat
from sam_optax import flax_training as ft

RHO, LR = 0.1, 0.1


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3)(x)


def data(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, 6, 6, 1)), jnp.float32),
          jnp.asarray(rng.integers(0, 3, n), jnp.int32))


def test_linen_step_batch_stats_from_clean_pass_and_same_dropout_key():
  model = LinenNet()
  x, y = data()
  v = model.init(jax.random.key(0), x)
  state = ft.TrainState.create(apply_fn=model.apply, params=v["params"], tx=so.sam(optax.sgd(LR), RHO),
                               batch_stats=v["batch_stats"])
  key = jax.random.key(42)
  new_state, metrics = ft.make_linen_train_step()(state, (x, y), key)

  # by hand: clean pass (its statistics are the new ones), SAM gradient with the same key
  def loss(p, stats):
    logits, mut = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                              rngs={"dropout": key}, mutable=["batch_stats"])
    return ft.softmax_cross_entropy(logits, y), mut

  (l0, mut), g = jax.value_and_grad(loss, has_aux=True)(v["params"], v["batch_stats"])
  gv = flat(g)
  leaves, treedef = jax.tree.flatten(v["params"])
  eps_flat = RHO * gv / np.linalg.norm(gv)
  sizes = np.cumsum([x_.size for x_ in leaves])[:-1]
  perturbed = treedef.unflatten([jnp.asarray(w + e.reshape(w.shape)) for w, e in
                                 zip(leaves, np.split(eps_flat, sizes))])
  g_adv = jax.grad(lambda p: loss(p, v["batch_stats"])[0])(perturbed)
  expected = jax.tree.map(lambda w, g_: w - LR * g_, v["params"], g_adv)
  np.testing.assert_allclose(flat(new_state.params), flat(expected), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(mut["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert not np.allclose(flat(new_state.batch_stats), flat(v["batch_stats"]))
  np.testing.assert_allclose(float(metrics["loss"]), float(l0), rtol=1e-6)

  # a different dropout key in the second pass would give another update
  other = jax.grad(lambda p: ft.softmax_cross_entropy(model.apply(
      {"params": p, "batch_stats": v["batch_stats"]}, x, train=True, rngs={"dropout": jax.random.key(7)},
      mutable=["batch_stats"])[0], y))(perturbed)
  assert not np.allclose(flat(other), flat(g_adv), atol=1e-6)


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
  np.testing.assert_allclose(flat(nnx.state(model, nnx.Param)), flat(expected), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat(nnx.state(model, nnx.BatchStat)), flat(clean_stats), rtol=1e-6)
  assert not np.allclose(flat(clean_stats), flat(nnx.state(reference, nnx.BatchStat)))


def test_equinox_example_trains():
  import importlib.util
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / "examples" / "equinox_sam.py"
  spec = importlib.util.spec_from_file_location("equinox_sam", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  initial, final = mod.main(steps=150)
  assert final < 0.3 * initial
