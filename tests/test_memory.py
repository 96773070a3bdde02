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
  sam = so.sam(optax.sgd(0.1, momentum=0.9), 0.05)
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
