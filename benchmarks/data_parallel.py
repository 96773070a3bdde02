"""Per-step time of data-parallel SAM on 8 simulated CPU devices vs 1 device, same global batch.

  python benchmarks/data_parallel.py   (sets 8 host devices itself)

Interleaved blocks of 10 steps, median over repetitions. Simulated devices share
the machine's cores, so this measures SPMD overhead, not a speed-up.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS",
                                         "") + " --xla_force_host_platform_device_count=8"

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sam_optax  # noqa: E402


def main(reps=8, block=10):
  rng = np.random.default_rng(0)
  sizes = (256, 512, 512, 10)
  params = [{"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
             "bias": jnp.zeros((b,), jnp.float32)} for a, b in zip(sizes[:-1], sizes[1:])]
  x = jnp.asarray(rng.normal(size=(1024, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 1024), jnp.int32)

  def loss_fn(p, batch):
    h, t = batch
    for layer in p[:-1]:
      h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p[-1]["kernel"] + p[-1]["bias"],
                                                           t).mean()

  opt = sam_optax.sam(optax.sgd(0.05, momentum=0.9), 0.05)

  def step(p, s, batch):
    grad_fn = lambda q: jax.grad(loss_fn)(q, batch)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rep = NamedSharding(mesh, P())
  runs = {}
  p1 = jax.device_put(params, jax.devices()[0])
  runs["1 device"] = [jax.jit(step), p1, opt.init(p1), (x, y)]
  p8 = jax.device_put(params, rep)
  s8 = jax.jit(opt.init, out_shardings=rep)(p8)
  b8 = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  runs["8 devices"] = [jax.jit(step, out_shardings=(rep, rep)), p8, s8, b8]
  for r in runs.values():
    for _ in range(3):
      r[1], r[2] = r[0](r[1], r[2], r[3])
    jax.block_until_ready(r[1])
  times = {k: [] for k in runs}
  for _ in range(reps):
    for k, r in runs.items():
      t0 = time.perf_counter()
      for _ in range(block):
        r[1], r[2] = r[0](r[1], r[2], r[3])
      jax.block_until_ready(r[1])
      times[k].append((time.perf_counter() - t0) / block)
  med = {k: float(np.median(v)) for k, v in times.items()}
  for k, v in med.items():
    print(f"{k}: {1e3 * v:.2f} ms/step")
  print(f"ratio 8 devices / 1 device: {med['8 devices'] / med['1 device']:.2f}")


if __name__ == "__main__":
  main()
