"""Per-step cost of sam_optax variants versus the base optimizer and optax.contrib.sam.

Interleaved A/B: every repetition runs a block of 10 steps of each optimizer's
jitted, warm step in turn, so machine noise hits all of them alike; the figure
is the median over repetitions of the per-step block average, reported as a ratio to the base
optimizer's step and to
optax.contrib.sam (opaque mode, the peer). Steps that skip the second pass use
``sam_optax.gated_jit`` (on CPU it picks a compiled program per branch).

SAMPa's step takes no clean gradient (its two gradients run side by side: ``sampa``
vmapped, ``sampa_2calls`` as two independent calls); SAF and MESA add their trajectory
loss to one gradient pass (MESA: plus one forward of the EMA weights); ESAM scores the
batch with a forward at w + eps and runs the second pass on half of it.

``--mesh`` re-runs the CNN and MLP in a process with 2 simulated CPU devices and adds
``sampa_mesh2``: SAMPa with one gradient per device (``sampa(..., mesh=...)``), against
SAM on one device. The simulated devices share this machine's cores.

  python benchmarks/step_cost.py [--reps 8] [--models mlp,cnn,transformer] [--widths 128,512,2048]
  [--mesh]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import sam_optax as so
from sam_optax import trajectory


class MLP(nn.Module):
  width: int = 512

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for _ in range(3):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class Block(nn.Module):
  """A small pre-norm transformer block and a classifier head."""
  dim: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim)(x.reshape(x.shape[0], 16, -1))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))
    return nn.Dense(10)(x.mean(1))


def model_and_data(name, batch, width=512):
  params, data, logits_fn = model_logits_and_data(name, batch, width)
  return params, data, loss_of(logits_fn)


def loss_of(logits_fn):
  return lambda p, b: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, b[0]),
                                                                      b[1]).mean()


def model_logits_and_data(name, batch, width=512):
  rng = np.random.default_rng(0)
  if name == "cnn":
    model, x = CNN(), rng.normal(size=(batch, 28, 28, 1))
  elif name == "transformer":
    model, x = Block(), rng.normal(size=(batch, 16, 16))
  else:
    model, x = MLP(width), rng.normal(size=(batch, 784))
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  params = model.init(jax.random.key(0), x[:2])["params"]
  return params, (x, y), lambda p, x_: model.apply({"params": p}, x_)


def make_optimizers(lr=0.05, rho=0.05, *, efficient=False):
  base = lambda: optax.sgd(lr, momentum=0.9)
  opts = {
      "base": base(),
      "sam": so.sam(base(), rho),
      # telemetry (issue 12): the default records norms and cosine; "_losses" also passes
      # value_and_grad_fn= and value= so the state holds the clean and perturbed losses
      "sam_no_telemetry": optax.chain(so.sharpness_aware(rho, telemetry=False), base()),
      "sam_losses": so.sam(base(), rho),
      "asam": so.asam(base(), 10 * rho),
      "gsam": optax.chain(so.gsam(rho, 0.3), base()),
      "looksam_k5": optax.chain(so.looksam(rho, k=5), base()),
      "randomized_p0.5": optax.chain(so.randomized(so.sharpness_aware(rho), 0.5), base()),
      "msam": so.msam(base(), rho=0.3),
      # SAM written out by hand in the step (the same arithmetic, no library): the engine's overhead
      "sam_by_hand": base(),
      # gated_jit around a step that is jitted itself (issue 19: the branch must reach the inner
      # jit)
      "looksam_k5_nested": optax.chain(so.looksam(rho, k=5), base()),
      "wsam": optax.chain(so.wsam(rho, 0.9), base()),
      "stable_sam": optax.chain(so.stable_sam(rho), base()),
      "monge": optax.chain(so.sharpness_aware(rho, perturbation=so.monge()), base()),
      "preconditioned": optax.chain(so.sharpness_aware(rho, perturbation=so.preconditioned()),
                                    base()),
      # the SGD phase of late-phase SAM (the switch lies beyond the run): the cost of the skipped
      # steps
      "late_phase_before_switch": optax.chain(so.late_phase(so.sharpness_aware(rho), 10**9),
                                              base()),
      "optax_contrib_sam": optax.contrib.sam(base(), optax.chain(optax.contrib.normalize(),
                                                                 optax.sgd(rho)),
                                             sync_period=2, opaque_mode=True),
  }
  if efficient:  # the steps below need the model's logits, not only its loss
    opts["sampa"] = so.sampa(base(), 0.1)
    opts["sampa_2calls"] = so.sampa(base(), 0.1, vectorize=False)
    if jax.device_count() >= 2:
      mesh = jax.make_mesh((2,), ("pair",), devices=jax.devices()[:2],
                           axis_types=(jax.sharding.AxisType.Auto,))
      opts["sampa_mesh2"] = so.sampa(base(), 0.1, mesh=mesh)
    opts["saf"] = base()
    opts["mesa"] = optax.chain(base(), so.weight_ema(0.99))
    opts["esam"] = optax.chain(so.esam(rho, 0.5), base())
    opts["functional_sam"] = optax.chain(so.functional_sam(rho), base())
  return opts


def init_state(name, opt, params, data):
  # the logit store of the batch's examples (lookback 2), next to the optimizer state
  if name == "saf":
    return opt.init(params), trajectory.saf_init(data[1].shape[0], 10, lookback=2)
  return opt.init(params)


def build_efficient_step(name, opt, logits_fn):
  """SAMPa, SAF, MESA and ESAM steps (as in sam_optax.flax, without Flax state)."""
  def losses(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, b[0]), b[1])

  if name.startswith("sampa"):
    def step(p, s, b):
      grad_fn = lambda q: jax.grad(lambda r: jnp.mean(losses(r, b)))(q)
      u, s = opt.update(p, s, p, grad_fn=grad_fn)  # no clean gradient
      return optax.apply_updates(p, u), s
  elif name == "functional_sam":
    def step(p, s, b):
      ce = lambda out, b_: optax.softmax_cross_entropy_with_integer_labels(out, b_[1])
      objective = so.Objective(lambda q, b_: logits_fn(q, b_[0]), ce, b)
      value, g = jax.value_and_grad(lambda q: jnp.mean(losses(q, b)))(p)
      u, s = opt.update(g, s, p, objective=objective, value=value)
      return optax.apply_updates(p, u), s
  elif name == "esam":
    def step(p, s, b):
      def clean(q):
        ex = losses(q, b)
        return jnp.mean(ex), ex
      (_, ex), g = jax.value_and_grad(clean, has_aux=True)(p)
      u, s = opt.update(g, s, p, objective=so.Objective(losses, lambda out, b_: out, b,
                                                        clean_losses=ex))
      return optax.apply_updates(p, u), s
  elif name == "saf":
    def step(p, s, b):
      s, store = s
      idx = jnp.arange(b[1].shape[0])

      def total(q):
        logits = logits_fn(q, b[0])
        reg, new_store = trajectory.saf_loss(store, logits, idx, 3, start_epoch=0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()
        return ce + reg, new_store

      (_, store), g = jax.value_and_grad(total, has_aux=True)(p)
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), (s, store)
  elif name == "mesa":
    def step(p, s, b):
      teacher = jax.lax.stop_gradient(logits_fn(trajectory.ema_params(s, like=p), b[0]))

      def total(q):
        logits = logits_fn(q, b[0])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()
        return ce + trajectory.mesa_loss(logits, teacher, 9, start_epoch=0)

      u, s = opt.update(jax.grad(total)(p), s, p)
      return optax.apply_updates(p, u), s
  else:
    raise ValueError(name)
  return jax.jit(step, donate_argnums=(0, 1))


def build_step(name, opt, loss):
  if name == "base":
    def step(p, s, b):
      g = jax.grad(loss)(p, b)
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s
    return jax.jit(step, donate_argnums=(0, 1))
  if name == "optax_contrib_sam":
    def step(p, s, b):
      g = jax.grad(loss)(p, b)
      u, s = opt.update(g, s, p, grad_fn=lambda q, _: jax.grad(loss)(q, b))
      return optax.apply_updates(p, u), s
    return jax.jit(step, donate_argnums=(0, 1))

  if name == "sam_by_hand":
    rho = 0.05

    def step(p, s, b):
      g = jax.grad(loss)(p, b)
      norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
      scale = jnp.where(norm > 1e-12, rho / jnp.where(norm > 1e-12, norm, 1.0), 0.0)
      g_adv = jax.grad(loss)(jax.tree.map(lambda w, x: w + scale * x, p, g), b)
      u, s = opt.update(g_adv, s, p)
      return optax.apply_updates(p, u), s
    return jax.jit(step, donate_argnums=(0, 1))
  if name == "looksam_k5_nested":
    def inner(p, s, b):
      grad_fn = lambda q: jax.grad(loss)(q, b)
      u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s
    return so.gated_jit(jax.jit(inner), donate_argnums=(0, 1))
  if name.endswith("_losses"):
    def step(p, s, b):
      value_and_grad_fn = lambda q: jax.value_and_grad(loss)(q, b)
      value, g = value_and_grad_fn(p)
      u, s = opt.update(g, s, p, value_and_grad_fn=value_and_grad_fn, value=value)
      return optax.apply_updates(p, u), s
    return so.gated_jit(step, donate_argnums=(0, 1))

  def step(p, s, b):
    grad_fn = lambda q: jax.grad(loss)(q, b)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s
  return so.gated_jit(step, donate_argnums=(0, 1))


BLOCK = 10


def measure(model_name, reps, batch, width=512, only=None):
  params, data, logits_fn = model_logits_and_data(model_name, batch, width)
  return measure_all(params, data, loss_of(logits_fn), reps, logits_fn=logits_fn, only=only)


def measure_all(params, data, loss, reps, block=BLOCK, logits_fn=None, only=None):
  """Compile, warm and time every optimizer's step on (params, data, loss); see the module doc.
  With ``logits_fn`` (params, x) -> logits, also SAMPa, SAF, MESA and ESAM; ``only``: a
  subset of the names (base and optax_contrib_sam are always kept: the ratios need them)."""
  opts = make_optimizers(efficient=logits_fn is not None)
  if only:
    opts = {n: o for n, o in opts.items() if n in set(only) | {"base", "optax_contrib_sam"}}
  steps, states = {}, {}
  compile_s, memory = {}, {}
  for name, opt in opts.items():
    efficient = name.startswith("sampa") or name in ("saf", "mesa", "esam", "functional_sam")
    steps[name] = (build_efficient_step(name, opt, logits_fn) if efficient
                   else build_step(name, opt, loss))
    p = jax.tree.map(jnp.copy, params)
    s = init_state(name, opt, p, data)
    # compile time and compiled memory of the (SAM-branch) program
    t0 = time.perf_counter()
    compiled = steps[name].lower(p, s, data).compile()  # a gated step lowers its SAM branch
    compile_s[name] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    memory[name] = (getattr(mem, "temp_size_in_bytes", 0),
                    getattr(mem, "argument_size_in_bytes", 0))
    for _ in range(3):  # warm every program (gated ones have two)
      p, s = steps[name](p, s, data)
    jax.block_until_ready(p)
    states[name] = (p, s)
  # A repetition times a block of BLOCK consecutive steps per optimizer (two LookSAM
  # periods), so schedules that skip passes are charged their real average cost;
  # a per-step median would pick a skipped step.
  times = {name: [] for name in opts}
  for _ in range(reps):
    for name in opts:
      p, s = states[name]
      t0 = time.perf_counter()
      for _ in range(block):
        p, s = steps[name](p, s, data)
      jax.block_until_ready(p)
      times[name].append((time.perf_counter() - t0) / block)
      states[name] = (p, s)
  med = {n: float(np.median(t)) for n, t in times.items()}
  return {n: {"median_ms": 1e3 * med[n], "vs_base": med[n] / med["base"],
              "vs_optax_contrib_sam": med[n] / med["optax_contrib_sam"],
              "compile_s": compile_s[n], "temp_bytes": memory[n][0], "arg_bytes": memory[n][1]}
          for n in opts}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=8, help="blocks of 10 steps per optimizer")
  ap.add_argument("--models", default="mlp,cnn,transformer")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--widths", default="", help="MLP width sweep, e.g. 128,512,2048")
  ap.add_argument("--json", default="")
  ap.add_argument("--only", default="", help="comma-separated optimizer names (base and the peer "
                                             "are always included)")
  ap.add_argument("--mesh", action="store_true",
                  help="also time SAMPa on 2 simulated CPU devices (re-runs cnn,mlp in a "
                       "subprocess)")
  args = ap.parse_args()
  if args.mesh and jax.device_count() < 2:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                      " --xla_force_host_platform_device_count=2").strip())
    cmd = [sys.executable, __file__, "--reps", str(args.reps), "--models", "cnn,mlp",
           "--batch", str(args.batch), "--only", args.only or "sam,sampa,sampa_2calls,sampa_mesh2"]
    cmd += ["--json", args.json] if args.json else []
    raise SystemExit(subprocess.call(cmd, env=env))
  print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"optax {optax.__version__}, {time.strftime('%Y-%m-%d')}")
  print(f"# reps={args.reps} blocks of {BLOCK} steps, median block; batch={args.batch} "
        "(LookSAM/randomized via gated_jit, "
        f"host gating={jax.default_backend() == 'cpu'})")
  out = {}
  runs = [(m, 512) for m in args.models.split(",") if m]
  runs += [("mlp", int(w)) for w in args.widths.split(",") if w]
  for model_name, width in runs:
    key = model_name if model_name != "mlp" or not args.widths else f"mlp_w{width}"
    res = measure(model_name, args.reps, args.batch, width,
                  only=[n for n in args.only.split(",") if n] or None)
    out[key] = res
    print(f"\n## {key}")
    print("| optimizer | median ms | × base | × optax.contrib.sam | compile s | temp MiB | arg "
          "MiB |")
    print("|---|---|---|---|---|---|---|")
    for n, r in res.items():
      print(f"| {n} | {r['median_ms']:.2f} | {r['vs_base']:.2f} | {r['vs_optax_contrib_sam']:.2f} "
            f"| {r['compile_s']:.2f} | {r['temp_bytes'] / 2**20:.2f} | "
            f"{r['arg_bytes'] / 2**20:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
