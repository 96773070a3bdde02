"""SAF and MESA pieces against numpy: the KL-with-temperature term, the weight EMA, the logit
store."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss
from sam_optax import trajectory


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_trajectory_loss(z, z_ref, t, lam, where=None):
  """lam * T^2 * mean_i sum_c p_ref (log p_ref - log q), in float64 numpy."""
  p, q = np_softmax(np.float64(z_ref) / t), np_softmax(np.float64(z) / t)
  kl = (p * (np.log(p) - np.log(q))).sum(-1)
  if where is not None:
    kl = kl[np.asarray(where)]
    if kl.size == 0:
      return 0.0
  return lam * t * t * kl.mean()


@pytest.mark.parametrize("t,lam", [(1.0, 1.0), (5.0, 0.3), (2.0, 0.8), (10.0, 2.0)])
def test_trajectory_loss_is_the_kl_formula(t, lam):
  rng = np.random.default_rng(0)
  z, z_ref = rng.normal(size=(6, 10)) * 3, rng.normal(size=(6, 10)) * 3
  got = trajectory.trajectory_loss(jnp.asarray(z, jnp.float32), jnp.asarray(z_ref, jnp.float32),
                                   temperature=t, weight=lam)
  np.testing.assert_allclose(float(got), np_trajectory_loss(z, z_ref, t, lam), rtol=1e-5)
  where = np.array([True, False, True, True, False, False])
  got_w = trajectory.trajectory_loss(z, z_ref, temperature=t, weight=lam, where=where)
  np.testing.assert_allclose(float(got_w), np_trajectory_loss(z, z_ref, t, lam, where), rtol=1e-5)
  assert float(trajectory.trajectory_loss(z, z_ref, where=np.zeros(6, bool))) == 0.0
  # its gradient: lam * T * (q - p) / B per logit, and none into the reference
  gz, gref = jax.grad(lambda a, b: trajectory.trajectory_loss(a, b, temperature=t, weight=lam),
                      argnums=(0, 1))(jnp.asarray(z, jnp.float32), jnp.asarray(z_ref, jnp.float32))
  expected = lam * t * (np_softmax(z / t) - np_softmax(z_ref / t)) / len(z)
  np.testing.assert_allclose(np.asarray(gz), expected, rtol=1e-4, atol=1e-7)
  assert not np.any(np.asarray(gref))


def test_confident_logits_stay_finite():
  """log of a softmax underflows to -inf (the reference code's form); log_softmax does not."""
  z = np.array([[400.0, 0.0, -400.0]])
  z_ref = np.array([[-400.0, 0.0, 400.0]])
  got = float(trajectory.trajectory_loss(z, z_ref, temperature=1.0))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, 800.0, rtol=1e-5)  # KL of two near-one-hots = the logit gap
  with np.errstate(divide="ignore", invalid="ignore"):
    naive = (np_softmax(z_ref) * (np.log(np_softmax(z_ref)) - np.log(np_softmax(z)))).sum()
  assert not np.isfinite(naive)


def test_weight_ema_matches_a_hand_loop():
  params = mlp_init(0)
  decay = 0.8
  opt = optax.chain(optax.sgd(0.1, momentum=0.9), so.weight_ema(decay))
  state = opt.init(params)
  ema = flat(params)
  p = params
  for t in range(10):
    g = jax.grad(mlp_loss)(p, make_data(t))
    u, state = opt.update(g, state, p)
    p = optax.apply_updates(p, u)
    ema = decay * ema + (1 - decay) * flat(p)
  np.testing.assert_allclose(flat(trajectory.ema_params(state)), ema, rtol=1e-5, atol=1e-6)
  # the updates pass through: the weights are those of plain SGD
  sgd = optax.sgd(0.1, momentum=0.9)
  ps, ss = params, sgd.init(params)
  for t in range(10):
    u, ss = sgd.update(jax.grad(mlp_loss)(ps, make_data(t)), ss, ps)
    ps = optax.apply_updates(ps, u)
  np.testing.assert_array_equal(flat(p), flat(ps))


