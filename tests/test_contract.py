"""The optax contract, for every row of the method registry (``tests/table.py``).

Each row builds a full optimizer (the transformation chained before sgd, or the complete
optimizer itself). The contract: the jitted step compiles once; state structure, dtypes,
shapes and ``jax.typeof`` stay as ``init`` made them, eager and jitted; unused extra keyword
arguments are accepted and ignored; a zero gradient gives no NaN; bf16 params keep their
dtype; it works under ``optax.MultiSteps`` and ``optax.apply_if_finite``; an eagerly built
state can be donated; ``rho`` injected with ``inject_hyperparams`` takes effect without
recompiling; the jitted step survives a ``jax.export`` round trip bit for bit.

The sweeps over every row are marked slow except for :data:`FAST` (one row per role and
closure kind), which the developer's fast lane (``pytest -m "not slow"``) runs.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export as jax_export

import sam_optax as so
import table
from helpers import make_data, mlp_example_losses, mlp_init, mlp_loss

# one row per role and closure kind: the fast lane's share of every sweep
FAST = ("sam", "looksam", "esam", "msam", "frob_sam")


def rows(names=None, fast=FAST):
  """Every row, the ones outside ``fast`` marked slow."""
  return [pytest.param(n, marks=() if n in fast else pytest.mark.slow)
          for n in (table.NAMES if names is None else names)]


def step_closures(name, p, batch, zero=False):
  scale = (lambda t: jax.tree.map(lambda g: g * 0, t)) if zero else (lambda t: t)
  return table.closures(name, lambda q: mlp_loss(q, batch), p,
                        example_losses=lambda q: mlp_example_losses(q, batch),
                        grad_fn=lambda q: scale(jax.grad(mlp_loss)(q, batch)))


def run_steps(opt, params, name, n=3, extra=None, zero=False):
  traces = []

  @jax.jit
  def step(p, s, batch):
    traces.append(1)
    g = jax.grad(mlp_loss)(p, batch)
    g = jax.tree.map(lambda x: x * 0, g) if zero else g
    u, s = opt.update(g, s, p, **step_closures(name, p, batch, zero), **(extra or {}))
    return optax.apply_updates(p, u), s, u

  state = opt.init(params)
  states, updates = [state], []
  for i in range(n):
    params, state, u = step(params, state, make_data(i))
    states.append(state)
    updates.append(u)
  return params, states, updates, len(traces)


@pytest.mark.parametrize("name", rows())
def test_contract(name):
  params = mlp_init(0)
  opt = table.optimizer(name)

  # compiles once; state structure, shapes and dtypes stable
  p_plain, states, _, traces = run_steps(opt, params, name, n=4)
  assert traces == 1
  for s in states[1:]:
    assert table.signature(s) == table.signature(states[0])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p_plain))
  assert not np.allclose(jax.tree.leaves(p_plain)[0], jax.tree.leaves(params)[0])

  # an eagerly built state can be donated (no array appears twice in it)
  batch0 = make_data(0)
  donated = jax.jit(lambda p, s: opt.update(jax.grad(mlp_loss)(p, batch0), s, p,
                                            **step_closures(name, p, batch0)), donate_argnums=1)
  leaves = jax.tree.leaves(opt.init(params))
  assert len({id(x) for x in leaves}) == len(leaves)
  donated(params, opt.init(params))

  # unused extra keyword arguments are accepted and ignored
  p_extra, _, _, _ = run_steps(opt, params, name, n=4, extra={"foo": "bar", "unused": jnp.ones(())})
  for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_extra), strict=True):
    np.testing.assert_array_equal(a, b)

  # zero gradient: finite, no NaN
  p_zero, z_states, _, _ = run_steps(opt, params, name, n=2, zero=True)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((p_zero, z_states)))

  # bf16 params keep their dtype
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  p16_out, s16, u16, _ = run_steps(opt, p16, name, n=2)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16_out))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u16[-1]))
  assert table.signature(s16[-1]) == table.signature(s16[0])

  # MultiSteps: accumulate 2 micro-batches; params move only every 2nd call
  ms = optax.MultiSteps(opt, every_k_schedule=2)
  _, _, ms_updates, traces = run_steps(ms, params, name, n=4)
  assert traces == 1
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(ms_updates[0]))
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(ms_updates[1]))

  # optax.apply_if_finite: a NaN gradient leaves params and inner state unchanged
  guarded = optax.apply_if_finite(opt, max_consecutive_errors=3)
  state = guarded.init(params)
  nan_grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  nan_kw = table.closures(name, lambda q: jnp.float32(jnp.nan), params,
                          example_losses=lambda q: jnp.full((4,),
                                                            jnp.nan), grad_fn=lambda q: nan_grads)
  u, new_state = jax.jit(lambda s: guarded.update(nan_grads, s, params, **nan_kw))(state)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  assert int(new_state.notfinite_count) == 1
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def typeof_tree(tree):
  return jax.tree.map(lambda x: str(jax.typeof(x)) + str(getattr(jax.typeof(x), "sharding", "")),
                      tree)


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("name", rows())
def test_state_types_are_stable_under_an_explicit_mesh(name, mode):
  """``jax.typeof`` of every state leaf after ``update`` is what ``init`` made, with params
  sharded over an Explicit-axis mesh (the presence flags of the telemetry lost the mesh's
  sharding in an eager step before this release)."""
  from jax.sharding import PartitionSpec as P
  AxisType = getattr(jax.sharding, "AxisType", None)
  if AxisType is None or not hasattr(jax, "set_mesh"):
    pytest.skip("Explicit-axis meshes need a newer jax than this one (jax.sharding.AxisType, "
                "jax.set_mesh); the main test run has it")
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = {"w": jnp.zeros((2, 8, 4), jnp.float16, out_sharding=P(None, "x")) + 0.5,
              "b": jnp.ones((8,), jnp.float16, out_sharding=P("x"))}
    loss = lambda p: sum(jnp.sum(jnp.square(x.astype(jnp.float32) - 0.2))
                         for x in jax.tree.leaves(p))
    opt = table.optimizer(name)
    state = opt.init(params)
    kw = table.closures(name, loss, params,
                        example_losses=lambda q: jnp.stack([loss(q), 2 * loss(q)]))
    update = lambda g, s, p: opt.update(g, s, p, **kw)
    if mode == "jit":
      update = jax.jit(update)
    _, new = update(jax.grad(loss)(params), state, params)
    before, after = typeof_tree(state), typeof_tree(new)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    paths = jax.tree_util.tree_flatten_with_path(before)[0]
    pairs = zip(paths, jax.tree.leaves(after), strict=True)
    changed = [(jax.tree_util.keystr(k), a, b) for (k, a), b in pairs if a != b]
    assert not changed, changed


# rows whose output at rho = 0 is the clean gradient: the transformations that come first in
# the chain (ESAM's is then the selected subset's gradient) and the wrappers that run their
# transformation on the first step
INJECT_RHO = [n for n in table.NAMES if table.entry(n).role in ("first", "wrapper")
              and "rho" in inspect.signature(table.entry(n).fn).parameters
              and not n.startswith("esam") and n != "late_phase_start_2"]


@pytest.mark.parametrize("name", rows(INJECT_RHO))
def test_inject_hyperparams_rho(name):
  """rho injected as a hyperparameter: rho = 0 gives the clean gradient, and changing it in
  the state changes the result without recompiling."""
  entry, example = table.ROWS[name]
  params, batch = mlp_init(1), make_data(1)
  args, kwargs = example.resolve()
  if entry.role == "wrapper":   # rho belongs to the wrapped transformation
    args = (optax.inject_hyperparams(so.sharpness_aware)(rho=0.0), *args[1:])
    if name == "randomized":
      args = (args[0], 1.0)      # a SAM step on the first draw
    tx = entry.fn(*args, **kwargs)
    rho_of = lambda s: s.inner.hyperparams
  else:
    # the example's arguments by name, with the radius replaced by an injected 0
    named = inspect.signature(entry.fn).bind_partial(*args, **kwargs).arguments
    named["rho"] = 0.0
    tx = optax.inject_hyperparams(entry.fn, static_args=entry.static)(**named)
    rho_of = lambda s: s.hyperparams
  kw = step_closures(name, params, batch)
  traces = []

  @jax.jit
  def update(s):
    traces.append(1)
    return tx.update(jax.grad(mlp_loss)(params, batch), s, params, **kw)

  state = tx.init(params)
  out0, _ = update(state)
  clean = jax.grad(mlp_loss)(params, batch)
  for a, b in zip(jax.tree.leaves(out0), jax.tree.leaves(clean), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  rho_of(state)["rho"] = jnp.full_like(rho_of(state)["rho"], 0.5)
  out1, _ = update(state)
  assert len(traces) == 1
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(out1), jax.tree.leaves(clean), strict=True))
  assert diff > 1e-4


@pytest.mark.parametrize("name", rows())
def test_export_round_trip_is_bitwise(name):
  """The jitted step exports (``jax.export``), serializes and runs bit for bit as the live
  one, with no host callback in the program."""
  opt = table.optimizer(name)
  params, batch = mlp_init(0), make_data(0)
  leaves, treedef = jax.tree.flatten((params, opt.init(params)))

  def step(*flat):
    p, s = jax.tree.unflatten(treedef, flat)
    u, s = opt.update(jax.grad(mlp_loss)(p, batch), s, p, **step_closures(name, p, batch))
    return jax.tree.leaves((optax.apply_updates(p, u), s))

  live = jax.jit(step)(*leaves)
  exported = jax_export.export(jax.jit(step))(*leaves)
  out = jax_export.deserialize(exported.serialize()).call(*leaves)
  assert len(out) == len(live)
  for a, b in zip(live, out, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "callback" not in exported.mlir_module()
