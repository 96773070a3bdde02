"""The study's report, from its stored runs: ``benchmarks/study.json``, the docs' tables
(``docs/_generated/study_*.md``), the README's and RESULTS.md's figures and the two figures.

Everything a page shows is a function of ``study.json`` (:func:`pages`, :func:`readme_block`,
:func:`results_block`, :func:`plot_frontier`, :func:`plot_curves`), and ``study.json`` is a
function of the stored runs and the timing run (:func:`summarize`);
``tests/test_study_report.py`` checks both against the committed files.

Definitions used throughout:

* **final**: test accuracy after the last epoch; **val_chosen**: test accuracy at the epoch
  whose accuracy on the noisy validation split is highest (what a practitioner can choose);
  **best**: the best epoch's test accuracy (a reference no one can choose).
* **noisy_fit**: the share of the mislabelled training images predicted with their wrong
  label, after the last epoch.
* **time_ratio**: a run's training time over SGD's 40-epoch run's, from the timing run's
  seconds per epoch (the median of three interleaved short runs) times the epochs.
* **memorization onset**: the first epoch from which the noisy-label fit stays above twice
  its lowest value (the floor a model that ignores the wrong labels sits on).
* **compute matches**: ``equal_epochs`` (every method 40 epochs), ``equal_gradient_evaluations``
  (SGD and AdamW for twice the epochs, SAM's two passes per step) and ``equal_wall_clock``
  (SGD and AdamW for the epochs SAM's measured time buys); the other methods' rows are their
  40-epoch runs under every match.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JSON_PATH = os.path.join(HERE, "study.json")
GENERATED = os.path.join(ROOT, "docs", "_generated")
FRONTIER_PNG = os.path.join(HERE, "study_frontier.png")
CURVES_PNG = os.path.join(HERE, "study_curves.png")
MAIN = "fmnist_mlp_noise40"

# the methods in the order of the tables, with their names in the docs
LABELS = {
    "sgd": "SGD", "adamw": "AdamW", "sam": "SAM, ρ chosen", "sam@0.05": "SAM, ρ = 0.05",
    "sam@auto": "SAM, ρ = auto", "sam+m=32": "m-SAM, m = 32", "asam": "ASAM",
    "looksam": "LookSAM, k = 5", "late_phase": "late-phase SAM", "randomized": "randomized SAM",
    "msam": "MSAM", "mesa": "MESA", "saf": "SAF", "esam": "ESAM", "sampa": "SAMPa",
    "functional_sam": "Functional-SAM", "wsam": "WSAM",
}
MATCHES = ("equal_epochs", "equal_gradient_evaluations", "equal_wall_clock")
MATCH_TITLES = {"equal_epochs": "equal epochs",
                "equal_gradient_evaluations": "equal gradient evaluations",
                "equal_wall_clock": "equal wall clock"}
BASELINES = ("sgd", "adamw")
CHEAP = 1.25          # the frontier's budget: at most this many times SGD's time
COLUMNS = ("final", "val_chosen", "best", "noisy_fit", "corrupted_mean", "ece", "lambda_max",
           "adaptive_sharpness")
PERCENT = ("final", "val_chosen", "best", "noisy_fit", "corrupted_mean")
TASK_TITLES = {"fmnist_mlp_noise40": "MLP, 40% noise", "fmnist_mlp_noise0": "MLP, clean labels",
               "fmnist_cnn_noise40": "CNN, 40% noise"}


# ------------------------------------------------------------------------ summaries


def onset(noisy_fit: list[float]) -> int | None:
  """The memorization onset (1-based epoch): the first epoch from which the noisy-label fit
  stays above twice its lowest value; None when it never does."""
  floor = 2.0 * min(noisy_fit)
  above = [f > floor for f in noisy_fit]
  for i in range(len(above)):
    if all(above[i:]):
      return i + 1
  return None


def describe(runs: list[dict]) -> dict:
  """Mean and standard deviation over seeds of each column (percentages for accuracies and
  the noisy fit), the per-seed finals and the seeds' count."""
  out: dict = {"seeds": len(runs)}
  for key in COLUMNS:
    vals = [r[key] for r in runs if key in r]
    if len(vals) != len(runs) or not vals:
      continue
    scale = 100.0 if key in PERCENT else 1.0
    arr = scale * np.asarray(vals, float)
    out[key] = float(arr.mean())
    out[key + "_std"] = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
  for key in ("final", "val_chosen", "noisy_fit"):
    if all(key in r for r in runs):
      out[key + "_per_seed"] = [100.0 * r[key] for r in runs]
  onsets = [onset(r["curves"]["noisy_fit"]) for r in runs if r["curves"].get("noisy_fit")]
  out["onsets"] = onsets
  return out


