"""AE-SAM's decisions against the rule by hand."""

import jax
import jax.numpy as jnp
import numpy as np

import sam_optax as so


def test_ae_sam_decisions_match_reference():
  rng = np.random.default_rng(0)
  params = [jnp.zeros(3)]
  scales = np.concatenate([rng.uniform(0.5, 2.0, 30), [5.0, 0.1, 3.0]])
  grads = [[jnp.asarray(rng.normal(size=3) * s, jnp.float32)] for s in scales]
  total, decay, l1, l2 = 20, 0.8, -1.0, 1.0
  tx = so.ae_sam(so.sharpness_aware(0.1), total_steps=total, decay=decay,
                          lambda_start=l1, lambda_end=l2)
  s = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=lambda p: [p[0] + 100.0]))
  mu = var = None
  decisions, ref = [], []
  for t, g in enumerate(grads):
    out, s = step(g, s)
    decisions.append(bool(np.any(np.asarray(out[0]) >= 99.0)))
    sq = float(np.sum(np.asarray(g[0], np.float64) ** 2))
    if t == 0:
      mu, var = sq, 0.0
    else:
      mu = decay * mu + (1 - decay) * sq
      var = decay * var + (1 - decay) * (sq - mu) ** 2
    c = l1 + (l2 - l1) * min(t / total, 1.0)
    ref.append(sq >= mu + c * np.sqrt(var))
  assert decisions == ref
  assert 0 < sum(ref) < len(ref)
  assert int(s.sharp_steps) == sum(ref)
