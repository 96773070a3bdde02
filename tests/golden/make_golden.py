"""Golden outputs of every public transformation and Flax train step, for bit-for-bit refactors.

Two files, each written by running this script against one commit (a ``git worktree`` of
it on ``PYTHONPATH``), before the refactor that the file guards:

* ``golden.npz``: the rows of ``ROWS`` and ``FLAX_ROWS``, from commit e828a15 (before the
  one engine)::

    git worktree add /tmp/golden_src e828a15
    PYTHONPATH=/tmp/golden_src .venv/bin/python tests/golden/make_golden.py   # prints
    sam_optax.__file__

* ``golden_ddf7af2.npz``: the rows of ``ROWS_DDF7AF2`` and ``FLAX_ROWS_DDF7AF2`` (the
  methods added after e828a15, the objective closure, the Flax steps of the methods that
  need more than gradients), from commit ddf7af2 (before the explicit protocol)::

    git worktree add /tmp/golden_ddf ddf7af2
    PYTHONPATH=/tmp/golden_ddf .venv/bin/python tests/golden/make_golden.py ddf7af2

The closures below are written with ``objective=`` (a ``sam_optax.Objective``); the rows
recorded at e828a15 passed the same functions through ESAM's first keywords
(``per_example_loss_fn=``, ``batch=``, ``example_losses=``), which the engine turned into
exactly this objective, so the bits are the same.

``tests/test_golden.py`` imports this module, recomputes every row with whatever
``sam_optax`` is importable and compares the arrays bitwise. The problem definitions
(the rows) live here only, so the generator and the test cannot drift apart.

A row runs ``N_STEPS`` jitted steps (one jitted function per row) of its optimizer on
``mlp_init(0)`` with ``make_data(i)`` (copies of tests/helpers.py's) at step ``i``. Keys of the npz:

* ``{row}/init/state{keystr}``: every leaf of ``opt.init(params)``;
* ``{row}/step{i}/updates{keystr}``, ``{row}/step{i}/params{keystr}``;
* ``{row}/step{i}/state{keystr}``: every leaf of the optimizer state after step ``i``;
* ``{row}/step{i}/metrics/{name}``: ``sam_optax.metrics(state)``, read outside jit.

``keystr`` is ``jax.tree_util.keystr`` of the leaf's path. Flax rows (``linen_*``) record
``params``/``batch_stats`` (the TrainState's), ``state`` (the TrainState without params and
batch_stats: ``.step``, ``.opt_state...``, ``.saf...``) and the metrics dict the train step
returns; the NNX row records the model's ``params``/``batch_stats``, ``state`` (the
optimizer's ``opt_state`` and the model's RNG counters) and the returned metrics.
``__meta__/...`` entries hold the library versions the golden was made with and the CPU
(``cpu_fingerprint``): the comparison is bitwise on that CPU and within a small tolerance on
another, where XLA:CPU may round differently. Both files were re-recorded from their commits
when CI moved to a CPU with other features (the c1603b0 version of this script against
e828a15, this one against ddf7af2); every array of the new recordings is within rtol 1e-3,
atol 1e-5 of the old ones, which the code at those commits was checked against bitwise.
"""

from __future__ import annotations

import os
import sys

# the same XLA set-up as tests/conftest.py, for when this runs as a script
if "jax" not in sys.modules:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
if TESTS not in sys.path:
  sys.path.insert(0, TESTS)

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sam_optax as so  # noqa: E402

jax.config.update("jax_enable_x64", False)

# ------------------------------------------------------ the problem (frozen here)
#
# mlp_init, mlp_apply, mlp_loss, make_data and mlp_example_losses are copies of
# tests/helpers.py at e828a15, so that later edits of helpers.py cannot move the golden;
# main() checks that they still agree with helpers.py when the golden is written.


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


def check_problem_matches_helpers() -> None:
  """The copies above compute what tests/helpers.py computes (checked when writing)."""
  import helpers
  p, b = mlp_init(0), make_data(0)
  pairs = [(p, helpers.mlp_init(0)), (b, helpers.make_data(0)),
           (mlp_loss(p, b), helpers.mlp_loss(p, b)),
           (mlp_example_losses(p, b), helpers.mlp_example_losses(p, b))]
  for ours, theirs in pairs:
    for a, c in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
      np.testing.assert_array_equal(a, c, strict=True)


