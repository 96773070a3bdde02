"""sam_optax.diagnostics: dead-unit fractions against values computed by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax.diagnostics import dead_unit_fraction, linen_dead_unit_fractions

# 3 examples, 5 units: unit 0 fires on example 2 only, unit 1 never (0 is inactive), unit 2
# always, unit 3 never (all negative), unit 4 on example 0 only -> 2 of 5 dead
Z = jnp.array([[-1.0, 0.0, 2.0, -4.0, 0.5],
               [-2.0, 0.0, 1.0, -1.0, -0.1],
               [3.0, -5.0, 0.3, -2.0, -9.0]])


def test_dense_activations():
  assert float(dead_unit_fraction(Z)) == pytest.approx(2 / 5)
  # the same on the ReLU output
  assert float(dead_unit_fraction(jax.nn.relu(Z))) == pytest.approx(2 / 5)
  assert float(dead_unit_fraction(Z.T, axis=0)) == pytest.approx(2 / 5)
  # threshold 0.4: unit 2 (max 2.0) and unit 4 (max 0.5) fire, unit 0 (max 3.0) fires -> 2 of 5
  assert float(dead_unit_fraction(Z, threshold=0.4)) == pytest.approx(2 / 5)
  # threshold 0.6: unit 4 (max 0.5) joins the dead
  assert float(dead_unit_fraction(Z, threshold=0.6)) == pytest.approx(3 / 5)
  # the batch's axis is read as examples: on example 1 alone only unit 2 fires
  assert float(dead_unit_fraction(Z[1:2])) == pytest.approx(4 / 5)


def test_convolution_channels_count_every_position():
  a = -jnp.ones((2, 4, 4, 4))
  a = a.at[1, 3, 0, 0].set(0.1)  # channel 0: one position of one image fires -> alive
  a = a.at[:, :, :, 2].set(1.0)  # channel 2 fires everywhere
  assert float(dead_unit_fraction(a)) == pytest.approx(2 / 4)
  nchw = jnp.moveaxis(a, -1, 1)
  assert float(dead_unit_fraction(nchw, axis=1)) == pytest.approx(2 / 4)


def test_nan_counts_as_active_and_dtypes():
  z = Z.at[0, 1].set(jnp.nan)
  assert float(dead_unit_fraction(z)) == pytest.approx(1 / 5)
  out = dead_unit_fraction(Z.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32 and float(out) == pytest.approx(2 / 5)


def test_jit():
  assert float(jax.jit(dead_unit_fraction, static_argnames="axis")(Z,
                                                                   axis=-1)) == pytest.approx(0.4)


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match=r"axis=\.\.\..*out of range"):
    dead_unit_fraction(Z, axis=2)
  with pytest.raises(ValueError, match=r"activations=\.\.\..*scalar"):
    dead_unit_fraction(jnp.float32(1.0))


class Head(nn.Module):
  """Conv -> BatchNorm -> ReLU -> Dense(4) -> ReLU (sown) -> Dense(3)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(2, (1, 1), name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    h = nn.relu(nn.Dense(4, name="head")(x.reshape(x.shape[0], -1)))
    self.sow("intermediates", "head_relu", h)
    return nn.Dense(3, name="logits")(h)


def test_linen_per_layer_fractions_by_hand():
  model = Head()
  x = jax.random.normal(jax.random.key(0), (16, 3, 3, 1))
  variables = model.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p, variables["params"])
  # head: units 0 and 2 get a bias no input overcomes -> 2 of 4 dead; units 1 and 3 always fire
  params["head"]["kernel"] = jnp.zeros_like(params["head"]["kernel"])
  params["head"]["bias"] = jnp.array([-1.0, 1.0, -1.0, 1.0])
  variables = {"params": params, "batch_stats": variables["batch_stats"]}
  out = linen_dead_unit_fractions(model.apply, variables, x)
  assert list(out) == ["conv", "bn", "head", "head_relu", "logits"]
  assert float(out["head"]) == float(out["head_relu"]) == 0.5
  # the output of BatchNorm (inference, fresh statistics: mean 0, var 1) has the conv's sign
  assert float(out["bn"]) == float(out["conv"])
  # batch statistics (train=True) centre every channel: each fires somewhere
  train = linen_dead_unit_fractions(model.apply, variables, x, mutable=("batch_stats",), train=True)
  assert float(train["bn"]) == 0.0 and float(train["head"]) == 0.5
  # only the sown value
  sown = linen_dead_unit_fractions(model.apply, variables, x, capture=False)
  assert list(sown) == ["head_relu"]


def test_linen_nested_modules_and_repeated_calls():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="dense", bias_init=nn.initializers.constant(-10.0),
                      kernel_init=nn.initializers.zeros)(x)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      block = Block(name="block")
      return block(x) + block(x + 1.0)

  x = jnp.ones((4, 3))
  variables = Net().init(jax.random.key(0), x)
  out = linen_dead_unit_fractions(Net().apply, variables, x)
  assert sorted(out) == ["block#0", "block#1", "block/dense#0", "block/dense#1"]
  assert all(float(v) == 1.0 for v in out.values())


def test_linen_errors():
  model = Head()
  x = jnp.ones((2, 3, 3, 1))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="capture="):
    linen_dead_unit_fractions(model.apply, variables, x, capture_intermediates=True)
  with pytest.raises(TypeError, match="model.apply"):
    linen_dead_unit_fractions(lambda v, x, **kw: model.apply(v, x), variables, x)


def test_matches_a_numpy_count():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(32, 50)) - 1.5
  expected = np.mean(np.all(a <= 0, axis=0))
  assert 0 < expected < 1
  assert float(dead_unit_fraction(jnp.asarray(a, jnp.float32))) == pytest.approx(expected)
