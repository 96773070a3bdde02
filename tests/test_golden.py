"""Bit-for-bit golden test: every public transformation and Flax train step against the
commits before the last two refactors.

``golden/golden.npz`` holds what the code at e828a15 computed for each row of
``golden/make_golden.py``'s ``ROWS`` and ``FLAX_ROWS`` (the contract table of that time,
extra paths, the linen and NNX train steps), and ``golden/golden_ddf7af2.npz`` what the code
at ddf7af2 computed for ``ROWS_DDF7AF2`` and ``FLAX_ROWS_DDF7AF2`` (the methods added
since, the objective closure, more Flax steps): per step the updates, the new params, every
optimizer-state leaf (keyed by its ``jax.tree_util.keystr`` path) and ``sam_optax.metrics``.
This test recomputes each row with the ``sam_optax`` that is importable and requires the
same bits and dtypes.

A deliberate change goes through the tables below, never through regenerating the golden.
There is one set of tables per refactor: ``CHANGES["e828a15"]`` (the one engine) and
``CHANGES["ddf7af2"]`` (the explicit protocol); a golden row sees the tables of every refactor
since its commit (the rows recorded at e828a15 both, those recorded at ddf7af2 the second):

* ``STATE_PATH_CHANGES``: a state leaf renamed or moved (old keystr regex -> new keystr),
  or removed on purpose (-> ``None``, with the reason in a comment on the entry);
* ``NEW_STATE_LEAVES``: state leaves the new code adds (regexes of the new keystr);
* ``NEW_METRICS``: names ``sam_optax.metrics`` / a train step newly reports;
* ``INTENDED_CHANGES``: values a deliberate bug fix changes (or metrics it drops), with the
  reason.

Updates, params and metrics must be equal unless listed in ``INTENDED_CHANGES``.
Regenerate (``python tests/golden/make_golden.py``) only from the old commit; see its docstring.

Bitwise equality only holds with the XLA the golden was made with: when jax, jaxlib,
optax (or flax, for the Flax rows) or the machine's architecture differ from those recorded
in the golden, the rows are skipped with the reason (set ``SAM_OPTAX_GOLDEN_STRICT=1`` to
compare anyway).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("sam_optax_make_golden",
                                               os.path.join(_HERE, "golden", "make_golden.py"))
mg = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mg  # dataclasses look their module up there
_spec.loader.exec_module(mg)

# ----------------------------------------------------------------- the change tables
#
# Keys in the golden are f"{row}/{section}/{kind}{path}" with section "init" or "step{i}" and
# kind "updates", "params", "batch_stats", "state" or "metrics/" (path: the metric's name).
# For the MLP rows `path` is the keystr of the leaf in the optimizer state, e.g.
# "[0].inner.telemetry.cosine"; for the linen rows it is the keystr in the TrainState without
# params and batch_stats (".step", ".opt_state[0].count", ".saf.logits"); for the NNX row in
# {"opt_state": ..., "rngs": ...} (pure dicts).

# Old state keystr -> new state keystr, for every row. The key is a regex matched in full
# against the old keystr (or a (row_regex, keystr_regex) pair to limit it to some rows);
# the value is a `re` template for the new keystr (`\1` for groups), or None: the leaf was
# removed on purpose -- put the reason in a comment on the entry. The first match applies.
# Example entries:
#   r"\[0\]\.inner\.(.*)": r"[0].\1",                 # GSAMState no longer wraps the core's
#   (r"looksam.*", r"\[0\]\.g_v_norm"): None,         # recomputed from g_v: one leaf fewer
# Issue 19, memory: the cosine keeps g alive through the second pass (a params-sized buffer);
# it is recorded (a state leaf) where the method keeps g anyway (GSAM, LookSAM, PGN, SAMPa,
# bSAM, Frob/Det-SAM) or with telemetry="full", and is None (no leaf) elsewhere.
_COSINE_FREE = (r"(gsam|looksam.*|gradient_norm_penalty|sampa.*|bsam|frob_sam|det_sam|linen_gsam"
                r"|linen_looksam|linen_sampa)")
_NO_COSINE = r"(?!" + _COSINE_FREE + r"$).*"
_ENGINE_ROWS = (r"(gsam|looksam|looksam_k3|looksam_grad_fn|gradient_norm_penalty|linen_gsam"
                r"|linen_looksam)")
_STATE_PATH_CHANGES_E828: dict[str | tuple[str, str], str | None] = {
    # GSAM, PGN and LookSAM are declarations on the engine, no longer wrappers of the
    # core: the core's fields (perturbation_state, telemetry) sit in their own state.
    # LookSAM's inner count (the number of SAM steps, which its rho schedule read) is
    # gone: a schedule is now read at the step count, as for every other method.
    (r"(looksam|linen_looksam).*", r"(.*)\.inner\.count"): None,
    (_NO_COSINE, r".*telemetry\.cosine"): None,
    (_NO_COSINE, r".*\['telemetry'\]\['cosine'\]"): None,
    (_ENGINE_ROWS, r"(.*)\.inner\.(perturbation_state|telemetry)(.*)"): r"\1.\2\3",
    (_ENGINE_ROWS, r"(.*)\.inner\.count"): r"\1.count",
}

# Regexes (matched in full) of new state keystrs with no golden counterpart, e.g.
#   r"\[0\]\.telemetry\.new_field",
_NEW_STATE_LEAVES_E828: list[str] = [
    # whether the cosine was recorded; the chain-order flag, read on the host by
    # sam_optax.metrics (the check used to call back to the host from the step)
    r".*telemetry\.misordered",
    r".*\['telemetry'\]\['misordered'\]",  # the NNX row's dict keys
]

# Regexes (matched in full) of metric names reported now that the golden does not have.
_NEW_METRICS_E828: list[str] = [
    # the ESAM, SAMPa, SAF and MESA steps are the one linen step now: they report what the
    # optimizer recorded (sam_optax.metrics), as the SAM step always did
    r"clean_grad_norm|clean_loss|perturbation_norm|perturbed_grad_norm|perturbed_loss|sharpness|cosine",
]

# (row_regex, key_regex) -> reason. key is the golden key after "{row}/", e.g.
# "step2/updates[0]['kernel']", "step1/state[0].count" or "step0/metrics/cosine"; both are
# matched in full. A listed value may differ (value, shape and dtype); the key must still
# exist, except a metric, which a listed change may drop.
#   ("esam.*", r"step\d+/metrics/clean_loss"): "the clean loss is now the mean of ...",
_INTENDED_CHANGES_E828: dict[tuple[str, str], str] = {
    (_NO_COSINE,
     r"(init|step\d+)/metrics/cosine"): "cosine recorded only where free (issue 19, memory)",
    # 1 ULP (1.024694 -> 1.024693) in the loss recorded at x~ on SAMPa's first linen step: the
    # one linen step's program (clean forward, then the vmapped pair) fuses differently in
    # XLA; updates, params, statistics and every other leaf are bitwise equal.
    ("linen_sampa",
     r"step0/state\.opt_state\.telemetry\.perturbed_loss"): "XLA fusion, 1 ULP, telemetry only",
    # Issue 19, memory: for the L2 geometry ||eps|| is rho * ||g||/||g|| (exactly rho), not a
    # reduction of eps itself, which made XLA keep a params-sized copy of eps through the
    # second pass (7.1 vs 3.6 MiB on the step-cost MLP); the recorded value moves by <= 1 ULP.
    (r".*", r"(init|step\d+)/(state.*telemetry(\.perturbation_norm|'\]\['perturbation_norm'\])"
            r"|metrics/perturbation_norm)"):
        "||eps|| in closed form for L2 (issue 19, memory), <= 1 ULP",
}

# The explicit protocol (issue 25). MSAM writes the standard Telemetry: its two norms move
# into it, and it records the caller's loss as the perturbed one (taken at w + eps).
_MSAM_ROWS = r"(msam|msam_adamw|linen_msam)"
_STATE_PATH_CHANGES_DDF: dict[str | tuple[str, str], str | None] = {
    (_MSAM_ROWS, r"(.*)\.(perturbation_norm|perturbed_grad_norm)"): r"\1.telemetry.\2",
}
_NEW_STATE_LEAVES_DDF: list[str] = [
    r"(\.opt_state)?\.telemetry\.(perturbed_loss|clean_loss|has_clean_loss|has_perturbed_loss|misordered)",
]
_NEW_METRICS_DDF: list[str] = [
    r"perturbed_loss",  # MSAM: the caller's loss, taken at the perturbed point
]
_INTENDED_CHANGES_DDF: dict[tuple[str, str], str] = {
    # the linen step reports the clean gradient's norm as `grad_norm` only for optimizers that
    # record no `clean_grad_norm` themselves (the same number): it reads no method's type, and
    # a method that takes its own gradients (SAMPa, bSAM) lets XLA drop the clean backward
    (r"linen_.*", r"step\d+/metrics/grad_norm"): "grad_norm is the telemetry's clean_grad_norm",
}

CHANGES = {
    "e828a15": (_STATE_PATH_CHANGES_E828, _NEW_STATE_LEAVES_E828, _NEW_METRICS_E828,
                _INTENDED_CHANGES_E828),
    "ddf7af2": (_STATE_PATH_CHANGES_DDF, _NEW_STATE_LEAVES_DDF, _NEW_METRICS_DDF,
                _INTENDED_CHANGES_DDF),
}
_ORDER = ("e828a15", "ddf7af2")   # the refactors, oldest first


def _tables(row: str) -> tuple[dict, list, list, dict]:
  """The change tables a row sees: those of every refactor since its golden's commit. A
  renamed leaf is renamed again by a later table (the tables compose in order)."""
  since = _ORDER[_ORDER.index(_COMMIT_OF[row]):]
  paths = [CHANGES[c][0] for c in since]
  leaves = [p for c in since for p in CHANGES[c][1]]
  metrics = [p for c in since for p in CHANGES[c][2]]
  intended = {k: v for c in since for k, v in CHANGES[c][3].items()}
  return paths, leaves, metrics, intended


# --------------------------------------------------------------------------- loading

_GOLDENS = {commit: np.load(path) for commit, (path, _) in mg.GOLDENS.items()}
_COMMIT_OF = {row: commit for commit, (_, rows) in mg.GOLDENS.items() for row in rows}
_ALL_ROWS = tuple(_COMMIT_OF)
_KEY = re.compile(r"(init|step\d+)/(updates|params|batch_stats|state|metrics/)(.*)", re.S)


def _is_flax(row: str) -> bool:
  return row.startswith(("linen_", "nnx_"))


def _golden_row(row: str) -> dict[str, np.ndarray]:
  golden = _GOLDENS[_COMMIT_OF[row]]
  prefix = row + "/"
  return {k[len(prefix):]: golden[k] for k in golden.files if k.startswith(prefix)}


def _version_mismatch(row: str) -> str | None:
  if os.environ.get("SAM_OPTAX_GOLDEN_STRICT") == "1":
    return None
  golden = _GOLDENS[_COMMIT_OF[row]]
  packages = ["jax", "jaxlib", "optax"] + (["flax"] if _is_flax(row) else [])
  diffs = []
  for pkg in packages:
    recorded = str(golden[f"__meta__/{pkg}"])
    try:
      now = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      now = "absent"
    if now != recorded:
      diffs.append(f"{pkg} {now} (golden: {recorded})")
  if platform.machine() != str(golden["__meta__/machine"]):
    diffs.append(f"machine {platform.machine()} (golden: {golden['__meta__/machine']})")
  return "; ".join(diffs) or None


# ------------------------------------------------------------------------ comparison


def _rename_state(row: str, path: str) -> tuple[bool, str | None]:
  """(matched, new path or None if removed) for an old state keystr, through every table
  the row sees, in order."""
  matched_any = False
  for table in _tables(row)[0]:
    for pattern, target in table.items():
      row_re, path_re = pattern if isinstance(pattern, tuple) else (".*", pattern)
      if not re.fullmatch(row_re, row):
        continue
      m = re.fullmatch(path_re, path)
      if m:
        matched_any = True
        if target is None:
          return True, None
        path = m.expand(target)
        break
  return matched_any, path


def _intended(row: str, key: str) -> str | None:
  for (row_re, key_re), reason in _tables(row)[3].items():
    if re.fullmatch(row_re, row) and re.fullmatch(key_re, key):
      return reason
  return None


def _same_cpu(row: str) -> bool:
  """Whether this CPU is the one the row's golden was recorded on (bitwise comparison);
  elsewhere XLA:CPU may round differently and the comparison allows :data:`OTHER_CPU`."""
  if os.environ.get("SAM_OPTAX_GOLDEN_STRICT") == "1":
    return True
  golden = _GOLDENS[_COMMIT_OF[row]]
  return "__meta__/cpu" in golden.files and str(golden["__meta__/cpu"]) == mg.cpu_fingerprint()


# on another CPU: ulp-level rounding differences, compounded over N_STEPS steps (measured:
# between two AMD EPYC machines, 1 entry of 9432 beyond rtol 1e-3 + atol 1e-6: an abs. 6e-6)
OTHER_CPU = {"rtol": 1e-3, "atol": 1e-5}


def _differs(old: np.ndarray, new: np.ndarray, exact: bool = True) -> str | None:
  if old.dtype != new.dtype:
    return f"dtype {new.dtype} (golden {old.dtype})"
  if old.shape != new.shape:
    return f"shape {new.shape} (golden {old.shape})"
  try:
    if exact:
      np.testing.assert_array_equal(new, old)
    elif np.issubdtype(old.dtype, np.inexact):
      np.testing.assert_allclose(new, old, **OTHER_CPU)
    else:
      np.testing.assert_array_equal(new, old)
  except AssertionError as e:
    return str(e).strip().replace("\n", "\n      ")
  if exact and old.tobytes() != new.tobytes():
    return "equal as numbers but not bitwise (signed zero or NaN payload)"
  return None


def compare(row: str, golden: dict[str, np.ndarray], new: dict[str, np.ndarray],
            exact: bool = True) -> list[str]:
  """The failures of one row: missing, unexpected and differing keys (``exact``: bitwise,
  else within :data:`OTHER_CPU`)."""
  failures, expected_new = [], set()
  for key, old in golden.items():
    m = _KEY.fullmatch(key)
    assert m, f"malformed golden key {row}/{key}"
    section, kind, path = m.groups()
    new_key = key
    if kind == "state":
      _, new_path = _rename_state(row, path)
      if new_path is None:  # removed on purpose (STATE_PATH_CHANGES)
        continue
      new_key = f"{section}/state{new_path}"
    expected_new.add(new_key)
    if new_key not in new:
      if kind == "metrics/" and _intended(row, key) is not None:
        continue  # a metric no longer reported, on purpose
      failures.append(f"missing: {key}" + (f" (renamed to {new_key})" if new_key != key else ""))
      continue
    if _intended(row, key) is not None:
      continue
    why = _differs(old, new[new_key], exact)
    if why is not None:
      failures.append(f"differs: {key}" + (f" -> {new_key}" if new_key != key else "") +
                      f": {why}")
  for key in sorted(set(new) - expected_new):
    m = _KEY.fullmatch(key)
    section, kind, path = m.groups() if m else (None, None, key)
    _, new_leaves, new_metrics, _ = _tables(row)
    if kind == "state" and any(re.fullmatch(p, path) for p in new_leaves):
      continue
    if kind == "metrics/" and any(re.fullmatch(p, path) for p in new_metrics):
      continue
    failures.append(f"unexpected (not in the golden): {key}")
  return failures


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("commit", sorted(mg.GOLDENS))
def test_golden_rows_match_the_table(commit):
  """Each golden was made from its table: no row without a golden, no golden without a row."""
  golden, (_, rows) = _GOLDENS[commit], mg.GOLDENS[commit]
  assert str(golden["__meta__/commit"]) == commit
  assert list(map(str, golden["__meta__/rows"])) == list(rows)
  rows_in_keys = {k.split("/", 1)[0] for k in golden.files if not k.startswith("__meta__/")}
  assert rows_in_keys == set(rows)


def test_change_tables_are_well_formed():
  assert set(CHANGES) == set(mg.GOLDENS) == set(_ORDER)
  for paths, leaves, metrics, intended in CHANGES.values():
    for pattern, target in paths.items():
      for p in pattern if isinstance(pattern, tuple) else (pattern,):
        re.compile(p)
      assert target is None or isinstance(target, str)
    for p in leaves + metrics:
      re.compile(p)
    for (row_re, key_re), reason in intended.items():
      re.compile(row_re), re.compile(key_re)
      assert isinstance(reason, str) and reason.strip(), "every intended change needs its reason"


# the fast lane's rows: SAM, a gated method, ESAM's objective, MSAM, a linen and the NNX step
_FAST = ("sam", "looksam", "esam", "msam", "linen_sam", "nnx_sam")


@pytest.mark.parametrize("row", [pytest.param(r, marks=() if r in _FAST else pytest.mark.slow)
                                 for r in _ALL_ROWS])
def test_golden(row):
  if _is_flax(row):
    pytest.importorskip("flax")
  mismatch = _version_mismatch(row)
  if mismatch:
    pytest.skip(f"bitwise golden needs the versions it was made with: {mismatch}")
  golden = _golden_row(row)
  assert golden, f"no golden for row {row}"
  computed = mg.compute_row(row)
  new = {k[len(row) + 1:]: v for k, v in computed.items()}
  failures = compare(row, golden, new, exact=_same_cpu(row))
  shown = "\n  ".join(failures[:25])
  more = f"\n  ... and {len(failures) - 25} more" if len(failures) > 25 else ""
  assert not failures, f"{row}: {len(failures)} of {len(golden)} golden arrays\n  {shown}{more}"


def test_every_registry_entry_has_a_golden_row():
  """Every public transformation of the method registry has recorded outputs, except those
  added after the last golden was recorded (``Entry(golden="")``), which say so."""
  from sam_optax._src import registry
  missing = [e.name for e in registry.ENTRIES if e.example is not None and e.golden != ""
             and e.golden_row not in _COMMIT_OF]
  assert not missing, f"registry entries without a golden row: {missing}"
