"""A resumable store of finished runs (one JSON file each) and a progress line with an ETA."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


class Store:
  """Finished runs under ``root``: ``root/<task>/<spec>/seed<k>.json``.

  ``get`` returns a stored result or None; ``put`` writes one atomically (a killed run
  leaves no file, so the next invocation runs it again from the start)."""

  def __init__(self, root: str):
    self.root = root

  def path(self, task: str, spec: str, seed: int) -> str:
    return os.path.join(self.root, task, spec.replace("/", "_"), f"seed{seed}.json")

  def get(self, task: str, spec: str, seed: int) -> dict | None:
    p = self.path(task, spec, seed)
    if not os.path.exists(p):
      return None
    with open(p) as f:
      return json.load(f)

  def put(self, task: str, spec: str, seed: int, result: dict) -> None:
    p = self.path(task, spec, seed)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, p)


class Progress:
  """One line per finished epoch or run: done/total work units, elapsed time and an ETA.

  Work is counted in epoch-passes (an epoch of a method that makes ``passes`` gradient
  evaluations per step counts ``passes``); the ETA divides the remaining work by the rate
  measured so far in this invocation (finished runs found in the store cost nothing)."""

  def __init__(self, total: float, stream=sys.stdout):
    self.total, self.done, self.stream = max(total, 1e-9), 0.0, stream
    self.start, self.worked = time.perf_counter(), 0.0

  def skip(self, units: float) -> None:
    self.done += units

  def advance(self, units: float, what: str) -> None:
    self.done += units
    self.worked += units
    elapsed = time.perf_counter() - self.start
    rate = self.worked / max(elapsed, 1e-9)
    left = (self.total - self.done) / max(rate, 1e-9)
    pct = 100.0 * self.done / self.total
    self.stream.write(f"[{pct:5.1f}%] {fmt_seconds(elapsed)} elapsed, ETA {fmt_seconds(left)}: "
                      f"{what}\n")
    self.stream.flush()


def fmt_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_all(store: Store, plan: Sequence[tuple[str, str, int, float, Callable[[Callable], dict]]],
            log=print) -> dict[tuple[str, str, int], dict]:
  """Runs every ``(task, spec, seed, units, fn)`` of ``plan`` not yet in ``store``;
  ``fn(tick)`` trains and returns the result, calling ``tick(units, what)`` as it goes.
  Returns every result, stored or new, keyed by ``(task, spec, seed)``."""
  total = sum(p[3] for p in plan)
  bar = Progress(total)
  out: dict[tuple[str, str, int], dict] = {}
  for task, spec, seed, units, fn in plan:
    found = store.get(task, spec, seed)
    if found is not None:
      bar.skip(units)
      out[(task, spec, seed)] = found
      continue
    given = [0.0]

    def tick(u: float, what: str, task=task, spec=spec, seed=seed) -> None:
      given[0] += u
      bar.advance(u, f"{task} {spec} seed {seed}: {what}")

    result = fn(tick)
    bar.skip(max(units - given[0], 0.0))
    store.put(task, spec, seed, result)
    out[(task, spec, seed)] = result
  return out


def jsonable(x: Any) -> Any:
  """Numpy scalars and arrays as plain Python numbers and lists."""
  import numpy as np
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic)):
    return np.asarray(x).tolist()
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return np.asarray(x).tolist()
  return x
