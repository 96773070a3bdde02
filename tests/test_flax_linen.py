"""The linen train step: BatchNorm statistics from the clean pass, one dropout key, every
closure kind passed, so one step trains every row of the method registry; the SAMPa, ESAM,
SAF and MESA steps against their transformations; a plain TrainState and a training flag
named otherwise."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import sam_optax as so
import table
from helpers import flat, make_data
from sam_optax import flax as ft
from sam_optax import trajectory
from test_contract import rows

RHO, LR = 0.1, 0.1


class LinenNet(nn.Module):
  """A convolution with BatchNorm and dropout (rate 0.5; the SAMPa/ESAM/SAF/MESA tests use 0.3)."""
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(3)(x)


def data(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, 6, 6, 1)), jnp.float32),
          jnp.asarray(rng.integers(0, 3, n), jnp.int32))


def test_linen_step_batch_stats_from_clean_pass_and_same_dropout_key():
  model = LinenNet()
  x, y = data()
  v = model.init(jax.random.key(0), x)
  state = ft.TrainState.create(apply_fn=model.apply, params=v["params"],
                               tx=so.sam(optax.sgd(LR), RHO),
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
      {"params": p,
       "batch_stats": v["batch_stats"]}, x, train=True, rngs={"dropout": jax.random.key(7)},
      mutable=["batch_stats"])[0], y))(perturbed)
  assert not np.allclose(flat(other), flat(g_adv), atol=1e-6)


class BNDropNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(8)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(3)(x)


@pytest.mark.parametrize("name", rows())
def test_one_linen_step_trains_any_transformation(name):
  x, y = make_data(7, n=16, d=4)
  model = BNDropNet()
  v = model.init(jax.random.key(0), x)
  tx = table.optimizer(name)
  state = ft.TrainState.create(apply_fn=model.apply, params=v["params"],
                               batch_stats=v["batch_stats"], tx=tx)
  step = ft.make_linen_train_step(regularizer=ft.mesa_regularizer(steps_per_epoch=1, start_epoch=0)
                                  if name == "weight_ema" else None,
                                  subset=table.ROWS[name][1].splits_batch)
  key = jax.random.key(3)
  first, _ = step(state, (x, y), key)
  new, metrics = step(first, (x, y), key)
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves((new.params, metrics)))
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.params),
                                                    jax.tree.leaves(v["params"]), strict=True))
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
  state = ft.TrainState.create(apply_fn=flagged.apply,
                               params=flagged.init(jax.random.key(0), x)["params"],
                               tx=so.sam(optax.sgd(0.1)))
  with pytest.raises(TypeError, match=r"train_kwarg=.*'training'"):
    ft.make_linen_train_step()(state, (x, y), jax.random.key(0))
  new, _ = ft.make_linen_train_step(train_kwarg="training")(state, (x, y), jax.random.key(0))
  assert int(new.step) == 1


# ------------------------------------------------ SAMPa, ESAM, SAF, MESA


Net = lambda: LinenNet(dropout=0.3)


def make_state(tx, cls=ft.TrainState, **extra):
  v = Net().init(jax.random.key(0), data()[0])
  return cls.create(apply_fn=Net().apply, params=v["params"], tx=tx, batch_stats=v["batch_stats"],
                    **extra)


def forward(state, params, x, key, train=True):
  if not train:
    return Net().apply({"params": params, "batch_stats": state.batch_stats}, x, train=False), None
  logits, mut = Net().apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                            rngs={"dropout": key}, mutable=["batch_stats"])
  return logits, mut["batch_stats"]


def ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(flat(a), flat(b), rtol=rtol, atol=atol)


def test_sampa_step_matches_the_optimizer_and_keeps_clean_statistics():
  tx = so.sampa(optax.sgd(LR, momentum=0.9), rho=0.1, lam=0.2)
  step = ft.make_linen_sampa_train_step()
  state = make_state(tx)
  ref_params, ref_opt = state.params, tx.init(state.params)
  for t in range(3):
    x, y = data(t)
    key = jax.random.key(10 + t)
    before = state
    state, metrics = step(state, (x, y), key)
    vg = lambda p, s=before, x=x, y=y, key=key: jax.value_and_grad(
        lambda q: ce(forward(s, q, x, key)[0], y))(p)
    u, ref_opt = tx.update(ref_params, ref_opt, ref_params, value_and_grad_fn=vg)
    ref_params = optax.apply_updates(ref_params, u)
    assert_tree_close(state.params, ref_params)
    logits, stats = forward(before, before.params, x, key)
    assert_tree_close(state.batch_stats, stats)
    np.testing.assert_allclose(float(metrics["loss"]), float(ce(logits, y)), rtol=1e-5)


def test_sampa_step_with_another_optimizer_is_the_plain_step():
  """The SAMPa step reads no optimizer's type: with SAM it is the standard step (the clean
  gradient is computed because SAM uses it)."""
  state = make_state(so.sam(optax.sgd(LR)))
  a, _ = ft.make_linen_sampa_train_step(ft.per_example_cross_entropy)(state, data(),
                                                                      jax.random.key(0))
  b, _ = ft.make_linen_train_step()(state, data(), jax.random.key(0))
  np.testing.assert_array_equal(flat(a.params), flat(b.params))
  with pytest.raises(ValueError, match="BatchNorm"):
    ft.make_linen_sampa_train_step(clean_forward=False)(make_state(so.sampa(optax.sgd(LR))), data(),
                                                        jax.random.key(0))


@pytest.mark.parametrize("subset", [True, False])
def test_esam_step_matches_the_transform(subset):
  tx = optax.chain(so.esam(0.1, 0.5, perturbation=so.l2()), optax.sgd(LR))
  state = make_state(tx)
  x, y = data(3)
  key = jax.random.key(7)
  new, _ = ft.make_linen_esam_train_step(subset=subset)(state, (x, y), key)

  def losses(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(forward(state, p, b[0], key)[0], b[1])

  ex, stats = losses(state.params, (x, y)), forward(state, state.params, x, key)[1]
  g = jax.grad(lambda p: jnp.mean(losses(p, (x, y))))(state.params)
  objective = (so.Objective(losses, lambda out, b: out, (x, y)) if subset else
               so.Objective(lambda p, b: losses(p, (x, y)), lambda out, b: out))
  u, _ = tx.update(g, tx.init(state.params), state.params, objective=objective)
  assert_tree_close(new.params, optax.apply_updates(state.params, u))
  assert_tree_close(new.batch_stats, stats)
  assert ex.shape == (16,)


def test_saf_step_one_pass_with_the_stored_reference():
  steps_per_epoch, lookback, start = 2, 1, 1
  n = 16
  x_all, y_all = data(5, n=n)
  state = make_state(optax.sgd(LR), cls=ft.SAFTrainState, saf=trajectory.saf_init(n, 3, lookback))
  step = ft.make_linen_saf_train_step(steps_per_epoch=steps_per_epoch, weight=0.3, temperature=5.0,
                                      start_epoch=start)
  params, stats = state.params, state.batch_stats
  recorded = {}
  rng = np.random.default_rng(0)
  t = 0
  for epoch in range(4):
    order = rng.permutation(n)
    for i in range(steps_per_epoch):
      idx = order[i * 8:(i + 1) * 8]
      x, y = x_all[idx], y_all[idx]
      key = jax.random.key(100 + t)
      hand = state.replace(params=params, batch_stats=stats)
      if epoch >= start:
        ref = jnp.stack([recorded[(int(j), epoch - lookback)] for j in idx])

      def total(p, hand=hand, x=x, y=y, key=key, epoch=epoch):
        logits = forward(hand, p, x, key)[0]
        reg = trajectory.trajectory_loss(logits, ref, temperature=5.0,
                                         weight=0.3) if epoch >= start else 0.0
        return ce(logits, y) + reg

      logits, stats = forward(hand, params, x, key)
      params = jax.tree.map(lambda w, g: w - LR * g, params, jax.grad(total)(params))
      for row, j in enumerate(idx):
        recorded[(int(j), epoch)] = logits[row]
      state, metrics = step(state, (x, y, jnp.asarray(idx)), key)
      assert_tree_close(state.params, params, rtol=2e-5, atol=2e-6)
      assert (float(metrics["trajectory_loss"]) > 0) == (epoch >= start)
      t += 1
  assert_tree_close(state.batch_stats, stats)


def test_mesa_step_distills_from_the_ema_weights():
  decay = 0.5
  tx = optax.chain(optax.sgd(LR), so.weight_ema(decay))
  state = make_state(tx)
  step = ft.make_linen_mesa_train_step(steps_per_epoch=1, weight=0.8, temperature=5.0,
                                       start_epoch=1)
  params, ema = state.params, state.params
  for t in range(3):
    x, y = data(20 + t)
    key = jax.random.key(t)
    before = state
    teacher = forward(before, ema, x, key, train=False)[0]

    def total(p, before=before, x=x, y=y, key=key, t=t, teacher=teacher):
      logits = forward(before, p, x, key)[0]
      reg = trajectory.trajectory_loss(logits, teacher, temperature=5.0, weight=0.8)
      return ce(logits, y) + (reg if t >= 1 else 0.0)

    params = jax.tree.map(lambda w, g: w - LR * g, params, jax.grad(total)(params))
    ema = jax.tree.map(lambda e, w: decay * e + (1 - decay) * w, ema, params)
    state, metrics = step(state, (x, y), key)
    assert_tree_close(state.params, params)
    assert_tree_close(trajectory.ema_params(state.opt_state), ema)
    assert (float(metrics["trajectory_loss"]) > 0) == (t >= 1)
