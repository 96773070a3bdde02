"""Multi-host data-parallel SAM with jax.distributed (the TPU-pod recipe, runnable on CPU).

Every process runs this same program; JAX's SPMD machinery makes the jitted step
one global computation over all processes' devices: the gradient is the global
mean, the SAM perturbation is global, the second pass is global.

On one machine, two processes with four CPU devices each (gloo collectives):

  python examples/multihost_sam.py --num-processes 2 --process-id 0 --port 12355 --out a.npz &
  python examples/multihost_sam.py --num-processes 2 --process-id 1 --port 12355

On a TPU pod, drop the flags: ``jax.distributed.initialize()`` finds the pod.
"""

from __future__ import annotations

import argparse

import jax


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--port", type=int, default=12355)
  ap.add_argument("--local-devices", type=int, default=0, help="CPU devices per process")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  local = args.local_devices or 8 // args.num_processes
  jax.config.update("jax_num_cpu_devices", local)
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)

  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import sam_optax

  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  sizes = (16, 32, 4)
  params = [{"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
             "bias": jnp.zeros((b,), jnp.float32)} for a, b in zip(sizes[:-1], sizes[1:])]
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  opt = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
  opt_state = jax.jit(opt.init, out_shardings=replicated)(params)

  def loss_fn(p, batch):
    x, y = batch
    for layer in p[:-1]:
      x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    logits = x @ p[-1]["kernel"] + p[-1]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(p, s, batch):
    grad_fn = lambda q: jax.grad(loss_fn)(q, batch)
    updates, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), s

  global_batch = 64
  data_sharding = NamedSharding(mesh, P("data"))
  for step in range(args.steps):
    data_rng = np.random.default_rng(100 + step)  # every process sees the same global batch
    x = data_rng.normal(size=(global_batch, sizes[0])).astype(np.float32)
    y = data_rng.integers(0, sizes[-1], global_batch).astype(np.int32)
    per = global_batch // jax.process_count()
    lo = jax.process_index() * per
    batch = tuple(jax.make_array_from_process_local_data(data_sharding, a[lo:lo + per], a.shape)
                  for a in (x, y))
    params, opt_state = train_step(params, opt_state, batch)

  flat = np.concatenate([np.asarray(jax.device_get(leaf)).ravel()
                         for leaf in jax.tree.leaves(params)])
  if args.out and jax.process_index() == 0:
    np.savez(args.out, params=flat)
  print(f"process {jax.process_index()}/{jax.process_count()}: {jax.device_count()} devices, "
        f"param checksum {flat.sum():.6f}")
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
