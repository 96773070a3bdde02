"""Resume: save mid-run, restore into a freshly built optimizer, continue, and get the
uninterrupted run's bits, for every row of the method registry (``tests/table.py``); SAF's
logit store and bSAM's posterior come back too; the demo killed mid-training and mid-write
resumes to the same parameters (SHA-256 of their bytes)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax as so
import table
from helpers import flat, make_data, mlp_apply, mlp_example_losses, mlp_init, mlp_loss
from sam_optax import checkpoint, trajectory
from test_contract import rows


def make_step(name, opt):
  @jax.jit
  def step(p, s, batch):
    kw = table.closures(name, lambda q: mlp_loss(q, batch), p,
                        example_losses=lambda q: mlp_example_losses(q, batch))
    u, s = opt.update(jax.grad(mlp_loss)(p, batch), s, p, **kw)
    return optax.apply_updates(p, u), s
  return step


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", rows())
def test_resume_is_bitwise_identical(name, tmp_path):
  opt = table.optimizer(name)
  step = make_step(name, opt)
  p, s = mlp_init(0), opt.init(mlp_init(0))
  for t in range(5):
    p, s = step(p, s, make_data(t))
  checkpoint.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
  p_ref, s_ref = p, s
  for t in range(5, 12):
    p_ref, s_ref = step(p_ref, s_ref, make_data(t))

  opt2 = table.optimizer(name)   # a new process would rebuild everything
  step2 = make_step(name, opt2)
  fresh = {"params": mlp_init(1), "opt_state": opt2.init(mlp_init(1))}
  restored = checkpoint.restore(tmp_path / "ckpt", fresh)
  p2, s2 = restored["params"], restored["opt_state"]
  for t in range(5, 12):
    p2, s2 = step2(p2, s2, make_data(t))
  np.testing.assert_array_equal(flat(p2), flat(p_ref))
  assert_same(s2, s_ref)
  if name == "bsam":  # the posterior comes back too
    assert_same(so.bsam_posterior(p2, s2), so.bsam_posterior(p_ref, s_ref))


SGD = table.SGD


def test_saf_store_resumes_bitwise(tmp_path):
  n, steps_per_epoch, batch = 32, 4, 8
  xs, ys = make_data(0, n=n)
  opt = SGD()

  @jax.jit
  def step(p, s, store, idx, t):
    epoch = t // steps_per_epoch
    x, y = xs[idx], ys[idx]

    def loss(q):
      logits = mlp_apply(q, x)
      base = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
      reg, new_store = trajectory.saf_loss(store, logits, idx, epoch, start_epoch=1)
      return base + reg, new_store

    (_, new_store), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, new_store

  orders = [np.random.default_rng(e).permutation(n) for e in range(4)]
  idx_at = lambda t: jnp.asarray(
      orders[t // steps_per_epoch][(t % steps_per_epoch) * batch:][:batch])
  p, s, store = mlp_init(0), opt.init(mlp_init(0)), trajectory.saf_init(n, 3, lookback=1)
  for t in range(6):
    p, s, store = step(p, s, store, idx_at(t), t)
  checkpoint.save(tmp_path / "ckpt", {"params": p, "opt_state": s, "saf": store})
  ref = (p, s, store)
  for t in range(6, 16):
    ref = step(*ref, idx_at(t), t)
  like = {"params": mlp_init(1), "opt_state": opt.init(mlp_init(1)),
          "saf": trajectory.saf_init(n, 3, 1)}
  r = checkpoint.restore(tmp_path / "ckpt", like)
  got = (r["params"], r["opt_state"], r["saf"])
  for t in range(6, 16):
    got = step(*got, idx_at(t), t)
  assert_same(got, ref)
  assert bool(jnp.any(ref[2].epochs == 3))


# ------------------------------------------------------------ the demo, killed


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


@pytest.mark.slow
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