def test_weight_ema_of_bf16_params_is_float32_and_moves():
  w = jnp.ones(4, jnp.bfloat16)
  opt = optax.chain(optax.sgd(1e-3), so.weight_ema(0.9998))
  state = opt.init(w)
  for _ in range(5):
    u, state = opt.update(jnp.ones(4, jnp.bfloat16), state, w)
    w = optax.apply_updates(w, u)
  ema = trajectory.ema_params(state)
  assert ema.dtype == jnp.float32 and float(ema[0]) < 1.0
  assert trajectory.ema_params(state, like=w).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="weight_ema"):
    trajectory.ema_params(optax.sgd(0.1).init(w))


def test_saf_store_returns_the_logits_from_lookback_epochs_earlier_by_index():
  n, c, lookback, batch = 12, 4, 2, 4
  rng = np.random.default_rng(0)
  state = trajectory.saf_init(n, c, lookback=lookback)
  assert state.logits.shape == (n, lookback + 1, c)
  written = {}
  dropped = {}
  for epoch in range(7):
    order = rng.permutation(n)
    dropped[epoch] = set(order[-batch:].tolist()) if epoch == 3 else set()
    if epoch == 3:  # the last batch of epoch 3 is dropped, as a loader with drop_last would
      order = order[:-batch]
    for i in range(0, len(order), batch):
      idx = order[i:i + batch]
      ref, valid = trajectory.saf_reference(state, jnp.asarray(idx), epoch)
      for row, j in enumerate(idx):
        source = (int(j), epoch - lookback)
        if source in written:
          assert bool(valid[row])
          np.testing.assert_array_equal(np.asarray(ref[row]), written[source])
        else:
          assert not bool(valid[row])
          assert epoch < lookback or int(j) in dropped[epoch - lookback]
      logits = rng.normal(size=(len(idx), c)).astype(np.float32)
      state = trajectory.saf_update(state, jnp.asarray(idx), jnp.asarray(logits), epoch)
      for row, j in enumerate(idx):
        written[(int(j), epoch)] = logits[row]


def test_saf_loss_is_active_only_in_its_window():
  n, c = 8, 3
  rng = np.random.default_rng(1)
  state = trajectory.saf_init(n, c, lookback=1)
  idx = jnp.arange(n)
  history = []
  for epoch in range(6):
    z = rng.normal(size=(n, c)).astype(np.float32)
    reg, state = trajectory.saf_loss(state, z, idx, epoch, weight=0.3, temperature=5.0,
                                     start_epoch=2, end_epoch=4)
    if 2 <= epoch < 4:
      np.testing.assert_allclose(float(reg), np_trajectory_loss(z, history[-1], 5.0, 0.3),
                                 rtol=1e-5)
      assert float(reg) > 0
    else:
      assert float(reg) == 0.0
    history.append(z)


def test_mesa_loss_window_and_formula():
  rng = np.random.default_rng(2)
  z, z_ema = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  assert float(trajectory.mesa_loss(z, z_ema, epoch=4, start_epoch=5)) == 0.0
  np.testing.assert_allclose(float(trajectory.mesa_loss(z, z_ema, epoch=5, start_epoch=5)),
                             np_trajectory_loss(z, z_ema, 5.0, 0.8), rtol=1e-5)
  off = trajectory.mesa_loss(z, z_ema, epoch=jnp.asarray(7), start_epoch=5, end_epoch=7)
  assert float(off) == 0.0


def test_arguments_are_checked():
  with pytest.raises(ValueError, match="temperature"):
    trajectory.trajectory_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), temperature=0.0)
  with pytest.raises(ValueError, match="lookback"):
    trajectory.saf_init(10, 3, lookback=0)
  with pytest.raises(ValueError, match="decay"):
    so.weight_ema(1.0)
  with pytest.raises(ValueError, match="batch, classes"):
    trajectory.trajectory_loss(jnp.zeros(3), jnp.zeros(3))
