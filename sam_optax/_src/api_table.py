"""The README's API table, written from the method registry.

``python -m sam_optax._src.api_table`` prints it; ``--write`` replaces the block between
``<!-- api-table -->`` and ``<!-- /api-table -->`` in ``README.md``
(``tests/test_registry.py`` checks that the committed README holds what this writes).
"""

from __future__ import annotations

import inspect
import os
import re
import sys

from sam_optax._src import registry


def _default(value) -> str:
  if isinstance(value, str):
    return repr(value).replace("'", '"')
  return repr(value)


def signature(fn) -> str:
  """``name(arg=default, *, kw=default)`` without annotations."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):  # pragma: no cover - builtins
    return fn.__name__
  parts, star = [], False
  for p in sig.parameters.values():
    if p.kind == p.VAR_POSITIONAL:
      parts.append(f"*{p.name}")
      star = True
      continue
    if p.kind == p.VAR_KEYWORD:
      parts.append(f"**{p.name}")
      continue
    if p.kind == p.KEYWORD_ONLY and not star:
      parts.append("*")
      star = True
    parts.append(p.name if p.default is p.empty else f"{p.name}={_default(p.default)}")
  return f"{fn.__name__}({', '.join(parts)})"


def readme_table() -> str:
  """The markdown: one table per section, a row per entry (its signature, what it does and
  its state, the paper)."""
  out = []
  for section in registry.SECTIONS:
    entries = [e for e in registry.ENTRIES if e.section == section]
    out.append(f"#### {section}\n\n| name | what | paper |\n|---|---|---|")
    for e in entries:
      what = e.what + (f"; state `{e.state}`" if e.state else "")
      out.append(f"| `{signature(e.fn)}` | {what} | {e.paper} |")
    out.append("")
  return "\n".join(out)


def write(readme: str) -> bool:
  """Replaces the README's API block; True if it changed."""
  with open(readme, encoding="utf-8") as f:
    text = f.read()
  block = re.compile(r"(<!-- api-table -->\n)(.*?)(<!-- /api-table -->)", re.S)
  if not block.search(text):
    raise SystemExit(f"{readme} has no <!-- api-table --> ... <!-- /api-table --> block")
  new = block.sub(lambda m: m.group(1) + readme_table() + m.group(3), text)
  if new != text:
    with open(readme, "w", encoding="utf-8") as f:
      f.write(new)
  return new != text


if __name__ == "__main__":
  if "--write" in sys.argv:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    print("README.md", "rewritten" if write(os.path.normpath(path)) else "unchanged")
  else:
    print(readme_table())
