"""Training that survives a kill (issue 16): the demo is SIGKILLed in the middle of
training and in the middle of a checkpoint write, resumed, and must end with parameters
bitwise equal (SHA-256 of their bytes) to an uninterrupted run's; a corrupted newest
checkpoint is reported by name and the run falls back to the previous one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

EPOCHS = 4
ARGS = ["--model", "mlp", "--optimizers", "looksam", "--seeds", "1", "--epochs", str(EPOCHS),
        "--no-sharpness", "--no-progress", "--batch-size", "32"]


def demo(out, ckpt, env_extra=None, wait=True):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  cmd = [sys.executable, "-m", "sam_optax.demo", *ARGS, "--out", str(out)]
  if ckpt is not None:
    cmd += ["--checkpoint-dir", str(ckpt)]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  output, _ = proc.communicate(timeout=300)
  return proc.returncode, output


def digest(out):
  with open(os.path.join(out, "run.json")) as f:
    runs = json.load(f)["runs"]
  assert len(runs) == 1
  return runs[0]["params_sha256"], runs[0]["resumed_from_epoch"]


def test_kill_and_resume_is_bitwise_identical(tmp_path):
  timings = {}
  t0 = time.perf_counter()
  rc, out = demo(tmp_path / "ref", None)
  timings["uninterrupted"] = time.perf_counter() - t0
  assert rc == 0, out
  ref, _ = digest(tmp_path / "ref")

  # 1. SIGKILL in the middle of training (after the 2nd epoch's checkpoint is committed)
  ckpt = tmp_path / "ckpt"
  run_dir = ckpt / "looksam-seed0"
  proc = demo(tmp_path / "a", ckpt, wait=False)
  deadline = time.time() + 240
  while not (run_dir / "step_2").exists():
    assert proc.poll() is None, proc.communicate()[0]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  t0 = time.perf_counter()
  rc, out = demo(tmp_path / "a", ckpt)
  timings["resume after kill"] = time.perf_counter() - t0
  assert rc == 0, out
  got, resumed = digest(tmp_path / "a")
  assert resumed >= 2 and "resumed from" in out
  assert got == ref

  # 2. SIGKILL in the middle of writing checkpoint 3 (written, not yet committed)
  ckpt2 = tmp_path / "ckpt2"
  rc, out = demo(tmp_path / "b", ckpt2, env_extra={"SAM_OPTAX_CRASH_IN_SAVE": "3"})
  assert rc == -signal.SIGKILL, out
  names = sorted(os.listdir(ckpt2 / "looksam-seed0"))
  assert names == [".tmp-step_3", "step_1", "step_2"], names
  rc, out = demo(tmp_path / "b", ckpt2)
  assert rc == 0, out
  got, resumed = digest(tmp_path / "b")
  assert resumed == 2 and got == ref
  assert sorted(os.listdir(ckpt2 / "looksam-seed0")) == ["step_2", "step_3", "step_4"]

  # 3. the newest checkpoint is damaged: reported by name, the previous one is used
  newest = ckpt2 / "looksam-seed0" / "step_4"
  for root, _, files in os.walk(newest):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
  rc, out = demo(tmp_path / "c", ckpt2)
  assert rc == 0, out
  assert "step_4 could not be restored" in out and "falling back" in out
  got, resumed = digest(tmp_path / "c")
  assert resumed == 3 and got == ref
  print("timings (s):", {k: round(v, 1) for k, v in timings.items()}, "digest:", ref)