GOLDEN_PATH = os.path.join(HERE, "golden.npz")
GOLDEN_COMMIT = "e828a15"
N_STEPS = 4
SGD = lambda: optax.sgd(0.05, momentum=0.9)


def _current(name: str, earlier: str) -> Callable:
  """A public function by its current name, or by the earlier one where it had that (the
  generator also runs against the commits the goldens were made from)."""
  return lambda *a, **k: getattr(so, name if name in so.__all__ else earlier)(*a, **k)


ae_sam = _current("ae_sam", "adaptive_policy")
skip_if_nonfinite = _current("skip_if_nonfinite", "apply_if_finite")


def chained(make_transform: Callable[[], optax.GradientTransformation]) -> Callable:
  return lambda: optax.chain(make_transform(), SGD())


def core_with(perturbation_fn: Callable[[], optax.GradientTransformation]) -> Callable:
  return chained(lambda: so.sharpness_aware(0.05, perturbation=perturbation_fn()))


@dataclass(frozen=True)
class Row:
  """make: builds the full optimizer. closure: what ``update`` gets besides
  ``(grads, state, params)``:

  * ``"vg"``: ``value_and_grad_fn=`` and ``value=`` (the clean loss), so the telemetry
    records the losses; the transforms that take no closure ignore both;
  * ``"grad"``: ``grad_fn=`` only (the other path of the gradient oracle);
  * ``"esam"``: ``objective=`` whose outputs are the per-example losses (no batch), ``value=``;
  * ``"esam_subset"``: the same with the batch in the objective (a subset can be taken);
  * ``"esam_example_losses"``: ``"esam"`` with the clean per-example losses given (no value);
  * ``"model"``: ``objective=`` of the MLP's logits and cross-entropies, ``value=``;
  * ``"model_outputs"``: ``"model"`` with the clean logits given (no value);
  * ``"vg_adam"``: ``"vg"`` and ``adam_state=`` (the optimizer's state before the step).
  """
  make: Callable[[], optax.GradientTransformation]
  closure: str = "vg"
  steps: int = N_STEPS


