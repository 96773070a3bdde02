"""Hand-written references shared by the method tests: SAM's point by hand, the MLP's
gradient in float64, the objective of the MLP's logits and cross-entropies, one update call."""

import jax
import jax.numpy as jnp
import numpy as np

import sam_optax as so
from helpers import flat, mlp_apply, mlp_loss, unflat

RHO = 0.05


def grad_np(params, batch):
  return [{k: np.asarray(v, np.float64) for k, v in layer.items()}
          for layer in jax.grad(mlp_loss)(params, batch)]


def sam_point(params, batch, direction=None, rho=RHO):
  """w + rho d with d = g/|g| (or the given flat direction), by hand."""
  g = flat(jax.grad(mlp_loss)(params, batch))
  d = g / np.linalg.norm(g) if direction is None else direction
  return unflat(flat(params) + rho * d, params), g


def objective(batch):
  return so.Objective(lambda p, b: mlp_apply(p, b[0]), cross_entropy, batch)


def cross_entropy(logits, b):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), b[1][:, None], axis=1)[:, 0]


def update(tx, params, batch, state=None, objective=False, clean_outputs=None, **kw):
  """One ``update`` of ``tx`` on the MLP's batch: with ``grad_fn=``, or with ``objective=``
  (the MLP's logits and cross-entropies; ``clean_outputs``: the clean pass's logits in it)."""
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  state = tx.init(params) if state is None else state
  if objective:
    closure = {"objective": globals()["objective"](batch)._replace(clean_outputs=clean_outputs)}
  else:
    closure = {"grad_fn": grad_fn}
  return tx.update(grad_fn(params), state, params, **closure, **kw)


def find_state(tree, kind):
  """The first node of type ``kind`` in a state (by hand, not through the library)."""
  return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)][0]


def counted_grad_fn(batch, counter):
  """``grad_fn`` of the MLP on ``batch`` that appends to ``counter`` each time it runs."""
  def grad_fn(p):
    jax.debug.callback(lambda: counter.append(1))
    return jax.grad(mlp_loss)(p, batch)
  return grad_fn
