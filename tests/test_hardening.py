"""The contract table, grown (issue 16): every exported transformation over every dtype
(float16, bfloat16, float32, float64 under x64, complex64) under plain ``jit`` and
``gated_jit``; every numeric hyperparameter through ``optax.inject_hyperparams``
(jitted init and update); params sharded over Explicit and Auto meshes of 8 CPU
devices; complex gradients normalized by sqrt(sum |g_i|^2)."""

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
from test_contract import NEEDS_LOSS, OPTIMIZERS, SGD

DTYPES = ["float16", "bfloat16", "float32", "float64", "complex64"]
# bSAM's precision and posterior are defined for real weights: it says so for complex ones
REAL_ONLY = {"bsam"}


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
  """The update's closure keywords for a row: ``grad_fn``, for the rows that need the
  losses ``value_and_grad_fn`` and ``value``, for ESAM ``per_example_loss_fn``."""
  if name.startswith("esam"):
    return {"per_example_loss_fn": lambda q: example_losses(q, loss_fn)}
  loss_fn = loss_fn or loss
  if name in NEEDS_LOSS:
    return {"value_and_grad_fn": lambda q: (loss_fn(q), grad_fn(q)), "value": loss_fn(p)}
  return {"grad_fn": grad_fn}


def signature(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)


def x64_if(dtype):
  return jax.enable_x64(True) if dtype in ("float64", "complex128") else contextlib.nullcontext()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_dtype_under_jit_and_gated_jit(name, dtype):
  if name in REAL_ONLY and dtype.startswith("complex"):
    with pytest.raises(TypeError, match="real parameters"):
      OPTIMIZERS[name]().init(make_params(dtype))
    return
  with x64_if(dtype):
    params = make_params(dtype)
    opt = OPTIMIZERS[name]()
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
    for opt in (OPTIMIZERS["looksam"](), OPTIMIZERS["adaptive_policy"](), OPTIMIZERS["msam"]()):
      state = opt.init(params)
      scalars = [x.dtype for x in jax.tree.leaves(state) if jnp.ndim(x) == 0 and
                 jnp.issubdtype(x.dtype, jnp.floating)]
      assert jnp.float64 in scalars or all(d == jnp.float32 for d in scalars)
      run = jax.jit(lambda p, s, opt=opt: opt.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))
      _, new = run(params, state)
      assert signature(new) == signature(state)


# ------------------------------------------------------------ inject_hyperparams


def perturbation_factory(ctor):
  """sharpness_aware(rho, perturbation=ctor(**numeric)) with every numeric argument of
  the perturbation visible to inject_hyperparams."""
  params = [inspect.Parameter("rho", inspect.Parameter.KEYWORD_ONLY, default=0.05)]
  params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
             for p in inspect.signature(ctor).parameters.values()
             if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)]

  def factory(*, rho=0.05, **kw):
    return optax.chain(so.sharpness_aware(rho, perturbation=ctor(**kw)), SGD())

  factory.__signature__ = inspect.Signature(params)
  return factory


def chained(ctor):
  def factory(*args, **kwargs):
    return optax.chain(ctor(*args, **kwargs), SGD())
  factory.__signature__ = inspect.signature(ctor)
  return factory


INJECT = {
    "sharpness_aware": (chained(so.sharpness_aware), (), {}),
    "gsam": (chained(so.gsam), (), {}),
    "looksam": (chained(so.looksam), (), {"k": 2}),
    "randomized": (chained(so.randomized), (so.sharpness_aware(0.05),), {}),
    "adaptive_policy": (chained(so.adaptive_policy), (so.sharpness_aware(0.05),), {"total_steps": 10}),
    "sam": (so.sam, (SGD(),), {}),
    "asam": (so.asam, (SGD(),), {}),
    "msam": (so.msam, (SGD(),), {}),
    "apply_if_finite": (so.apply_if_finite, (so.sam(SGD()),), {}),
    "gradient_norm_penalty": (chained(so.gradient_norm_penalty), (), {}),
    "trace_sam": (chained(so.trace_sam), (), {}),
    "frob_sam": (chained(so.frob_sam), (), {}),
    "det_sam": (chained(so.det_sam), (), {}),
    "bsam": (so.bsam, (0.05,), {"num_data": 32}),
    "sampa": (so.sampa, (SGD(),), {}),
    "esam": (chained(so.esam), (), {}),
    "weight_ema": (lambda decay=0.9: optax.chain(SGD(), so.weight_ema(decay)), (), {}),
    **{f"perturbation_{c.__name__}": (perturbation_factory(c), (), {})
       for c in (so.l2, so.adaptive, so.unnormalized, so.linf, so.fisher, so.friendly,
                 so.variance_suppressed, so.stochastic, so.sparse, so.random_weight)},
}


