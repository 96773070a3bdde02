"""Markdown tables from results.json, for benchmarks/CLAIMS.md (so no figure is retyped by hand).

  python -m benchmarks.claims.report [--results benchmarks/claims/results.json] [--only NAME]

Prints the table of primary tests first (not with --only), then, per claim, the figure tables
and the table of tests that CLAIMS.md shows under that claim's *Results*. Tables are kept narrow
(a handful of columns, short headers, the unit in a note under the table) so that they fit a
documentation page without scrolling.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from benchmarks.claims import common as C

# Display names for keys of results.json; a key not listed here is shown as it is.
LABELS = {
  "clean": "clean",
  "noise": "Gaussian noise",
  "blur": "blur",
  "rotate15": "rotation ±15°",
  "rotate30": "rotation ±30°",
  "shift": "translation",
  "contrast": "low contrast",
  "corrupted_mean": "mean of the 6 corruptions",
  "test_accuracy": "test accuracy (%)",
  "loss_epoch_4": "loss in epoch 4",
  "lambda_max": "λ_max",
  "l2_sharpness": "L2 sharpness",
  "adaptive_sharpness": "adaptive sharpness",
  "test_error": "test error",
  "corrupted_error": "corrupted error",
  "lr": "learning rate",
  "grad_norm": "‖g‖",
  "kappa": "κ",
  "s1": "s₁",
  "sK": "s_K",
  "ratio": "r = s₁ / s_K",
  "cos_one_multi": "cos(one-step, multi-step)",
  "cos_one_vmax": "|cos(one-step, v_max)|",
  "rayleigh_ratio": "ĝᵀHĝ / λ_max",
}


def label(key):
  return LABELS.get(key, key)


def ms(pair, digits=2):
  return "–" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def signed_ms(pair, digits=2):
  return "–" if pair is None else f"{pair[0]:+.{digits}f} ± {pair[1]:.{digits}f}"


def table(header, rows):
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
  return "\n".join(out)


def unit_note(tests):
  """The unit of the statistics as a note under the table (none when no test has a unit).

  The commonest unit goes in the note; rows in another unit (or in none) carry a marker."""
  units = Counter(t["unit"] for t in tests)
  main = units.most_common(1)[0][0]
  marks = {u: " " + "†‡§"[i] for i, u in enumerate(u for u in units if u != main)}
  if not main and not marks:
    return marks, ""
  parts = [f"in {main}" if main else "without a unit"]
  parts += [f"rows marked{m}: {('in ' + u) if u else 'no unit'}" for u, m in marks.items()]
  return marks, "\n\nMean, standard deviation and interval " + "; ".join(parts) + "."


def tests_table(rec):
  marks, note = unit_note(rec["tests"])
  rows = []
  for t in rec["tests"]:
    lo, hi = t["ci95"]
    thr = f", ≥ {t['min_effect']:g}" if t["min_effect"] else ""
    rows.append([("**primary** " if t["primary"] else "") + t["name"] + marks.get(t["unit"], ""),
                 f"{t['mean']:+.3f} ± {t['std']:.3f}", f"[{lo:+.3f}, {hi:+.3f}]", t["n"],
                 f"{t['predicted']}{thr}", t["verdict"]])
  return table(["test", "mean ± std", "95% CI", "seeds", "predicted", "verdict"], rows) + note


def summary(results):
  """The primary tests of every claim, one row each: the figures behind each verdict."""
  rows = []
  for i, rec in enumerate(results["claims"], 1):
    first = True
    for t in rec["tests"]:
      if not t["primary"]:
        continue
      lo, hi = t["ci95"]
      unit = f" {t['unit']}" if t["unit"] else ""
      rows.append([str(i) if first else "", t["name"], f"{t['mean']:+.3f}{unit}",
                   f"[{lo:+.3f}, {hi:+.3f}]", t["verdict"]])
      first = False
  return table(["claim", "primary test", "mean", "95% CI", "verdict"], rows)


def ood(f):
  out = []
  keys = ["clean", "noise", "blur", "rotate15", "rotate30", "shift", "contrast", "corrupted_mean"]
  for ds, res in f["corruptions"].items():
    out.append(f"Accuracy (%) on {ds}, trained on clean images:\n\n" + table(
        ["test images", *res], [[label(k), *[ms(r[k]) for r in res.values()]] for k in keys]))
  rows = [[ds if i == 0 else "", o, ms(r.get("cue_matches")), ms(r.get("cue_random")),
           ms(r["probe"])]
          for ds, res in f["dominoes"].items() for i, (o, r) in enumerate(res.items())]
  out.append("Dominoes, accuracy (%):\n\n" + table(
      ["dataset", "model", "cue = label", "cue random", "probe"], rows)
      + "\n\n*cue = label*: the bar gives the label, as in training; *cue random*: the bar is "
        "random; *probe*: a linear probe on the frozen last hidden layer, cue random; *init*: the "
        "untrained network's features.")
  return "\n\n".join(out)


def gradual_domain_adaptation(f):
  res = f["target_accuracy"]
  keys = list(next(iter(res.values())))
  return ("Target accuracy (%), 55-60 degrees:\n\n"
          + table(["setting", *res], [[k, *[ms(r[k], 1) for r in res.values()]] for k in keys])
          + "\n\n*source_test*: the source model on upright test images; every other row is "
            "target accuracy. *source_only*: the source model; *direct*: one stage of "
            "self-training on the target; *T*: the number of intermediate domains.")


def _sweep(f, key, digits):
  res = f[key]
  es = list(next(iter(res.values())))
  return table(["run", *[f"E={e}" for e in es]],
               [[n, *[ms(r[e], digits) for e in es]] for n, r in res.items()])


def repeated_exposure(f):
  g = f["gain_equal_steps"]
  es = list(next(iter(g.values())))
  return ("Test accuracy (%) on clean labels; E = passes over the data at fixed steps:\n\n"
          + _sweep(f, "test_accuracy", 2)
          + "\n\nSAM's gain over AdamW at equal steps (points; `gain_equal_steps`):\n\n"
          + table(["ρ", *[f"E={e}" for e in es]],
                  [[rho, *[signed_ms(r[e]) for e in es]] for rho, r in g.items()]))


def one_pass_lm(f):
  t = f["text"]
  return (f"Text: {t['train_files']} training files ({t['train_bytes']:,} bytes), "
          f"{t['validation_files']} validation files ({t['val_bytes']:,} bytes), Python "
          f"{t['python']}. Validation bits per byte:\n\n"
          + _sweep(f, "validation_bits_per_byte", 3))


def one_step_degrades(f):
  keys = ["loss", "grad_norm", "lambda_max", "kappa", "s1", "sK", "ratio", "cos_one_multi",
          "cos_one_vmax", "rayleigh_ratio"]
  return ("First and last checkpoint:\n\n"
          + table(["quantity", "first", "last"],
                  [[label(k), *[ms(f[f"{w}_checkpoint"][k], 3) for w in ("first", "last")]]
                   for k in keys]))


def flat_minima_not_always_better(f):
  r = f["rescaling"]
  v = r["values"]
  alphas = list(next(iter(v.values())))
  out = [f"Rescaling by α (test accuracy {ms(r['test_accuracy'])}%, largest logit change "
         f"{r['max_logit_change']:.2e}):\n\n"
         + table(["α", *[label(k) for k in v]], [[a, *[ms(x[a], 3) for x in v.values()]]
                                                 for a in alphas])]
  tau = {}
  for pair, val in f["kendall_tau"].items():
    measure, other = pair.split(" vs ")
    tau.setdefault(measure, {})[other] = val
  others = list(next(iter(tau.values())))
  out.append(f"Kendall τ over the grid (per seed, mean ± std; {f['grid_models_fitting']} of the "
             f"{f['grid_models']} models reached 99% training accuracy and enter it):\n\n"
             + table(["measure", *[f"τ with {label(o)}" for o in others]],
                     [[label(m), *[ms(x[o]) for o in others]] for m, x in tau.items()]))
  return "\n\n".join(out)


def implicit_bias(f):
  e = f["edge_of_stability"]
  cf = e["closed_form"]
  out = [table(["run", "λ_max plateau", "closed form", "final loss"],
               [["GD", ms(e["plateau"]["gd"]), f"{cf['gd']:.2f}", ms(e["final_loss"]["gd"], 4)],
                ["USAM", ms(e["plateau"]["usam"]), f"{cf['usam']:.2f}",
                 ms(e["final_loss"]["usam"], 4)],
                ["SAM", ms(e["plateau"]["sam"]), ms(cf["sam_at_measured_grad_norm"]) + " †",
                 ms(e["final_loss"]["sam"], 4)]])
         + "\n\n† SAM's closed form is evaluated at its measured gradient norm ‖g‖ "
           "(mean ± std over seeds)."]
  rhos = list(f["feature_rank"])
  out.append("Feature rank (principal components for 99% of the variance) and test "
             "accuracy (%):\n\n" + table(
                 ["ρ", "rank", "test accuracy"],
                 [[r, ms(f["feature_rank"][r], 1), ms(f["feature_rank_test_accuracy"][r])]
                  for r in rhos]))
  q = f["quadratic_cycle"]
  out.append("Quadratic 2-cycle: " + ", ".join(f"amplitude {c['amplitude']:.5f} vs "
                                               f"{c['predicted']:.5f}"
                                               for c in q[:3]) + f" (first 3 of {len(q)} seeds).")
  return "\n\n".join(out)


def rho_sensitivity(f):
  out = []
  for ds, res in f["sweep"].items():
    rows = [[f"{rs:g}", ms(res["sam"]["test"][i]), ms(res["sam"]["val"][i]), f"{ra:g}",
             ms(res["asam"]["test"][i]), ms(res["asam"]["val"][i])]
            for i, (rs, ra) in enumerate(zip(f["rhos_sam"], f["rhos_asam"]))]
    out.append(f"{ds}, accuracy (%) against ρ; *val*: the held-out 20% of the training set:\n\n"
               + table(["SAM ρ", "SAM test", "SAM val", "ASAM ρ", "ASAM test", "ASAM val"], rows))
  first = next(iter(f["cnn"].values()))
  out.append("Digits CNN, 40% label noise:\n\n" + table(
      ["arm", *[label(k) for k in first]],
      [[k, *[ms(x) for x in v.values()]] for k, v in f["cnn"].items()]))
  return "\n\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--results", default=os.path.join(C.HERE, "results.json"))
  ap.add_argument("--only", default="")
  args = ap.parse_args(argv)
  with open(args.results) as fh:
    results = json.load(fh)
  if not args.only:
    print("## Summary: primary tests\n")
    print(summary(results) + "\n")
  for rec in results["claims"]:
    if args.only and rec["name"] not in args.only.split(","):
      continue
    print(f"## {rec['name']}: {rec['verdict']} ({rec['seconds']:.0f} s)\n")
    print(globals()[rec["name"]](rec["figures"]) + "\n")
    print(tests_table(rec) + "\n")


if __name__ == "__main__":
  main()
