"""Writes the API reference from each public module's ``__all__`` and checks it.

At ``config-inited`` it imports every public module of sam_optax (the fixed
list below plus any ``sam_optax.<name>`` module that does not start with an
underscore, so a new module gets a page without touching the docs), and writes
``api/<module>.rst`` with an ``autosummary`` table of the module's ``__all__``
(for a module without ``__all__``: the functions and classes it defines whose
names do not start with an underscore). Names of the top-level package are
grouped by their section in the method registry (``sam_optax._src.registry``).

At ``build-finished`` it fails the build when a public name has no page.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the page lists are also read by tests/test_docs.py, without sphinx
  from sphinx.application import Sphinx

PACKAGE = "sam_optax"
# Shown first, in this order; other public submodules follow alphabetically.
ORDERED = ["sam_optax", "sam_optax.sharpness", "sam_optax.flax", "sam_optax.checkpoint",
           "sam_optax.datasets"]
# Not API: the command-line demo.
SKIPPED = {"sam_optax.demo", "sam_optax.flax_training"}  # the demo; the deprecated name
# The top-level names are grouped by their section in the method registry
# (sam_optax/_src/registry.py): a new method needs no line here.
API_DIR = "api"
EXPECTED: dict[str, list[str]] = {}  # module -> public names, filled at config-inited
STUB_DIR = "_autosummary"


def public_modules() -> list[str]:
  pkg = importlib.import_module(PACKAGE)
  found = {f"{PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
           if not m.name.startswith("_")}
  extra = sorted(found - set(ORDERED) - SKIPPED)
  return ORDERED + extra


def public_names(module) -> list[str]:
  names = getattr(module, "__all__", None)
  if names is not None:
    return list(names)
  return [n for n, v in vars(module).items()
          if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
          and getattr(v, "__module__", None) == module.__name__]


def _table(names: list[str]) -> str:
  rows = "\n".join(f"   {n}" for n in names)
  return f".. autosummary::\n   :toctree: {STUB_DIR}\n   :nosignatures:\n\n{rows}\n"


def module_page(name: str) -> str:
  module = importlib.import_module(name)
  names = public_names(module)
  title = f"``{name}``"
  out = [title, "=" * len(title), "", f".. automodule:: {name}", "   :no-members:", "",
         f".. currentmodule:: {name}", ""]
  if name == PACKAGE:
    from sam_optax._src import registry
    section_of = {e.name: e.section for e in registry.ENTRIES}
    section_of.update({state: section_of[owner] for state, owner in registry.STATES.items()})
    groups: dict[str, list[str]] = {}
    for n in names:
      groups.setdefault(section_of.get(n, "Other"), []).append(n)
    for section in list(registry.SECTIONS) + ["Other"]:
      if section in groups:
        out += [section, "-" * len(section), "", _table(groups[section])]
  else:
    out += [_table(names)]
  return "\n".join(out)


def write_pages(app: Sphinx, config) -> None:
  api = Path(app.srcdir) / API_DIR
  api.mkdir(exist_ok=True)
  modules = public_modules()
  pages = {f"{m}.rst": module_page(m) for m in modules}
  toc = ["API reference", "=============", "",
         "Generated from each module's ``__all__`` when the docs are built.", "",
         ".. toctree::", "   :maxdepth: 1", ""] + [f"   {m}" for m in modules]
  pages["index.rst"] = "\n".join(toc) + "\n"
  for fname, text in pages.items():
    path = api / fname
    if not path.exists() or path.read_text() != text:  # unchanged files keep the build incremental
      path.write_text(text)
  EXPECTED.clear()
  EXPECTED.update({m: public_names(importlib.import_module(m)) for m in modules})


def check_pages(app: Sphinx, exception: Exception | None) -> None:
  if exception is not None:
    return
  from sphinx.errors import ExtensionError
  missing = [f"{m}.{n}" for m, names in EXPECTED.items() for n in names
             if f"{API_DIR}/{STUB_DIR}/{m}.{n}" not in app.env.all_docs]
  if missing:
    raise ExtensionError("public names without an API page: " + ", ".join(missing))


def setup(app: Sphinx) -> dict:
  # at config-inited, before Sphinx lists the source files and autosummary writes the stubs
  app.connect("config-inited", write_pages)
  app.connect("build-finished", check_pages)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