# Every row of tests/test_contract.py's OPTIMIZERS table (same names), plus extra paths.
ROWS: dict[str, Row] = {
    # --- TRANSFORMS rows, chained before sgd(0.05, momentum=0.9)
    "sharpness_aware": Row(chained(lambda: so.sharpness_aware(0.05))),
    "l2": Row(core_with(so.l2)),
    "adaptive": Row(core_with(so.adaptive)),
    "adaptive_linf": Row(core_with(lambda: so.adaptive(base=so.linf()))),
    "masked_kernels": Row(core_with(lambda: so.masked(so.adaptive(), so.kernel_mask))),
    "masked_norm_layers": Row(core_with(lambda: so.masked(so.l2(), so.normalization_mask))),
    "unnormalized": Row(core_with(so.unnormalized)),
    "linf": Row(core_with(so.linf)),
    "fisher": Row(core_with(so.fisher)),
    "friendly": Row(core_with(so.friendly)),
    "variance_suppressed": Row(core_with(so.variance_suppressed)),
    "stochastic": Row(core_with(so.stochastic)),
    "sparse": Row(core_with(lambda: so.sparse(refresh_every=2))),
    "random_weight": Row(core_with(so.random_weight)),
    "ascent_steps": Row(chained(lambda: so.sharpness_aware(0.05, ascent_steps=3))),
    "gsam": Row(chained(lambda: so.gsam(0.05))),
    "looksam": Row(chained(lambda: so.looksam(0.05, k=2))),
    "randomized": Row(chained(lambda: so.randomized(so.sharpness_aware(0.05), 0.5))),
    "adaptive_policy": Row(chained(lambda: ae_sam(so.sharpness_aware(0.05),
                                                              total_steps=10))),
    "gradient_norm_penalty": Row(chained(lambda: so.gradient_norm_penalty(0.1, 0.8))),
    "trace_sam": Row(chained(lambda: so.trace_sam(0.01, num_samples=2))),
    "trace_sam_sphere": Row(chained(lambda: so.trace_sam(0.01, distribution="sphere"))),
    "det_sam": Row(chained(lambda: so.det_sam(1.0, num_samples=2))),
    "frob_sam": Row(chained(lambda: so.frob_sam(0.005))),
    # --- the contract's full optimizers
    "sam": Row(lambda: so.sam(SGD())),
    "asam": Row(lambda: so.asam(SGD())),
    "asam_kernels_only": Row(lambda: so.asam(SGD(), kernels_only=True)),
    "msam": Row(lambda: so.msam(SGD())),
    "msam_adamw": Row(lambda: so.msam(optax.adamw(1e-3), rho=1.0)),
    "apply_if_finite": Row(lambda: skip_if_nonfinite(so.sam(SGD()))),
    "bsam": Row(lambda: so.bsam(0.05, num_data=32)),
    "sampa": Row(lambda: so.sampa(SGD())),
    "sampa_unvectorized": Row(lambda: so.sampa(SGD(), vectorize=False)),
    "esam": Row(chained(lambda: so.esam()), "esam"),
    "esam_l2": Row(chained(lambda: so.esam(0.05, 0.25, perturbation=so.l2())), "esam"),
    "weight_ema": Row(lambda: optax.chain(SGD(), so.weight_ema(0.9))),
    # --- extra paths
    "ascent_steps_adaptive_linf": Row(chained(lambda: so.sharpness_aware(
        0.05, ascent_steps=3, perturbation=so.adaptive(base=so.linf())))),
    "esam_subset": Row(chained(lambda: so.esam()), "esam_subset"),
    "esam_example_losses": Row(chained(lambda: so.esam()), "esam_example_losses"),
    "looksam_k3": Row(chained(lambda: so.looksam(0.05, k=3))),  # 4 steps: pass, reuse x2, pass
    "randomized_p05_seed3": Row(chained(lambda: so.randomized(so.sharpness_aware(0.05),
                                                              probability=0.5, seed=3))),
    # a threshold high enough that the last of the 4 steps skips the second pass
    "adaptive_policy_skips": Row(chained(lambda: ae_sam(
        so.sharpness_aware(0.05), total_steps=4, lambda_start=2.0, lambda_end=2.0))),
    "sharpness_aware_rho_schedule": Row(chained(lambda: so.sharpness_aware(
        optax.linear_schedule(0.01, 0.1, transition_steps=3)))),
    # grad_fn (no losses) instead of value_and_grad_fn, for the transforms with an oracle
    "sharpness_aware_grad_fn": Row(chained(lambda: so.sharpness_aware(0.05)), "grad"),
    "looksam_grad_fn": Row(chained(lambda: so.looksam(0.05, k=2)), "grad"),
    "sampa_grad_fn": Row(lambda: so.sampa(SGD()), "grad"),
}

FLAX_ROWS = ("linen_sam", "linen_looksam", "linen_gsam", "linen_esam_subset", "linen_esam_full",
             "linen_sampa", "linen_saf", "linen_mesa", "nnx_sam")
ALL_ROWS = tuple(ROWS) + FLAX_ROWS

# Recorded at ddf7af2: the contract rows added after e828a15, the objective closure and the
# clean pass's losses/outputs, the base Adam's moments, and the Flax steps of more methods.
ROWS_DDF7AF2: dict[str, Row] = {
    "wsam": Row(chained(lambda: so.wsam(0.05, 0.9))),
    "wsam_optimizer_decoupled": Row(lambda: so.wsam_optimizer(SGD(), 0.05, 0.9, decoupled=True,
                                                               learning_rate=0.05)),
    "stable_sam": Row(chained(lambda: so.stable_sam(0.05))),
    "monge": Row(core_with(so.monge)),
    "preconditioned": Row(core_with(so.preconditioned)),
    "preconditioned_adam": Row(lambda: optax.chain(
        so.sharpness_aware(0.05, perturbation=so.preconditioned(moments="adam")),
        optax.adam(1e-2)), "vg_adam"),
    "late_phase": Row(chained(lambda: so.late_phase(so.sharpness_aware(0.05), 0))),
    "late_phase_start_2": Row(chained(lambda: so.late_phase(so.sharpness_aware(0.05), 2))),
    "esam_functional_sam": Row(chained(lambda: so.functional_sam()), "esam"),
    "esam_functional_preconditioned": Row(chained(
        lambda: so.functional_sam(perturbation=so.preconditioned())), "esam"),
    "functional_sam_objective": Row(chained(lambda: so.functional_sam(0.05)), "model"),
    "functional_sam_outputs": Row(chained(lambda: so.functional_sam(0.05)), "model_outputs"),
    "esam_objective": Row(chained(lambda: so.esam(0.05, 0.5)), "esam_subset"),
    "gsam_objective": Row(chained(lambda: so.gsam(0.05)), "model"),
}
FLAX_ROWS_DDF7AF2 = ("linen_functional_sam", "linen_msam", "linen_late_phase", "linen_bsam",
                     "nnx_objective_esam")
