"""One contract table that every exported transformation must pass (see STYLE.md).

Each row builds a full optimizer (the transformation chained before sgd, or the
alias itself). The contracts: unused extra keyword arguments are accepted and
ignored; the jitted step compiles once; state dtypes and shapes are stable;
it works under inject_hyperparams (rho), optax.MultiSteps and
optax.apply_if_finite; bf16 params keep their dtype; a zero gradient gives no
NaN.

ESAM scores examples, so it needs per-example losses: every row's update also receives
``per_example_loss_fn=`` (params -> per-example losses of the batch); the other rows ignore
it, as they ignore any unused extra argument.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
from helpers import make_data, mlp_example_losses, mlp_init, mlp_loss

SGD = lambda: optax.sgd(0.05, momentum=0.9)


def core_with(perturbation):
  return lambda rho=0.05: so.sharpness_aware(rho, perturbation=perturbation)


# name -> factory(rho) of the sharpness-aware transformation (before the base optimizer)
TRANSFORMS = {
    "sharpness_aware": lambda rho=0.05: so.sharpness_aware(rho),
    "l2": core_with(so.l2()),
    "adaptive": core_with(so.adaptive()),
    "adaptive_linf": core_with(so.adaptive(base=so.linf())),
    "masked_kernels": core_with(so.masked(so.adaptive(), so.kernel_mask)),
    "masked_norm_layers": core_with(so.masked(so.l2(), so.normalization_mask)),
    "unnormalized": core_with(so.unnormalized()),
    "linf": core_with(so.linf()),
    "fisher": core_with(so.fisher()),
    "friendly": core_with(so.friendly()),
    "variance_suppressed": core_with(so.variance_suppressed()),
    "stochastic": core_with(so.stochastic()),
    "sparse": core_with(so.sparse(refresh_every=2)),
    "random_weight": core_with(so.random_weight()),
    "ascent_steps": lambda rho=0.05: so.sharpness_aware(rho, ascent_steps=3),
    "gsam": lambda rho=0.05: so.gsam(rho),
    "looksam": lambda rho=0.05: so.looksam(rho, k=2),
    "randomized": lambda rho=0.05: so.randomized(so.sharpness_aware(rho), 0.5),
    "adaptive_policy": lambda rho=0.05: so.adaptive_policy(so.sharpness_aware(rho),
                                                           total_steps=10),
    "gradient_norm_penalty": lambda rho=0.1: so.gradient_norm_penalty(rho, 0.8),
    "trace_sam": lambda rho=0.01: so.trace_sam(rho, num_samples=2),
    "trace_sam_sphere": lambda rho=0.01: so.trace_sam(rho, distribution="sphere"),
    "det_sam": lambda rho=1.0: so.det_sam(rho, num_samples=2),
    "frob_sam": lambda rho=0.005: so.frob_sam(rho),
    "wsam": lambda rho=0.05: so.wsam(rho, 0.9),
    "stable_sam": lambda rho=0.05: so.stable_sam(rho),
    "monge": core_with(so.monge()),
    "preconditioned": core_with(so.preconditioned()),
    "late_phase": lambda rho=0.05: so.late_phase(so.sharpness_aware(rho), 0),
}
# Rows whose transformation needs the losses: the contract calls them with
# `value_and_grad_fn=` and the clean `value=` instead of `grad_fn=` (and does not pass
# `value` as an "unused" extra argument, since they use it).
NEEDS_LOSS = {"det_sam", "frob_sam"}
OPTIMIZERS = {name: (lambda f=f: optax.chain(f(), SGD())) for name, f in TRANSFORMS.items()}
OPTIMIZERS["sam"] = lambda: so.sam(SGD())
OPTIMIZERS["asam"] = lambda: so.asam(SGD())
OPTIMIZERS["asam_kernels_only"] = lambda: so.asam(SGD(), kernels_only=True)
OPTIMIZERS["msam"] = lambda: so.msam(SGD())
OPTIMIZERS["msam_adamw"] = lambda: so.msam(optax.adamw(1e-3), rho=1.0)
OPTIMIZERS["apply_if_finite"] = lambda: so.apply_if_finite(so.sam(SGD()))
OPTIMIZERS["bsam"] = lambda: so.bsam(0.05, num_data=32)
OPTIMIZERS["sampa"] = lambda: so.sampa(SGD())
OPTIMIZERS["sampa_unvectorized"] = lambda: so.sampa(SGD(), vectorize=False)
OPTIMIZERS["esam"] = lambda: optax.chain(so.esam(), SGD())
OPTIMIZERS["esam_l2"] = lambda: optax.chain(so.esam(0.05, 0.25, perturbation=so.l2()), SGD())
OPTIMIZERS["weight_ema"] = lambda: optax.chain(SGD(), so.weight_ema(0.9))
OPTIMIZERS["wsam_optimizer_decoupled"] = lambda: so.wsam_optimizer(SGD(), 0.05, 0.9, decoupled=True,
                                                                   learning_rate=0.05)
OPTIMIZERS["late_phase_start_2"] = lambda: optax.chain(so.late_phase(so.sharpness_aware(0.05), 2), SGD())
# functional_sam needs the objective: the table's per_example_loss_fn gives it (the rows'
# names start with esam_ so that the hardening tables pass them the same closure)
OPTIMIZERS["esam_functional_sam"] = lambda: optax.chain(so.functional_sam(), SGD())
OPTIMIZERS["esam_functional_preconditioned"] = lambda: optax.chain(
    so.functional_sam(perturbation=so.preconditioned()), SGD())


def test_table_covers_every_exported_transformation():
  exported = {n for n in so.__all__ if n[0].islower()}
  helpers = {"gated_jit", "kernel_mask", "normalization_mask", "make_perturbation", "local_params",
             "msam_clean_params", "rho_schedule_from_lr", "masked", "metrics", "bsam_posterior",
             "bsam_sample"}
  aliases = {"ae_sam": "adaptive_policy", "skip_if_nonfinite": "apply_if_finite"}
  for new, old in aliases.items():
    assert getattr(so, new) is getattr(so, old)
  covered = set(TRANSFORMS) | set(OPTIMIZERS) | {"masked", "functional_sam", "wsam_optimizer"}
  assert exported - helpers - covered - set(aliases) == set()


def run_steps(opt, params, n=3, dtype=None, extra=None, zero=False, name=None):
  traces = []

  @jax.jit
  def step(p, s, batch):
    traces.append(1)
    grad_fn = lambda q: jax.tree.map(lambda g: g * 0 if zero else g, jax.grad(mlp_loss)(q, batch))
    if name in NEEDS_LOSS:
      def vg(q):
        loss, g = jax.value_and_grad(mlp_loss)(q, batch)
        return loss, jax.tree.map(lambda x: x * 0 if zero else x, g)
      kw = {"value_and_grad_fn": vg, "value": mlp_loss(p, batch)}
    else:
      kw = {"grad_fn": grad_fn}
    u, s = opt.update(grad_fn(p), s, p, **kw,
                      per_example_loss_fn=lambda q: mlp_example_losses(q, batch), **(extra or {}))
    return optax.apply_updates(p, u), s, u

  state = opt.init(params)
  states, updates = [state], []
  for i in range(n):
    params, state, u = step(params, state, make_data(i))
    states.append(state)
    updates.append(u)
  return params, states, updates, len(traces)


def signature(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_contract(name):
  params = mlp_init(0)
  opt = OPTIMIZERS[name]()

  # compiles once; state structure, shapes and dtypes stable
  p_plain, states, updates, traces = run_steps(opt, params, n=4, name=name)
  assert traces == 1
  for s in states[1:]:
    assert signature(s) == signature(states[0])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p_plain))
  assert not np.allclose(jax.tree.leaves(p_plain)[0], jax.tree.leaves(params)[0])

  # an eagerly built state can be donated (no array appears twice in it)
  batch0 = make_data(0)
  closure = ({"value_and_grad_fn": lambda q: jax.value_and_grad(mlp_loss)(q, batch0),
              "value": mlp_loss(params, batch0)} if name in NEEDS_LOSS else
             {"grad_fn": lambda q: jax.grad(mlp_loss)(q, batch0)})
  donated = jax.jit(lambda p, s: opt.update(
      jax.grad(mlp_loss)(p, batch0), s, p, **closure,
      per_example_loss_fn=lambda q: mlp_example_losses(q, batch0)), donate_argnums=1)
  leaves = jax.tree.leaves(opt.init(params))
  assert len({id(x) for x in leaves}) == len(leaves)
  donated(params, opt.init(params))

  # unused extra keyword arguments are accepted and ignored
  extra = {"foo": "bar"} if name in NEEDS_LOSS else {"value": jnp.ones(()), "foo": "bar"}
  p_extra, _, _, _ = run_steps(opt, params, n=4, extra=extra, name=name)
  for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_extra), strict=False):
    np.testing.assert_array_equal(a, b)

  # zero gradient: finite, no NaN
  p_zero, z_states, _, _ = run_steps(opt, params, n=2, zero=True, name=name)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((p_zero, z_states)))

  # bf16 params keep their dtype
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  p16_out, s16, u16, _ = run_steps(opt, p16, n=2, name=name)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16_out))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u16[-1]))
  assert signature(s16[-1]) == signature(s16[0])

  # MultiSteps: accumulate 2 micro-batches; params move only every 2nd call
  ms = optax.MultiSteps(opt, every_k_schedule=2)
  p_ms, ms_states, ms_updates, traces = run_steps(ms, params, n=4, name=name)
  assert traces == 1
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(ms_updates[0]))
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(ms_updates[1]))

  # apply_if_finite: a NaN gradient leaves params and inner state unchanged
  guarded = optax.apply_if_finite(opt, max_consecutive_errors=3)
  state = guarded.init(params)
  nan_grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  nan_kw = ({"value_and_grad_fn": lambda q: (jnp.float32(jnp.nan), nan_grads)}
            if name in NEEDS_LOSS else {"grad_fn": lambda q: nan_grads})
  u, new_state = jax.jit(lambda s: guarded.update(
      nan_grads, s, params, **nan_kw,
      per_example_loss_fn=lambda q: jnp.full((4,), jnp.nan)))(state)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  assert int(new_state.notfinite_count) == 1
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state), strict=False):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(set(TRANSFORMS) - {"random_weight"}))
def test_inject_hyperparams_rho(name):
  """rho injected as a hyperparameter: rho = 0 gives the clean gradient, and changing it
  in the state changes the result without recompiling."""
  params = mlp_init(1)
  batch = make_data(1)
  grad_fn = lambda q: jax.grad(mlp_loss)(q, batch)
  factory = TRANSFORMS[name]
  if name == "randomized":  # make the first draw a SAM step
    factory = lambda rho=0.05: so.randomized(so.sharpness_aware(rho), 1.0)
  tx = optax.inject_hyperparams(factory)(rho=0.0)
  traces = []

  kw = {"grad_fn": grad_fn}
  if name in NEEDS_LOSS:
    kw = {"value_and_grad_fn": lambda q: jax.value_and_grad(mlp_loss)(q, batch),
          "value": mlp_loss(params, batch)}

  @jax.jit
  def update(s):
    traces.append(1)
    return tx.update(grad_fn(params), s, params, **kw)

  state = tx.init(params)
  out0, _ = update(state)
  clean = grad_fn(params)
  for a, b in zip(jax.tree.leaves(out0), jax.tree.leaves(clean), strict=False):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  state.hyperparams["rho"] = jnp.full_like(state.hyperparams["rho"], 0.5)
  out1, _ = update(state)
  assert len(traces) == 1
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out1),
                                                            jax.tree.leaves(clean), strict=False))
  # the MLP has no normalization layer, so SAM-ON's mask selects nothing there
  assert (diff > 1e-4) != (name == "masked_norm_layers")
