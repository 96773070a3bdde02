"""Why SAM and ESAM stall on the demo's CNN at 40% label noise: dead units in the head.

  python -m benchmarks.dead_units [--dataset mnist5k] [--heads relu,bn] [--epochs 2]

The demo's CNN (``sam_optax.demo.make_model("cnn", head=...)``) on MNIST-5k with 40% symmetric
label noise, the demo's optimizers and schedule (SGD + momentum 0.9, lr 0.05 cosine over
``--schedule-epochs``, batch 64), one seed. For each head and optimizer it prints the share of
live head units (``1 - sam_optax.diagnostics.dead_unit_fraction`` of the head's activation on a
fixed probe of 512 training images, BatchNorm in training mode as the step sees it) at a few
steps of the first epoch and after each epoch, with the epoch's mean training loss, the test
accuracy and the spread of the logits across the probe's inputs (inference mode).

Two controls separate ESAM's data selection from the dead head:

* ``esam_random``: ESAM's step, but the half of the batch used for the second pass is drawn at
  random (the scores are swamped by a random offset) instead of ESAM's top-k;
* ``esam_l2``: ESAM with the L2 perturbation, whose selection the script recomputes exactly
  (eps = rho g/|g|, scores l_i(w + eps) - l_i(w), top half) to count the mislabelled examples
  in the selected half against the batch's share.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax as so
from sam_optax import flax as ft
from sam_optax.datasets import load_mnist5k
from sam_optax.demo.models import make_model
from sam_optax.demo.recipes import Recipe, make_step, optimizers
from sam_optax.diagnostics import linen_dead_unit_fractions

PROBE_STEPS = (0, 5, 10, 20, 30, 50)


def esam_control_step(rho: float, mode: str):
  """A jitted ESAM step whose selection is random (``mode="random"``) or ESAM's own with the L2
  perturbation, recomputed to report the share of noisy labels selected (``mode="l2"``)."""
  tx_make = (lambda sgd: optax.chain(so.esam(rho, 0.5), sgd)) if mode == "random" else \
      (lambda sgd: optax.chain(so.esam(rho, 0.5, perturbation=so.l2()), sgd))

  def step(state, batch, key):
    x, y, noisy = batch
    apply = lambda p, xb: state.apply_fn({"params": p, "batch_stats": state.batch_stats}, xb,
                                         train=True,
                                         rngs={"dropout": key}, mutable=["batch_stats"])

    def clean(p):
      logits, mutated = apply(p, x)
      losses = ft.per_example_cross_entropy(logits, y)
      return losses.mean(), (losses, mutated["batch_stats"])

    (loss, (losses, stats)), grads = jax.value_and_grad(clean, has_aux=True)(state.params)
    losses_at = lambda p, b: ft.per_example_cross_entropy(apply(p, b[0])[0], b[1])
    metrics = {"loss": loss}
    example_losses = losses
    if mode == "random":  # scores l_i(w+eps) - l_i(w) - 1e4 u_i: the top half is a random half
      example_losses = losses + 1e4 * jax.random.uniform(jax.random.fold_in(key, 1), losses.shape)
    else:
      norm = optax.global_norm(grads)
      eps = jax.tree.map(lambda g: rho * g / jnp.maximum(norm, 1e-12), grads)
      scores = losses_at(optax.apply_updates(state.params, eps), (x, y)) - losses
      top = jnp.argsort(-scores, stable=True)[: math.ceil(0.5 * len(y))]
      metrics["noisy_selected"] = jnp.mean(noisy[top])
      metrics["noisy_batch"] = jnp.mean(noisy)
    objective = so.Objective(lambda p, b: apply(p, b[0])[0],
                             lambda out, b: ft.per_example_cross_entropy(out, b[1]), (x, y),
                             clean_losses=example_losses)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                         grad_fn=lambda p: jax.grad(lambda q: clean(q)[0])(p),
                                         value=loss, objective=objective)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state, batch_stats=stats)
    return new, metrics

  return tx_make, jax.jit(step)


def run(head: str, name: str, data, clean_y, args) -> dict:
  x_tr, y_tr, x_te, y_te = data
  model = make_model("cnn", head)
  spe = len(y_tr) // 64
  sched_steps = args.schedule_epochs * spe
  rho = {"sam_0.1": 0.1}.get(name, args.rho)
  table = optimizers(0.05, sched_steps, rho, spe, args.schedule_epochs)
  sgd = lambda: optax.sgd(optax.cosine_decay_schedule(0.05, sched_steps), momentum=0.9)
  key = jax.random.key(args.seed)
  variables = model.init({"params": key}, jnp.asarray(x_tr[:2]), train=False)
  if name.startswith("esam_"):
    make_tx, step = esam_control_step(rho, name.split("_")[1])
    tx = make_tx(sgd())
  else:
    recipe = table[name.split("_")[0]]
    tx = recipe.make_opt() if isinstance(recipe, Recipe) else recipe()
    step = jax.jit(make_step(recipe))
  state = ft.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                               batch_stats=variables["batch_stats"])
  probe = jnp.asarray(x_tr[:512])
  evaluate = ft.make_linen_eval_step()

  @jax.jit
  def live(state):
    f = linen_dead_unit_fractions(state.apply_fn,
                                  {"params": state.params, "batch_stats": state.batch_stats},
                                  probe, capture=False, mutable=("batch_stats",), train=True,
                                  rngs={"dropout": jax.random.key(0)})
    return 1.0 - f["head"], 1.0 - jnp.maximum(f["conv1"], f["conv2"])

  @jax.jit
  def logit_spread(state):
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, probe,
                            train=False)
    return jnp.mean(jnp.std(logits, axis=0))

  noisy = (y_tr != clean_y).astype(np.float32)
  rng = np.random.default_rng(args.seed)
  out = {"steps": {}, "epochs": []}
  n = 0
  t0 = time.perf_counter()
  for epoch in range(args.epochs):
    order = rng.permutation(len(y_tr))
    ms = []
    for i in range(spe):
      if epoch == 0 and i in PROBE_STEPS:
        out["steps"][i] = float(live(state)[0])
      idx = order[i * 64:(i + 1) * 64]
      batch = (jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
      if name.startswith("esam_"):
        batch = (*batch, jnp.asarray(noisy[idx]))
      state, m = step(state, batch, jax.random.fold_in(key, n))
      ms.append({k: v for k, v in m.items() if k in ("loss", "noisy_selected", "noisy_batch")})
      n += 1
    means = {k: float(np.mean([float(m[k]) for m in ms])) for k in ms[0]}
    acc = float(jnp.mean(jnp.argmax(evaluate(state, jnp.asarray(x_te)), -1) == jnp.asarray(y_te)))
    head_live, conv_live = map(float, live(state))
    out["epochs"].append({"loss": means["loss"], "test_acc": acc, "head_live": head_live,
                          "conv_live_min": conv_live, "logit_std": float(logit_spread(state)),
                          **{k: v for k, v in means.items() if k.startswith("noisy")}})
  out["seconds"] = time.perf_counter() - t0
  return out


def main():
  ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--heads", default="relu,bn")
  ap.add_argument("--optimizers", default="sgd,sam,sam_0.1,esam,esam_random,esam_l2")
  ap.add_argument("--epochs", type=int, default=2, help="epochs trained")
  ap.add_argument("--schedule-epochs", type=int, default=10,
                  help="length of the lr schedule (the demo's run)")
  ap.add_argument("--rho", type=float, default=0.05)
  ap.add_argument("--noise", type=float, default=0.4)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  data = load_mnist5k(args.seed, args.noise)
  clean_y = load_mnist5k(args.seed, 0.0)[1]
  print(f"# MNIST-5k, demo CNN, {args.noise:.0%} noise, seed {args.seed}, rho {args.rho} (sam_0.1: "
        f"0.1), lr schedule over {args.schedule_epochs} epochs, jax {jax.__version__}, "
        f"{jax.default_backend()}, {time.strftime('%Y-%m-%d')}")
  steps = " | ".join(f"step {s}" for s in PROBE_STEPS)
  ep = " | ".join(f"ep {e + 1}: live / loss / acc / logit std" for e in range(args.epochs))
  print(f"| head | optimizer | {steps} | {ep} | noisy share selected / batch |")
  print("|" + "---|" * (3 + len(PROBE_STEPS) + args.epochs))
  for head in args.heads.split(","):
    for name in args.optimizers.split(","):
      r = run(head, name, data, clean_y, args)
      cells = [f"{100 * r['steps'][s]:.0f}%" for s in PROBE_STEPS]
      cells += [f"{100 * e['head_live']:.0f}% / {e['loss']:.3f} / {100 * e['test_acc']:.1f} / "
                f"{e['logit_std']:.3f}"
                for e in r["epochs"]]
      sel = "; ".join(f"{100 * e['noisy_selected']:.1f} / {100 * e['noisy_batch']:.1f}"
                      for e in r["epochs"] if "noisy_selected" in e)
      print(f"| {head} | {name} | " + " | ".join(cells) + f" | {sel} |", flush=True)


if __name__ == "__main__":
  main()
