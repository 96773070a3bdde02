"""SAM with an Equinox model: the transform is framework-free, only pytrees matter.

  pip install equinox && python examples/equinox_sam.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import sam_optax


def main(steps: int = 200) -> tuple[float, float]:
  key = jax.random.key(0)
  k_model, k_data = jax.random.split(key)
  model = eqx.nn.MLP(in_size=2, out_size=1, width_size=32, depth=2, key=k_model)
  x = jax.random.normal(k_data, (256, 2))
  y = jnp.sin(3 * x[:, :1]) * jnp.cos(2 * x[:, 1:])

  params, static = eqx.partition(model, eqx.is_inexact_array)
  opt = sam_optax.sam(optax.adam(1e-2), rho=0.05)
  opt_state = opt.init(params)

  def loss_fn(p):
    m = eqx.combine(p, static)
    return jnp.mean((jax.vmap(m)(x) - y) ** 2)

  @jax.jit
  def step(p, s):
    grad_fn = jax.grad(loss_fn)
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = opt.update(g, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s, loss

  initial = float(loss_fn(params))
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state)
    if i % 50 == 0:
      print(f"step {i:4d}  loss {float(loss):.4f}")
  final = float(loss_fn(params))
  print(f"final loss {final:.4f}")
  return initial, final


if __name__ == "__main__":
  main()
