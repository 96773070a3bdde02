"""Compiled memory (deterministic, from XLA's memory_analysis) of the SAM step vs its peers."""

import jax
import optax
import optax.contrib

import sam_optax as so
from helpers import make_data, mlp_init, mlp_loss


def temp_bytes(step, *args):
  return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_sam_step_memory_is_close_to_the_peer_and_the_base():
  params = mlp_init(0, sizes=(64, 256, 256, 10))
  batch = make_data(0, n=128, d=64, classes=10)
  base = optax.sgd(0.1, momentum=0.9)
  sam = optax.chain(so.sharpness_aware(0.05, telemetry=False), optax.sgd(0.1, momentum=0.9))
  peer = optax.contrib.sam(optax.sgd(0.1, momentum=0.9),
                           optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True)

  def base_step(p, s, b):
    return base.update(jax.grad(mlp_loss)(p, b), s, p)

  def sam_step(p, s, b):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, b)
    return sam.update(grad_fn(p), s, p, grad_fn=grad_fn)

  def peer_step(p, s, b):
    return peer.update(jax.grad(mlp_loss)(p, b), s, p, grad_fn=lambda q, _: jax.grad(mlp_loss)(q, b))

  t_base = temp_bytes(base_step, params, base.init(params), batch)
  t_sam = temp_bytes(sam_step, params, sam.init(params), batch)
  t_peer = temp_bytes(peer_step, params, peer.init(params), batch)
  # SAM holds one extra params-sized buffer (the perturbed point) and a second activation set
  assert t_sam <= 2.0 * t_base
  assert t_sam <= 1.25 * t_peer


def _cnn():
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(32, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Conv(64, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  model = CNN()
  x = jax.numpy.ones((128, 28, 28, 1))
  y = jax.numpy.arange(128) % 10
  params = model.init(jax.random.key(0), x[:2])["params"]
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, b[0]), b[1]).mean()
  return params, (x, y), loss


def _temp(opt, params, batch, loss, losses):
  def step(p, s, b):
    vg = lambda q: jax.value_and_grad(loss)(q, b)
    value, g = vg(p)
    if losses:
      return opt.update(g, s, p, value_and_grad_fn=vg, value=value)
    return opt.update(g, s, p, grad_fn=lambda q: vg(q)[1])
  return temp_bytes(step, params, opt.init(params), batch)


def test_chain_order_guard_costs_no_memory():
  """With telemetry off the step is the plain SAM program plus the guard's cosine over a
  few small leaves: within 1% of the peer-sized program it was before."""
  params = mlp_init(0, sizes=(64, 256, 256, 10))
  batch = make_data(0, n=128, d=64, classes=10)
  off = optax.chain(so.sharpness_aware(0.05, telemetry=False), optax.sgd(0.1, momentum=0.9))
  peer = optax.contrib.sam(optax.sgd(0.1, momentum=0.9),
                           optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True)

  def peer_step(p, s, b):
    return peer.update(jax.grad(mlp_loss)(p, b), s, p, grad_fn=lambda q, _: jax.grad(mlp_loss)(q, b))

  t_off = _temp(off, params, batch, mlp_loss, False)
  assert t_off <= 1.01 * temp_bytes(peer_step, params, peer.init(params), batch)


def test_telemetry_memory_on_a_convnet():
  """Issue 12: on a convnet (activations dominate), recording the telemetry, losses
  included, leaves the compiled temporary memory within 1% of the step without it. The
  cosine needs g alive until the perturbed gradient is done: on a wide MLP at small batch
  that costs up to one params-sized buffer (benchmarks/RESULTS.md has the figures)."""
  params, batch, loss = _cnn()
  on = so.sam(optax.sgd(0.1, momentum=0.9), 0.05)
  off = optax.chain(so.sharpness_aware(0.05, telemetry=False), optax.sgd(0.1, momentum=0.9))
  t_off = _temp(off, params, batch, loss, False)
  assert _temp(on, params, batch, loss, False) <= 1.01 * t_off
  assert _temp(on, params, batch, loss, True) <= 1.01 * t_off
