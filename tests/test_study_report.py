"""benchmarks/study.py's bookkeeping: its summaries of made-up runs against figures worked
out by hand, the committed study.json against the committed runs it summarizes (read here
with plain json, not with the report's code), and the docs' pages, the README's and
RESULTS.md's figures against what the report writes from the committed JSON."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import study_report as sr  # noqa: E402

STUDY = ROOT / "benchmarks" / "study.json"
RUNS = ROOT / "benchmarks" / "runs"


def _run(final, val, noisy_fit_curve, epochs=4):
  test = [final - 0.05, final + 0.02, final, final]
  return {"final": final, "best": max(test), "epochs": epochs, "val_chosen": val,
          "noisy_fit": noisy_fit_curve[-1],
          "curves": {"test_acc": test, "val_acc": [0.5, 0.6, 0.55, 0.5],
                     "noisy_fit": noisy_fit_curve, "train_loss": [1.0, 0.8, 0.6, 0.5]}}


def test_onset_by_hand():
  assert sr.onset([0.02, 0.015, 0.02, 0.04, 0.05, 0.07]) == 4   # floor 0.03: above from 4 on
  assert sr.onset([0.02, 0.015, 0.04, 0.02, 0.05, 0.07]) == 5   # dips back at 4: from 5
  assert sr.onset([0.02, 0.02, 0.03, 0.03]) is None              # never twice the floor


def test_summaries_of_made_up_runs_by_hand():
  flat, rising = [0.02, 0.02, 0.02, 0.02], [0.02, 0.02, 0.05, 0.09]
  results = {}
  for s, (f_sgd, f_sam, f_long) in enumerate([(0.80, 0.86, 0.83), (0.82, 0.88, 0.84)]):
    results[(sr.MAIN, "sgd", s)] = _run(f_sgd, 0.84, rising)
    results[(sr.MAIN, "sam@0.2", s)] = _run(f_sam, 0.87, flat)
    results[(sr.MAIN, "sgd+epochs=8", s)] = _run(f_long, 0.85, rising, epochs=8)
    results[(sr.MAIN, "sgd+epochs=6", s)] = _run(f_long - 0.01, 0.85, rising, epochs=6)
    for spec, e in (("adamw", 4), ("adamw+epochs=8", 8), ("adamw+epochs=6", 6)):
      results[(sr.MAIN, spec, s)] = _run(0.8, 0.8, rising, epochs=e)
  timing = {"ratio": {"sgd": 1.0, "sam@0.2": 1.9, "sam": 1.9, "adamw": 1.1}}
  chosen = {"sgd": "sgd", "adamw": "adamw", "sam": "sam@0.2"}
  choices = {"seeds": [0], "sam": {"0.2": 0.6}, "sweeps": {}}
  study = sr.summarize(results, timing, chosen, choices, epochs=4, matched=6, seeds=(0, 1))
  e = study["headline"]["equal_epochs"]
  assert e["sgd"]["final"] == pytest.approx(81.0)
  assert e["sam"]["final"] == pytest.approx(87.0)
  assert e["sam"]["final_std"] == pytest.approx(np.std([86.0, 88.0], ddof=1))
  assert e["sam"]["time_ratio"] == pytest.approx(1.9)
  g = study["headline"]["equal_gradient_evaluations"]["sgd"]
  assert (g["spec"], g["epochs"], g["final"]) == ("sgd+epochs=8", 8, pytest.approx(83.5))
  assert g["time_ratio"] == pytest.approx(2.0)   # twice SGD's epochs at SGD's epoch cost
  w = study["headline"]["equal_wall_clock"]["sgd"]
  assert (w["spec"], w["time_ratio"]) == ("sgd+epochs=6", pytest.approx(1.5))
  assert study["headline"]["equal_wall_clock"]["sam"] == e["sam"]   # SAM's own runs
  mlp = study["regime"]["mlp"]
  assert mlp["0"]["best"] == pytest.approx(82.0) and mlp["0"]["final"] == pytest.approx(80.0)
  assert mlp["0"]["onset"] == 3 and mlp["0"]["memorizes"]   # 2 points down, fit rising
  assert study["meta"]["complete"] and study["meta"]["seeds"] == [0, 1]
  gains = sr.gains_table(study)
  assert "| equal epochs | 4 | 81.00 |" in gains and "+6.00" in gains   # 87 - 81
  assert "| equal gradient evaluations | 8 | 83.50 |" in gains and "+3.50" in gains
  # a partial study: seed 1 lacks SAM's run, so every MLP row covers seed 0 only
  del results[(sr.MAIN, "sam@0.2", 1)]
  part = sr.summarize(results, timing, chosen, choices, epochs=4, matched=6, seeds=(0, 1))
  assert not part["meta"]["complete"] and part["meta"]["seeds"] == [0]
  assert part["headline"]["equal_epochs"]["sgd"]["final"] == pytest.approx(80.0)
  assert part["headline"]["equal_epochs"]["sam"]["seeds"] == 1
  # m-SAM runs last: with seed 0 only, the two other methods keep both seeds and m-SAM's row
  # says it has one
  results[(sr.MAIN, "sam@0.2", 1)] = _run(0.88, 0.87, flat)
  results[(sr.MAIN, "sam@0.2+m=32", 0)] = _run(0.85, 0.86, flat)
  chosen_m = dict(chosen, **{"sam+m=32": "sam@0.2+m=32"})
  with_m = sr.summarize(results, timing, chosen_m, choices, epochs=4, matched=6, seeds=(0, 1))
  assert with_m["meta"]["seeds"] == [0, 1] and not with_m["meta"]["complete"]
  m_row = with_m["headline"]["equal_epochs"]["sam+m=32"]
  assert m_row["seeds"] == 1 and m_row["final"] == pytest.approx(85.0)
  assert "| m-SAM, m = 32 (1 seed) |" in sr.headline_table(with_m)
  assert "| SAM, ρ chosen |" in sr.headline_table(with_m)


def test_replace_block_needs_both_markers():
  text = "a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n"
  assert sr.replace_block(text, "x", "new\n") == "a\n<!-- x:begin -->\nnew\n<!-- x:end -->\nb\n"
  with pytest.raises(ValueError, match="x:begin"):
    sr.replace_block("no markers", "x", "new")


def test_label_heights_keep_their_gap_and_order():
  ys = [1.0, 1.01, 1.02, 5.0, 0.99]
  out = sr._spread(ys, 0.5)
  order = sorted(range(len(ys)), key=lambda i: ys[i])
  gaps = np.diff([out[i] for i in order])
  assert np.all(gaps >= 0.5 - 1e-9)


# ------------------------------------------------------------- the committed files

needs_study = pytest.mark.skipif(not STUDY.exists(), reason="benchmarks/study.json not committed")


@needs_study
def test_study_json_has_what_the_issue_asks():
  """Every headline row whole; every method and every compute match once the study is
  complete (a partial study, committed while its runs go on, says so in ``meta``)."""
  study = json.loads(STUDY.read_text())
  assert set(study["headline"]) == set(sr.MATCHES)
  for match, rows in study["headline"].items():
    if study["meta"]["complete"]:
      assert set(sr.LABELS) <= set(rows), (match, set(sr.LABELS) - set(rows))
    for method, row in rows.items():
      for key in ("final", "val_chosen", "noisy_fit", "time_ratio"):
        assert row[key] is not None and np.isfinite(row[key]), (match, method, key)
  if "sgd" in study["headline"]["equal_gradient_evaluations"]:
    assert study["headline"]["equal_gradient_evaluations"]["sgd"]["epochs"] == 2 * study[
        "meta"]["epochs"]
  mlp = study["regime"]["mlp"]
  assert mlp, "the regime needs SGD's runs on the MLP at 40% noise"
  for seed, r in mlp.items():
    assert r["best"] - r["final"] >= 2.0, f"seed {seed}: SGD has not begun to memorize"
    assert r["noisy_fit_final"] > 2 * r["noisy_fit_lowest"]


@needs_study
def test_study_json_agrees_with_the_stored_runs():
  """Each headline row's final, validation-chosen accuracy and noisy fit are the means of the
  stored runs of its spec (read here with json, not with the report's code)."""
  study = json.loads(STUDY.read_text())
  task = sr.MAIN
  for match, rows in study["headline"].items():
    for method, row in rows.items():
      folder = RUNS / task / row["spec"].replace("/", "_")
      runs = [json.loads((folder / f"seed{k}.json").read_text())
              for k in study["meta"]["seeds"] if (folder / f"seed{k}.json").exists()]
      assert len(runs) == row["seeds"], (match, method)
      for key in ("final", "val_chosen", "noisy_fit"):
        assert row[key] == pytest.approx(100 * np.mean([r[key] for r in runs]), abs=1e-9)
  for seed, r in study["regime"]["mlp"].items():
    run = json.loads((RUNS / task / "sgd" / f"seed{seed}.json").read_text())
    assert r["best"] == pytest.approx(100 * max(run["curves"]["test_acc"]))
    assert r["final"] == pytest.approx(100 * run["curves"]["test_acc"][-1])


@needs_study
def test_committed_pages_are_what_the_report_writes():
  study = json.loads(STUDY.read_text())
  for name, text in sr.pages(study).items():
    page = ROOT / "docs" / "_generated" / name
    assert page.read_text() == text, (
        f"{page} differs from what `python -m benchmarks.study --report` writes from "
        "benchmarks/study.json; run it and commit the result")
  for path, block, expected in ((ROOT / "README.md", "study:readme", sr.readme_block(study)),
                                (ROOT / "benchmarks" / "RESULTS.md", "study:index",
                                 sr.results_block(study))):
    text = path.read_text()
    assert sr.replace_block(text, block, expected) == text, f"{path.name}'s {block} block"


# ------------------------------------------------------------------- the run's plan


def test_the_plan_makes_each_choice_before_it_is_needed(monkeypatch):
  """Seed 0's baselines and SAM's grid first; the sweeps once the grid chose a radius (the
  best noisy-validation accuracy); every method on every seed, and the baselines at twice
  the epochs and at SAM's measured wall clock, once the sweeps and the timing are in."""
  from types import SimpleNamespace

  from benchmarks import auto_rho
  from benchmarks import study as st
  monkeypatch.setattr(auto_rho, "GRID", (0.05, 0.2))
  tasks = {st.MAIN: SimpleNamespace(epochs=40)}

  def val(v):
    return {"curves": {"val_acc": [v - 0.1, v]}}

  first = st.plan({}, None, tasks)
  assert first == [(st.MAIN, s, 0) for s in ("sgd", "adamw", "sam@0.05", "sam@0.2", "sam@auto")]
  results = {(st.MAIN, "sam@0.05", 0): val(0.50), (st.MAIN, "sam@0.2", 0): val(0.53)}
  assert st.choose_sam_rho(results, st.MAIN) == 0.2
  second = st.plan(results, None, tasks)
  assert (st.MAIN, "asam@0.5", 0) in second and (st.MAIN, "wsam@0.025", 0) in second  # 0.2/8
  assert not any(r[2] == 1 for r in second)       # no other seed before the choices
  for name in st.SWEEPS:
    for i, v in enumerate(st.sweep_values(name, 0.2)):
      results[(st.MAIN, f"{name}@{v:g}", 0)] = val(0.4 + 0.01 * i)   # the last value wins
  assert st.plan(results, None, tasks)[-1][2] == 0   # still waits for the timing
  timing = {"ratio": {"sam": 2.26}}
  assert st.matched_epochs(timing, 40) == 90        # 2.26 x 40 = 90.4, to 10 epochs
  rows = st.plan(results, timing, tasks)
  chosen = st.chosen_specs(results, st.MAIN, 0.2)
  assert chosen["asam"] == "asam@2" and chosen["msam"] == "msam@1" and chosen["wsam"] == "wsam@0.1"
  for seed in (0, 1, 2):
    for spec in ("sam@0.2", "looksam@0.2", "asam@2", "sgd+epochs=80", "adamw+epochs=90"):
      assert (st.MAIN, spec, seed) in rows, (spec, seed)
  groups = [i for i, r in enumerate(rows) if "+m=" in r[1]]
  main_rows = [i for i, r in enumerate(rows) if r[0] == st.MAIN and "+m=" not in r[1]]
  assert min(groups) > max(main_rows)               # m-sharpness after every other method


def test_time_ratios_pair_each_round_with_sgds():
  from benchmarks import study as st
  # round 2 ran while the machine was busy: both took 3x longer; paired ratios ignore it
  seconds = {"sgd": [1.0, 3.0, 1.0], "sam": [2.0, 6.0, 2.2], "cheap": [1.2, 3.9, 1.3]}
  r = st.time_ratios(seconds)
  assert r["sgd"] == 1.0
  assert r["sam"] == pytest.approx(2.0)    # median of 2.0, 2.0, 2.2
  assert r["cheap"] == pytest.approx(1.3)  # median of 1.2, 1.3, 1.3
  # the ratio of medians would read SAM's 2.2 against SGD's 1.0 here
  assert np.median(seconds["sam"]) / np.median(seconds["sgd"]) == pytest.approx(2.2)