def _epochs_of(spec: str, default: int) -> int:
  m = re.search(r"\+epochs=(\d+)", spec)
  return int(m.group(1)) if m else default


def time_ratio(timing: dict | None, spec: str, epochs: int, default_epochs: int) -> float | None:
  """A run's time over SGD's ``default_epochs`` run: the spec's seconds per epoch over SGD's,
  times its epochs over the default."""
  if not timing:
    return None
  base = re.sub(r"\+epochs=\d+", "", spec)
  ratio = timing["ratio"].get(base)
  return None if ratio is None else float(ratio) * epochs / default_epochs


def mean_curves(runs: list[dict]) -> dict:
  keys = ("test_acc", "val_acc", "noisy_fit", "train_loss")
  return {k: (100.0 if k != "train_loss" else 1.0)
          * np.mean([r["curves"][k] for r in runs], axis=0) for k in keys
          if all(r["curves"].get(k) for r in runs)}


def summarize(results: dict, timing: dict | None, chosen: dict, choices: dict, epochs: int,
              matched: int, seeds=(0, 1, 2)) -> dict:
  """``study.json`` from the runs (``{(task, spec, seed): result}``), the timing run, the
  chosen spec of each method (``{method: spec}``) and the choices' validation scores."""
  match_specs = {"equal_epochs": {b: b for b in BASELINES},
                 "equal_gradient_evaluations": {b: f"{b}+epochs={2 * epochs}" for b in BASELINES},
                 "equal_wall_clock": {b: f"{b}+epochs={matched}" for b in BASELINES}}
  # a seed is whole once every method but m-SAM has run on it: m-SAM runs last (its step
  # costs several SAM steps) and its row gives the seeds it has (``seeds`` of its entry)
  needed = ({s for s in chosen.values() if "+m=" not in s}
            | {s for m in match_specs.values() for s in m.values()})
  whole = [s for s in seeds if all((MAIN, spec, s) in results for spec in needed)]
  used = tuple(whole) if whole else tuple(seeds[:1])   # a partial study: whole seeds only

  def runs_of(task, spec):
    pick = used if task == MAIN else seeds
    return [results[(task, spec, s)] for s in pick if (task, spec, s) in results]

  tables: dict = {}
  for task in sorted({t for t, _, _ in results}):
    specs = sorted({s for t, s, _ in results if t == task})
    tables[task] = {}
    for spec in specs:
      runs = runs_of(task, spec)
      entry = describe(runs)
      entry["epochs"] = _epochs_of(spec, runs[0]["epochs"])
      if task == MAIN:
        entry["time_ratio"] = time_ratio(timing, spec, entry["epochs"], epochs)
      tables[task][spec] = entry

  headline: dict = {}
  for match in MATCHES:
    headline[match] = {}
    for method in LABELS:
      spec = match_specs[match].get(method, chosen.get(method))
      entry = tables.get(MAIN, {}).get(spec) if spec else None
      if entry is None:
        continue
      headline[match][method] = {
          "spec": spec, "epochs": entry["epochs"], "seeds": entry["seeds"],
          "final": entry["final"], "final_std": entry["final_std"],
          "val_chosen": entry.get("val_chosen"), "noisy_fit": entry.get("noisy_fit"),
          "time_ratio": entry.get("time_ratio")}

  regime: dict = {}
  for task, model in (("fmnist_mlp_noise40", "mlp"), ("fmnist_cnn_noise40", "cnn")):
    per_seed = {}
    for s in seeds:
      r = results.get((task, "sgd", s))
      if r is None:
        continue
      nf = r["curves"]["noisy_fit"]
      per_seed[str(s)] = {
          "best": 100.0 * r["best"], "final": 100.0 * r["final"],
          "best_epoch": int(np.argmax(r["curves"]["test_acc"])) + 1, "epochs": r["epochs"],
          "noisy_fit_lowest": 100.0 * min(nf), "noisy_fit_final": 100.0 * nf[-1],
          "onset": onset(nf),
          "memorizes": bool(r["best"] - r["final"] >= 0.02 and nf[-1] > 2.0 * min(nf))}
    if per_seed:
      regime[model] = per_seed

  curves = {m: {k: v.tolist() for k, v in mean_curves(runs_of(MAIN, spec)).items()}
            for m, spec in chosen.items() if runs_of(MAIN, spec)}
  complete = len(whole) == len(seeds) and all(
      (MAIN, spec, s) in results for spec in chosen.values() for s in seeds)
  return {
      "meta": {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
               "python": platform.python_version(), "jax": _version("jax"),
               "date": datetime.date.today().isoformat(), "epochs": epochs, "seeds": list(used),
               "planned_seeds": list(seeds),
               "dataset": "Fashion-MNIST: 55,000 training images (5,000 held out as the noisy "
                          "validation split), the 10,000-image test set",
               "wall_seconds": float(sum(r.get("wall_seconds", 0.0) for r in results.values())),
               "complete": complete},
      "choices": choices, "chosen": chosen,
      "matches": {"equal_epochs": epochs, "equal_gradient_evaluations": 2 * epochs,
                  "equal_wall_clock": matched,
                  "sam_time_ratio": (timing or {}).get("ratio", {}).get("sam")},
      "timing": timing, "regime": regime, "headline": headline, "tables": tables,
      "curves": curves}


