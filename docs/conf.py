"""Sphinx configuration of the sam_optax documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (after ``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

import sam_optax  # noqa: E402

project = "sam_optax"
author = "The sam_optax authors"
copyright = "2026, The sam_optax authors"
release = sam_optax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "sphinx-mathjax-offline",  # serves MathJax from _static: formulas render offline, no CDN
    "api_pages",  # the API pages, written from each module's __all__
    "api_links",  # inline code naming a public object links to its page
]

# The notebooks are rendered with the outputs stored in them; `tests/test_notebooks.py`
# executes them. The repository's notebooks/ and benchmarks/ are the sources: the build
# copies the notebooks here (docs/notebooks/ is generated and git-ignored).
nb_execution_mode = "off"
NOTEBOOKS = DOCS / "notebooks"
NOTEBOOKS.mkdir(exist_ok=True)
for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
  target = NOTEBOOKS / nb.name
  if not target.exists() or target.read_bytes() != nb.read_bytes():
    shutil.copyfile(nb, target)

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md", "_generated"]
suppress_warnings = ["myst.header"]  # RESULTS.md starts its sections at level 2 under our title

html_theme = "sphinx_book_theme"
html_title = f"sam_optax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": True,
}
pygments_style = "friendly"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
