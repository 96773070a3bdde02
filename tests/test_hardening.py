"""The contract, grown: every row of the method registry (``tests/table.py``) over every dtype
(float16, bfloat16, float32, float64 under x64, complex64) under plain ``jit`` and
``gated_jit``; every numeric hyperparameter of every public transformation through
``optax.inject_hyperparams`` (jitted init and update); params sharded over Explicit and Auto
meshes of 8 CPU devices; a non-finite step skipped by ``skip_if_nonfinite``; constructors fed
nasty values; complex gradients normalized by sqrt(sum |g_i|^2). Every sweep runs its
``FAST`` rows in the developer's fast lane and the rest in the full suite."""

import contextlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax as so
import table
from test_contract import rows as all_rows

# the fast lane's rows of these sweeps: a gradient method, a gated one, an objective one
FAST = ("sam", "looksam", "esam")
rows = lambda names=None: all_rows(names, FAST)

DTYPES = ["float16", "bfloat16", "float32", "float64", "complex64"]
SGD = table.SGD


def make_params(dtype, seed=0):
  rng = np.random.default_rng(seed)

  def draw(*shape):
    x = rng.normal(size=shape) * 0.5
    if dtype.startswith("complex"):
      x = x + 1j * rng.normal(size=shape) * 0.5
    return jnp.asarray(x, dtype)

  return {"w": draw(8, 4), "b": draw(8), "s": draw(3)}


def leaf_terms(p, target=0.3):
  terms = []
  for i, x in enumerate(jax.tree.leaves(p)):
    d = x - target
    a2 = jnp.real(d * jnp.conj(d)) if jnp.iscomplexobj(d) else d * d
    terms.append(jnp.sum((1.0 + i) * a2 + 0.05 * a2 * a2).astype(jnp.float32))
  return terms


def loss(p):
  """A real loss of params of any dtype, with curvature: sum c|x-t|^2 + 0.05|x-t|^4."""
  return sum(leaf_terms(p))


def descent_grad(p):
  """The steepest-ascent direction: for complex params JAX's grad of a real loss is its
  conjugate (https://docs.jax.dev/en/latest/notebooks/autodiff_cookbook.html), and
  optax descends along what it is given, as for any optax optimizer."""
  return jax.tree.map(jnp.conj, jax.grad(loss)(p))


def example_losses(p, loss_fn=None):
  """Per-example losses for ESAM: the loss with three targets around ``loss``'s 0.3 (each
  "example" pulls every leaf, as real examples do); with ``loss_fn`` (the poisoned loss of
  the non-finite test), that loss three times."""
  if loss_fn is not None:
    return jnp.stack([loss_fn(p)] * 3)
  return jnp.stack([sum(leaf_terms(p, target)) for target in (0.2, 0.3, 0.4)])


def closure(name, grad_fn, p, loss_fn=None):
  """The update's closure keywords for a row, on the loss above (or ``loss_fn``, the
  poisoned loss of the non-finite test)."""
  return table.closures(name, loss_fn or loss, p, grad_fn=grad_fn,
                        example_losses=lambda q: example_losses(q, loss_fn))


def signature(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)


def x64_if(dtype):
  return jax.enable_x64(True) if dtype in ("float64", "complex128") else contextlib.nullcontext()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", rows())
def test_every_dtype_under_jit_and_gated_jit(name, dtype):
  if not table.entry(name).complex_params and dtype.startswith("complex"):
    with pytest.raises(TypeError, match="real parameters"):
      table.optimizer(name).init(make_params(dtype))
    return
  with x64_if(dtype):
    params = make_params(dtype)
    opt = table.optimizer(name)
    for kind in ("jit", "gated_jit"):
      traces = []

      def step(p, s):
        traces.append(1)
        u, s = opt.update(descent_grad(p), s, p, **closure(name, descent_grad, p))
        return optax.apply_updates(p, u), s

      run = jax.jit(step) if kind == "jit" else so.gated_jit(step, host_gating=True)
      p, s0 = params, opt.init(params)
      s = s0
      for _ in range(4):
        p, s = run(p, s)
        assert signature(s) == signature(s0), (kind, "state dtype/shape changed")
      assert len(traces) <= (1 if kind == "jit" else 2), (kind, len(traces))
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype
        assert np.all(np.isfinite(np.asarray(a, np.complex128 if dtype.startswith("complex")
                                              else np.float64)))
      assert float(loss(p)) < float(loss(params)), kind


def numpy_direction(g, rho):
  flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(g)])
  return rho / np.sqrt(np.sum(np.abs(flat) ** 2)), flat