def _version(name: str) -> str:
  try:
    from importlib.metadata import version
    return version(name)
  except Exception:   # noqa: BLE001
    return "?"


# --------------------------------------------------------------------------- markdown


def _pm(entry: dict, key: str, digits: int = 2) -> str:
  if entry.get(key) is None:
    return "–"
  std = entry.get(key + "_std")
  return f"{entry[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if std and entry["seeds"] > 1 else "")


def _num(x, digits: int = 2, suffix: str = "") -> str:
  return "–" if x is None else f"{x:.{digits}f}{suffix}"


def _table(header: str, body: list[str]) -> str:
  """A markdown table: the header row (``| a | b |``), its separator, the body rows."""
  return "\n".join([header, "|" + "---|" * (header.count("|") - 1)] + body) + "\n"


def _setting(spec: str) -> str:
  """The setting a spec names, in words (ρ, λ, m, epochs)."""
  parts = []
  head, *opts = spec.split("+")
  name, _, value = head.partition("@")
  if value:
    parts.append(("λ" if name in ("mesa", "saf") else "ρ") + f" = {value}")
  for o in opts:
    k, _, v = o.partition("=")
    parts.append(f"{v} epochs" if k == "epochs" else f"{k} = {v}")
  return ", ".join(parts) or "–"


def _label(study: dict, method: str, entry: dict) -> str:
  """The method's name in the tables, with its seeds' count where it has fewer than the
  study's (m-SAM, run last, in a study cut short)."""
  n = entry["seeds"]
  short = n < len(study["meta"]["seeds"])
  return LABELS[method] + (f" ({n} seed{'s' if n > 1 else ''})" if short else "")


def headline_table(study: dict) -> str:
  """Every method at 40% noise with the baselines under the three compute matches."""
  h = study["headline"]
  header = ("| method | setting | final % | at the validation-chosen epoch % | noisy-label fit % "
          "| time / SGD |")
  rows: list[str] = []
  for match in MATCHES:
    for method, e in h[match].items():
      if match != "equal_epochs" and method not in BASELINES:
        continue
      label = (_label(study, method, e)
               + ("" if match == "equal_epochs" else f" ({MATCH_TITLES[match]})"))
      rows.append(f"| {label} | {_setting(e['spec'])} | {_pm(e, 'final')} | "
                  f"{_num(e['val_chosen'])} | {_num(e['noisy_fit'], 1)} | "
                  f"{_num(e['time_ratio'], 2, '×')} |")
  return _table(header, rows)


