import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# 8 simulated CPU devices for the data-parallel and per-device tests; must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_collection_modifyitems(config, items):
  """Slow tests first, so that with `-n 2 --maxschedchunk 1` the notebooks and the
  multi-process tests are spread over both workers instead of landing in one chunk."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
