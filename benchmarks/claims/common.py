"""What the claim scripts share: the verdict rule, data, models, training loops, plots, CLI.

Everything trains small models with plain JAX pytrees (lists of ``{"w", "b"}``
layers), so a whole training run is one ``lax.scan`` over steps and several
seeds or hyperparameter settings run as one ``vmap``-ed program: one compile per
optimizer and shape, no Python loop per step. The only convnet (the demo's
BatchNorm CNN, used by ``rho_sensitivity``) is jitted at the step level with a
Python loop over steps, since XLA:CPU runs convolutions inside loops slowly
(jax-ml/jax#12868).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage
from scipy import stats as sps

import sam_optax as so
from sam_optax import datasets

HERE = os.path.dirname(os.path.abspath(__file__))
# where a --quick run writes when no --out is given: never over the committed full run in HERE
QUICK_DIR = os.path.join(HERE, "quick")


def out_dir(out: str | None, quick: bool) -> str:
  """``--out`` when given; else HERE for a full run and QUICK_DIR for a quick one."""
  return out if out is not None else (QUICK_DIR if quick else HERE)
PyTree = Any

# ------------------------------------------------------------------ verdict rule

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
RULE = ("Each test is one statistic measured per seed (mostly a paired difference), with the sign "
        "the claim predicts. supported: the 95% Student-t interval of its mean over >= 3 seeds "
        "excludes 0 on the predicted side and the mean reaches the effect size the claim names (if "
        "any); not supported: the whole interval falls short of that size (without one: lies on "
        "the opposite side of 0); inconclusive: otherwise. A claim is supported when all its "
        "primary tests are, not supported when any primary test is not, inconclusive otherwise.")


def ci95(values: Sequence[float]) -> tuple[float, float, float, float]:
  """Mean, sample std, and the two-sided 95% Student-t interval of the mean."""
  v = np.asarray(values, np.float64)
  n = len(v)
  mean = float(v.mean())
  if n < 2:
    return mean, float("nan"), float("-inf"), float("inf")
  std = float(v.std(ddof=1))
  half = float(sps.t.ppf(0.975, n - 1)) * std / np.sqrt(n)
  return mean, std, mean - half, mean + half


def sign_test(name: str, values: Sequence[float], *, predicted: str = "+", min_effect: float = 0.0,
              unit: str = "", primary: bool = True, what: str = "") -> dict:
  """The one verdict rule of CLAIMS.md, applied to one statistic measured per seed.

  ``values`` hold one number per seed (usually a paired difference, e.g. SAM
  minus the base optimizer on the same seed), oriented so that the claim
  predicts the sign ``predicted`` ("+" or "-"). With n >= 3 seeds:

  * ``supported``: the 95% t-interval of the mean excludes 0 on the predicted
    side, and the mean reaches ``min_effect`` (the size the claim names, e.g.
    +1 accuracy point; 0 when it names none);
  * ``not supported``: the whole interval lies short of ``min_effect`` on the
    predicted side (with ``min_effect`` = 0: the opposite sign, significantly);
  * ``inconclusive``: anything else (the interval straddles the threshold), or
    fewer than 3 seeds.
  """
  if predicted not in ("+", "-"):
    raise ValueError(f"predicted must be '+' or '-', got {predicted!r}")
  s = 1.0 if predicted == "+" else -1.0
  vals = [float(x) for x in values]
  mean, std, lo, hi = ci95(vals)
  # orient: the predicted direction is positive
  olo, ohi, omean = (lo, hi, mean) if s > 0 else (-hi, -lo, -mean)
  if len(vals) < 3 or not np.isfinite(mean):
    verdict = INCONCLUSIVE
  elif olo > 0 and omean >= min_effect:
    verdict = SUPPORTED
  elif ohi < min_effect or (min_effect == 0 and ohi < 0):
    verdict = NOT_SUPPORTED
  else:
    verdict = INCONCLUSIVE
  return {"name": name, "what": what, "predicted": predicted, "min_effect": min_effect,
          "unit": unit,
          "primary": primary, "values": vals, "n": len(vals), "mean": mean, "std": std,
          "ci95": [lo, hi], "verdict": verdict}


def combine(tests: Sequence[dict]) -> str:
  """A claim's verdict from its primary tests: supported if all are, not supported if
  any is not, inconclusive otherwise."""
  prim = [t["verdict"] for t in tests if t["primary"]]
  if not prim:
    return INCONCLUSIVE
  if all(v == SUPPORTED for v in prim):
    return SUPPORTED
  if any(v == NOT_SUPPORTED for v in prim):
    return NOT_SUPPORTED
  return INCONCLUSIVE


def mean_std(values) -> list[float]:
  v = np.asarray(values, np.float64)
  return [float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0]


def fmt(ms, digits: int = 2) -> str:
  return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def kendall_tau(a, b) -> float:
  return float(sps.kendalltau(np.asarray(a), np.asarray(b)).statistic)


def spearman(a, b) -> float:
  return float(sps.spearmanr(np.asarray(a), np.asarray(b)).statistic)


# -------------------------------------------------------------------------- data


def digits_images():
  """Digits as images (N, 8, 8) in [0, 1], fixed split."""
  x_tr, y_tr, x_te, y_te = datasets.load_digits()
  return x_tr[..., 0], y_tr, x_te[..., 0], y_te


def mnist_images():
  """MNIST-5k as images (N, 28, 28) in [0, 1], fixed stratified 4,000 / 1,000 split."""
  x_tr, y_tr, x_te, y_te = datasets.load_mnist5k()
  return x_tr[..., 0], y_tr, x_te[..., 0], y_te


def fashion_images():
  """Fashion-MNIST as images (N, 28, 28) in [0, 1], the standard 60,000 / 10,000 split
  (Debian's ``dataset-fashion-mnist``; see ``sam_optax.datasets.load_fashion_mnist``)."""
  x_tr, y_tr, x_te, y_te = datasets.load_fashion_mnist()
  return x_tr[..., 0], y_tr, x_te[..., 0], y_te


def load_images(name: str):
  return {"digits": digits_images, "mnist5k": mnist_images, "fashion_mnist": fashion_images}[name]()


def flat(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32).reshape(len(x), -1)


def rotate(images: np.ndarray, angles: np.ndarray | float) -> np.ndarray:
  """Each image rotated by its angle (degrees, counter-clockwise), bilinear, same size.

  Angles are rounded to 0.25 degree and each distinct angle is one vectorized
  ``ndimage.rotate`` call over its group of images.
  """
  images = np.asarray(images, np.float32)
  angles = np.broadcast_to(np.round(np.asarray(angles, np.float64) * 4) / 4, (len(images),))
  out = np.empty_like(images)
  for a in np.unique(angles):
    sel = angles == a
    out[sel] = ndimage.rotate(images[sel], a, axes=(2, 1), reshape=False, order=1, mode="constant")
  return np.clip(out, 0.0, 1.0)


def shift(images: np.ndarray, pixels: np.ndarray) -> np.ndarray:
  """Each image translated by integer (dy, dx) pixels, zero fill."""
  out = np.zeros_like(images)
  h, w = images.shape[1:3]
  for i, (dy, dx) in enumerate(np.asarray(pixels, int)):
    src = images[i, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
  return out


def corruptions(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
  """The test set under the shifts of the ``ood`` claim, in the spirit of MNIST-C / CIFAR-10-C.

  Severities scale with the image side (8 for digits, 28 for MNIST): Gaussian
  noise (std 0.3), Gaussian blur (sigma = side/28), rotations by ±15 and ±30
  degrees (random sign per image), translations by side/7 pixels in a random
  direction, and contrast reduced to 40%.
  """
  rng = np.random.default_rng(seed)
  x = np.asarray(images, np.float32)
  side = x.shape[1]
  sign = rng.choice([-1.0, 1.0], len(x))
  step = max(1, round(side / 7))
  dirs = np.array([[0, 1], [0, -1], [1, 0], [-1, 0]])[rng.integers(0, 4, len(x))] * step
  return {
      "noise": np.clip(x + rng.normal(0, 0.3, x.shape).astype(np.float32), 0, 1),
      "blur": ndimage.gaussian_filter(x, sigma=(0, side / 28, side / 28)).astype(np.float32),
      "rotate15": rotate(x, 15 * sign),
      "rotate30": rotate(x, 30 * sign),
      "shift": shift(x, dirs),
      "contrast": (0.4 * x + 0.6 * x.mean(axis=(1, 2), keepdims=True)).astype(np.float32),
  }


def teacher_student(n: int, *, dim: int = 32, classes: int = 10, hidden: int = 64,
                    teacher_seed: int = 0, seed: int = 0, label_noise: float = 0.0):
  """x ~ N(0, I_dim) labelled by the argmax of a fixed random tanh teacher; symmetric
  label noise on a ``label_noise`` share. The teacher depends only on ``teacher_seed``."""
  t = np.random.default_rng(teacher_seed)
  w1 = t.normal(size=(dim, hidden)) / np.sqrt(dim)
  w2 = t.normal(size=(hidden, classes)) / np.sqrt(hidden)
  x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
  y = np.argmax(np.tanh(x @ w1) @ w2, -1).astype(np.int32)
  return x, datasets.add_label_noise(y, label_noise, seed + 7919, classes)


def stdlib_text(validation_mod: int = 10) -> tuple[np.ndarray, np.ndarray, dict]:
  """The bytes of the Python standard library's ``.py`` files (no site-packages), as
  (train, validation) uint8 arrays. A file goes to validation when the first byte
  of the MD5 of its path relative to the stdlib root is 0 mod ``validation_mod``,
  so the split is fixed and whole files never straddle it."""
  root = sysconfig.get_paths()["stdlib"]
  train, val, n_files = [], [], [0, 0]
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
    for f in sorted(filenames):
      if not f.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, f), root)
      with open(os.path.join(dirpath, f), "rb") as fh:
        data = fh.read()
      is_val = hashlib.md5(rel.encode()).digest()[0] % validation_mod == 0
      (val if is_val else train).append(data)
      n_files[is_val] += 1
  info = {"root": root, "python": platform.python_version(), "train_files": n_files[0],
          "validation_files": n_files[1]}
  as_array = lambda parts: np.frombuffer(b"\n".join(parts), np.uint8)
  return as_array(train), as_array(val), info


def batch_indices(rng: np.random.Generator, n: int, steps: int, batch: int) -> np.ndarray:
  """(steps, batch) example indices: epochs of fresh permutations of range(n), cut into
  batches (an epoch boundary may fall inside a batch when n % batch != 0)."""
  need = steps * batch
  reps = -(-need // n)
  order = np.concatenate([rng.permutation(n) for _ in range(reps)])[:need]
  return order.reshape(steps, batch).astype(np.int32)


# ------------------------------------------------------------------------ models


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict]:
  """He-initialized dense layers ``[{"w": (a, b), "b": (b,)}, ...]``."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (a, b), jnp.float32) * jnp.sqrt(2.0 / a),
           "b": jnp.zeros((b,), jnp.float32)} for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_features(params: list[dict], x: jax.Array, act: Callable = jax.nn.relu) -> jax.Array:
  """The last hidden layer's activations."""
  h = x.reshape(x.shape[0], -1)
  for layer in params[:-1]:
    h = act(h @ layer["w"] + layer["b"])
  return h


def mlp_apply(params: list[dict], x: jax.Array, act: Callable = jax.nn.relu) -> jax.Array:
  return mlp_features(params, x, act) @ params[-1]["w"] + params[-1]["b"]


def init_many(seeds: Sequence[int], sizes: Sequence[int]) -> list[dict]:
  """One MLP per seed, stacked on a leading axis (for ``vmap``)."""
  return jax.vmap(lambda k: mlp_init(k, sizes))(jnp.stack([jax.random.key(s) for s in seeds]))


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def ce_loss(params, batch):
  """Mean cross-entropy of the ReLU MLP on ``batch = (x, y)``."""
  x, y = batch
  return cross_entropy(mlp_apply(params, x), y)


# -------------------------------------------------------------------- optimizers
# Each takes the hyperparameters (a dict of scalars, traced under vmap) and the
# static step count, and returns an optax transformation. The base and the
# sharpness-aware version differ only in the sam_optax wrapper around the base.


def gd_base(hp, steps):
  """Plain (full-batch) gradient descent at a constant learning rate."""
  del steps
  return optax.sgd(hp["lr"])


def sgd_base(hp, steps):
  return optax.sgd(optax.cosine_decay_schedule(hp["lr"], steps), momentum=0.9)


def adamw_base(hp, steps):
  return optax.adamw(optax.cosine_decay_schedule(hp["lr"], steps), weight_decay=hp["wd"])


def adamw_const(hp, steps):
  del steps
  return optax.adamw(hp["lr"], weight_decay=hp["wd"])


def with_sam(base: Callable) -> Callable:
  """``base`` wrapped in SAM (``sam_optax.sam``), rho = ``hp["rho"]``."""
  def make(hp, steps):
    return so.sam(base(hp, steps), hp["rho"])
  make.__name__ = f"sam_{base.__name__}"
  return make


def with_asam(base: Callable) -> Callable:
  """``base`` wrapped in ASAM (``sam_optax.asam``, eta 0.01), rho = ``hp["rho"]``."""
  def make(hp, steps):
    return so.asam(base(hp, steps), hp["rho"])
  make.__name__ = f"asam_{base.__name__}"
  return make


def with_geometry(base: Callable, tag: str, geometry: Callable) -> Callable:
  """``base`` after ``sharpness_aware`` with the perturbation ``geometry()``: ``"usam"`` with
  ``unnormalized`` (epsilon = rho * g), ``"psam"`` with ``preconditioned``."""
  def make(hp, steps):
    return optax.chain(so.sharpness_aware(hp["rho"], perturbation=geometry()), base(hp, steps))
  make.__name__ = f"{tag}_{base.__name__}"
  return make


def with_fsam(base: Callable, preconditioned: bool = False) -> Callable:
  """``base`` after Functional-SAM (``functional_sam``), with the preconditioned geometry when
  ``preconditioned``. Needs ``objective=`` at each step: give :func:`fit` an ``objective_of``."""
  def make(hp, steps):
    geometry = so.preconditioned() if preconditioned else None
    return optax.chain(so.functional_sam(hp["rho"], perturbation=geometry), base(hp, steps))
  make.__name__ = f"{'fpsam' if preconditioned else 'fsam'}_{base.__name__}"
  return make


OPTIMIZERS: dict[str, Callable] = {}
for _base in (gd_base, sgd_base, adamw_base, adamw_const):
  _name = _base.__name__.replace("_base", "")
  OPTIMIZERS[_name] = _base
  OPTIMIZERS[f"sam_{_name}"] = with_sam(_base)
  OPTIMIZERS[f"asam_{_name}"] = with_asam(_base)
  OPTIMIZERS[f"usam_{_name}"] = with_geometry(_base, "usam", so.unnormalized)
  OPTIMIZERS[f"psam_{_name}"] = with_geometry(_base, "psam", so.preconditioned)
  OPTIMIZERS[f"fsam_{_name}"] = with_fsam(_base)
  OPTIMIZERS[f"fpsam_{_name}"] = with_fsam(_base, preconditioned=True)


# ------------------------------------------------------------------ training loop


def train_scan(loss_fn: Callable, make_opt: Callable, params: PyTree, hp: dict, data: PyTree,
               idx: jax.Array, log_every: int = 0, measure: Callable | None = None,
               measure_every: int = 0, objective_of: Callable | None = None):
  """One training run as a ``lax.scan`` over the rows of ``idx`` (steps, batch).

  ``loss_fn(params, batch)`` with ``batch = tree_map(lambda a: a[rows], data)``;
  the optimizer gets ``grad_fn`` (the same batch's gradient closure), which the
  plain base optimizers ignore, and with ``objective_of(batch) -> sam_optax.Objective``
  (the model and its per-example loss, whose mean must be ``loss_fn``) also
  ``objective=``, which Functional-SAM needs and the others ignore. With ``measure(params, data) ->
  pytree`` and
  ``measure_every = k``, the scan is nested (an outer scan over blocks of k
  steps), so the measurement runs at the start and after every block without a
  ``cond`` (which ``vmap`` would turn into running both branches).

  Returns ``(params, losses)``, the clean training loss per step (or its mean
  over blocks of ``log_every`` steps), and with ``measure`` also the stacked
  measurements (first axis: blocks + 1).
  """
  steps = idx.shape[0]
  opt = optax.with_extra_args_support(make_opt(hp, steps))

  def step(carry, rows):
    p, s = carry
    batch = jax.tree.map(lambda a: a[rows], data)
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    extra = {} if objective_of is None else {"objective": objective_of(batch)}
    updates, s = opt.update(g, s, p, grad_fn=lambda q: jax.grad(loss_fn)(q, batch), **extra)
    return (optax.apply_updates(p, updates), s), loss

  carry0 = (params, opt.init(params))
  if measure is None:
    (params, _), losses = jax.lax.scan(step, carry0, idx)
    if log_every:
      losses = losses[: steps // log_every * log_every].reshape(-1, log_every).mean(1)
    return params, losses
  blocks = steps // measure_every
  idx = idx[: blocks * measure_every].reshape(blocks, measure_every, -1)

  def block(carry, rows):
    carry, losses = jax.lax.scan(step, carry, rows)
    return carry, (losses.mean(), measure(carry[0], data))

  first = measure(params, data)
  (params, _), (losses, measured) = jax.lax.scan(block, carry0, idx)
  measured = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, measured)
  return params, losses, measured


@functools.cache
def _compiled_fit(loss_fn, make_opt, data_axis, log_every, measure, measure_every, objective_of):
  run = functools.partial(train_scan, loss_fn, make_opt, log_every=log_every, measure=measure,
                          measure_every=measure_every, objective_of=objective_of)
  return jax.jit(jax.vmap(lambda p, hp, d, i: run(p, hp, d, i), in_axes=(0, 0, data_axis, 0)))


def fit(loss_fn: Callable, opt: str | Callable, params: PyTree, hp: dict, data: PyTree,
        idx: np.ndarray, *, data_per_run: bool = False, log_every: int = 0,
        measure: Callable | None = None, measure_every: int = 0,
        objective_of: Callable | None = None):
  """Trains ``R`` models at once: ``params`` and every ``hp`` value and ``idx`` carry a
  leading axis of length R (seeds x settings; scalars in ``hp`` are broadcast);
  ``data`` is shared unless ``data_per_run``. One compile per (loss, optimizer,
  measurement, shapes). ``objective_of``: as in :func:`train_scan` (needed by the
  Functional-SAM optimizers). Returns what :func:`train_scan` returns, stacked."""
  make_opt = OPTIMIZERS[opt] if isinstance(opt, str) else opt
  r = len(idx)
  hp = {k: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (r,)) for k, v in hp.items()}
  f = _compiled_fit(loss_fn, make_opt, 0 if data_per_run else None, log_every, measure,
                    measure_every, objective_of)
  return f(params, hp, data, jnp.asarray(idx))