def test_complex_sam_direction_is_g_over_its_true_norm():
  rho = 0.1
  tx = so.sharpness_aware(rho)
  # sum of x^2 is exactly 0 for this gradient: a real-valued norm formula loses it
  g = jnp.asarray([1 + 1j, 1 - 1j], jnp.complex64)
  w = jnp.zeros(2, jnp.complex64)
  point, _ = tx.update(g, tx.init(w), w, grad_fn=lambda p: p)  # grad_fn returns where it was called
  np.testing.assert_allclose(np.asarray(point), rho * np.asarray(g) / 2.0, rtol=1e-6)
  g_tree, w_tree = make_params("complex64", 1), make_params("complex64", 2)
  point, state = tx.update(g_tree, tx.init(w_tree), w_tree, grad_fn=lambda p: p)
  scale, g_flat = numpy_direction(g_tree, rho)
  w_flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(w_tree)])
  p_flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(point)])
  np.testing.assert_allclose(p_flat, w_flat + scale * g_flat, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(so.metrics(state)["perturbation_norm"]), rho, rtol=1e-5)


def test_complex_gsam_uses_the_real_inner_product():
  rho, alpha = 0.1, 0.6
  g, g_at, w = (make_params("complex64", s) for s in (3, 4, 5))
  out, _ = so.gsam(rho, alpha).update(g, so.gsam(rho, alpha).init(w), w, grad_fn=lambda p: g_at)
  as_real = lambda t: np.concatenate([np.concatenate([np.asarray(x).real.ravel(),
                                                      np.asarray(x).imag.ravel()])
                                      for x in jax.tree.leaves(t)])
  gp, gv = as_real(g_at), as_real(g)
  unit = gp / np.linalg.norm(gp)
  np.testing.assert_allclose(as_real(out), gp - alpha * (gv - (gv @ unit) * unit), rtol=1e-5,
                             atol=1e-6)


def test_float64_norms_and_state_scalars_stay_float64():
  with jax.enable_x64(True):
    params = make_params("float64")
    for opt in (table.optimizer("looksam"), table.optimizer("ae_sam"), table.optimizer("msam")):
      state = opt.init(params)
      scalars = [x.dtype for x in jax.tree.leaves(state) if jnp.ndim(x) == 0 and
                 jnp.issubdtype(x.dtype, jnp.floating)]
      assert jnp.float64 in scalars or all(d == jnp.float32 for d in scalars)
      run = jax.jit(lambda p, s,
                    opt=opt: opt.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))
      _, new = run(params, state)
      assert signature(new) == signature(state)


# ------------------------------------------------------------ inject_hyperparams


def numeric_arguments(fn, args, kwargs):
  """The parameters of ``fn`` whose value (given, else the default) is a number."""
  is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  given = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
  return {n for n, p in inspect.signature(fn).parameters.items()
          if is_number(given.get(n, p.default))}


INJECTABLE = [n for n in table.NAMES
              if numeric_arguments(table.entry(n).fn, *table.ROWS[n][1].resolve())
              - set(table.entry(n).static)]


@pytest.mark.parametrize("name", rows(INJECTABLE))
def test_every_numeric_hyperparameter_can_be_injected(name):
  entry, example = table.ROWS[name]
  args, kwargs = example.resolve()
  numeric = numeric_arguments(entry.fn, args, kwargs) - set(entry.static)
  injected = table.wrap(name, optax.inject_hyperparams(entry.fn, static_args=entry.static)(
      *args, **kwargs))
  plain = table.wrap(name, entry.fn(*example.resolve()[0], **example.resolve()[1]))
  params = make_params("float32")

  def run(opt):
    state = jax.jit(opt.init)(params)
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p,
                                           **closure(name, jax.grad(loss), p)))
    p = params
    for _ in range(3):
      u, state = step(p, state)
      p = optax.apply_updates(p, u)
    return p, state

  p_inj, s_inj = run(injected)
  p_plain, _ = run(plain)
  hyper = [x for x in jax.tree_util.tree_leaves(s_inj, is_leaf=lambda x: isinstance(x, dict)
                                                 and set(numeric) <= set(x))
           if isinstance(x, dict)]
  assert hyper, (numeric, "not all in the injected state's hyperparams")
  for a, b in zip(jax.tree.leaves(p_inj), jax.tree.leaves(p_plain), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_structural_ints_ask_for_static_args():
  with pytest.raises(TypeError, match=r"static_args=\('ascent_steps',\)"):
    opt = optax.inject_hyperparams(so.sharpness_aware)(rho=0.05, ascent_steps=2)
    jax.jit(opt.init)(make_params("float32"))


# ------------------------------------------------------------------------ meshes


def shard(mesh, params):
  specs = {"w": P("x", None), "b": P("x"), "s": P()}
  return jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in specs.items()})


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("name", rows())
def test_params_sharded_over_a_mesh(name, axis_type):
  params = make_params("float32")
  opt = table.optimizer(name)

  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p, **closure(name, jax.grad(loss), p))
    return optax.apply_updates(p, u), s

  p_ref, s_ref = params, opt.init(params)
  for _ in range(3):
    p_ref, s_ref = jax.jit(step)(p_ref, s_ref)

  mesh = jax.make_mesh((8,), ("x",), axis_types=(getattr(AxisType, axis_type),))
  with jax.set_mesh(mesh):
    p = shard(mesh, params)
    s = jax.jit(opt.init)(p)
    shardings = jax.tree.map(lambda x: x.sharding, (p, s))
    # Auto (GSPMD) may pick other layouts for outputs: pin them, as the README says
    kw = {} if axis_type == "Explicit" else {"out_shardings": shardings}
    run = jax.jit(step, **kw)
    for _ in range(3):
      p, s = run(p, s)
      after = jax.tree.map(lambda x: x.sharding, (p, s))
      for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(shardings), strict=True):
        assert a.is_equivalent_to(b, 1) or a.is_equivalent_to(b, 2), (a, b)
  # Frob-SAM's covariance term is scaled by lam/rho^2 = 200: it multiplies the float32
  # rounding differences of a sharded reduction order by as much
  tol = {"rtol": 1e-3, "atol": 1e-4} if name == "frob_sam" else {"rtol": 1e-5, "atol": 1e-6}
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)