ALL_ROWS_DDF7AF2 = tuple(ROWS_DDF7AF2) + FLAX_ROWS_DDF7AF2
GOLDENS = {"e828a15": (os.path.join(HERE, "golden.npz"), ALL_ROWS),
           "ddf7af2": (os.path.join(HERE, "golden_ddf7af2.npz"), ALL_ROWS_DDF7AF2)}


# ------------------------------------------------------------------------- helpers


def as_numpy(x) -> np.ndarray:
  """A leaf as a numpy array (PRNG key arrays as their uint32 key data)."""
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def flat(tree, prefix: str, out: dict) -> None:
  """Puts every leaf of ``tree`` in ``out`` as ``prefix + keystr(path)``."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = prefix + jax.tree_util.keystr(path)
    if key in out:
      raise AssertionError(f"duplicate golden key {key!r}")
    out[key] = as_numpy(leaf)


def put_metrics(metrics: dict, prefix: str, out: dict) -> None:
  for name, value in metrics.items():
    out[f"{prefix}/metrics/{name}"] = as_numpy(value)


def example_objective(batch, with_batch: bool = False):
  """The per-example losses as an objective whose outputs are the losses themselves
  (what ``per_example_loss_fn=`` became): over the closed-over batch, or over ``batch=``
  (a subset can then be taken)."""
  if with_batch:
    return so.Objective(mlp_example_losses, lambda out, b: out, batch)
  return so.Objective(lambda q, b: mlp_example_losses(q, batch), lambda out, b: out, None)


def model_objective(batch):
  """The MLP's logits and its per-example cross-entropies apart (Functional-SAM's view)."""
  def per_example(logits, b):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), b[1][:, None], axis=1)[:, 0]
  return so.Objective(lambda q, b: mlp_apply(q, b[0]), per_example, batch)


def with_clean(objective, **clean):
  """The clean pass's per-example losses or outputs: fields of the objective where it has
  them (from ddf7af2's successor on), the keywords of ESAM and Functional-SAM before."""
  fields = {"example_losses": "clean_losses", "model_outputs": "clean_outputs"}
  if all(fields[k] in so.Objective._fields for k in clean):
    return {"objective": objective._replace(**{fields[k]: v for k, v in clean.items()})}
  return {"objective": objective, **clean}


def closure(kind: str, p, batch, state=None) -> dict:
  if kind == "vg":
    return {"value_and_grad_fn": lambda q: jax.value_and_grad(mlp_loss)(q, batch),
            "value": mlp_loss(p, batch)}
  if kind == "grad":
    return {"grad_fn": lambda q: jax.grad(mlp_loss)(q, batch)}
  if kind == "esam":
    return {"objective": example_objective(batch), "value": mlp_loss(p, batch)}
  if kind == "esam_subset":
    return {"objective": example_objective(batch, with_batch=True), "value": mlp_loss(p, batch)}
  if kind == "esam_example_losses":
    return with_clean(example_objective(batch), example_losses=mlp_example_losses(p, batch))
  if kind == "model":
    return {"objective": model_objective(batch), "value": mlp_loss(p, batch)}
  if kind == "model_outputs":
    return with_clean(model_objective(batch), model_outputs=mlp_apply(p, batch[0]))
  if kind == "vg_adam":
    return {**closure("vg", p, batch), "adam_state": state}
  raise ValueError(kind)


def compute_mlp_row(name: str) -> dict[str, np.ndarray]:
  row = ROWS[name] if name in ROWS else ROWS_DDF7AF2[name]
  opt = row.make()

  @jax.jit
  def step(p, s, batch):
    u, s = opt.update(jax.grad(mlp_loss)(p, batch), s, p, **closure(row.closure, p, batch, s))
    return optax.apply_updates(p, u), s, u

  params = mlp_init(0)
  state = opt.init(params)
  out: dict[str, np.ndarray] = {}
  flat(state, f"{name}/init/state", out)
  for i in range(row.steps):
    params, state, updates = step(params, state, make_data(i))
    pre = f"{name}/step{i}"
    flat(updates, f"{pre}/updates", out)
    flat(params, f"{pre}/params", out)
    flat(state, f"{pre}/state", out)
    put_metrics(so.metrics(state), pre, out)
  return out


# ------------------------------------------------------------------------- Flax


def flax_data(n: int = 32, d: int = 4):
  x = jax.random.normal(jax.random.key(1), (n, d))
  y = (x[:, 0] > 0).astype(jnp.int32)
  return x, y


def linen_model():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
      x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
      return nn.Dense(3)(x)

  return Net()


def flax_module():
  """The Flax integration: ``sam_optax.flax`` (its home from ddf7af2's successor on), or the
  earlier ``sam_optax.flax_training``."""
  try:
    from sam_optax import flax as ft
  except ImportError:
    from sam_optax import flax_training as ft
  return ft


def compute_linen_row(name: str) -> dict[str, np.ndarray]:
  from sam_optax import trajectory

  ft = flax_module()

  model = linen_model()
  x, y = flax_data()
  variables = model.init(jax.random.key(0), x)
  sgd = lambda: optax.sgd(0.1, momentum=0.9)
  state_cls, extra, batch = ft.TrainState, {}, (x, y)
  if name == "linen_sam":
    tx, step = so.sam(sgd(), rho=0.05), ft.make_linen_train_step()
  elif name == "linen_looksam":
    tx, step = optax.chain(so.looksam(0.05, k=2), sgd()), ft.make_linen_train_step()
  elif name == "linen_gsam":
    tx, step = optax.chain(so.gsam(0.05, alpha=0.3), sgd()), ft.make_linen_train_step()
  elif name == "linen_esam_subset":
    tx, step = optax.chain(so.esam(0.05, 0.5), sgd()), ft.make_linen_esam_train_step(subset=True)
  elif name == "linen_esam_full":
    tx, step = optax.chain(so.esam(0.05, 0.5), sgd()), ft.make_linen_esam_train_step(subset=False)
  elif name == "linen_sampa":
    tx, step = so.sampa(sgd()), ft.make_linen_sampa_train_step()
  elif name == "linen_saf":
    tx = sgd()
    step = ft.make_linen_saf_train_step(steps_per_epoch=1, start_epoch=1)
    state_cls = ft.SAFTrainState
    extra = {"saf": trajectory.saf_init(x.shape[0], 3, lookback=1)}
    batch = (x, y, jnp.arange(x.shape[0]))
  elif name == "linen_mesa":
    tx = optax.chain(sgd(), so.weight_ema(0.9))
    step = ft.make_linen_mesa_train_step(steps_per_epoch=1, start_epoch=0)
  elif name == "linen_functional_sam":
    tx, step = optax.chain(so.functional_sam(0.05), sgd()), ft.make_linen_train_step()
  elif name == "linen_msam":
    tx, step = so.msam(sgd(), rho=0.3), ft.make_linen_train_step()
  elif name == "linen_late_phase":
    tx = optax.chain(so.late_phase(so.sharpness_aware(0.05), 1), sgd())
    step = ft.make_linen_train_step()
  elif name == "linen_bsam":
    tx, step = so.bsam(0.05, num_data=32), ft.make_linen_train_step()
  else:
    raise KeyError(name)
  state = state_cls.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=tx, **extra)
  out: dict[str, np.ndarray] = {}
  for i in range(3):
    state, metrics = step(state, batch, jax.random.key(100 + i))
    pre = f"{name}/step{i}"
    flat(state.params, f"{pre}/params", out)
    flat(state.batch_stats, f"{pre}/batch_stats", out)
    flat(state.replace(params=None, batch_stats=None), f"{pre}/state", out)
    put_metrics(metrics, pre, out)
  return out


