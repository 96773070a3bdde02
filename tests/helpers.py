"""Small models and hand-written references shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np


def random_tree(seed, dtype=jnp.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)) * scale, dtype),
                "bias": jnp.asarray(rng.normal(size=(3,)) * scale, dtype)},
      "out": [jnp.asarray(rng.normal(size=(3, 2)) * scale, dtype),
              jnp.asarray(rng.normal(size=()) * scale, dtype)],
  }


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def unflat(vec, like):
  leaves, treedef = jax.tree.flatten(like)
  out, i = [], 0
  for x in leaves:
    out.append(jnp.asarray(vec[i:i + x.size].reshape(x.shape), x.dtype))
    i += x.size
  return treedef.unflatten(out)


def mlp_init(seed, sizes=(8, 16, 3)):
  rng = np.random.default_rng(seed)
  params = []
  for a, b in zip(sizes[:-1], sizes[1:], strict=False):
    params.append({"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
                   "bias": jnp.zeros((b,), jnp.float32)})
  return params


def mlp_apply(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
  return x @ params[-1]["kernel"] + params[-1]["bias"]


def mlp_loss(params, batch):
  x, y = batch
  logits = mlp_apply(params, x)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def make_data(seed, n=32, d=8, classes=3):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  y = jnp.asarray(rng.integers(0, classes, size=n), jnp.int32)
  return x, y


def mlp_example_losses(params, batch):
  """The per-example terms of ``mlp_loss`` (its mean is ``mlp_loss``), for ESAM."""
  x, y = batch
  return -jnp.take_along_axis(jax.nn.log_softmax(mlp_apply(params, x)), y[:, None], axis=1)[:, 0]


def typeof(x):
  """``jax.typeof`` where this jax has it; the abstract value (shape, dtype) on the oldest jax
  the package supports, which has no sharding in its types."""
  f = getattr(jax, "typeof", None)
  return f(x) if f is not None else jax.core.get_aval(x)


def shard_map(f, **kwargs):
  """``jax.shard_map``, or ``jax.experimental.shard_map.shard_map`` on jax before 0.6."""
  sm = getattr(jax, "shard_map", None)
  if sm is None:
    from jax.experimental.shard_map import shard_map as sm
  return sm(f, **kwargs)
