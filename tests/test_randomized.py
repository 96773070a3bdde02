"""RST at its extremes."""

import jax
import numpy as np
import pytest

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss
from references import counted_grad_fn


@pytest.mark.parametrize("p, expect", [(0.0, "base"), (1.0, "inner")])
def test_randomized_extremes(p, expect):
  params = mlp_init(4)
  inner = so.sharpness_aware(0.05)
  tx = so.randomized(inner, p)
  counter = []
  s, si = tx.init(params), inner.init(params)
  for t in range(5):
    batch = make_data(t)
    g = jax.grad(mlp_loss)(params, batch)
    grad_fn = counted_grad_fn(batch, counter)
    out, s = jax.jit(lambda s, g=g, grad_fn=grad_fn: tx.update(g, s, params, grad_fn=grad_fn))(s)
    ref, si = inner.update(g, si, params, grad_fn=lambda q, b=batch: jax.grad(mlp_loss)(q, b))
    np.testing.assert_allclose(flat(out), flat(g if expect == "base" else ref), rtol=1e-5,
                               atol=1e-7)
  jax.effects_barrier()
  assert len(counter) == (0 if expect == "base" else 5)
