"""m-sharpness on one device (``group_size=m``): against a hand-written per-group SAM, the
scaling guide's vmap-with-axis_name recipe, the chunked path, the Flax steps with BatchNorm
and dropout, groups inside devices, and its errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax as so
from sam_optax import flax as ft

B, D = 24, 5
X = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
Y = np.sin(X @ np.arange(1.0, D + 1, dtype=np.float32))


def apply_fn(p, b):
  return jnp.tanh(b[0] @ p["a"] + p["b"])


def example_losses(out, b):
  return (out - b[1]) ** 2


def init():
  return {"a": jnp.asarray(np.random.default_rng(1).normal(size=D), jnp.float32),
          "b": jnp.zeros((), jnp.float32)}


def objective(x=X, y=Y):
  return so.Objective(apply_fn, example_losses, (x, y))


def norm(tree):
  return np.sqrt(sum(float(np.sum(np.square(v))) for v in jax.tree.leaves(tree)))


def by_hand(w, m, rho, direction=lambda g, w: g, x=X, y=Y):
  """Per-group SAM written out: each group of m examples its own epsilon from its own
  gradient (``direction(g, w)`` normalized as the geometry does), the mean of the
  gradients at the perturbed points."""
  out = jax.tree.map(np.zeros_like, w)
  groups = len(y) // m
  for k in range(groups):
    sl = slice(k * m, (k + 1) * m)
    loss_k = lambda p, sl=sl: jnp.mean(example_losses(apply_fn(p, (x[sl], y[sl])), (x[sl], y[sl])))
    g = jax.grad(loss_k)(w)
    d = direction(g, w)
    w_adv = jax.tree.map(lambda a, b: a + rho * b, w, d)
    out = jax.tree.map(lambda o, v: o + np.asarray(v) / groups, out, jax.grad(loss_k)(w_adv))
  return out


def l2_direction(g, w):
  n = norm(g)
  return jax.tree.map(lambda v: v / n, g)


def adaptive_direction(g, w, eta=0.01):
  t = jax.tree.map(lambda a: jnp.abs(a) + eta, w)
  n = norm(jax.tree.map(lambda a, b: a * b, t, g))
  return jax.tree.map(lambda a, b: a * a * b / n, t, g)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("m", [1, 4, 8, B])
def test_against_a_hand_written_per_group_sam(m):
  w = init()
  tx = so.sharpness_aware(0.1, group_size=m)
  out, _ = tx.update(jax.grad(objective().loss)(w), tx.init(w), w, objective=objective())
  assert_close(out, by_hand(w, m, 0.1, l2_direction))


def test_asam_geometry_per_group():
  w = init()
  tx = so.sharpness_aware(0.5, perturbation=so.adaptive(0.01), group_size=6)
  out, _ = tx.update(jax.grad(objective().loss)(w), tx.init(w), w, objective=objective())
  assert_close(out, by_hand(w, 6, 0.5, adaptive_direction))


def test_equals_the_vmap_recipe_of_the_scaling_guide():
  """``sharpness_aware(rho, axis_name="group")`` vmapped over the reshaped batch: each row
  is the mean over groups."""
  m, w = 6, init()
  recipe = so.sharpness_aware(0.1, axis_name="group")
  state = recipe.init(w)

  def group_update(xg, yg):
    grad_fn = jax.grad(lambda p: objective(xg, yg).loss(p))
    return recipe.update(grad_fn(w), state, w, grad_fn=grad_fn)[0]

  rows = jax.vmap(group_update, axis_name="group")(X.reshape(-1, m, D), Y.reshape(-1, m))
  tx = so.sharpness_aware(0.1, group_size=m)
  out, _ = tx.update(jax.grad(objective().loss)(w), tx.init(w), w, objective=objective())
  assert_close(out, jax.tree.map(lambda r: r[0], rows))


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_equals_vectorized(chunk):
  w = init()
  g = jax.grad(objective().loss)(w)
  full = so.sharpness_aware(0.1, group_size=6, telemetry="full")
  chunked = so.sharpness_aware(0.1, group_size=6, group_chunk=chunk, telemetry="full")
  out_f, st_f = jax.jit(lambda s: full.update(g, s, w, objective=objective()))(full.init(w))
  out_c, st_c = jax.jit(lambda s: chunked.update(g, s, w, objective=objective()))(chunked.init(w))
  assert_close(out_f, out_c, rtol=1e-6)
  assert_close(st_f, st_c, rtol=1e-6)


def test_chunks_bound_the_compiled_memory():
  """One chunk of groups at a time keeps fewer per-group gradients alive than all groups at
  once (compiled temp memory, deterministic)."""
  w = {"a": jnp.zeros((256, 256)), "b": jnp.zeros(256)}
  x = jnp.ones((64, 256))
  obj = so.Objective(lambda p, b: jnp.tanh(b @ p["a"] + p["b"]),
                     lambda out, b: jnp.mean(out ** 2, -1), x)

  def temp(tx):
    f = jax.jit(lambda g, s, w: tx.update(g, s, w, objective=obj)[0])
    compiled = f.lower(w, tx.init(w), w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  vectorized = temp(so.sharpness_aware(0.05, group_size=4))
  chunked = temp(so.sharpness_aware(0.05, group_size=4, group_chunk=1))
  assert chunked < vectorized / 4, (chunked, vectorized)


def test_group_size_none_is_sam_bitwise():
  w = init()
  g = jax.grad(objective().loss)(w)
  grad_fn = jax.grad(objective().loss)
  a, _ = so.sharpness_aware(0.1, group_size=None).update(g, so.sharpness_aware(0.1).init(w), w,
                                                          grad_fn=grad_fn)
  b, _ = so.sharpness_aware(0.1).update(g, so.sharpness_aware(0.1).init(w), w, grad_fn=grad_fn)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_telemetry_is_the_mean_over_groups():
  w, m = init(), 6
  tx = so.sharpness_aware(0.1, group_size=m, telemetry="full")
  _, state = tx.update(jax.grad(objective().loss)(w), tx.init(w), w, objective=objective())
  got = so.metrics(state)
  norms, adv_norms, losses, adv_losses = [], [], [], []
  for k in range(B // m):
    obj = objective(X[k * m:(k + 1) * m], Y[k * m:(k + 1) * m])
    value, g = jax.value_and_grad(obj.loss)(w)
    w_adv = jax.tree.map(lambda a, b: a + 0.1 * b / norm(g), w, g)
    adv_value, g_adv = jax.value_and_grad(obj.loss)(w_adv)
    norms.append(norm(g)), adv_norms.append(norm(g_adv))
    losses.append(float(value)), adv_losses.append(float(adv_value))
  np.testing.assert_allclose(float(got["clean_grad_norm"]), np.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(float(got["perturbed_grad_norm"]), np.mean(adv_norms), rtol=1e-5)
  np.testing.assert_allclose(float(got["clean_loss"]), np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(float(got["perturbed_loss"]), np.mean(adv_losses), rtol=1e-5)
  np.testing.assert_allclose(float(got["perturbation_norm"]), 0.1, rtol=1e-5)
  assert -1.0 <= float(got["cosine"]) <= 1.0


def test_auto_radius_with_groups_reads_the_mean_group_losses():
  w, m = init(), 6
  tx = so.sharpness_aware("auto", group_size=m)
  _, state = tx.update(jax.grad(objective().loss)(w), tx.init(w), w, objective=objective())
  got = so.metrics(state)
  np.testing.assert_allclose(float(got["rho_signal"]),
                             float(got["sharpness"]) / float(got["clean_loss"]), rtol=1e-5)
  assert float(got["rho"]) == pytest.approx(0.05)


def test_groups_inside_devices():
  """``axis_name`` with ``group_size``: each device splits its own examples into groups;
  the output is the mean over every group of every device."""
  n, m = 4, 3
  mesh = jax.make_mesh((n,), ("d",))
  w = init()
  tx = so.sharpness_aware(0.1, group_size=m, axis_name="d")
  state = tx.init(w)

  def local(x, y):
    w_local = so.local_params(w, "d")
    obj = objective(x, y)
    out, _ = tx.update(jax.grad(obj.loss)(w_local), state, w_local, objective=obj)
    return jax.tree.map(lambda v: v[None], out)

  x, y = (jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (X, Y))
  out = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"))(x, y)
  out = jax.tree.map(lambda v: np.asarray(v)[0], out)
  assert_close(out, by_hand(w, m, 0.1, l2_direction))


def test_half_precision_and_zero_gradient_stay_finite():
  w = jax.tree.map(lambda v: v.astype(jnp.float16), init())
  tx = so.sharpness_aware("auto", group_size=6)
  obj = so.Objective(lambda p, b: apply_fn(jax.tree.map(lambda v: v.astype(jnp.float32), p), b),
                     example_losses, (X, Y))
  out, state = tx.update(jax.grad(obj.loss)(w), tx.init(w), w, objective=obj)
  assert all(v.dtype == jnp.float16 for v in jax.tree.leaves(out))
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves((out, state)))
  flat = so.Objective(lambda p, b: 0.0 * b[0][:, 0], example_losses, (X, Y * 0))
  out, state = tx.update(jax.grad(flat.loss)(w), tx.init(w), w, objective=flat)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves((out, state)))


def test_errors_name_the_argument_and_the_fix():
  w = init()
  g = jax.grad(objective().loss)(w)
  with pytest.raises(ValueError, match="does not split into groups of 5"):
    so.sharpness_aware(0.1, group_size=5).update(g, so.sharpness_aware(0.1).init(w), w,
                                                 objective=objective())
  with pytest.raises(ValueError, match="with the batch"):
    no_batch = so.Objective(lambda p, b: apply_fn(p, (X, Y)), lambda o, b: (o - Y) ** 2)
    so.sharpness_aware(0.1, group_size=4).update(g, so.sharpness_aware(0.1).init(w), w,
                                                 objective=no_batch)
  with pytest.raises(TypeError, match="objective"):
    so.sharpness_aware(0.1, group_size=4).update(g, so.sharpness_aware(0.1).init(w), w,
                                                 grad_fn=jax.grad(objective().loss))
  with pytest.raises(ValueError, match="group_size"):
    so.sharpness_aware(0.1, group_size=0)
  with pytest.raises(ValueError, match="ascent_steps"):
    so.sharpness_aware(0.1, group_size=4, ascent_steps=2)
  with pytest.raises(ValueError, match="group_chunk"):
    so.sharpness_aware(0.1, group_chunk=2)
  with pytest.raises(ValueError, match="without state"):
    so.sharpness_aware(0.1, group_size=4, perturbation=so.random_weight(0.1)).init(w)


def test_sam_and_asam_take_group_size():
  w = init()
  g = jax.grad(objective().loss)(w)
  out, _ = so.sam(optax.sgd(1.0), 0.1, group_size=6).update(
      g, so.sam(optax.sgd(1.0), 0.1, group_size=6).init(w), w, objective=objective())
  assert_close(out, jax.tree.map(lambda v: -v, by_hand(w, 6, 0.1, l2_direction)))
  tx = so.asam(optax.sgd(1.0), 0.5, group_size=6)
  out, _ = tx.update(g, tx.init(w), w, objective=objective())
  assert_close(out, jax.tree.map(lambda v: -v, by_hand(w, 6, 0.5, adaptive_direction)))


# ------------------------------------------------------------------- Flax steps

class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.25, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


def test_linen_step_with_batchnorm_and_dropout():
  """The linen step with ``group_size``: each group normalizes with its own batch
  statistics and draws its dropout mask from the step's key (the same in both of its
  passes); the running statistics come from the clean full-batch pass."""
  m, rho, lr = 6, 0.1, 0.3
  model = Net()
  labels = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0)
  variables = model.init(jax.random.key(0), X)
  tx = so.sam(optax.sgd(lr), rho, group_size=m)
  state = ft.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                               batch_stats=variables["batch_stats"])
  key = jax.random.key(3)
  new, metrics = ft.make_linen_train_step(subset=True)(state, (X, labels), key)

  def group_loss(p, xs, ys):
    logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, xs,
                            train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ys))

  p = variables["params"]
  mean = jax.tree.map(np.zeros_like, p)
  for k in range(B // m):
    xs, ys = X[k * m:(k + 1) * m], labels[k * m:(k + 1) * m]
    g = jax.grad(group_loss)(p, xs, ys)
    p_adv = jax.tree.map(lambda a, b: a + rho * b / norm(g), p, g)
    mean = jax.tree.map(lambda o, v: o + np.asarray(v) / (B // m),
                        mean, jax.grad(group_loss)(p_adv, xs, ys))
  assert_close(new.params, jax.tree.map(lambda a, b: a - lr * b, p, mean), rtol=2e-5, atol=1e-6)
  _, clean = model.apply(variables, X, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
  assert_close(new.batch_stats, clean["batch_stats"], rtol=1e-6)
  assert np.isfinite(float(metrics["loss"]))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(D, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.bn(self.dense(x)))))


def test_nnx_objective_step_with_batchnorm_and_dropout():
  """``nnx_objective_update`` with ``group_size``: equal to the per-group SAM written with
  ``nnx.split``/``merge`` (each group's passes from the same RNG state, so the same mask in
  both), the BatchNorm statistics from the clean full-batch pass."""
  m, rho, lr = 6, 0.1, 0.3
  labels = jnp.asarray((X[:, 0] > 0).astype(np.int32))
  model = NNXNet(nnx.Rngs(0, dropout=1))
  reference = nnx.clone(model)
  optimizer = nnx.Optimizer(model, so.sam(optax.sgd(lr), rho, group_size=m), wrt=nnx.Param)
  forward = lambda mod, b: mod(b[0])
  losses = lambda logits, b: optax.softmax_cross_entropy_with_integer_labels(logits, b[1])
  ft.nnx_objective_update(model, optimizer, forward, losses, (jnp.asarray(X), labels))

  graphdef, params, rest = nnx.split(reference, nnx.Param, ...)

  def group_loss(p, xs, ys):
    mod = nnx.merge(graphdef, p, rest, copy=True)
    return jnp.mean(losses(mod(xs), (xs, ys)))

  mean = jax.tree.map(np.zeros_like, params)
  for k in range(B // m):
    xs, ys = jnp.asarray(X[k * m:(k + 1) * m]), labels[k * m:(k + 1) * m]
    g = jax.grad(group_loss)(params, xs, ys)
    p_adv = jax.tree.map(lambda a, b: a + rho * b / norm(g), params, g)
    mean = jax.tree.map(lambda o, v: o + np.asarray(v) / (B // m),
                        mean, jax.grad(group_loss)(p_adv, xs, ys))
  want = jax.tree.map(lambda a, b: a - lr * b, params, mean)
  assert_close(nnx.state(model, nnx.Param), want, rtol=2e-5, atol=1e-6)
  clean = nnx.merge(graphdef, params, rest, copy=True)
  clean(jnp.asarray(X))
  assert_close(nnx.state(model, nnx.BatchStat), nnx.state(clean, nnx.BatchStat), rtol=1e-6)