def compute_nnx_row(name: str) -> dict[str, np.ndarray]:
  from flax import nnx

  ft = flax_module()

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin1, self.bn = nnx.Linear(4, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
      self.drop, self.lin2 = nnx.Dropout(0.1, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  model = Net(nnx.Rngs(0))
  x, y = flax_data()
  if name == "nnx_sam":
    optimizer = nnx.Optimizer(model, so.sam(optax.sgd(0.1, momentum=0.9)), wrt=nnx.Param)
    step = nnx.jit(ft.nnx_sam_step, static_argnums=2)
    call = lambda: step(model, optimizer, loss_fn, x, y)
  elif name == "nnx_objective_esam":
    tx = optax.chain(so.esam(0.05, 0.5, perturbation=so.l2()), optax.sgd(0.1, momentum=0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    forward = lambda m, b: m(b[0])
    per_example = lambda out, b: optax.softmax_cross_entropy_with_integer_labels(out, b[1])

    @nnx.jit
    def objective_step(model, optimizer, batch):
      loss = ft.nnx_objective_update(model, optimizer, forward, per_example, batch)
      return {"loss": loss, **so.metrics(optimizer.opt_state)}

    call = lambda: objective_step(model, optimizer, (x, y))
  else:
    raise KeyError(name)
  out: dict[str, np.ndarray] = {}
  for i in range(3):
    metrics = call()
    pre = f"{name}/step{i}"
    flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)), f"{pre}/params", out)
    flat(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), f"{pre}/batch_stats", out)
    flat({"opt_state": nnx.to_pure_dict(nnx.state(optimizer.opt_state)),
          "rngs": nnx.to_pure_dict(nnx.state(model, nnx.RngState))}, f"{pre}/state", out)
    put_metrics(metrics, pre, out)
  return out


