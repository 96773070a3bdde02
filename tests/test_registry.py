"""The method registry is complete and the tables built from it are in sync.

Every name in ``sam_optax.__all__`` has an entry (or is an entry's state class); every
entry names a public function; the README's API table is the one the registry writes;
every entry has a golden row (or says it was added after the goldens were recorded); the
examples build; the deprecated names warn and name their replacement.
"""

import inspect
import os
import re
import warnings

import pytest

import sam_optax as so
from sam_optax._src import registry
from sam_optax._src.api_table import readme_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_public_name_has_an_entry():
  covered = {e.name for e in registry.ENTRIES} | set(registry.STATES)
  missing = sorted(set(so.__all__) - covered)
  assert not missing, ("public names without a registry entry (sam_optax/_src/registry.py): "
                       f"{missing}")
  unknown = sorted(covered - set(so.__all__))
  assert not unknown, f"registry entries that are not public names: {unknown}"


def test_entries_are_well_formed():
  names = [e.name for e in registry.ENTRIES]
  assert len(names) == len(set(names)), "an entry appears twice"
  for e in registry.ENTRIES:
    assert e.section in registry.SECTIONS, e
    assert e.role in registry.ROLES, e
    assert e.closure in registry.CLOSURES, e
    assert (e.example is None) == (e.role == "helper"), (
        f"{e.name}: a transformation needs an example")
    assert e.what.strip(), e.name
    fn = getattr(so, e.name)
    assert fn.__doc__ and "Example:" in fn.__doc__, f"{e.name} has no docstring Example"
    for static in e.static:
      assert static in inspect.signature(fn).parameters, (e.name, static)


def test_every_state_class_belongs_to_an_entry_of_its_section():
  for state, name in registry.STATES.items():
    assert hasattr(so, state), state
    assert registry.by_name()[name].state == state


def test_examples_build():
  for row, (entry, example) in registry.test_rows().items():
    t = example.build(entry.fn)
    assert hasattr(t, "init") and hasattr(t, "update"), row


def test_readme_api_table_is_the_registrys():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  m = re.search(r"<!-- api-table -->\n(.*?)<!-- /api-table -->", readme, re.S)
  assert m, "README.md has no <!-- api-table --> block"
  assert m.group(1) == readme_table(), (
      "README.md's API table differs from the registry's: run `python -m sam_optax._src.api_table "
      "--write` and commit README.md")


@pytest.mark.parametrize("old, new", [("adaptive_policy", "ae_sam"),
                                      ("apply_if_finite", "skip_if_nonfinite"),
                                      ("ESAMState", "SharpnessAwareState")])
def test_deprecated_names_warn_and_name_the_replacement(old, new):
  with pytest.warns(DeprecationWarning, match=new):
    got = getattr(so, old)
  assert got is getattr(so, new)


def test_gate_is_private_now():
  with pytest.warns(DeprecationWarning, match="internal"):
    gate = so.Gate
  assert "Gate" not in so.__all__ and gate.__module__ == "sam_optax._src.gating"


def test_flax_training_still_imports_with_a_warning():
  import importlib
  import sys
  sys.modules.pop("sam_optax.flax_training", None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ft = importlib.import_module("sam_optax.flax_training")
  assert any(issubclass(w.category, DeprecationWarning) and "sam_optax.flax" in str(w.message)
             for w in caught)
  from sam_optax import flax
  assert ft.make_linen_train_step is flax.make_linen_train_step


def _module_imports() -> dict[str, set[str]]:
  """Each module of the package and the package modules it imports at module level (``from
  pkg import submodule`` counts as the submodule, not the package)."""
  import ast
  from pathlib import Path
  root = Path(so.__file__).resolve().parent
  mods = {}
  for p in root.rglob("*.py"):
    parts = p.relative_to(root.parent).with_suffix("").parts
    mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
  graph = {m: set() for m in mods}
  for m, p in mods.items():
    for node in ast.parse(p.read_text()).body:
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = [f"{node.module}.{a.name}" for a in node.names]
        targets = [s for s in subs if s in mods] or [node.module]
      else:
        continue
      graph[m] |= {t for t in targets if t in mods and t != m and t != "sam_optax"}
  return graph


def test_no_import_circle_inside_the_package():
  graph, state, cycles = _module_imports(), {}, []

  def visit(u, path):
    state[u] = "open"
    for v in sorted(graph[u]):
      if state.get(v) == "open":
        cycles.append(" -> ".join(path[path.index(v):] + [v]))
      elif v not in state:
        visit(v, path + [v])
    state[u] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import circles: " + "; ".join(cycles)
