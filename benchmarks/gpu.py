"""GPU step cost and memory: a ResNet-18-size CNN on CIFAR-shaped random data.

  python benchmarks/gpu.py            # on a GPU machine (pip install -e '.[test]' 'jax[cuda12]');
  ~3-4 min
  python benchmarks/gpu.py --tiny     # a seconds-long smoke run on CPU

Prints, per optimizer: median step time (blocks of 10 steps, interleaved), images/s,
ratio to the base step and to optax.contrib.sam, compile time and compiled temp
memory. On GPU the skipped passes are skipped by lax.cond inside the step
(gated_jit is plain jax.jit there). The SAMPa, SAF, MESA and ESAM rows come too:
``sampa`` evaluates its two gradients in one vmapped call on the GPU, and with two or
more GPUs ``sampa_mesh2`` puts one gradient on each of two of them (compare it with
``sam`` on one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import loss_of, measure_all  # noqa: E402


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), use_bias=False)(x)
    y = nn.relu(nn.GroupNorm(num_groups=8)(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = nn.GroupNorm(num_groups=8)(y)
    if x.shape[-1] != self.features or self.stride != 1:
      x = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False)(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 layout (2-2-2-2 basic blocks, 64..512 channels), GroupNorm instead of
  BatchNorm so the step is a pure function of params (11M parameters)."""
  width: int = 64
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    x = nn.relu(nn.Conv(self.width, (3, 3), use_bias=False)(x))
    for i, blocks in enumerate((2, 2, 2, 2)):
      for j in range(blocks):
        x = BasicBlock(self.width * 2**i, stride=2 if (i > 0 and j == 0) else 1)(x)
    return nn.Dense(10)(x.mean((1, 2)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  batch, width = (8, 8) if args.tiny else (args.batch, 64)
  model = ResNet18(width)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  params = model.init(jax.random.key(0), x[:2])["params"]
  n_params = sum(p.size for p in jax.tree.leaves(params))
  logits_fn = lambda p, x_: model.apply({"params": p}, x_)
  loss = loss_of(logits_fn)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, ResNet-18 layout width {width}, "
        f"{n_params / 1e6:.1f}M params, batch {batch}, {time.strftime('%Y-%m-%d')}")
  res = measure_all(params, (x, y), loss, reps=1 if args.tiny else args.reps,
                    block=2 if args.tiny else 10,
                    logits_fn=logits_fn)
  print("| optimizer | ms/step | images/s | × base | × optax.contrib.sam | compile s | temp MiB |")
  print("|---|---|---|---|---|---|---|")
  for n, r in res.items():
    print(f"| {n} | {r['median_ms']:.2f} | {1e3 * batch / r['median_ms']:.0f} | {r['vs_base']:.2f} "
          f"| {r['vs_optax_contrib_sam']:.2f} | {r['compile_s']:.1f} | "
          f"{r['temp_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
  main()