def gains_table(study: dict) -> str:
  """SAM's (chosen ρ) and ``rho="auto"``'s gain over SGD and AdamW under each match."""
  h = study["headline"]
  header = ("| compute match | SGD epochs | SGD final % | AdamW final % | SAM − SGD | SAM − AdamW "
          "| auto − SGD |")
  rows: list[str] = []
  for match in MATCHES:
    sgd, adamw = h[match].get("sgd"), h[match].get("adamw")
    sam, auto = h[match].get("sam"), h[match].get("sam@auto")
    if sgd is None or sam is None:
      continue
    gap = lambda a, b: "–" if a is None or b is None else f"{a['final'] - b['final']:+.2f}"
    rows.append(f"| {MATCH_TITLES[match]} | {sgd['epochs']} | {sgd['final']:.2f} | "
                f"{_num(adamw and adamw['final'])} | {gap(sam, sgd)} | {gap(sam, adamw)} | "
                f"{gap(auto, sgd)} |")
  return _table(header, rows)


def verdict_sentence(study: dict) -> str:
  """Whether SAM (chosen ρ) beats SGD and AdamW when they get its gradient evaluations, and
  at the validation-chosen epoch (early stopping on the noisy split)."""
  g = study["headline"]["equal_gradient_evaluations"]
  if "sam" not in g or "sgd" not in g:
    return ""
  sam, sgd, adamw = g["sam"], g["sgd"], g.get("adamw")
  word = lambda d: "above" if d > 0 else "below"
  d_sgd = sam["final"] - sgd["final"]
  text = (f"At equal gradient evaluations SAM ends {abs(d_sgd):.2f} points {word(d_sgd)} SGD "
          f"({sam['final']:.2f}% against {sgd['final']:.2f}% for SGD trained {sgd['epochs']} "
          f"epochs)")
  if adamw is not None:
    d = sam["final"] - adamw["final"]
    text += f" and {abs(d):.2f} points {word(d)} AdamW ({adamw['final']:.2f}%)"
  v = sam["val_chosen"] - sgd["val_chosen"]
  text += (f"; with the epoch each run keeps chosen on the noisy validation split, SAM is "
           f"{abs(v):.2f} points {word(v)} SGD ({sam['val_chosen']:.2f}% against "
           f"{sgd['val_chosen']:.2f}%).")
  return text + "\n\n"


def regime_table(study: dict) -> str:
  header = ("| model | seed | epochs | SGD best % (epoch) | SGD final % | drop | noisy-label fit "
          "% (lowest → final) | onset |")
  rows: list[str] = []
  for model, seeds in study["regime"].items():
    for seed, r in seeds.items():
      rows.append(f"| {model.upper()} | {seed} | {r['epochs']} | {r['best']:.2f} "
                  f"({r['best_epoch']}) | {r['final']:.2f} | {r['best'] - r['final']:.2f} | "
                  f"{r['noisy_fit_lowest']:.1f} → {r['noisy_fit_final']:.1f} | "
                  f"{r['onset'] if r['onset'] is not None else 'none'} |")
  return _table(header, rows)


def variants_table(study: dict) -> str:
  """Every method at 40% noise, equal epochs, with the robustness and sharpness columns."""
  h = study["headline"]["equal_epochs"]
  t = study["tables"][MAIN]
  header = ("| method | final % | val-chosen % | corrupted % | ECE | λ_max | adaptive sharpness "
          "| time / SGD |")
  rows: list[str] = []
  for method, e in h.items():
    full = t[e["spec"]]
    rows.append(f"| {_label(study, method, full)} | {_pm(full, 'final')} | "
                f"{_num(full.get('val_chosen'))} | "
                f"{_num(full.get('corrupted_mean'))} | {_num(full.get('ece'), 3)} | "
                f"{_num(full.get('lambda_max'), 2)} | {_num(full.get('adaptive_sharpness'), 4)} "
                f"| {_num(e['time_ratio'], 2, '×')} |")
  return _table(header, rows)


