"""Issue 19: one engine. Each test here failed on e828a15 (the code before the engine).

* every public transformation's jitted step survives a ``jax.export`` round trip bit for
  bit (the chain-order check used to put a host callback in every program);
* ``gated_jit`` around a step that is itself jitted runs LookSAM's second pass only on
  every k-th step (the branch used to come from a context variable the inner jit's cache
  did not see), reading the step count from the device once;
* a perturbation keeps its projection through ``inject_hyperparams`` and ``_replace``;
* multi-step ascent draws fresh noise for every pass;
* ``msam(rho=<schedule>)`` and integer params are clear errors;
* the one linen step trains a TrainState holding any public transformation, with the
  clean pass's statistics; a plain flax TrainState works; a model whose flag is not
  ``train`` gets an error that names the fix.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import sam_optax as so
from helpers import make_data, mlp_example_losses, mlp_init, mlp_loss
from sam_optax import flax_training as ft
from test_contract import NEEDS_LOSS, OPTIMIZERS


def _closures(name, batch):
  if name in NEEDS_LOSS:
    return {"value_and_grad_fn": lambda q: jax.value_and_grad(mlp_loss)(q, batch), "value": mlp_loss}
  return {"grad_fn": lambda q: jax.grad(mlp_loss)(q, batch)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_export_round_trip_is_bitwise(name):
  opt = OPTIMIZERS[name]()
  params, batch = mlp_init(0), make_data(0)
  state = opt.init(params)
  leaves, treedef = jax.tree.flatten((params, state))

  def step(*flat):
    p, s = jax.tree.unflatten(treedef, flat)
    kw = _closures(name, batch)
    if "value" in kw:
      kw["value"] = mlp_loss(p, batch)
    u, s = opt.update(jax.grad(mlp_loss)(p, batch), s, p, **kw,
                      per_example_loss_fn=lambda q: mlp_example_losses(q, batch))
    return jax.tree.leaves((optax.apply_updates(p, u), s))

  live = jax.jit(step)(*leaves)
  exported = jax.export.export(jax.jit(step))(*leaves)
  restored = jax.export.deserialize(exported.serialize())
  out = restored.call(*leaves)
  assert len(out) == len(live)
  for a, b in zip(live, out, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "callback" not in exported.mlir_module()


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


def test_projection_survives_inject_hyperparams_and_replace():
  params, batch = mlp_init(0), make_data(0)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  box = so.adaptive(0.01, base=so.linf())
  injected = optax.inject_hyperparams(so.adaptive, static_args=("base",))(eta=0.01, base=so.linf())

  def run(perturbation):
    tx = so.sharpness_aware(0.05, perturbation=perturbation, ascent_steps=3)
    return tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]

  expected = run(box)
  for p in (injected, box._replace()):
    for a, b in zip(jax.tree.leaves(run(p)), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
  # the box's projection, not the L2 ball's
  delta = jax.tree.map(lambda w: 10.0 * jnp.ones_like(w), params)
  projected = box._replace().project(delta, 0.1, params)
  t = jax.tree.map(lambda w: jnp.abs(w) + 0.01, params)
  for a, s in zip(jax.tree.leaves(projected), jax.tree.leaves(t)):
    np.testing.assert_allclose(a, 0.1 * s, rtol=1e-6)


def test_multi_step_ascent_draws_fresh_noise_for_every_pass():
  params, batch = mlp_init(0), make_data(0)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  p = so.stochastic(0.5, seed=3)
  tx = so.sharpness_aware(0.05, perturbation=p, ascent_steps=3)
  _, state = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  # three passes consumed three draws: the key advanced three times
  s = p.init(params)
  for _ in range(3):
    _, s = p.update(grad_fn(params), s, params)
  np.testing.assert_array_equal(state.perturbation_state.key, s.key)


def test_clear_errors_for_a_schedule_in_msam_and_integer_params():
  with pytest.raises(TypeError, match=r"msam\(rho=...\)"):
    so.msam(optax.sgd(0.1, momentum=0.9), rho=optax.linear_schedule(0.1, 0.3, 10))
  tx = so.sharpness_aware(0.05)
  params = {"w": jnp.ones(3), "steps": jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match=r"\['steps'\].*int32.*cannot be perturbed"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


class BNDropNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(8)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(3)(x)


ANY_TX = {name: f for name, f in OPTIMIZERS.items()}


@pytest.mark.parametrize("name", sorted(ANY_TX))
def test_one_linen_step_trains_any_transformation(name):
  x, y = make_data(7, n=16, d=4)
  model = BNDropNet()
  v = model.init(jax.random.key(0), x)
  tx = ANY_TX[name]()
  state = ft.TrainState.create(apply_fn=model.apply, params=v["params"], batch_stats=v["batch_stats"], tx=tx)
  step = ft.make_linen_train_step(regularizer=ft.mesa_regularizer(steps_per_epoch=1, start_epoch=0)
                                  if name == "weight_ema" else None)
  key = jax.random.key(3)
  first, _ = step(state, (x, y), key)
  new, metrics = step(first, (x, y), key)
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves((new.params, metrics)))
  assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(v["params"])[0])
  # the statistics are the clean pass's, at the params and statistics the step started from
  _, mut = model.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(first.batch_stats), jax.tree.leaves(mut["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_plain_flax_train_state_and_a_training_flag():
  x, y = make_data(1, n=8, d=4)
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), x)["params"]
  apply = lambda v, x, train=False, **kw: (model.apply(v, x), {}) if train else model.apply(v, x)
  plain = train_state.TrainState.create(apply_fn=apply, params=params, tx=so.sam(optax.sgd(0.1)))
  new, m = ft.make_linen_train_step()(plain, (x, y), jax.random.key(0))
  assert int(new.step) == 1 and np.isfinite(float(m["loss"]))

  class Flagged(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
      return nn.Dense(3)(x)

  flagged = Flagged()
  state = ft.TrainState.create(apply_fn=flagged.apply, params=flagged.init(jax.random.key(0), x)["params"],
                               tx=so.sam(optax.sgd(0.1)))
  with pytest.raises(TypeError, match=r"train_kwarg=.*'training'"):
    ft.make_linen_train_step()(state, (x, y), jax.random.key(0))
  new, _ = ft.make_linen_train_step(train_kwarg="training")(state, (x, y), jax.random.key(0))
  assert int(new.step) == 1


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
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[1]),
                                                       jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))


def test_metrics_inside_jit_omit_what_was_not_recorded():
  # e828a15: inside jit `metrics()` read `clean_loss`, `perturbed_loss` and
  # `sharpness` as 0 when the step was given no loss (a plausible but wrong 0).
  loss = lambda w: jnp.sum(w ** 4)
  w = jnp.array([1.0, -2.0])
  tx = so.sam(optax.sgd(0.1), 0.05)

  @jax.jit
  def bare(w, state):
    _, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    return so.metrics(state)

  @jax.jit
  def full(w, state):
    value, g = jax.value_and_grad(loss)(w)
    _, state = tx.update(g, state, w, value=value, value_and_grad_fn=jax.value_and_grad(loss))
    return so.metrics(state)

  m = bare(w, tx.init(w))
  assert not {"clean_loss", "perturbed_loss", "sharpness"} & set(m)
  m = full(w, tx.init(w))
  g = jax.grad(loss)(w)
  by_hand = loss(w + 0.05 * g / jnp.linalg.norm(g)) - loss(w)
  np.testing.assert_allclose(m["sharpness"], by_hand, rtol=1e-6)
  # outside jit the flags are concrete as well
  state = tx.init(w)
  _, state = tx.update(g, state, w, grad_fn=jax.grad(loss))
  assert "sharpness" not in so.metrics(state) and "perturbed_grad_norm" in so.metrics(state)


@pytest.mark.parametrize("method", ["esam", "functional_sam"])
def test_nnx_objective_update_matches_the_same_method_on_plain_functions(method):
  # e828a15 had no NNX route for the methods that need per-example losses or outputs
  from flax import nnx

  make = {"esam": lambda: so.esam(0.1, gamma=0.5), "functional_sam": lambda: so.functional_sam(0.1)}[method]
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
