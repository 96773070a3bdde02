"""benchmarks/auto_rho.py's bookkeeping: the regrets of made-up runs against numbers worked
out by hand, the committed results file has what the issue asks of it, and the docs' table is
the one the script writes from the committed file."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import auto_rho as ar  # noqa: E402
from benchmarks.lab.methods import Spec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "auto_rho.json"


def _made_up(finals: dict, seeds=(0, 1, 2), rho=None):
  out = {}
  for text, per_seed in finals.items():
    for s, f in zip(seeds, per_seed, strict=True):
      run = {"final": f, "curves": {}}
      if text == "sam@auto" and rho is not None:
        run["curves"]["rho"] = rho
      out[("t", str(Spec.parse(text)), s)] = run
  return out


def test_regret_stalls_and_seeds_by_hand(monkeypatch):
  monkeypatch.setattr(ar, "GRID", (0.05, 0.2))
  finals = {"sgd": [0.80, 0.82, 0.81], "sam@0.05": [0.85, 0.86, 0.87],
            "sam@0.2": [0.90, 0.88, 0.89], "sam@auto": [0.89, 0.10, 0.88]}
  out = ar.summarize(_made_up(finals, rho=[0.1, 0.2]), {"t": None}, True)["t"]
  assert out["seeds"] == [0, 1, 2]
  assert out["best_rho"] == 0.2
  assert out["best"] == pytest.approx(89.0)
  assert out["regret_default"] == pytest.approx(89.0 - 86.0)
  assert out["regret"] == pytest.approx(89.0 - (89 + 10 + 88) / 3)
  assert out["regret_per_seed"] == pytest.approx([1.0, 78.0, 1.0])
  assert out["stalls"] == 1   # 10% is chance for 10 classes
  assert out["auto_rho_per_epoch"] == pytest.approx([0.1, 0.2])


def test_a_seed_with_a_missing_run_is_left_out(monkeypatch):
  monkeypatch.setattr(ar, "GRID", (0.05,))
  runs = _made_up({"sgd": [0.8, 0.8, 0.8], "sam@0.05": [0.9, 0.8, 0.7],
                   "sam@auto": [0.9, 0.9, 0.9]})
  del runs[("t", "sam@auto", 2)]
  out = ar.summarize(runs, {"t": None}, True)["t"]
  assert out["seeds"] == [0, 1]
  assert out["final"]["sam@0.05"]["mean"] == pytest.approx(85.0)


def test_results_file_has_what_each_task_needs():
  tasks = json.loads(RESULTS.read_text())["tasks"]
  assert set(tasks) == set(ar.TITLES)
  for name, entry in tasks.items():
    for key in ("regret", "regret_default", "stalls", "cost_ratio", "seeds"):
      assert key in entry, f"{name} lacks {key}"
    assert entry["stalls"] == 0, name


def test_docs_table_is_written_from_the_results_file():
  summary = json.loads(RESULTS.read_text())
  assert Path(ar.DOC_TABLE).read_text() == ar.markdown(summary)


def test_group_cost_table_is_written_from_its_results_file():
  from benchmarks import group_cost
  result = json.loads((ROOT / "benchmarks" / "group_cost.json").read_text())
  assert set(result["models"]) == {"mlp", "cnn"}
  for variants in result["models"].values():
    assert variants["sam"]["memory_vs_sam"] == 1.0
    assert {"m=32", "m=8", "m=1"} <= set(variants)
  assert Path(group_cost.DOC_TABLE).read_text() == group_cost.markdown(result)


def test_msharpness_table_is_written_from_its_results_file():
  from benchmarks import msharpness
  summary = json.loads((ROOT / "benchmarks" / "msharpness.json").read_text())
  assert len(summary["seeds"]) >= 2
  assert Path(msharpness.DOC_TABLE).read_text() == msharpness.markdown(summary)
