"""benchmarks/fashion_mnist.py's bookkeeping, on made-up runs (the training itself is the
recorded run in ARCHIVE.md): the summary's means, the wall-clock ratio that leaves out the
compiling run, and tables whose rows have as many cells as their header."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import fashion_mnist as fm  # noqa: E402


def _run(final, seconds, timed, noisy=None):
  out = {"final": final, "best": final + 0.01, "corrupted_mean": final - 0.2, "ece": 0.05,
         "lambda_max": 10.0 * final, "adaptive_sharpness": 0.01, "seconds": seconds, "timed": timed,
         "curve": [final - 0.1, final]}
  if noisy is not None:
    out["noisy_fit"] = noisy
  return out


def test_summary_and_tables():
  runs = {"0": {"sgd": [_run(0.8, 100.0, False), _run(0.9, 10.0, True), _run(0.85, 12.0, True)],
                "sam": [_run(0.82, 20.0, True), _run(0.88, 22.0, True), _run(0.86, 24.0, True)]},
          "0.4": {"sgd": [_run(0.7, 11.0, True, 0.1), _run(0.72, 11.0, True, 0.2)],
                  "sam": [_run(0.75, 33.0, True, 0.05), _run(0.73, 33.0, True, 0.07)]}}
  s = fm.summarize(runs)
  np.testing.assert_allclose(s["0"]["sgd"]["final"],
                             [np.mean([0.8, 0.9, 0.85]), np.std([0.8, 0.9, 0.85])])
  # SGD's compiling run (100 s) is left out: median of 10 and 12 is 11; SAM's median is 22
  np.testing.assert_allclose(s["0"]["sam"]["time_ratio"], 22.0 / 11.0)
  np.testing.assert_allclose(s["0.4"]["sam"]["time_ratio"], 3.0)
  np.testing.assert_allclose(s["0.4"]["sam"]["noisy_fit"][0], 0.06)
  assert "noisy_fit" not in s["0"]["sgd"]
  chosen = {"sgd": {"value": None, "what": "-"}, "sam": {"value": 0.05, "what": "ρ"}}
  text = fm.table(s, chosen)
  for block in text.split("**")[2::2]:
    rows = [r for r in block.strip().splitlines() if r.startswith("|")]
    widths = {r.count("|") for r in rows}
    assert len(widths) == 1, rows  # header, separator and every row alike
  assert "| sam | ρ = 0.05 | 85.33 ± 2.49 |" in text  # mean and std of 82, 88, 86
