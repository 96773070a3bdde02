"""Markdown tables from results.json, for benchmarks/CLAIMS.md (so no figure is retyped by hand).

  python -m benchmarks.claims.report [--results benchmarks/claims/results.json] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.claims import common as C


def ms(pair, digits=2):
  return "–" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def table(header, rows):
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
  return "\n".join(out)


def tests_table(rec):
  rows = []
  for t in rec["tests"]:
    lo, hi = t["ci95"]
    unit = f" {t['unit']}" if t["unit"] else ""
    thr = f", ≥ {t['min_effect']:g}" if t["min_effect"] else ""
    rows.append([("**primary** " if t["primary"] else "") + t["name"],
                 f"{t['mean']:+.3f} ± {t['std']:.3f}{unit}",
                 f"[{lo:+.3f}, {hi:+.3f}]", t["n"], f"{t['predicted']}{thr}", t["verdict"]])
  return table(["test", "mean ± std", "95% CI", "seeds", "predicted", "verdict"], rows)


def ood(f):
  out = []
  keys = ["clean", "noise", "blur", "rotate15", "rotate30", "shift", "contrast", "corrupted_mean"]
  for ds, res in f["corruptions"].items():
    out.append(f"Accuracy (%) on {ds}, trained clean:\n\n" + table(
        ["optimizer", *keys], [[o, *[ms(r[k]) for k in keys]] for o, r in res.items()]))
  for ds, res in f["dominoes"].items():
    rows = [[o, ms(r.get("cue_matches")), ms(r.get("cue_random")),
             ms(r["probe"])] for o, r in res.items()]
    out.append(f"Dominoes on {ds} (accuracy %, 'init' = the untrained network's "
               f"features):\n\n" + table(
        ["model", "cue = label", "cue random", "linear probe, cue random"], rows))
  return "\n\n".join(out)


def gradual_domain_adaptation(f):
  res = f["target_accuracy"]
  keys = list(next(iter(res.values())))
  return "Target accuracy (%), 55-60 degrees:\n\n" + table(
      ["optimizer", *keys], [[n, *[ms(r[k], 1) for k in keys]] for n, r in res.items()])


def _sweep(f, key, digits):
  res = f[key]
  es = list(next(iter(res.values())))
  return table(["run", *[f"E={e}" for e in es]],
               [[n, *[ms(r[e], digits) for e in es]] for n, r in res.items()])


def repeated_exposure(f):
  return "Test accuracy (%) on clean labels; E = passes over the data at fixed steps:\n\n" + _sweep(
      f, "test_accuracy", 2)


def one_pass_lm(f):
  t = f["text"]
  return (f"Text: {t['train_files']} training files ({t['train_bytes']:,} bytes), "
          f"{t['validation_files']} validation files ({t['val_bytes']:,} bytes), Python "
          f"{t['python']}. Validation bits per byte:\n\n"
          + _sweep(f, "validation_bits_per_byte", 3))


def one_step_degrades(f):
  keys = ["loss", "grad_norm", "lambda_max", "kappa", "s1", "sK", "ratio", "cos_one_multi",
          "cos_one_vmax",
          "rayleigh_ratio"]
  return "First and last checkpoint:\n\n" + table(
      ["checkpoint",
       *keys], [[w, *[ms(f[f"{w}_checkpoint"][k], 3) for k in keys]] for w in ("first", "last")])


def flat_minima_not_always_better(f):
  r = f["rescaling"]
  alphas = list(next(iter(r["values"].values())))
  out = [f"Rescaling (test accuracy {ms(r['test_accuracy'])}%, largest logit change "
         f"{r['max_logit_change']:.2e}):\n\n" + table(["measure", *[f"alpha={a}" for a in alphas]],
                        [[k, *[ms(v[a], 3) for a in alphas]] for k, v in r["values"].items()])]
  out.append("Kendall tau over the grid (per seed, mean ± std):\n\n" + table(
      ["pair", "tau"], [[k, ms(v)] for k, v in f["kendall_tau"].items()]))
  return "\n\n".join(out)


def implicit_bias(f):
  e = f["edge_of_stability"]
  cf = e["closed_form"]
  out = [table(["run", "plateau of lambda_max", "closed form", "final loss"],
               [["GD", ms(e["plateau"]["gd"]), f"{cf['gd']:.2f}", ms(e["final_loss"]["gd"], 4)],
                ["USAM", ms(e["plateau"]["usam"]), f"{cf['usam']:.2f}",
                 ms(e["final_loss"]["usam"], 4)],
                ["SAM", ms(e["plateau"]["sam"]),
                 ms(cf["sam_at_measured_grad_norm"]) + " (at measured |g|)",
                 ms(e["final_loss"]["sam"], 4)]])]
  rhos = list(f["feature_rank"])
  out.append("Feature rank (principal components for 99% of the variance) and test "
             "accuracy (%):\n\n" + table(
      ["rho", *rhos], [["rank", *[ms(f["feature_rank"][r], 1) for r in rhos]],
                       ["test accuracy", *[ms(f["feature_rank_test_accuracy"][r]) for r in rhos]]]))
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
    out.append(f"{ds}, accuracy (%) against rho (test; validation = the held-out 20% of the "
               f"training set):\n\n"
               + table(["SAM rho", "SAM test", "SAM val", "ASAM rho", "ASAM test", "ASAM val"],
                       rows))
  first = next(iter(f["cnn"].values()))
  out.append("Digits CNN, 40% label noise:\n\n" + table(
      ["arm", *first.keys()], [[k, *[ms(x) for x in v.values()]] for k, v in f["cnn"].items()]))
  return "\n\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--results", default=os.path.join(C.HERE, "results.json"))
  ap.add_argument("--only", default="")
  args = ap.parse_args(argv)
  with open(args.results) as fh:
    results = json.load(fh)
  for rec in results["claims"]:
    if args.only and rec["name"] not in args.only.split(","):
      continue
    print(f"## {rec['name']}: {rec['verdict']} ({rec['seconds']:.0f} s)\n")
    print(globals()[rec["name"]](rec["figures"]) + "\n")
    print(tests_table(rec) + "\n")


if __name__ == "__main__":
  main()
