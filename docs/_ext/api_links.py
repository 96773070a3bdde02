"""Turns inline code that names a public object into a link to its API page.

The guides, the getting-started page and the included benchmark and claims pages
write API names as inline code (```sam_optax.looksam```, ```looksam(0.05, k=5)```,
```flax.make_linen_train_step```). At ``doctree-read`` every inline
literal outside code blocks and existing links is matched against the public names
(:data:`api_pages.EXPECTED`, filled at ``config-inited``): a full dotted name, a
name with the ``sam_optax.`` prefix left out (``flax.X``, ``sharpness.X``),
or a bare top-level name; a trailing call (``(...)``) or attribute access is allowed.
A match is wrapped in a ``py:obj`` cross-reference, which Sphinx resolves like any
other; text that matches nothing is left as it is.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import api_pages
from docutils import nodes
from sphinx import addnodes

if TYPE_CHECKING:
  from sphinx.application import Sphinx

_NAME = re.compile(r"^(?:so\.)?([A-Za-z_][\w.]*?)(?:\(.*\))?$", re.S)


def targets() -> dict[str, str]:
  """Every spelling a page may use -> the documented full name."""
  out: dict[str, str] = {}
  for module, names in api_pages.EXPECTED.items():
    short = module.removeprefix(f"{api_pages.PACKAGE}.")
    for name in names:
      full = f"{module}.{name}"
      out[full] = full
      if module == api_pages.PACKAGE:
        out.setdefault(name, full)
      else:
        out.setdefault(f"{short}.{name}", full)
  return out


def resolve(text: str, known: dict[str, str]) -> str | None:
  m = _NAME.match(text.strip())
  if not m:
    return None
  name = m.group(1)
  if name in known:
    return known[name]
  # `sam_optax.metrics(state)["sharpness"]`-like text is not matched; `Class.method` is
  head = name.rsplit(".", 1)[0]
  return known.get(head) if "." in name and head in known and head != name else None


def link_literals(app: Sphinx, doctree: nodes.document) -> None:
  docname = app.env.docname
  if docname.startswith(f"{api_pages.API_DIR}/"):
    return  # the API pages link their own names
  known = targets()
  for node in list(doctree.findall(nodes.literal)):
    if isinstance(node.parent, (nodes.reference, addnodes.pending_xref, nodes.literal_block)):
      continue
    target = resolve(node.astext(), known)
    if target is None:
      continue
    xref = addnodes.pending_xref("", refdomain="py", reftype="obj", reftarget=target,
                                 refexplicit=True, refwarn=False, refdoc=docname)
    node.replace_self(xref)
    node["classes"] += ["xref", "py", "py-obj"]
    xref += node


def setup(app: Sphinx) -> dict:
  app.connect("doctree-read", link_literals)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
