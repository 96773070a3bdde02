"""The byte-level language model trained in one pass (every window seen once).

The Python standard library's ``.py`` files as text (no download;
``benchmarks.claims.common.stdlib_text``); an MLP LM: the previous 24 bytes embedded (16
dims each), two ReLU layers of 256, a softmax over the next byte; AdamW (lr 2e-3, weight
decay 0.01, cosine) for 1,200 steps of 128 disjoint windows. Validation: bits per byte and
next-byte accuracy on 20,000 windows of held-out files, measured after each quarter of
the run (the "epochs" of the curves).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax as so

from .methods import Spec, build
from .tasks import STEP_METRICS, _norm

CTX, EMBED, HIDDEN, VAL_WINDOWS = 24, 16, 256, 20_000
LN2 = float(np.log(2.0))


def init(key):
  keys = jax.random.split(key, 4)
  sizes = [CTX * EMBED, HIDDEN, HIDDEN, 256]
  mlp = [{"w": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a), "b": jnp.zeros(b)}
         for k, a, b in zip(keys[1:], sizes[:-1], sizes[1:], strict=True)]
  return {"embed": 0.5 * jax.random.normal(keys[0], (256, EMBED), jnp.float32), "mlp": mlp}


def logits_of(params, windows):
  w = windows.astype(jnp.int32)
  x = params["embed"][w[:, :-1]].reshape(w.shape[0], -1)
  for layer in params["mlp"][:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params["mlp"][-1]["w"] + params["mlp"][-1]["b"]


def example_losses(logits, windows):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         windows.astype(jnp.int32)[:, -1])


def loss_of(params, windows):
  return jnp.mean(example_losses(logits_of(params, windows), windows))


def windows_of(text: np.ndarray, starts: np.ndarray) -> np.ndarray:
  return text[starts[:, None] + np.arange(CTX + 1)]


class ByteLM:
  """One pass over ``steps * batch`` disjoint training windows; ``epochs`` evaluation points."""

  def __init__(self, name: str = "byte_lm", *, steps: int = 1200, batch: int = 128, epochs: int = 4,
               lr: float = 2e-3, weight_decay: float = 0.01):
    self.name, self.steps, self.batch, self.epochs = name, steps, batch, epochs
    self.lr, self.wd = lr, weight_decay
    self._data = None

  def data(self):
    if self._data is None:
      from benchmarks.claims import common as C
      train, val, _ = C.stdlib_text()
      n = self.steps * self.batch
      slots = len(train) // (CTX + 1)
      pool = windows_of(train, np.random.default_rng(0).choice(slots, n, replace=False) * (CTX + 1))
      val_w = windows_of(val, np.random.default_rng(1).integers(0, len(val) - CTX - 1, VAL_WINDOWS))
      self._data = jnp.asarray(pool), jnp.asarray(val_w)
    return self._data

  def base(self, steps: int) -> optax.GradientTransformation:
    return optax.adamw(optax.cosine_decay_schedule(self.lr, steps), weight_decay=self.wd)

  def units(self, spec: Spec) -> float:
    return self.epochs * build(spec, optax.sgd(0.1), 10, 1, 10).passes

  def timing_step(self, spec: Spec, seed: int = 0):
    """``(step, state, batch(i))`` as :meth:`ImageTask.timing_step`."""
    pool, _ = self.data()
    built = build(spec, self.base(self.steps), self.steps, self.steps // self.epochs, self.epochs)
    tx = built.tx
    params = init(jax.random.key(seed))

    @jax.jit
    def step(carry, i):
      p, s = carry
      batch = jax.lax.dynamic_slice_in_dim(pool, (i * self.batch) % (len(pool) - self.batch),
                                           self.batch)
      value, g = jax.value_and_grad(loss_of)(p, batch)
      objective = so.Objective(logits_of, example_losses, batch)
      u, s = tx.update(g, s, p, value_and_grad_fn=lambda q: jax.value_and_grad(loss_of)(q, batch),
                       value=value, objective=objective)
      return (optax.apply_updates(p, u), s), value

    return step, (params, tx.init(params)), None

  def run(self, spec: Spec, seed: int, tick: Callable, measure: bool = False) -> dict:
    del measure
    pool, val_w = self.data()
    built = build(spec, self.base(self.steps), self.steps, self.steps // self.epochs, self.epochs)
    tx = built.tx
    params = init(jax.random.key(seed))
    state = tx.init(params)
    order = np.random.default_rng(seed).permutation(len(pool)).reshape(self.steps, self.batch)
    per = self.steps // self.epochs

    @jax.jit
    def chunk(params, state, rows):
      def body(carry, idx):
        p, s = carry
        batch = pool[idx]
        value, g = jax.value_and_grad(loss_of)(p, batch)
        objective = so.Objective(logits_of, example_losses, batch)
        u, s = tx.update(g, s, p, value_and_grad_fn=lambda q: jax.value_and_grad(loss_of)(q, batch),
                         value=value, objective=objective)
        m = so.metrics(s)
        out = {k: jnp.asarray(m[k], jnp.float32) for k in STEP_METRICS if k in m}
        out["loss"] = value
        return (optax.apply_updates(p, u), s), out
      (params, state), ms = jax.lax.scan(body, (params, state), rows)
      return params, state, jax.tree.map(jnp.mean, ms)

    @jax.jit
    def evaluate(params):
      logits = logits_of(params, val_w)
      ce = jnp.mean(example_losses(logits, val_w))
      acc = jnp.mean(jnp.argmax(logits, -1) == val_w.astype(jnp.int32)[:, -1])
      return ce / LN2, acc

    curves: dict[str, list] = {"train_loss": [], "test_acc": [], "bits_per_byte": [], "seconds": []}
    for e in range(self.epochs):
      t0 = time.perf_counter()
      params, state, means = chunk(params, state, jnp.asarray(order[e * per:(e + 1) * per]))
      jax.block_until_ready(params)
      curves["seconds"].append(time.perf_counter() - t0)
      means = jax.device_get(means)
      curves["train_loss"].append(float(means["loss"]))
      curves.setdefault("param_norm", []).append(float(_norm(params)))
      for k in STEP_METRICS:
        if k in means and k != "loss":
          curves.setdefault(k, []).append(float(means[k]))
      bpb, acc = evaluate(params)
      curves["bits_per_byte"].append(float(bpb))
      curves["test_acc"].append(float(acc))
      tick(built.passes, f"{(e + 1) * per}/{self.steps} steps, {float(bpb):.3f} bits/byte")
    test = curves["test_acc"]
    return {"final": test[-1], "best": max(test), "bits_per_byte": curves["bits_per_byte"][-1],
            "epochs": self.epochs, "curves": curves,
            "train_seconds": float(np.sum(curves["seconds"][1:]))}
