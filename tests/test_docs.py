"""The examples a reader copies: README.md and the docs pages run as written; every public
name has a runnable Example; the installed version is the one the package reports."""

import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sam_optax

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
  return FENCE.findall(path.read_text())


REPORTED = ("loss", "accuracy", "linen_accuracy", "nnx_accuracy")


def run_blocks(path: Path, tmp_path) -> dict:
  """Runs the page's ```python blocks in order as one script, as a reader pasting them would,
  in a fresh interpreter with 2 CPU devices (so the multi-device examples really shard but
  do not depend on the 8 simulated devices of this process). Returns the values of the
  REPORTED names the script defines."""
  blocks = python_blocks(path)
  assert blocks, f"{path} has no ```python block"
  report = ("\nimport json as _json\n"
            f"print('RESULT ' + _json.dumps({{k: float(v) for k, v in globals().items() "
            f"if k in {REPORTED!r}}}))\n")
  script = tmp_path / f"{path.stem}.py"
  script.write_text("\n\n".join(blocks) + report)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, f"{path.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
  line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def check_training_worked(ns: dict) -> None:
  """Pages that train a classifier end with a training accuracy; a broken step would not
  reach it. Pages that return a loss return a finite one."""
  for name in ("accuracy", "linen_accuracy", "nnx_accuracy"):
    if name in ns:
      assert ns[name] > 0.9, (name, ns[name])
  if "loss" in ns:
    assert math.isfinite(ns["loss"])


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
  ns = run_blocks(ROOT / "README.md", tmp_path)
  check_training_worked(ns)
  assert "loss" in ns and "accuracy" in ns  # the usage program returns and reports the loss


PAGES = sorted(p for p in list(DOCS.glob("*.md")) + list(DOCS.glob("guides/*.md"))
               if python_blocks(p))


def test_docs_pages_with_code_are_found():
  names = {p.relative_to(DOCS).as_posix() for p in PAGES}
  assert {"getting_started.md", "guides/composing.md", "guides/scaling.md"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_docs_page_runs(page, tmp_path):
  check_training_worked(run_blocks(page, tmp_path))


def _api_pages():
  spec = importlib.util.spec_from_file_location("api_pages", DOCS / "_ext" / "api_pages.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_public_name_has_a_runnable_example():
  """The names the API reference lists (each public module's __all__) all carry an
  ``Example:`` section with doctest lines, which ``pytest --doctest-modules`` runs."""
  api = _api_pages()
  missing = []
  for module_name in api.public_modules():
    module = importlib.import_module(module_name)
    for name in api.public_names(module):
      doc = getattr(module, name).__doc__ or ""
      section = doc.split("Example:", 1)[1] if "Example:" in doc else ""
      if ">>>" not in section:
        missing.append(f"{module_name}.{name}")
  assert not missing, f"no runnable Example section: {missing}"


def test_version_is_the_distribution_version():
  assert sam_optax.__version__ == importlib.metadata.version("sam_optax")


@pytest.mark.skipif(os.environ.get("SAM_OPTAX_TEST_INSTALLED") != "1",
                    reason="checks the wheel; set SAM_OPTAX_TEST_INSTALLED=1 (the README's test "
                           "command does)")
def test_tests_run_against_the_installed_wheel():
  package = Path(sam_optax.__file__).resolve().parent
  assert package != ROOT / "sam_optax", f"sam_optax imported from the source tree: {package}"
  assert "site-packages" in package.parts
  assert (package / "py.typed").exists()
  assert importlib.util.find_spec("sam_optax.flax") is not None
  assert importlib.util.find_spec("sam_optax.demo.cli") is not None


@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None, reason="needs the docs extra")
def test_docs_build_check_fails_on_a_public_name_without_a_page():
  from types import SimpleNamespace

  from sphinx.errors import ExtensionError

  api = _api_pages()
  api.EXPECTED.clear()
  api.EXPECTED.update({"sam_optax": ["sam", "l2"]})
  app = SimpleNamespace(env=SimpleNamespace(all_docs={"api/_autosummary/sam_optax.sam": 0}))
  with pytest.raises(ExtensionError, match="sam_optax.l2"):
    api.check_pages(app, None)
  app.env.all_docs["api/_autosummary/sam_optax.l2"] = 0
  api.check_pages(app, None)  # every name has its page: no error
