"""One demo run: training, per-epoch test accuracy and step metrics, checkpoints, sharpness."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import sam_optax as so
from sam_optax import flax as ft
from sam_optax import trajectory
from sam_optax.demo.recipes import Recipe, make_step
from sam_optax.demo.report import dead_units, worst_layer


class Run(NamedTuple):
  """One training run: test accuracy per epoch, train seconds (epochs after the first),
  steps/s, (top eigenvalue, max-sharpness) or None, the final state (clean params), the
  per-epoch means of the step metrics and the dead-unit fraction after each epoch
  (``{name: [per epoch]}``, see :func:`dead_units`) and the epoch it resumed from (0 for a
  fresh run)."""
  accs: list
  train_s: float
  steps_per_s: float
  sharpness: tuple | None
  state: Any
  history: dict
  resumed_from: int = 0
  dead_layers: dict | None = None  # {layer: dead fraction} of the final state


# per-step metrics averaged per epoch (those the optimizer reports)
EPOCH_METRICS = ("loss", "accuracy", "perturbed_loss", "sharpness", "cosine", "perturbation_norm",
                 "clean_grad_norm", "perturbed_grad_norm", "sam_step")


def train_one(model, make_opt, data, *, epochs, batch_size, seed, progress=None,
              with_sharpness=True, checkpoint_dir=None, log=print, label: str = "") -> Run:
  """Trains one (optimizer, seed) run. With ``checkpoint_dir`` it writes an atomic
  checkpoint after every epoch (the newest 3 kept) and, when one is there already,
  resumes from the newest one that restores; the result is bitwise the same as an
  uninterrupted run. ``progress``: a tqdm bar advanced once per epoch, its postfix
  ``label`` and what the run is doing (compiling in the first epoch, then training)."""
  from sam_optax import checkpoint

  x_tr, y_tr, x_te, y_te = data
  key = jax.random.key(seed)
  saf = isinstance(make_opt, Recipe) and make_opt.kind == "saf"
  state = _new_state(model, make_opt, x_tr, len(y_tr), key, saf)
  step = so.gated_jit(make_step(make_opt))
  evaluate = ft.make_linen_eval_step()
  steps_per_epoch = len(y_tr) // batch_size
  recorded = ("test_accuracy", "dead_units") + EPOCH_METRICS
  history = {k: np.zeros(epochs, np.float32) for k in recorded}
  count_dead = dead_units(state, x_tr)
  present: set = set()
  first_epoch, t_train = 0, 0.0

  def snapshot(epoch_done):
    return {"params": state.params, "opt_state": state.opt_state, "batch_stats": state.batch_stats,
            **({"saf": state.saf} if saf else {}),
            "step": state.step, "epoch": np.asarray(epoch_done, np.int32),
            "train_s": np.asarray(t_train, np.float32),
            "history": history, "present": np.array([k in present for k in EPOCH_METRICS])}

  if checkpoint_dir is not None:
    found = checkpoint.restore_latest(checkpoint_dir, snapshot(0), log=log)
    if found is not None:
      first_epoch, saved = found
      state = state.replace(params=saved["params"], opt_state=saved["opt_state"],
                            batch_stats=saved["batch_stats"], step=saved["step"],
                            **({"saf": saved["saf"]} if saf else {}))
      t_train = float(saved["train_s"])
      history = {k: np.asarray(v) for k, v in saved["history"].items()}
      present = {k for k, on in zip(EPOCH_METRICS, np.asarray(saved["present"]), strict=True) if on}
      log(f"resumed from {checkpoint_dir}/step_{first_epoch} (epoch {first_epoch} of {epochs})")
      if progress is not None:
        progress.update(first_epoch)

  rng = np.random.default_rng(seed)
  for _ in range(first_epoch):  # replay the shuffles of the epochs already done
    rng.permutation(len(y_tr))
  n_steps = first_epoch * steps_per_epoch
  for epoch in range(first_epoch, epochs):
    order = rng.permutation(len(y_tr))
    t0 = time.perf_counter()
    state, means = _train_epoch(step, state, (x_tr, y_tr), order, batch_size, key, n_steps, saf)
    n_steps += steps_per_epoch
    if epoch > 0:  # epoch 0 includes compilation
      t_train += time.perf_counter() - t0
    present |= set(means)
    for k, v in means.items():
      history[k][epoch] = v
    params = so.clean_params(state.params, state.opt_state)
    logits = evaluate(state.replace(params=params), jnp.asarray(x_te))
    history["test_accuracy"][epoch] = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_te)))
    history["dead_units"][epoch] = worst_layer(count_dead(params, state.batch_stats))[1]
    if checkpoint_dir is not None:
      checkpoint.save_latest(checkpoint_dir, epoch + 1, snapshot(epoch + 1), keep=3)
    if progress is not None:
      progress.set_postfix_str(f"{label}: training" if label else "training")
      progress.update(1)
  params = so.clean_params(state.params, state.opt_state)
  timed_steps = steps_per_epoch * max(epochs - 1, 1)
  if with_sharpness and progress is not None:
    progress.set_postfix_str("measuring the solution's sharpness (Hessian, ascent)")
  sharp = final_sharpness(state.replace(params=params), x_tr, y_tr) if with_sharpness else None
  curves = {"dead_units": history["dead_units"].tolist(),
            **{k: history[k].tolist() for k in EPOCH_METRICS if k in present}}
  final_dead = {k: float(v) for k, v in count_dead(params, state.batch_stats).items()}
  return Run(history["test_accuracy"].tolist(), t_train, timed_steps / max(t_train, 1e-9), sharp,
             state.replace(params=params), curves, first_epoch, final_dead)


def _new_state(model, make_opt, x_tr, n_train: int, key, saf: bool):
  """The TrainState at the model's init (SAF's with its logit store)."""
  variables = model.init({"params": key}, jnp.asarray(x_tr[:2]), train=False)
  tx = make_opt.make_opt() if isinstance(make_opt, Recipe) else make_opt()
  extra = {"saf": trajectory.saf_init(n_train, 10, lookback=2)} if saf else {}
  return (ft.SAFTrainState if saf else ft.TrainState).create(
      apply_fn=model.apply, params=variables["params"], tx=tx,
      batch_stats=variables.get("batch_stats"), **extra)


def _train_epoch(step, state, data, order, batch_size: int, key, first_step: int, saf: bool):
  """One epoch of steps over ``order``; returns the state and the epoch means of the step
  metrics (those in ``EPOCH_METRICS`` that the optimizer reports)."""
  x_tr, y_tr = data
  step_metrics = []
  for i in range(len(y_tr) // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    batch = (jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
    if saf:  # SAF reads and writes its logit store by example index
      batch = (*batch, jnp.asarray(idx, jnp.int32))
    state, m = step(state, batch, jax.random.fold_in(key, first_step + i))
    step_metrics.append({k: m[k] for k in EPOCH_METRICS if k in m})
  jax.block_until_ready(state.params)
  means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *step_metrics))
  return state, means


def final_sharpness(state, x_tr, y_tr, n: int = 512, rho: float = 0.05):
  """Top Hessian eigenvalue and max-sharpness (L2 ball, rho) of the training loss on a
  fixed subset of the (noisy) training set, BatchNorm in inference mode, no dropout."""
  from sam_optax import sharpness
  x, y = jnp.asarray(x_tr[:n]), jnp.asarray(y_tr[:n])

  def loss_fn(p):
    variables = {"params": p}
    if state.batch_stats is not None:
      variables["batch_stats"] = state.batch_stats
    return ft.softmax_cross_entropy(state.apply_fn(variables, x, train=False), y)

  @jax.jit
  def measure(p):
    # unrolled: XLA:CPU runs convolutions inside loops far slower (jax-ml/jax#12868)
    lam, _ = sharpness.hessian_top_eigenvalue(loss_fn, p, num_iters=20, unroll=True)
    return lam, sharpness.max_sharpness(loss_fn, p, rho, steps=5, unroll=True)

  lam, ms = measure(state.params)
  return float(lam), float(ms)
