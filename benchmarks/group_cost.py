"""Step time and compiled memory of m-sharpness (``group_size=m``) against SAM.

For each model (the study's 784-512-512-10 MLP at batch 128; the demo's BatchNorm CNN on
8x8 digits at batch 64) and each m in B, 32, 8, 1: the jitted linen train step of
``sam(sgd, 0.05, group_size=m)`` (all groups in one ``vmap``) and, for m = 8 and 1, the
chunked path (``group_chunk``: 4 groups at a time), against SAM on the whole batch.

Time: interleaved blocks of 10 warm steps of every variant in turn, 9 repetitions, the
median of the per-repetition ratios to SAM. Memory: the compiled step's temporary buffers
(``compile().memory_analysis()``), exact and machine-independent.

  python -m benchmarks.group_cost [--reps 9]      # writes benchmarks/group_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax as so
from sam_optax import flax as ft

from .lab.tasks import MLP, demo_cnn

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 10


def variants(batch: int) -> dict:
  out = {"sam": {}}
  for m in (batch, 32, 8, 1):
    if batch % m == 0:
      out[f"m={m}"] = {"group_size": m}
  for m in (8, 1):
    out[f"m={m}, chunks of 4 groups"] = {"group_size": m, "group_chunk": 4}
  return out


def build(model, x, y, batch: int, kwargs: dict):
  tx = so.sam(optax.sgd(0.05, momentum=0.9), 0.05, **kwargs)
  variables = model.init(jax.random.key(0), x[:2])
  state = ft.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                               batch_stats=variables.get("batch_stats"))
  step = jax.jit(ft.make_linen_train_step(jit=False, subset=bool(kwargs)))
  key = jax.random.key(1)

  def batch_of(i):
    idx = (jnp.arange(batch) + i * batch) % len(y)
    return (x[idx], y[idx])

  compiled = step.lower(state, batch_of(0), key).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return (lambda s, i: step(s, batch_of(i), jax.random.fold_in(key, i))[0]), state, temp


def measure(name: str, model, x, y, batch: int, reps: int) -> dict:
  live, temp = {}, {}
  for label, kwargs in variants(batch).items():
    step, state, temp[label] = build(model, x, y, batch, kwargs)
    state = step(state, 0)
    jax.block_until_ready(state)
    live[label] = [step, state]
  seconds = {k: [] for k in live}
  for r in range(reps):
    for label, (step, state) in live.items():
      t0 = time.perf_counter()
      for i in range(BLOCK):
        state = step(state, 1 + r * BLOCK + i)
      jax.block_until_ready(state)
      seconds[label].append((time.perf_counter() - t0) / BLOCK)
      live[label][1] = state
  base = np.asarray(seconds["sam"])
  out = {}
  for label in live:
    s = np.asarray(seconds[label])
    out[label] = {"time_vs_sam": float(np.median(s / base)), "step_ms": 1e3 * float(np.median(s)),
                  "temp_bytes": int(temp[label]), "memory_vs_sam": temp[label] / temp["sam"]}
    print(f"{name:8} {label:26} time {out[label]['time_vs_sam']:5.2f}x SAM "
          f"({out[label]['step_ms']:.2f} ms), temp memory {out[label]['memory_vs_sam']:6.2f}x SAM",
          flush=True)
  return out


DOC_TABLE = os.path.join(os.path.dirname(HERE), "docs", "_generated", "group_cost.md")
TITLES = {"mlp": "784-512-512-10 MLP, batch 128", "cnn": "digits BatchNorm CNN, batch 64"}


def markdown(result: dict) -> str:
  """The scaling guide's table of ``group_cost.json`` (``tests/test_auto_rho_benchmark.py``
  checks the committed page against the committed file)."""
  rows = ["| model | variant | step time / SAM | step (ms) | compiled temp. memory / SAM |",
          "|---|---|---|---|---|"]
  for model, variants_ in result["models"].items():
    for label, e in variants_.items():
      rows.append(f"| {TITLES.get(model, model)} | {label} | {e['time_vs_sam']:.2f}× "
                  f"| {e['step_ms']:.2f} | {e['memory_vs_sam']:.2f}× |")
  return ("\n".join(rows) + f"\n\nThe jitted linen step of `sam(sgd, 0.05, group_size=m)` "
          f"against SAM on the whole batch, on {result['device']}: median of {result['reps']} "
          f"interleaved blocks of {result['block']} warm steps; memory from "
          "`compile().memory_analysis()`.\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.group_cost", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=9)
  parser.add_argument("--out", default=os.path.join(HERE, "group_cost.json"))
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  mlp_x = jnp.asarray(rng.normal(size=(1024, 28, 28, 1)).astype(np.float32))
  cnn_x = jnp.asarray(rng.normal(size=(512, 8, 8, 1)).astype(np.float32))
  labels = lambda n: jnp.asarray(rng.integers(0, 10, n), jnp.int32)
  result = {"reps": args.reps, "block": BLOCK, "device": jax.devices()[0].device_kind,
            "models": {"mlp": measure("mlp", MLP(), mlp_x, labels(1024), 128, args.reps),
                       "cnn": measure("cnn", demo_cnn(), cnn_x, labels(512), 64, args.reps)}}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  os.makedirs(os.path.dirname(DOC_TABLE), exist_ok=True)
  with open(DOC_TABLE, "w") as f:
    f.write(markdown(result))
  print(f"wrote {args.out} and {DOC_TABLE}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
