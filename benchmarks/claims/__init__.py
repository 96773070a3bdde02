"""The seed article's claims about SAM, tested at a scale that fits two CPU cores.

One module per claim, each with ``run(quick, out) -> record``; ``common`` holds the
verdict rule, data, models and training loops they share. Run them all with
``python -m benchmarks.claims [--quick] [--only NAME[,NAME]] [--out DIR]``, or one
with ``python -m benchmarks.claims.<name> [--quick]``. See ``benchmarks/CLAIMS.md``.
"""

CLAIMS = ("ood", "gradual_domain_adaptation", "repeated_exposure", "one_pass_lm",
          "one_step_degrades",
          "flat_minima_not_always_better", "implicit_bias", "rho_sensitivity")