def rho_table(study: dict) -> str:
  """SAM's grid and the swept methods on the choice seeds' noisy validation split."""
  c = study["choices"]
  t = study["tables"][MAIN]
  header = "| method | value | noisy validation % (best epoch) | final test % | noisy-label fit % |"
  rows: list[str] = []

  def row(label, method, spec, value, val):
    runs = t.get(spec)
    if runs is None:
      return
    k = min(len(c["seeds"]), runs["seeds"])
    mark = " (chosen)" if study["chosen"].get(method) == spec else ""
    rows.append(f"| {label} | {value}{mark} | {100 * val:.2f} | "
                f"{np.mean(runs['final_per_seed'][:k]):.2f} | "
                f"{np.mean(runs['noisy_fit_per_seed'][:k]):.1f} |")

  for rho, val in c["sam"].items():
    row("SAM", "sam", f"sam@{float(rho):g}", f"ρ = {rho}", val)
  for name, scores in c["sweeps"].items():
    for v, val in scores.items():
      row(LABELS[name], name, f"{name}@{float(v):g}", f"ρ = {v}", val)
  return _table(header, rows)


def frontier_sentence(study: dict) -> str:
  """Which variants keep SAM's gain at no more than ``CHEAP`` times SGD's time: those whose
  final accuracy keeps at least half of SAM's (chosen ρ) gain over SGD at equal epochs."""
  h = study["headline"]["equal_epochs"]
  if "sam" not in h or "sgd" not in h:
    return "The frontier needs SAM's and SGD's runs.\n"
  sgd, sam = h["sgd"]["final"], h["sam"]["final"]
  gain = sam - sgd
  keep, lose, dear = [], [], []
  for m, e in h.items():
    if m in BASELINES or m in ("sam", "sam@0.05", "sam@auto") or e["time_ratio"] is None:
      continue
    item = f"{LABELS[m]} ({e['final'] - sgd:+.2f} points at {e['time_ratio']:.2f}×)"
    if e["time_ratio"] > CHEAP:
      dear.append(item)
    elif e["final"] - sgd >= 0.5 * gain:
      keep.append(item)
    else:
      lose.append(item)
  say = lambda xs: ", ".join(xs) if xs else "none"
  keepers = [(e["time_ratio"], m) for m, e in h.items()
             if m not in BASELINES and m not in ("sam", "sam@0.05", "sam@auto")
             and e["time_ratio"] is not None and e["final"] - sgd >= 0.5 * gain]
  cheapest = ""
  if keepers:
    r, m = min(keepers)
    cheapest = (f" The cheapest variant that keeps at least half of SAM's gain is {LABELS[m]}, "
                f"at {r:.2f}× SGD's time.")
  return (f"SAM at its chosen radius gains {gain:+.2f} points over SGD at equal epochs "
          f"({h['sam']['time_ratio']:.2f}× SGD's time). At no more than {CHEAP}× SGD's time, "
          f"the variants that keep at least half of that gain are: {say(keep)}; those that lose "
          f"it: {say(lose)}. Above {CHEAP}×: {say(dear)}.{cheapest}\n")


def reference_table(study: dict) -> str:
  """The references: the MLP on clean labels and the CNN at 40% noise, where they ran."""
  header = "| model | method | seeds | final % | val-chosen % | best % | noisy-label fit % |"
  rows: list[str] = []
  for task in ("fmnist_mlp_noise0", "fmnist_cnn_noise40"):
    specs = sorted(study["tables"].get(task, {}), key=lambda s: (s not in BASELINES, s))
    for spec in specs:
      e = study["tables"][task][spec]
      rows.append(f"| {TASK_TITLES[task]} | {_method_of(spec)} | {e['seeds']} | "
                  f"{_pm(e, 'final')} | {_num(e.get('val_chosen'))} | {_num(e.get('best'))} | "
                  f"{_num(e.get('noisy_fit'), 1)} |")
  if not rows:
    rows.append("| – | not run | – | – | – | – | – |")
  return _table(header, rows)


def _method_of(spec: str) -> str:
  """A reference run's method in words: its name and setting (``SAM (ρ = 0.2)``), not the
  headline's role (``SAM, ρ chosen``: a reference keeps the 40%-noise MLP's radius)."""
  name = spec.split("@")[0].split("+")[0]
  label = {"sam": "SAM"}.get(name, LABELS.get(name, name))
  setting = _setting(spec)
  return label if setting == "–" else f"{label} ({setting})"


