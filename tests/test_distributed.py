"""Data-parallel, FSDP, per-device (shard_map, pmap) and grouped (vmap) SAM on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax as so
from helpers import flat, make_data, mlp_init, mlp_loss, unflat

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
RHO = 0.1
AUTO = jax.sharding.AxisType.Auto  # GSPMD propagation, as most training code uses


def single_device_run(opt, params, batches):
  @jax.jit
  def step(p, s, batch):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s
  p, s = params, opt.init(params)
  for b in batches:
    p, s = step(p, s, b)
  return p


def shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_data_parallel_sam_equals_single_device(layout):
  opt = optax.chain(so.sharpness_aware(RHO, perturbation=so.friendly()),
                    optax.sgd(0.1, momentum=0.9))
  params = mlp_init(0, sizes=(8, 16, 4))
  batches = [make_data(i, n=64, classes=4) for i in range(3)]
  expected = single_device_run(opt, params, batches)

  if layout == "replicated":
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AUTO,))
    p_spec = jax.tree.map(lambda _: P(), params)
  else:  # FSDP-style: kernels split over a second axis
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AUTO, AUTO))
    p_spec = [{"kernel": P(None, "model"), "bias": P()} for _ in params]
  with jax.set_mesh(mesh):
    _run_sharded(opt, params, p_spec, mesh, batches, expected, layout)


def _run_sharded(opt, params, p_spec, mesh, batches, expected, layout):
  p = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, p_spec)
  s = jax.jit(opt.init)(p)
  before = shardings(s)
  types_before = jax.tree.map(lambda x: (x.shape, x.dtype), s)

  def step_fn(p, s, batch):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  # pin the outputs to the inputs' layout (GSPMD would otherwise pick its own for the state)
  step = jax.jit(step_fn, out_shardings=(shardings(p), before), donate_argnums=(0, 1))
  for b in batches:
    b = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), b)
    p, s = step(p, s, b)
  np.testing.assert_allclose(flat(p), flat(expected), rtol=1e-5, atol=1e-6)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), s) == types_before
  for a, b, x in zip(jax.tree.leaves(before), jax.tree.leaves(shardings(s)), jax.tree.leaves(s)):
    assert a.is_equivalent_to(b, x.ndim), (a, b)
  if layout == "fsdp":
    assert p[0]["kernel"].sharding.spec == P(None, "model")


def per_device_reference(params, batch, n_dev, rho=RHO):
  """mean over devices of grad L_i(w + rho g_i/|g_i|), by hand."""
  x, y = batch
  outs = []
  for xi, yi in zip(np.split(np.asarray(x), n_dev), np.split(np.asarray(y), n_dev)):
    bi = (jnp.asarray(xi), jnp.asarray(yi))
    g = flat(jax.grad(mlp_loss)(params, bi))
    w = flat(params) + rho * g / np.linalg.norm(g)
    outs.append(flat(jax.grad(mlp_loss)(unflat(w, params), bi)))
  return np.mean(outs, axis=0)


def global_reference(params, batch, rho=RHO):
  g = flat(jax.grad(mlp_loss)(params, batch))
  return flat(jax.grad(mlp_loss)(unflat(flat(params) + rho * g / np.linalg.norm(g), params), batch))


@pytest.mark.parametrize("mode", ["check_vma_false", "local_params"])
def test_shard_map_per_device_perturbation(mode):
  mesh = jax.make_mesh((8,), ("data",))
  params = mlp_init(1)
  batch = make_data(1, n=64)
  tx = so.sharpness_aware(RHO, axis_name="data")
  state = tx.init(params)

  def body(p, s, b):
    if mode == "local_params":
      p = so.local_params(p, "data")
    grad_fn = lambda q: jax.grad(mlp_loss)(q, b)
    out, _ = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return out

  f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P(),
                    check_vma=(mode != "check_vma_false"))
  b = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), batch)
  p = jax.device_put(params, NamedSharding(mesh, P()))
  out = jax.jit(f)(p, state, b)
  expected = per_device_reference(params, batch, 8)
  np.testing.assert_allclose(flat(out), expected, rtol=1e-4, atol=1e-6)
  # and it really differs from global SAM on the same batch
  assert not np.allclose(expected, global_reference(params, batch), rtol=1e-3, atol=1e-5)


def test_shard_map_default_check_vma_silent_failure_is_caught():
  mesh = jax.make_mesh((8,), ("data",))
  params = mlp_init(2)
  tx = so.sharpness_aware(RHO, axis_name="data")
  state = tx.init(params)

  def body(p, s, b):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, b)  # summed over devices by shard_map
    out, _ = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return out

  f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
  b = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), make_data(2, n=64))
  with pytest.raises(ValueError, match="m-sharpness would silently disappear.*local_params"):
    jax.jit(f)(jax.device_put(params, NamedSharding(mesh, P())), state, b)


def test_pmap_per_device_perturbation():
  params = mlp_init(3)
  batch = make_data(3, n=64)
  tx = so.sharpness_aware(RHO, axis_name="batch")
  state = tx.init(params)

  def body(p, s, b):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, b)
    out, _ = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return out

  split = jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch)
  out = jax.pmap(body, axis_name="batch", in_axes=(None, None, 0))(params, state, split)
  out0 = jax.tree.map(lambda x: x[0], out)
  np.testing.assert_allclose(flat(out0), per_device_reference(params, batch, 8), rtol=1e-4,
                             atol=1e-6)


def test_m_sharpness_on_one_device_with_vmap_groups():
  """Groups of m examples, each with its own perturbation: vmap with a named axis."""
  params = mlp_init(4)
  batch = make_data(4, n=48)
  m = 6
  tx = so.sharpness_aware(RHO, axis_name="group")
  state = tx.init(params)

  def per_group(b):
    grad_fn = lambda q: jax.grad(mlp_loss)(q, b)
    out, _ = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return out

  groups = jax.tree.map(lambda x: x.reshape(-1, m, *x.shape[1:]), batch)
  out = jax.jit(jax.vmap(per_group, axis_name="group"))(groups)
  out0 = jax.tree.map(lambda x: x[0], out)
  np.testing.assert_allclose(flat(out0), per_device_reference(params, batch, 48 // m),
                             rtol=1e-4, atol=1e-6)
