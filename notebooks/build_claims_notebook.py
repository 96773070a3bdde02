"""Writes notebooks/05_claims.ipynb (three of the seed article's claims, re-run and plotted).

Kept apart from build_notebooks.py, whose helpers it reuses, so notebooks 01-04 are untouched.

  python notebooks/build_claims_notebook.py && PYTHONPATH=. jupyter nbconvert --execute --inplace \
      notebooks/05_claims.ipynb   # or tests/test_claims.py, with SAM_OPTAX_NOTEBOOK_SMALL=1
"""

import os

from build_notebooks import SMALL, notebook

CLAIMS_NB = [
    "md:# Does SAM do what the article says? Three claims, re-run\n\n"
    "`benchmarks/claims` tests the seed article's eight claims about SAM on data that needs no download, "
    "at a scale that fits two CPU cores: one script per claim, each returning a record with the measured "
    "figures, sign tests over seeds and a verdict (`python -m benchmarks.claims`; the full write-up is "
    "`benchmarks/CLAIMS.md`). The rule: a test is *supported* when the 95% interval of its per-seed "
    "statistic excludes 0 on the predicted side, *not supported* when it lies wholly on the wrong side "
    "(or below the effect size the claim names), *inconclusive* otherwise.\n\n"
    "This notebook shows three of them. By default it reads the committed full run "
    "(`benchmarks/claims/results.json` and its plots, written by `python -m benchmarks.claims`); set "
    "`RERUN = True` below (or `SAM_OPTAX_CLAIMS_RERUN=1`) to re-run the three here with the full "
    "settings, a few minutes each. Under `SAM_OPTAX_NOTEBOOK_SMALL=1` (the test suite) they re-run with "
    "their `--quick` settings, a smoke test whose verdicts mean little.",
    SMALL,
    '''import json, os, sys, tempfile
from IPython.display import Image, display
try:
    import benchmarks.claims
except ImportError:  # started from notebooks/: the repository root is one level up
    sys.path.insert(0, os.path.abspath(".."))
from benchmarks.claims import common, flat_minima_not_always_better, implicit_bias, one_step_degrades

RERUN = SMALL or os.environ.get("SAM_OPTAX_CLAIMS_RERUN") == "1"
OUT = tempfile.mkdtemp(prefix="claims_") if RERUN else common.HERE

with open(os.path.join(common.HERE, "results.json")) as f:
    committed = json.load(f)

def get(module):
    """The claim's record: re-run (RERUN) or the committed full run's."""
    if RERUN:
        return module.run(quick=SMALL, out=OUT)
    name = module.__name__.rsplit(".", 1)[-1]
    return next(c for c in committed["claims"] if c["name"] == name)

def show(record):
    print(f"{record['name']}: {record['verdict']} at this scale ({record['seconds']:.0f} s"
          f"{', quick settings' if record['quick'] else ''})")
    for t in record["tests"]:
        lo, hi = t["ci95"]
        print(f"  {'primary ' if t['primary'] else '        '}{t['name']}: {t['mean']:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}] {t['unit']} -> {t['verdict']}")
    for plot in record["plots"]:
        display(Image(filename=os.path.join(OUT, plot)))

print("the committed full run:")
for c in committed["claims"]:
    print(f"  {c['name']:<31} {c['verdict']}")''',
    "md:## Implicit bias: the edge of stability and low-rank features\n\n"
    "Full-batch gradient descent drives the top Hessian eigenvalue up until it reaches 2/η and then "
    "hovers there (Cohen et al. 2021). SAM's ascent step makes the dynamics unstable earlier: for "
    "USAM (ε = ρg) the threshold solves ηλ(1 + ρλ) = 2, 12.4 instead of 20 at η = 0.1, ρ = 0.05; for "
    "SAM (ε = ρg/‖g‖) the same formula holds with ρ/‖g‖, so the plateau falls as the gradient shrinks. "
    "The right panel shows the feature rank of the last hidden layer against ρ.",
    '''record = get(implicit_bias)
show(record)''',
    "md:In the committed full run the three plateaus do land on their closed forms: GD at 20.22 against "
    "2/η = 20, USAM at 12.55 against 12.36, SAM at 6.62 against 6.42 (the formula evaluated at its "
    "measured gradient norm), each within 10% on every seed, and the 2-cycle on the quadratic has "
    "exactly the predicted amplitude. USAM's plateau is set by ρ and η alone; SAM's also moves with "
    "the gradient norm, which is why it is the lowest. The feature-rank half does not reproduce "
    "Andriushchenko et al.: the rank rises from 73.8 at ρ = 0 to 91.6 at ρ = 0.2 and falls below "
    "SGD's only at ρ = 0.8 (66.4), so Spearman(ρ, rank) is −0.131 with an interval that includes 0, "
    "and the claim is *inconclusive* at this scale.",
    "md:## The one-step ascent degrades during training\n\n"
    "SAM evaluates the gradient at w + ρ g/‖g‖, one ascent step. How much of the worst case in the "
    "ρ-ball does that step reach? Second-order reasoning predicts the ratio r = s₁/s_K of one-step to "
    "multi-step sharpness falls as κ = ‖g‖/(ρλ_max) falls during training. In the committed full run it "
    "does: r falls from 0.990 at initialization to 0.785 after 960 steps (first quarter of the "
    "checkpoints minus the last: +0.191, 95% interval [+0.136, +0.245]), the one-step and multi-step "
    "perturbations drift apart (cosine 0.990 → 0.727), and r follows κ with a Spearman correlation of "
    "+0.936, so the claim is *supported*. κ only falls to 0.479, so r is still far above its quadratic "
    "limit (the Rayleigh quotient, 0.337 at the end).",
    '''record = get(one_step_degrades)
show(record)''',
    "md:## Flat minima need not generalize better\n\n"
    "Rescaling a ReLU net's first layer by α and its second by 1/α changes nothing the network computes, "
    "yet moves the top Hessian eigenvalue and the L2 sharpness by orders of magnitude (Dinh et al. "
    "2017); ASAM's adaptive sharpness is invariant. Over a grid of trained models, sharpness sorts the "
    "models by learning rate rather than by test error (Andriushchenko et al. 2023). In the committed "
    "full run both hold for the standard measures: with the logits unchanged, λ_max goes from 1.417 at "
    "α = 1 to 76.375 at α = 0.1 while the adaptive sharpness stays at 0.020, and over the 141 grid "
    "models that fit the training set λ_max ranks them by learning rate (τ = −0.71) far more than by "
    "test error (τ = +0.24); all four primary tests are *supported*. Adaptive sharpness is the "
    "exception: it ignores the learning rate (τ = +0.02) and tracks test error (τ = +0.42).",
    '''record = get(flat_minima_not_always_better)
show(record)''',
    "md:What the three say together, at this scale: SAM does flatten the solution in the sense its "
    "stability theory predicts (its λ_max plateau is the lowest, where the formula puts it), though the "
    "low-rank features reported for larger networks do not appear here; the one-step approximation it "
    "relies on reaches less of the worst case as the gradient shrinks relative to the curvature; and "
    "flatness measured by λ_max or L2 sharpness is a property of the parametrization and the learning "
    "rate as much as of generalization, while the rescaling-invariant adaptive sharpness does track "
    "test error on this grid. `benchmarks/CLAIMS.md` has the tables, the other five claims, and what a "
    "larger scale could change.",
]

if __name__ == "__main__":
  import nbformat as nbf
  here = os.path.dirname(os.path.abspath(__file__))
  nbf.write(notebook(CLAIMS_NB), os.path.join(here, "05_claims.ipynb"))
