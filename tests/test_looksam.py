"""LookSAM against its rule by hand, its real pass counts, and gated_jit around it."""

import jax
import numpy as np

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat
from references import counted_grad_fn


def sam_point_grad(params, g, rho, grad_of):
  gv = flat(g)
  return grad_of(unflat(flat(params) + rho * gv / np.linalg.norm(gv), params))


def test_looksam_over_two_periods_matches_reference_and_counts_passes():
  k, rho, alpha = 5, 0.05, 0.7
  params = mlp_init(1)
  batches = [make_data(i) for i in range(2 * k)]
  tx = so.looksam(rho, k, alpha)
  counter = []

  @jax.jit
  def step(s, batch):
    grad_fn = counted_grad_fn(batch, counter)
    return tx.update(jax.grad(mlp_loss)(params, batch), s, params, grad_fn=grad_fn)

  state = tx.init(params)
  g_v = None
  for t, batch in enumerate(batches):
    out, state = step(state, batch)
    g = flat(jax.grad(mlp_loss)(params, batch))
    if t % k == 0:
      gs = flat(sam_point_grad(params, unflat(g, params), rho,
                               lambda p, b=batch: jax.grad(mlp_loss)(p, b)))
      g_v = gs - (gs @ g) / (g @ g) * g
      expected = gs
    else:
      expected = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    np.testing.assert_allclose(flat(out), expected, rtol=1e-4, atol=1e-6)
  jax.effects_barrier()
  assert len(counter) == 2
