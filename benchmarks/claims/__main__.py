"""``python -m benchmarks.claims [--quick] [--only NAME[,NAME]] [--out DIR]``.

Runs the claims (all, or those named) and writes ``DIR/results.json``: the
environment and, for each claim, its record (name, verdict, the tests with their
per-seed values and 95% intervals, the measured figures, the published figures it
echoes, the plots, the run time). With ``--only``, the other claims' records
already in ``DIR/results.json`` are kept. ``DIR`` defaults to ``benchmarks/claims``
(the committed full run) and, with ``--quick``, to ``benchmarks/claims/quick`` (ignored by
git), so a smoke test never overwrites the full run's records and plots.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from benchmarks.claims import CLAIMS
from benchmarks.claims import common as C


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.claims", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help="tiny settings: a smoke test of every script")
  ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CLAIMS)}")
  ap.add_argument("--out", default=None,
                  help="output folder (default: benchmarks/claims, where the committed full run "
                       "lives; benchmarks/claims/quick with --quick, so a smoke test never "
                       "overwrites it)")
  args = ap.parse_args(argv)
  args.out = C.out_dir(args.out, args.quick)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CLAIMS)
  unknown = [n for n in names if n not in CLAIMS]
  if unknown:
    ap.error(f"unknown claim(s) {unknown}; choose from {', '.join(CLAIMS)}")
  path = os.path.join(args.out, "results.json")
  previous = {}
  if args.only and os.path.exists(path):
    with open(path) as f:
      previous = {c["name"]: c for c in json.load(f).get("claims", [])}
  records = dict(previous)
  t0 = time.time()
  for name in names:
    module = importlib.import_module(f"benchmarks.claims.{name}")
    records[name] = C.run_claim(name, module.run, args.quick, args.out)
  ordered = [records[n] for n in CLAIMS if n in records]
  command = " ".join(["python -m benchmarks.claims", *(argv if argv is not None else sys.argv[1:])])
  C.write_json(path,
               {"environment": C.environment(), "command": command, "rule": C.RULE,
                "claims": ordered})
  print(f"\n{len(names)} claim(s) in {time.time() - t0:.0f} s; {path}")
  for rec in ordered:
    print(f"  {rec['name']:<31} {rec['verdict']:<14} ({rec['seconds']:.0f} "
          f"s{', quick' if rec['quick'] else ''})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