def _provenance(study: dict, partial_note: bool = True) -> str:
  m = study["meta"]
  state = "" if m["complete"] or not partial_note else (
      f" Partial: the MLP tables cover seed(s) {', '.join(map(str, m['seeds']))} of "
      f"{', '.join(map(str, m['planned_seeds']))}; the other runs have not finished yet.")
  return (f"\n<small>Generated by `python -m benchmarks.study --report` from "
          f"`benchmarks/study.json` ({m['date']}, {m['machine']}, jax {m['jax']}).{state}"
          f"</small>\n")


def pages(study: dict) -> dict[str, str]:
  """The generated docs pages, by file name under ``docs/_generated``."""
  tail = _provenance(study)
  return {"study_headline.md": headline_table(study) + tail,
          "study_gains.md": verdict_sentence(study) + gains_table(study) + tail,
          "study_regime.md": regime_table(study) + _provenance(study, partial_note=False),
          "study_variants.md": variants_table(study) + tail,
          "study_rho.md": rho_table(study) + tail,
          "study_frontier.md": frontier_sentence(study),
          "study_references.md": reference_table(study) + tail}


def readme_block(study: dict) -> str:
  """The README's figures (between its ``study:readme`` markers)."""
  h = study["headline"]
  e, g, w = h["equal_epochs"], h["equal_gradient_evaluations"], h["equal_wall_clock"]
  mlp = {k: r for k, r in study["regime"].get("mlp", {}).items()
         if int(k) in study["meta"]["seeds"]}
  best = np.mean([r["best"] for r in mlp.values()]) if mlp else float("nan")
  final = np.mean([r["final"] for r in mlp.values()]) if mlp else float("nan")
  rho = study["chosen"].get("sam", "sam@?").split("@")[1]
  seeds = len(study["meta"]["seeds"])
  parts = [
      f"On the full Fashion-MNIST with 40% of the training labels wrong ({seeds} "
      f"seed{'s' if seeds > 1 else ''}, `python -m benchmarks.study`), an MLP trained until SGD "
      f"memorizes the wrong labels "
      f"(SGD's best epoch {best:.2f}%, its last {final:.2f}%): SAM with ρ = {rho}, chosen on a "
      f"noisy validation split, ends at {e['sam']['final']:.2f}% "
      f"({e['sam']['time_ratio']:.2f}× SGD's time), against {e['sgd']['final']:.2f}% for SGD "
      f"at equal epochs"]
  if "sgd" in g:
    parts.append(f" and {g['sgd']['final']:.2f}% for SGD given SAM's gradient evaluations "
                 f"({g['sgd']['epochs']} epochs)")
    parts.append(f". Stopped at the epoch the noisy validation split picks, the gap is smaller: "
                 f"{e['sam']['val_chosen']:.2f}% for SAM against {g['sgd']['val_chosen']:.2f}% "
                 f"for SGD at SAM's gradient evaluations")
  if "sam@auto" in e:
    parts.append(f"; `rho=\"auto\"` ends at {e['sam@auto']['final']:.2f}% with no grid")
  if "sam@0.05" in e:
    parts.append(f", the default ρ = 0.05 at {e['sam@0.05']['final']:.2f}%")
  cheap = [(m, x) for m, x in e.items() if m not in BASELINES and x["time_ratio"] is not None
           and x["time_ratio"] <= CHEAP]
  if cheap:
    gain = e["sam"]["final"] - e["sgd"]["final"]
    keep = [(m, x) for m, x in cheap if x["final"] - e["sgd"]["final"] >= 0.5 * gain]
    m, x = max(keep or cheap, key=lambda mx: mx[1]["final"])
    if keep:
      say = (f"{LABELS[m]} keeps {x['final'] - e['sgd']['final']:+.2f} of SAM's {gain:+.2f} "
             f"points over SGD ({x['final']:.2f}% at {x['time_ratio']:.2f}× SGD's time)")
    else:
      which = "the only one in that budget" if len(cheap) == 1 else "the most accurate of them"
      say = (f"no variant keeps half of SAM's {gain:+.2f} points over SGD ({which}, "
             f"{LABELS[m]} at {x['time_ratio']:.2f}× SGD's time, ends at {x['final']:.2f}%)")
    parts.append(f". At ≤ {CHEAP}× SGD's time {say}")
  del w
  import textwrap
  return textwrap.fill("".join(parts) + ".", width=100, break_long_words=False,
                       break_on_hyphens=False) + "\n"


