"""Two local processes x 4 CPU devices (gloo) train the same SAM run as one process x 8 devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "multihost_sam.py"


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def clean_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the script sets its own device count
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.mark.slow
def test_two_processes_match_single_process_eight_devices(tmp_path):
  single = tmp_path / "single.npz"
  subprocess.run([sys.executable, str(SCRIPT), "--num-processes", "1", "--local-devices", "8",
                  "--out", str(single)], check=True, env=clean_env(), timeout=300,
                 capture_output=True)
  multi = tmp_path / "multi.npz"
  port = free_port()
  procs = []
  try:
    for pid in range(2):
      cmd = [sys.executable, str(SCRIPT), "--num-processes", "2", "--process-id", str(pid),
             "--port", str(port), "--local-devices", "4"]
      if pid == 0:
        cmd += ["--out", str(multi)]
      procs.append(subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
      assert p.returncode == 0, out[-3000:]
  finally:
    for p in procs:  # never leave a process behind, even when the test fails
      if p.poll() is None:
        p.kill()
        p.wait()
  a, b = np.load(single)["params"], np.load(multi)["params"]
  assert "process 1/2: 8 devices" in outputs[1]
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