def tile(tree: PyTree, times: int) -> PyTree:
  """Repeats a stacked pytree ``times`` times along its leading axis (settings x seeds)."""
  return jax.tree.map(lambda a: jnp.concatenate([a] * times, 0), tree)


@jax.jit
def _accuracy_many(params, x, y):
  return jax.vmap(lambda p: jnp.mean(jnp.argmax(mlp_apply(p, x), -1) == y))(params)


def accuracy(params: PyTree, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Accuracy (%) of each of the stacked MLPs on (x, y)."""
  return 100 * np.asarray(_accuracy_many(params, jnp.asarray(flat(x)), jnp.asarray(y)))


def unstack(tree: PyTree, i: int) -> PyTree:
  return jax.tree.map(lambda a: a[i], tree)


def repetition_sweep(loss_fn: Callable, params0: PyTree, pool: PyTree, *, steps: int, batch: int,
                     epochs: Sequence[int], seeds: Sequence[int], runs: dict, evaluate: Callable,
                     objective_of: Callable | None = None) -> dict:
  """Fixed steps, varying repetition: for each E in ``epochs``, every run trains on the
  first ``steps * batch // E`` examples of ``pool`` (so E passes over them at full
  length). ``runs = {name: (optimizer, hp, step_fraction)}``; a fraction of 0.5
  gives a run of half the steps over the same examples (SAM at the base
  optimizer's compute). Runs of one seed and E share the batch order; ``objective_of``
  goes to :func:`fit` (for Functional-SAM). Returns
  ``{name: {E: evaluate(params)}}`` (one value per seed)."""
  out = {name: {} for name in runs}
  for e in epochs:
    n = steps * batch // e
    idx = np.stack([batch_indices(np.random.default_rng([s, e]), n, steps, batch) for s in seeds])
    for name, (opt, hp, frac) in runs.items():
      params, _ = fit(loss_fn, opt, params0, hp, pool, idx[:, : int(round(steps * frac))],
                      objective_of=objective_of)
      out[name][e] = np.asarray(evaluate(params))
    print(f"  E={e} (n={n}): " + ", ".join(f"{k} {np.mean(v[e]):.3f}" for k, v in out.items()),
          flush=True)
  return out


def growth(gain: dict) -> np.ndarray:
  """Per seed: the mean gain over the repeated settings (E > 1) minus the one-pass gain."""
  es = sorted(gain)
  return np.mean([gain[e] for e in es[1:]], axis=0) - gain[es[0]]


# ------------------------------------------------------------------- measurement


def linear_probe(feats_tr: jax.Array, y_tr: jax.Array, feats_te: jax.Array, y_te: jax.Array, *,
                 steps: int = 300, lr: float = 0.05, wd: float = 1e-4) -> jax.Array:
  """Accuracy (%) of a softmax-regression probe on frozen features (standardized with the
  training features' statistics), trained full-batch with Adam. Stacked inputs on a
  leading model axis give one probe per model."""

  def one(ftr, fte):
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    params = {"w": jnp.zeros((ftr.shape[1], 10)), "b": jnp.zeros(10)}
    opt = optax.adamw(lr, weight_decay=wd)

    def loss(p):
      return cross_entropy(ftr @ p["w"] + p["b"], y_tr)

    def step(carry, _):
      p, s = carry
      u, s = opt.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return 100 * jnp.mean(jnp.argmax(fte @ p["w"] + p["b"], -1) == y_te)

  return jax.jit(jax.vmap(one))(feats_tr, feats_te)


# ------------------------------------------------------------------------- plots


def plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as pyplot
  return pyplot


def save(fig, out: str, name: str) -> str:
  """Saves ``fig`` as ``<out>/plots/<name>.png``; returns the path relative to ``out``."""
  os.makedirs(os.path.join(out, "plots"), exist_ok=True)
  rel = os.path.join("plots", f"{name}.png")
  fig.tight_layout()
  fig.savefig(os.path.join(out, rel), dpi=110)
  plt().close(fig)
  return rel


def errorbar(ax, x, runs, label, **kw):
  """Mean ± std over seeds (``runs`` shaped (seeds, len(x)))."""
  runs = np.asarray(runs, np.float64)
  ax.errorbar(x, runs.mean(0), yerr=runs.std(0, ddof=1) if len(runs) > 1 else None, label=label,
              capsize=3, marker="o", ms=4, **kw)


def repetition_axes(axes_and_labels, epochs, steps: int) -> None:
  """Formats the panels of a :func:`repetition_sweep` plot: passes over the data on a log x
  axis labelled at each swept value, the y label, a grid and the legend."""
  for ax, ylabel in axes_and_labels:
    ax.set_xscale("log")
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.minorticks_off()
    ax.set_xlabel(f"passes over the data (fixed {steps} steps)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------- the CLI


def record(name: str, *, claim: str, published: str, protocol: str, tests: list[dict],
           figures: dict, plots: list[str], quick: bool, seconds: float) -> dict:
  """A claim's entry in results.json."""
  return {"name": name, "verdict": combine(tests), "claim": claim, "published": published,
          "protocol": protocol, "tests": tests, "figures": figures, "plots": plots,
          "quick": quick, "seconds": round(seconds, 1)}


def protocol_of(doc: str) -> str:
  """A script's docstring without its title and usage lines, as one paragraph per block."""
  blocks = [" ".join(b.split()) for b in doc.strip().split("\n\n")[1:]]
  return "\n\n".join(b for b in blocks if not b.startswith("python -m"))


def environment() -> dict:
  return {"jax": jax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
          "python": platform.python_version(), "machine": platform.machine(),
          "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def to_jsonable(x):
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return to_jsonable(np.asarray(x).tolist())
  if isinstance(x, (np.floating, float)):
    return None if not np.isfinite(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(to_jsonable(obj), f, indent=1)
    f.write("\n")


def print_record(rec: dict) -> None:
  print(f"\n== {rec['name']}: {rec['verdict']}  ({rec['seconds']:.0f} "
        f"s{', quick' if rec['quick'] else ''})")
  for t in rec["tests"]:
    lo, hi = t["ci95"]
    threshold = f", min {t['min_effect']:g}" if t["min_effect"] else ""
    print(f"  {'*' if t['primary'] else ' '} {t['name']}: {t['mean']:+.3f} ± {t['std']:.3f} "
          f"{t['unit']} (95% CI [{lo:+.3f}, {hi:+.3f}], n={t['n']}, predicted "
          f"{t['predicted']}{threshold}) -> {t['verdict']}")
  sys.stdout.flush()


def script_main(name: str, run: Callable[[bool, str], dict], argv=None) -> dict:
  """``python -m benchmarks.claims.<name> [--quick] [--out DIR]``: runs one claim and
  writes ``DIR/runs/<name>.json`` and its plots under ``DIR/plots`` (``DIR`` defaults to
  ``benchmarks/claims``, or ``benchmarks/claims/quick`` for a quick run)."""
  ap = argparse.ArgumentParser(prog=f"python -m benchmarks.claims.{name}")
  ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke test, seconds)")
  ap.add_argument("--out", default=None,
                  help="output folder (default: benchmarks/claims, or benchmarks/claims/quick "
                       "with --quick)")
  args = ap.parse_args(argv)
  rec = run_claim(name, run, args.quick, out_dir(args.out, args.quick))
  return rec


def run_claim(name: str, run: Callable[[bool, str], dict], quick: bool, out: str) -> dict:
  t0 = time.time()
  rec = run(quick, out)
  rec["seconds"] = round(time.time() - t0, 1)
  write_json(os.path.join(out, "runs", f"{name}.json"), rec)
  print_record(rec)
  return rec