def results_block(study: dict) -> str:
  """RESULTS.md's entry for the study (between its ``study:index`` markers)."""
  return readme_block(study) + "\n" + gains_table(study)


def replace_block(text: str, name: str, block: str) -> str:
  """``text`` with what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->``
  replaced by ``block``; ``ValueError`` when the markers are missing."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  i, j = text.find(begin), text.find(end)
  if i < 0 or j < i:
    raise ValueError(f"markers {begin} ... {end} not found")
  return text[: i + len(begin)] + "\n" + block + text[j:]


# ---------------------------------------------------------------------------- figures


def _spread(ys: list[float], gap: float) -> list[float]:
  """Label heights at least ``gap`` apart, each as near its point as that allows."""
  order = np.argsort(ys)
  out = np.asarray(ys, float)[order].copy()
  for _ in range(200):
    moved = False
    for i in range(1, len(out)):
      if out[i] - out[i - 1] < gap:
        mid = 0.5 * (out[i] + out[i - 1])
        out[i - 1], out[i] = mid - gap / 2, mid + gap / 2
        moved = True
    if not moved:
      break
  res = np.empty_like(out)
  res[order] = out
  return res.tolist()


def plot_frontier(study: dict, path: str = FRONTIER_PNG) -> None:
  """Final test accuracy against time per run (× SGD's), every method at 40% noise, and the
  baselines under the longer compute matches; labels in a column right of the axes, in the
  points' vertical order, joined to their points."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  pts = []
  for match in MATCHES:
    for m, e in study["headline"][match].items():
      if (match != "equal_epochs" and m not in BASELINES) or e["time_ratio"] is None:
        continue
      if match != "equal_epochs" and any(p[3] == e["spec"] for p in pts):
        continue
      label = LABELS[m] + ("" if match == "equal_epochs" else f", {e['epochs']} epochs")
      pts.append((e["time_ratio"], e["final"], e["final_std"], e["spec"], label,
                  m in BASELINES))
  fig, ax = plt.subplots(figsize=(9, 7))
  ax.axvspan(0.5, CHEAP, color="0.93", zorder=0)   # from left of the axis (log: not 0)
  lo, hi = min(p[1] - p[2] for p in pts), max(p[1] + p[2] for p in pts)
  ax.text(0.81, 0.99, f"≤ {CHEAP}×", transform=ax.get_xaxis_transform(),
          ha="left", va="top", fontsize=9, color="0.4")
  xmax = max(p[0] for p in pts)
  ys = _spread([p[1] for p in pts], (hi - lo) / max(len(pts), 1))
  for (x, y, s, _, label, base), ly in zip(pts, ys, strict=True):
    color = "tab:gray" if base else "tab:blue"
    ax.errorbar(x, y, yerr=s, fmt="o", color=color, ms=5, capsize=2)
    ax.annotate(f"{label}  {y:.2f}", (x, y), xytext=(1.02, ly),
                textcoords=("axes fraction", "data"), fontsize=10, va="center", ha="left",
                color=color, arrowprops=dict(arrowstyle="-", color="0.75", lw=0.6))
  ax.set_ylim(min(lo, min(ys)) - 0.3, max(hi, max(ys)) + 0.3)
  # a log axis: the cheap variants between 1 and 2 stay apart with m-SAM's 9x on the same axis
  ax.set_xscale("log", base=2)
  ticks = [t for t in (0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16) if t <= xmax * 1.15]
  ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_xlim(0.8, xmax * 1.15)
  ax.set_xlabel("time per run, × SGD's 40-epoch run (this CPU; log scale)")
  ax.set_ylabel("final test accuracy, % (mean ± std over seeds)")
  ax.set_title("Fashion-MNIST MLP, 40% label noise:\naccuracy against cost", fontsize=11)
  ax.grid(alpha=0.3)
  fig.subplots_adjust(left=0.09, right=0.66, top=0.93, bottom=0.09)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(study: dict, path: str = CURVES_PNG) -> None:
  """Per method: test accuracy, noisy validation accuracy and noisy-label fit per epoch
  (means over seeds), SGD's memorization onset as a dashed line, the method's own dotted."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curves = study["curves"]
  methods = [m for m in LABELS if m in curves]
  sgd_onset = onset([x / 100 for x in curves["sgd"]["noisy_fit"]]) if "sgd" in curves else None
  cols = 3
  rows = -(-len(methods) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(10, 2.6 * rows + 0.6), sharex=True,
                           sharey=True, squeeze=False, layout="constrained")
  for ax, m in zip(axes.flat, methods, strict=False):
    c = curves[m]
    ep = np.arange(1, len(c["test_acc"]) + 1)
    ax.plot(ep, c["test_acc"], color="tab:blue", label="test (clean labels)")
    ax.plot(ep, c["val_acc"], color="tab:orange", label="validation (noisy labels)")
    ax.plot(ep, c["noisy_fit"], color="tab:red", label="wrong training labels fitted")
    if sgd_onset:
      ax.axvline(sgd_onset, color="0.4", ls="--", lw=0.8)
    own = onset([x / 100 for x in c["noisy_fit"]])
    if own and m != "sgd":
      ax.axvline(own, color="tab:red", ls=":", lw=0.9)
    ax.set_title(LABELS[m], fontsize=11)
    ax.grid(alpha=0.3)
    ax.set_ylim(0, 100)
  spare = list(axes.flat[len(methods):])
  for ax in spare:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  from matplotlib.lines import Line2D
  handles += [Line2D([], [], color="0.4", ls="--"), Line2D([], [], color="tab:red", ls=":")]
  labels += ["SGD's memorization onset", "the method's own onset"]
  if spare:   # the legend in the grid's first empty cell
    spare[0].legend(handles, labels, loc="center", fontsize=10, frameon=False)
  else:
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=10, frameon=False)
  fig.supxlabel("epoch")
  fig.supylabel("%")
  fig.suptitle("Fashion-MNIST MLP, 40% label noise: learning curves (means over seeds)")
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------------------ write


def write(store, all_tasks, timing_path, quick: bool = False, root: str | None = None) -> dict:
  """Summarizes the stored runs into study.json and writes every page and figure from it
  (under the store's folder for ``--quick``)."""
  from . import study as S
  results = S.stored(store, all_tasks)
  timing = S._read(timing_path)
  epochs = all_tasks[MAIN].epochs
  rho = S.choose_sam_rho(results, MAIN)
  chosen = S.chosen_specs(results, MAIN, rho) if rho is not None else {}
  chosen = {m: s for m, s in chosen.items() if any(k[1] == s and k[0] == MAIN for k in results)}
  choices = {"seeds": list(S.CHOICE_SEEDS),
             "sam": {f"{r:g}": v for r, v in S.sam_scores(results, MAIN).items()},
             "sweeps": {n: {f"{v:g}": s for v, s in S.sweep_scores(results, MAIN, n, rho).items()
                            if s is not None} for n in S.SWEEPS} if rho is not None else {}}
  study = summarize(results, timing, chosen, choices, epochs, S.matched_epochs(timing, epochs))
  from .lab.store import jsonable
  study = jsonable(study)
  out = root if quick else HERE
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump(study, f, indent=1)
  write_pages(study, quick=quick, root=root)
  return study


def write_pages(study: dict, quick: bool = False, root: str | None = None) -> None:
  """Every page and figure from ``study``."""
  gen = os.path.join(root, "generated") if quick else GENERATED
  os.makedirs(gen, exist_ok=True)
  for name, text in pages(study).items():
    with open(os.path.join(gen, name), "w") as f:
      f.write(text)
  complete_enough = all(m in study["headline"]["equal_epochs"] for m in ("sgd", "sam"))
  if complete_enough:
    for path, block_name, block in ((os.path.join(ROOT, "README.md"), "study:readme",
                                     readme_block(study)),
                                    (os.path.join(HERE, "RESULTS.md"), "study:index",
                                     results_block(study))):
      if quick:
        continue
      with open(path) as f:
        text = f.read()
      try:
        text = replace_block(text, block_name, block)
      except ValueError as err:
        print(f"{os.path.relpath(path, ROOT)} not updated: {err}")
        continue
      with open(path, "w") as f:
        f.write(text)
    plot_frontier(study, os.path.join(root, "frontier.png") if quick else FRONTIER_PNG)
    plot_curves(study, os.path.join(root, "curves.png") if quick else CURVES_PNG)
  print(f"wrote study.json, {len(pages(study))} pages under {gen} and the figures")
