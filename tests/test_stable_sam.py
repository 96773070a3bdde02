"""StableSAM against its renormalization by hand."""

import jax
import numpy as np

from helpers import flat, make_data, mlp_init, mlp_loss
from references import RHO, sam_point, update
from sam_optax import stable_sam


def test_stable_sam_renormalizes_to_the_clean_norm():
  params, batch = mlp_init(4), make_data(4)
  point, g = sam_point(params, batch)
  g_tilde = flat(jax.grad(mlp_loss)(point, batch))
  expected = g_tilde * np.linalg.norm(g) / np.linalg.norm(g_tilde)
  out, _ = update(stable_sam(RHO), params, batch)
  np.testing.assert_allclose(flat(out), expected, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(flat(out)), np.linalg.norm(g), rtol=1e-5)