def compute_row(name: str) -> dict[str, np.ndarray]:
  if name in ROWS:
    return compute_mlp_row(name)
  if name.startswith("linen_"):
    return compute_linen_row(name)
  if name.startswith("nnx_"):
    return compute_nnx_row(name)
  if name in ROWS_DDF7AF2:
    return compute_mlp_row(name)
  raise KeyError(name)


def cpu_fingerprint() -> str:
  """The CPU's model name and a hash of its feature flags (``/proc/cpuinfo``): XLA:CPU
  compiles for the features it finds, so the same program can round differently (by an
  ulp or so) on another CPU generation with the same versions of everything."""
  import hashlib
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
  except OSError:
    import platform
    return platform.processor() or "unknown"
  model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
  flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
  return f"{model} / flags {hashlib.sha256(' '.join(sorted(flags)).encode()).hexdigest()[:12]}"


def versions() -> dict[str, str]:
  import importlib.metadata as md
  import platform
  out = {"python": platform.python_version(), "machine": platform.machine(),
         "cpu": cpu_fingerprint()}
  for pkg in ("jax", "jaxlib", "optax", "flax", "numpy", "chex"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = "absent"
  return out


def main(commit: str = GOLDEN_COMMIT) -> None:
  """Writes the golden of ``commit`` (``e828a15`` or ``ddf7af2``, see the module docstring)."""
  import time
  print("sam_optax from", so.__file__)
  check_problem_matches_helpers()
  path, rows = GOLDENS[commit]
  arrays: dict[str, np.ndarray] = {}
  for name in rows:
    t = time.perf_counter()
    row = compute_row(name)
    if any(not k.startswith(name + "/") for k in row):
      raise AssertionError(name)
    arrays.update(row)
    print(f"{name:32s} {len(row):4d} arrays {time.perf_counter() - t:6.2f} s", flush=True)
  for k, v in versions().items():
    arrays[f"__meta__/{k}"] = np.asarray(v)
  arrays["__meta__/commit"] = np.asarray(commit)
  arrays["__meta__/rows"] = np.asarray(rows)
  np.savez_compressed(path, **arrays)
  print(f"wrote {path}: {len(arrays)} arrays, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else GOLDEN_COMMIT)