@pytest.mark.parametrize("name", sorted(INJECT))
def test_every_numeric_hyperparameter_can_be_injected(name):
  factory, args, kwargs = INJECT[name]
  numeric = {n for n, p in inspect.signature(factory).parameters.items()
             if (isinstance(p.default, (int, float)) and not isinstance(p.default, bool))
             or (isinstance(kwargs.get(n), (int, float)) and not isinstance(kwargs.get(n), bool))}
  # ints that fix the program's shape (a number of samples) stay static, as the error says
  static = tuple(n for n in ("num_samples",) if n in inspect.signature(factory).parameters)
  numeric -= set(static)
  injected = optax.inject_hyperparams(factory, static_args=static)(*args, **kwargs)
  plain = factory(*args, **kwargs)
  params = make_params("float32")

  row = "det_sam" if name in NEEDS_LOSS or name in ("det_sam", "frob_sam") else name
  per_example = lambda q: jnp.stack([loss(q), 2 * loss(q), 0.5 * loss(q), loss(q) + 1.0])
  extra = {} if row.startswith("esam") else {"per_example_loss_fn": per_example}

  def run(opt):
    state = jax.jit(opt.init)(params)
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p, **extra,
                                           **closure(row, jax.grad(loss), p)))
    p = params
    for _ in range(3):
      u, state = step(p, state)
      p = optax.apply_updates(p, u)
    return p, state

  p_inj, s_inj = run(injected)
  p_plain, _ = run(plain)
  assert numeric and numeric <= set(s_inj.hyperparams), (numeric, set(s_inj.hyperparams))
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
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_params_sharded_over_a_mesh(name, axis_type):
  params = make_params("float32")
  opt = OPTIMIZERS[name]()

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


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_non_finite_step_is_skipped_and_leaves_the_state(name):
  """The recipe: ``sam_optax.apply_if_finite`` around the whole optimizer. A NaN at the
  perturbed point is skipped: zero update, the inner state exactly as before, the skip
  counted. Rows that do not call the closure on every step (msam never; LookSAM on k-1
  steps of k; the adaptive policy when it skips SAM; weight_ema has no closure) get the NaN
  in the clean gradient as well, so that the poisoned step is one that sees it."""
  params = make_params("float32")
  opt = so.apply_if_finite(OPTIMIZERS[name](), max_consecutive_errors=3)
  poisoned = lambda p: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
  closure_not_always_called = name.startswith(("msam", "looksam", "adaptive_policy", "weight_ema", "late_phase"))

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
  if name == "apply_if_finite":
    # the row is itself an apply_if_finite: the inner one zeroes the update and counts the
    # skip (a finite output, which the outer accepts); what it wraps must be untouched
    assert int(kept.notfinite_count) == int(before.notfinite_count) + 1
    kept, before = kept.inner_state, before.inner_state
  for a, b in zip(jax.tree.leaves((p_bad, kept)), jax.tree.leaves((p, before)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # metrics() reports the outermost apply_if_finite: for the nested row, the one that skipped
  assert int(so.metrics(s_bad.inner_state if name == "apply_if_finite" else s_bad)
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

CONSTRUCTORS = {
    "sharpness_aware": lambda v: so.sharpness_aware(v),
    "sharpness_aware.eps": lambda v: so.sharpness_aware(0.05, eps=v),
    "sharpness_aware.ascent_steps": lambda v: so.sharpness_aware(0.05, ascent_steps=v),
    "sam": lambda v: so.sam(SGD(), v),
    "asam.rho": lambda v: so.asam(SGD(), v),
    "asam.eta": lambda v: so.asam(SGD(), 0.5, v),
    "l2": lambda v: so.l2(v),
    "adaptive": lambda v: so.adaptive(v),
    "fisher": lambda v: so.fisher(v),
    "friendly.sigma": lambda v: so.friendly(v),
    "friendly.decay": lambda v: so.friendly(1.0, v),
    "variance_suppressed": lambda v: so.variance_suppressed(v),
    "stochastic.keep_prob": lambda v: so.stochastic(v),
    "stochastic.seed": lambda v: so.stochastic(0.5, v),
    "sparse.sparsity": lambda v: so.sparse(v),
    "sparse.refresh_every": lambda v: so.sparse(0.5, v),
    "sparse.decay": lambda v: so.sparse(0.5, 10, v),
    "random_weight.sigma": lambda v: so.random_weight(v),
    "random_weight.seed": lambda v: so.random_weight(0.01, v),
    "gsam.rho": lambda v: so.gsam(v),
    "gsam.alpha": lambda v: so.gsam(0.05, v),
    "looksam.k": lambda v: so.looksam(0.05, v),
    "looksam.alpha": lambda v: so.looksam(0.05, 5, v),
    "randomized.probability": lambda v: so.randomized(so.sharpness_aware(), v),
    "randomized.seed": lambda v: so.randomized(so.sharpness_aware(), 0.5, v),
    "adaptive_policy.total_steps": lambda v: so.adaptive_policy(so.sharpness_aware(), total_steps=v),
    "adaptive_policy.decay": lambda v: so.adaptive_policy(so.sharpness_aware(), total_steps=5, decay=v),
    "adaptive_policy.lambda_start": lambda v: so.adaptive_policy(so.sharpness_aware(), total_steps=5,
                                                                 lambda_start=v),
    "msam": lambda v: so.msam(SGD(), v),
    "apply_if_finite": lambda v: so.apply_if_finite(so.sam(SGD()), v),
    "gradient_norm_penalty.rho": lambda v: so.gradient_norm_penalty(v),
    "gradient_norm_penalty.alpha": lambda v: so.gradient_norm_penalty(0.1, v),
    "trace_sam.rho": lambda v: so.trace_sam(v),
    "trace_sam.num_samples": lambda v: so.trace_sam(0.01, v),
    "frob_sam.lam": lambda v: so.frob_sam(0.005, v),
    "det_sam.h": lambda v: so.det_sam(h=v),
    "bsam.learning_rate": lambda v: so.bsam(v, num_data=32),
    "bsam.num_data": lambda v: so.bsam(0.05, num_data=v),
    "bsam.prior_precision": lambda v: so.bsam(0.05, num_data=32, prior_precision=v),
    "bsam.b2": lambda v: so.bsam(0.05, num_data=32, b2=v),
    "sampa.rho": lambda v: so.sampa(SGD(), v),
    "sampa.lam": lambda v: so.sampa(SGD(), 0.1, v),
    "esam.gamma": lambda v: so.esam(0.05, v),
    "weight_ema.decay": lambda v: so.weight_ema(v),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
@settings(max_examples=20, deadline=None, derandomize=True)
@given(value=NASTY)
def test_constructors_work_or_raise_a_clear_error(name, value):
  """Every input either builds a transformation whose first step is finite, or raises a
  ValueError/TypeError that names the argument; never an error from deep inside JAX."""
  argument = name.split(".")[-1] if "." in name else None
  try:
    opt = CONSTRUCTORS[name](value)
  except (ValueError, TypeError) as e:
    arg = argument or {"sam": "rho", "l2": "eps", "adaptive": "eta", "fisher": "eta",
                       "variance_suppressed": "theta", "msam": "rho",
                       "apply_if_finite": "max_consecutive_errors"}.get(name, "rho")
    assert f"{arg}=" in str(e), str(e)
    return
  if not hasattr(opt, "init"):
    return
  params = make_params("float32")
  if name.startswith(("det_sam", "frob_sam", "esam", "weight_ema")):
    return  # their update needs other closures; constructing is what is fuzzed here
  factory = name.split(".")[0]
  if factory in ("sam", "asam", "msam", "apply_if_finite", "bsam"):
    chain = opt  # a complete optimizer
  elif factory in ("l2", "adaptive", "fisher", "friendly", "variance_suppressed", "stochastic",
                   "sparse", "random_weight"):
    chain = optax.chain(so.sharpness_aware(0.05, perturbation=opt), SGD())  # a perturbation
  else:
    chain = optax.chain(opt, SGD())
  u, _ = chain.update(jax.grad(loss)(params), chain.init(params), params, grad_fn=jax.grad(loss))
  moderate = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e3
  if moderate:  # a huge radius or step size may overflow the loss: that is the user's number
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u)), (name, value)
