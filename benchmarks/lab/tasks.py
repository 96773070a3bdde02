"""The tasks of the long benchmarks: data, model, base optimizer and training loop.

Every task trains with :func:`sam_optax.flax.make_linen_train_step` (image tasks) or a
plain-function step (the byte-level LM) and records, per epoch: the mean clean training
loss, test accuracy, accuracy on a held-out noisy validation split (where the task has
one), the share of the mislabelled training images whose noisy label the model predicts
(``noisy_fit``), the train seconds, and the epoch means of what the optimizer recorded
(:func:`sam_optax.metrics`: losses at w and w + ε, norms, the cosine, ρ). ``measure=True``
adds the final solution's corrupted-image accuracy, ECE, λ_max and adaptive sharpness.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax as so
from sam_optax import calibration, datasets, sharpness, trajectory
from sam_optax import flax as ft

from .methods import Built, Spec, build

# step metrics averaged per epoch (those a method records)
STEP_METRICS = ("loss", "perturbed_loss", "sharpness", "cosine", "clean_grad_norm",
                "perturbed_grad_norm", "perturbation_norm", "rho", "sam_step")
CORRUPTIONS = ("noise", "blur", "rotate15")


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
  """784-512-512-10 ReLU, no normalization (0.67M parameters)."""
  width: int = 512

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


class Block(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a shortcut (1x1 projection where shapes change)."""
  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(bn()(nn.Conv(self.width, (3, 3), self.stride, use_bias=False)(x)))
    y = bn()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
    if self.stride != 1 or x.shape[-1] != self.width:
      x = bn()(nn.Conv(self.width, (1, 1), self.stride, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A 3x3 stride-2 stem and three residual stages (widths 8, 16, 32), BatchNorm: 20k
  parameters."""
  widths: tuple = (8, 16, 32)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), 2, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for i, w in enumerate(self.widths):
      x = Block(w, 1 if i == 0 else 2)(x, train)
    return nn.Dense(10)(x.mean((1, 2)))


def demo_cnn():
  """The demo's CNN (two BatchNorm convolutions, a BatchNorm head with dropout)."""
  from sam_optax.demo import make_model
  return make_model("cnn")


# ----------------------------------------------------------------------------- data


class Data:
  """Training images and their (noisy) labels, a noisy validation split, the clean test
  set, and the mislabelled training images (their indices and noisy labels)."""

  def __init__(self, x_tr, y_tr, y_clean, x_te, y_te, val: int, split_seed: int = 1234):
    order = np.random.default_rng(split_seed).permutation(len(y_tr))
    tr, va = np.sort(order[val:]), np.sort(order[:val])
    self.x, self.y = np.asarray(x_tr[tr]), np.asarray(y_tr[tr])
    self.x_val, self.y_val = np.asarray(x_tr[va]), np.asarray(y_tr[va])
    self.x_test, self.y_test = np.asarray(x_te), np.asarray(y_te)
    wrong = np.flatnonzero(self.y != y_clean[tr])
    self.noisy = (wrong, self.y[wrong]) if len(wrong) else None


def load(dataset: str, seed: int, noise: float, val: int, limit: int | None = None) -> Data:
  loader = {"digits": datasets.load_digits, "mnist5k": datasets.load_mnist5k,
            "fashion_mnist": datasets.load_fashion_mnist}[dataset]
  x_tr, y_tr, x_te, y_te = loader(seed, noise)
  y_clean = loader(seed, 0.0)[1]
  if limit is not None:  # --quick: a slice of every split
    x_tr, y_tr, y_clean = x_tr[:limit], y_tr[:limit], y_clean[:limit]
    x_te, y_te = x_te[:limit // 2], y_te[:limit // 2]
  return Data(x_tr, y_tr, y_clean, x_te, y_te, val)


# ------------------------------------------------------------------------ evaluation


def clean_params(name: str, state: Any) -> Any:
  """The parameters to evaluate (MSAM keeps the training loop's parameters perturbed)."""
  if name == "msam":
    return so.msam_clean_params(state.params, state.opt_state)
  return state.params


class Evaluator:
  """Jitted predictions, λ_max and adaptive sharpness of one model."""

  def __init__(self, model: nn.Module):
    self.model = model
    self.logits = jax.jit(lambda v, x: model.apply(v, x))

    def sharp(v, x, y):
      rest = {k: a for k, a in v.items() if k != "params"}
      logits = lambda p: model.apply({"params": p, **rest}, x)
      loss = lambda p: jnp.mean(ft.per_example_cross_entropy(logits(p), y))
      lam, _ = sharpness.hessian_top_eigenvalue(loss, v["params"], num_iters=20, unroll=True)
      ada = sharpness.max_sharpness(loss, v["params"], 0.1, perturbation=so.adaptive(), steps=5,
                                    unroll=True)
      return lam, ada

    self.sharp = jax.jit(sharp)

  def probs(self, variables: dict, x: np.ndarray, chunk: int = 5000) -> np.ndarray:
    return np.concatenate([np.asarray(jax.nn.softmax(self.logits(variables,
                                                                 jnp.asarray(x[i:i + chunk]))))
                           for i in range(0, len(x), chunk)])

  def accuracy(self, variables: dict, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(self.probs(variables, x).argmax(-1) == y))


_EVALUATORS: dict = {}


def evaluator(model: nn.Module) -> Evaluator:
  if model not in _EVALUATORS:
    _EVALUATORS[model] = Evaluator(model)
  return _EVALUATORS[model]


def final_measures(ev: Evaluator, variables: dict, data: Data) -> dict:
  """Corrupted-image accuracy (noise, blur, rotation), ECE (15 bins), λ_max (20 power
  iterations) and adaptive sharpness (ASAM geometry, ρ = 0.1, 5 ascent steps), the last two
  on a fixed 1,024-image training probe with its training labels, BatchNorm in inference mode."""
  from benchmarks.claims import common as C
  probs = ev.probs(variables, data.x_test)
  out = {"ece": float(calibration.expected_calibration_error(jnp.asarray(probs),
                                                              jnp.asarray(data.y_test)))}
  shifted = C.corruptions(data.x_test[..., 0], seed=0)
  out["corrupted"] = {k: ev.accuracy(variables, shifted[k][..., None],
                                     data.y_test) for k in CORRUPTIONS}
  out["corrupted_mean"] = float(np.mean(list(out["corrupted"].values())))
  probe = np.random.default_rng(99).choice(len(data.y), min(1024, len(data.y)), replace=False)
  lam, ada = ev.sharp(variables, jnp.asarray(data.x[probe]), jnp.asarray(data.y[probe]))
  out["lambda_max"], out["adaptive_sharpness"] = float(lam), float(ada)
  return out


# --------------------------------------------------------------------- image tasks


class ImageTask:
  """A linen model on an image set with symmetric label noise.

  Args:
    name: the task's name in the store.
    dataset: ``digits``, ``mnist5k`` or ``fashion_mnist``.
    model: a callable returning the linen model.
    noise: the share of training labels replaced by another class.
    lr, weight_decay: the base optimizer, SGD with momentum 0.9 and a cosine schedule.
    batch, epochs: per step, per run.
    val: images of the noisy training set held out for validation (0: none).
    loop: ``"scan"`` (one compiled epoch; no convolutions in it: XLA:CPU runs them slowly
      inside loops) or ``"python"`` (one jitted step per batch; ``gated_jit`` for the
      methods that skip passes).
    limit: use only this many training images (``--quick``).
  """

  def __init__(self, name: str, dataset: str, model: Callable[[], nn.Module], *, noise: float,
               lr: float, weight_decay: float, batch: int, epochs: int, val: int = 0,
               loop: str = "python", limit: int | None = None):
    self.name, self.dataset, self.make_model = name, dataset, model
    self.noise, self.lr, self.wd, self.batch, self.epochs = noise, lr, weight_decay, batch, epochs
    self.val, self.loop, self.limit = val, loop, limit

  def base(self, steps: int) -> optax.GradientTransformation:
    sgd = optax.sgd(optax.cosine_decay_schedule(self.lr, steps), momentum=0.9)
    return sgd if not self.wd else optax.chain(optax.add_decayed_weights(self.wd), sgd)

  def epochs_of(self, spec: Spec) -> int:
    return int(spec.option("epochs", self.epochs))

  def units(self, spec: Spec) -> float:
    """Planned work (epoch-passes) for the progress line."""
    probe = build(spec, optax.sgd(0.1), 10, 1, 10)
    return self.epochs_of(spec) * probe.passes

  def timing_step(self, spec: Spec, seed: int = 0) -> tuple[Callable, Any, Callable]:
    """``(step, state, batch(i))``: the jitted train step of ``spec`` on this task's model
    and batch size, its first state and the i-th batch, for step-time measurements."""
    data = load(self.dataset, seed, self.noise, self.val, self.limit)
    spe = len(data.y) // self.batch
    built = build(spec, self.base(spe), spe, spe, 1)
    state = _init_state(self.make_model(), built, data, seed)
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    step = jax.jit(_make_step(built))
    key = jax.random.key(seed)

    def batch(i):
      idx = jnp.arange(i * self.batch, (i + 1) * self.batch) % len(data.y)
      return (x[idx], y[idx]), jax.random.fold_in(key, i)

    return (lambda state, i: step(state, *batch(i))), state, batch

  def epoch_timer(self, spec: Spec, epochs: int = 2, seed: int = 0) -> Callable[[], float]:
    """A callable that trains ``spec`` for ``epochs`` from a fresh state with this task's
    training loop and returns the seconds it took (compiled on the first call): a short run
    whose schedule has the full run's shape (late-phase SAM in its last quarter, LookSAM's
    and randomized SAM's skipped passes, SAF's and MESA's term), for run-time ratios."""
    data = load(self.dataset, seed, self.noise, self.val, self.limit)
    loop = _Loop(self, spec, data, epochs)
    model = self.make_model()
    key = jax.random.key(seed)
    orders = [jnp.asarray(np.random.default_rng(e).permutation(len(data.y))[: loop.rows]
                          .reshape(loop.spe, self.batch), jnp.int32) for e in range(epochs)]

    def timed() -> float:
      state = _init_state(model, loop.built, data, seed)
      jax.block_until_ready(state.params)
      t0 = time.perf_counter()
      for e, order in enumerate(orders):
        state, _ = loop.epoch(state, order, key, e)
      jax.block_until_ready(state.params)
      return time.perf_counter() - t0

    return timed

  def run(self, spec: Spec, seed: int, tick: Callable, measure: bool = False) -> dict:
    data = load(self.dataset, seed, self.noise, self.val, self.limit)
    epochs = self.epochs_of(spec)
    loop = _Loop(self, spec, data, epochs)
    built, spe = loop.built, loop.spe
    model = self.make_model()
    state = _init_state(model, built, data, seed)
    ev = evaluator(model)
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)
    curves: dict[str, list] = {k: [] for k in ("train_loss", "test_acc", "val_acc", "noisy_fit",
                                               "seconds")}
    for epoch in range(epochs):
      order = rng.permutation(len(data.y))[: loop.rows].reshape(spe, self.batch)
      t0 = time.perf_counter()
      state, means = loop.epoch(state, jnp.asarray(order, jnp.int32), key, epoch)
      jax.block_until_ready(state.params)
      curves["seconds"].append(time.perf_counter() - t0)
      variables = _variables(built, spec, state)
      curves["train_loss"].append(float(means.get("loss", np.nan)))
      curves.setdefault("param_norm", []).append(float(_norm(variables["params"])))
      for k in STEP_METRICS:
        if k in means and k != "loss":
          curves.setdefault(k, []).append(float(means[k]))
      curves["test_acc"].append(ev.accuracy(variables, data.x_test, data.y_test))
      if self.val:
        curves["val_acc"].append(ev.accuracy(variables, data.x_val, data.y_val))
      if data.noisy is not None:
        pred = ev.probs(variables, data.x[data.noisy[0]]).argmax(-1)
        curves["noisy_fit"].append(float(np.mean(pred == data.noisy[1])))
      tick(built.passes, f"epoch {epoch + 1}/{epochs} test {100 * curves['test_acc'][-1]:.2f}")
    out = summarize_curves(curves, epochs)
    out["steps_per_epoch"] = spe
    if measure:
      out.update(final_measures(ev, _variables(built, spec, state), data))
    stats = so.metrics(state.opt_state)
    if "sam_step_fraction" in stats:
      out["sam_step_fraction"] = float(stats["sam_step_fraction"])
    return out


class _Loop:
  """The training loop of one spec on one task's data, shared by a full run and the timing
  run: the method built for ``epochs`` epochs of whole batches, and one epoch over given
  batch index rows as one compiled scan (``loop="scan"``) or one jitted step per batch
  (``gated_jit`` for the methods that skip passes)."""

  def __init__(self, task: ImageTask, spec: Spec, data: Data, epochs: int):
    self.spe = len(data.y) // task.batch
    self.rows = self.spe * task.batch
    steps = epochs * self.spe
    self.built = build(spec, task.base(steps), steps, self.spe, epochs)
    self.x, self.y = jnp.asarray(data.x), jnp.asarray(data.y)
    self.with_indices = self.built.kind == "saf"
    step = _make_step(self.built)
    self.epoch_fn = _scan_epoch(step, self.with_indices) if task.loop == "scan" else None
    self.step_fn = None
    if self.epoch_fn is None:
      self.step_fn = so.gated_jit(step) if self.built.gated else jax.jit(step)

  def epoch(self, state: Any, order: jax.Array, key: jax.Array, epoch: int) -> tuple[Any, dict]:
    """Trains one epoch over ``order`` (``[steps, batch]`` int32 image indices); returns the
    state and the epoch means of the step metrics the method records."""
    first = epoch * self.spe
    if self.epoch_fn is not None:
      state, means = self.epoch_fn(state, self.x, self.y, order, key, first)
      return state, jax.device_get(means)
    sums: dict[str, Any] = {}
    for i in range(self.spe):
      idx = order[i]
      batch = (self.x[idx], self.y[idx]) + ((idx,) if self.with_indices else ())
      state, m = self.step_fn(state, batch, jax.random.fold_in(key, first + i))
      for k in STEP_METRICS:
        if k in m:
          sums[k] = sums.get(k, 0.0) + m[k]
    return state, {k: float(v) / self.spe for k, v in jax.device_get(sums).items()}


def summarize_curves(curves: dict, epochs: int) -> dict:
  """Final and best test accuracy, the test accuracy at the epoch of best validation
  accuracy (the noisy split: what a practitioner can choose), and the curves."""
  test = curves["test_acc"]
  out = {"final": test[-1], "best": max(test), "epochs": epochs, "curves": curves,
         "train_seconds": (float(np.sum(curves["seconds"][1:])) if epochs > 1
                           else curves["seconds"][0])}
  if curves.get("val_acc"):
    chosen = int(np.argmax(curves["val_acc"]))
    out["val_chosen"], out["val_epoch"] = test[chosen], chosen + 1
  if curves.get("noisy_fit"):
    out["noisy_fit"] = curves["noisy_fit"][-1]
  return out


def _init_state(model: nn.Module, built: Built, data: Data, seed: int):
  variables = model.init(jax.random.key(seed), jnp.asarray(data.x[:2]))
  extra = {"saf": trajectory.saf_init(len(data.y), 10, lookback=2)} if built.kind == "saf" else {}
  cls = ft.SAFTrainState if built.kind == "saf" else ft.TrainState
  return cls.create(apply_fn=model.apply, params=variables["params"], tx=built.tx,
                    batch_stats=variables.get("batch_stats"), **extra)


def _make_step(built: Built) -> Callable:
  if built.kind == "plain":   # m-sharpness: the objective carries the batch to split
    return ft.make_linen_train_step(jit=False, **built.step_kwargs)
  if built.kind == "sampa":
    return ft.make_linen_sampa_train_step(jit=False)
  make = {"esam": ft.make_linen_esam_train_step, "saf": ft.make_linen_saf_train_step,
          "mesa": ft.make_linen_mesa_train_step}[built.kind]
  return make(jit=False, **built.step_kwargs)


def _scan_epoch(step: Callable, with_indices: bool) -> Callable:
  """One epoch as one compiled ``lax.scan`` over the batches' index rows; returns the
  state and the epoch means of the step metrics."""

  @jax.jit
  def epoch(state, x, y, order, key, first_step):
    def body(state, row):
      i, idx = row
      batch = (x[idx], y[idx]) + ((idx,) if with_indices else ())
      state, m = step(state, batch, jax.random.fold_in(key, first_step + i))
      return state, {k: jnp.asarray(m[k], jnp.float32) for k in STEP_METRICS if k in m}

    state, ms = jax.lax.scan(body, state, (jnp.arange(order.shape[0]), order))
    return state, jax.tree.map(jnp.mean, ms)

  return epoch


@jax.jit
def _norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _variables(built: Built, spec: Spec, state: Any) -> dict:
  params = clean_params(spec.name, state)
  stats = getattr(state, "batch_stats", None)
  return {"params": params, **({"batch_stats": stats} if stats else {})}