# ---------------------------------------------------------------- non-finite steps


@pytest.mark.parametrize("name", rows())
def test_non_finite_step_is_skipped_and_leaves_the_state(name):
  """The recipe: ``sam_optax.skip_if_nonfinite`` around the whole optimizer. A NaN at the
  perturbed point is skipped: zero update, the inner state exactly as before, the skip
  counted. Rows that do not call the closure on every step (msam never; LookSAM on k-1
  steps of k; the adaptive policy when it skips SAM; weight_ema has no closure) get the NaN
  in the clean gradient as well, so that the poisoned step is one that sees it."""
  params = make_params("float32")
  opt = so.skip_if_nonfinite(table.optimizer(name), max_consecutive_errors=3)
  poisoned = lambda p: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
  closure_not_always_called = not table.entry(name).closure_every_step

  def step(p, s, nan):
    g = jax.grad(loss)(p)
    if nan and closure_not_always_called:
      g = poisoned(g)
    nan_loss = (lambda q: loss(q) * jnp.nan) if nan else None
    u, s = opt.update(g, s, p, **closure(name, poisoned if nan else jax.grad(loss), p, nan_loss))
    return optax.apply_updates(p, u), s

  step = jax.jit(step, static_argnums=2)
  p, s = step(params, opt.init(params), False)
  p_bad, s_bad = step(p, s, True)
  kept, before = s_bad.inner_state, s.inner_state
  if name == "skip_if_nonfinite":
    # the row is itself an apply_if_finite: the inner one zeroes the update and counts the
    # skip (a finite output, which the outer accepts); what it wraps must be untouched
    assert int(kept.notfinite_count) == int(before.notfinite_count) + 1
    kept, before = kept.inner_state, before.inner_state
  for a, b in zip(jax.tree.leaves((p_bad, kept)), jax.tree.leaves((p, before)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # metrics() reports the outermost apply_if_finite: for the nested row, the one that skipped
  assert int(so.metrics(s_bad.inner_state if name == "skip_if_nonfinite" else s_bad)
             ["skipped_steps"]) == 1
  p_next, s_next = step(p_bad, s_bad, False)
  assert int(s_next.notfinite_count) == 0
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(p_next))


# ------------------------------------------------------------------ constructor fuzz

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NASTY = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(min_value=-10**12, max_value=10**12),
    st.sampled_from([None, "0.1", [0.1], (0.1,), {"a": 1}, True, 1 + 2j,
                     np.float32(0.5), np.array([0.1, 0.2]), jnp.asarray(0.3), np.int64(3)]),
)

def constructors():
  """``"entry.argument" -> (row, value -> transformation)``: every numeric argument of every
  public transformation (its example's value replaced), each entry's first row."""
  out = {}
  for name in table.NAMES:
    entry, example = table.ROWS[name]
    if name != entry.name:
      continue
    args, kwargs = example.resolve()
    params = list(inspect.signature(entry.fn).parameters)
    for arg in sorted(numeric_arguments(entry.fn, args, kwargs)):
      pos = params.index(arg)

      def make(v, entry=entry, example=example, arg=arg, pos=pos):
        a, k = example.resolve()
        if pos < len(a):
          a = a[:pos] + (v,) + a[pos + 1:]
        else:
          k = {**k, arg: v}
        return entry.fn(*a, **k)

      out[f"{name}.{arg}"] = (name, make)
  return out


CONSTRUCTORS = constructors()


FAST_CONSTRUCTORS = ("sam",)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n.split(".")[0] in FAST_CONSTRUCTORS else pytest.mark.slow)
    for n in sorted(CONSTRUCTORS)])
@settings(max_examples=20, deadline=None, derandomize=True)
@given(value=NASTY)
def test_constructors_work_or_raise_a_clear_error(name, value):
  """Every input either builds a transformation whose first step is finite, or raises a
  ValueError/TypeError that names the argument; never an error from deep inside JAX."""
  row, make = CONSTRUCTORS[name]
  argument = name.split(".", 1)[1]
  try:
    opt = make(value)
  except (ValueError, TypeError) as e:
    assert f"{argument}=" in str(e), str(e)
    return
  params = make_params("float32")
  chain = table.wrap(row, opt)
  u, _ = chain.update(jax.grad(loss)(params), chain.init(params), params,
                      **closure(row, jax.grad(loss), params))
  moderate = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e3
  if moderate:  # a huge radius or step size may overflow the loss: that is the user's number
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u)), (name, value)
