"""benchmarks/claims: the verdict rule, the results.json schema of a quick run, notebook 05.

The verdicts themselves are results, not assertions: only their form is checked.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.claims import CLAIMS  # noqa: E402
from benchmarks.claims import common as C  # noqa: E402

VERDICTS = {"supported", "not supported", "inconclusive"}
CHEAP = ("repeated_exposure", "one_pass_lm")


def test_rule_supported_needs_the_interval_clear_of_zero():
  assert C.sign_test("t", [1.0, 1.2, 0.9])["verdict"] == "supported"
  assert C.sign_test("t", [1.0, -1.2, 0.9])["verdict"] == "inconclusive"
  assert C.sign_test("t", [-1.0, -1.2, -0.9])["verdict"] == "not supported"
  assert C.sign_test("t", [-1.0, -1.2, -0.9], predicted="-")["verdict"] == "supported"


def test_rule_minimum_effect_and_seed_count():
  assert C.sign_test("t", [0.5, 0.6, 0.55], min_effect=1.0)["verdict"] == "not supported"
  assert C.sign_test("t", [0.2, 2.0, 1.5], min_effect=1.0)["verdict"] == "inconclusive"
  assert C.sign_test("t", [2.0, 2.1, 1.9], min_effect=1.0)["verdict"] == "supported"
  assert C.sign_test("t", [1.0, 1.1])["verdict"] == "inconclusive"  # fewer than 3 seeds


def test_rule_combines_primary_tests_only():
  ok, bad, unsure = ({"primary": p, "verdict": v} for p, v in
                     ((True, "supported"), (False, "not supported"), (True, "inconclusive")))
  assert C.combine([ok, bad]) == "supported"
  assert C.combine([ok, unsure]) == "inconclusive"
  assert C.combine([ok, {"primary": True, "verdict": "not supported"}]) == "not supported"


def check_record(rec, out):
  assert rec["name"] in CLAIMS
  assert rec["verdict"] in VERDICTS
  assert rec["quick"] is True
  for key in ("claim", "published", "protocol"):
    assert isinstance(rec[key], str) and rec[key]
  assert isinstance(rec["figures"], dict) and rec["figures"]
  assert isinstance(rec["seconds"], (int, float))
  assert rec["tests"] and any(t["primary"] for t in rec["tests"])
  for t in rec["tests"]:
    assert t["verdict"] in VERDICTS and t["predicted"] in "+-"
    assert t["n"] == len(t["values"]) >= 3
    assert len(t["ci95"]) == 2
  assert rec["verdict"] == C.combine(rec["tests"])  # the verdict follows from the tests
  for plot in rec["plots"]:
    assert plot.endswith(".png") and (out / plot).stat().st_size > 1000
  assert (out / "runs" / f"{rec['name']}.json").exists()


@pytest.mark.slow
def test_quick_run_writes_results_json(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated devices
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  subprocess.run([sys.executable, "-m", "benchmarks.claims", "--quick", "--only", ",".join(CHEAP),
                  "--out", str(tmp_path)], cwd=ROOT, env=env, check=True, timeout=600)
  results = json.loads((tmp_path / "results.json").read_text())
  assert {"environment", "command", "rule", "claims"} <= set(results)
  assert [c["name"] for c in results["claims"]] == [n for n in CLAIMS if n in CHEAP]
  for rec in results["claims"]:
    check_record(rec, tmp_path)


def test_committed_results_cover_every_claim():
  path = ROOT / "benchmarks" / "claims" / "results.json"
  if not path.exists():
    pytest.skip("no committed results.json yet")
  results = json.loads(path.read_text())
  assert [c["name"] for c in results["claims"]] == list(CLAIMS)
  for rec in results["claims"]:
    assert rec["verdict"] in VERDICTS and rec["verdict"] == C.combine(rec["tests"])
    for plot in rec["plots"]:
      assert (path.parent / plot).exists()


@pytest.mark.slow
def test_claims_notebook_runs_clean(monkeypatch, tmp_path):
  import nbformat
  from nbclient import NotebookClient
  monkeypatch.setenv("SAM_OPTAX_NOTEBOOK_SMALL", "1")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  nb = nbformat.read(ROOT / "notebooks" / "05_claims.ipynb", as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert sum(o.get("output_type") == "display_data" for o in outputs) >= 3  # three claims' plots
