"""SAM on LoRA adapters: a byte-level NNX transformer, pretrained on one part of the Python standard
library's source and fine-tuned with LoRA on another, AdamW against SAM and Functional-SAM on the
adapters only.

What it shows:

* LoRA (Hu et al. 2021, arXiv 2106.09685) with ``flax.nnx``: after pretraining, every ``nnx.Linear``
  of the transformer blocks is wrapped in ``nnx.LoRA(..., base_module=linear)``; the adapter
  matrices are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``) and
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains them alone. The base weights stay bitwise
  unchanged (the test checks it).
* SAM (Foret et al. 2021, arXiv 2010.01412) on the adapters:
  ``sam_optax.sam(optax.adamw(...), rho)``, the ascent and the second gradient taken in the
  adapters' space only. The closure comes from ``sam_optax.flax.nnx_value_and_grad_fn`` with the
  model split as ``(LoRAParam, everything else)``, split before the clean pass so that both passes
  draw the same dropout masks.
* Functional-SAM (Singh, Mobahi, Agarwala, Dauphin, ICML 2025, arXiv 2502.02407):
  ``optax.chain(sam_optax.functional_sam(rho), optax.adamw(...))``, which needs the model and the
  loss apart: ``sam_optax.Objective(apply_fn, loss_fn, batch)`` with
  ``apply_fn(lora_params, batch) -> logits`` and ``loss_fn(logits, batch) -> (B,)`` per-sequence
  losses; the clean logits go in the objective as ``clean_outputs=`` so that no extra forward is
  spent.

The corpus is the running interpreter's own standard library, read as bytes from
``os.path.dirname(os.__file__)``: pretraining on ``email/*.py``, fine-tuning on ``json/*.py``
(sorted file lists; every fifth 1 KiB block of the fine-tuning text is held out). The figures
therefore depend on the Python version (its stdlib sources). The table reports held-out bits per
byte (the mean next-byte cross-entropy in bits over the held-out blocks; 8 is a uniform guess),
mean ± std over the fine-tuning seeds; the pretrained base is shared by all seeds.

  python examples/lora_sam.py          # the full comparison (3 seeds, a few minutes on 2 CPU cores)
  python examples/lora_sam.py --quick  # a tiny model, a few steps, 1 seed (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sam_optax
from sam_optax import flax as ft

PRETRAIN_PACKAGE = "email"
FINETUNE_PACKAGE = "json"
METHODS = ("adamw", "sam", "functional_sam")
LABELS = {"base": "no fine-tuning", "adamw": "AdamW", "sam": "SAM",
          "functional_sam": "Functional-SAM"}
LORA_TARGETS = ("query", "key", "value", "out", "up", "down")


@dataclasses.dataclass(frozen=True)
class Config:
  width: int = 64
  heads: int = 4
  layers: int = 2
  seq_len: int = 64
  batch: int = 16
  dropout: float = 0.1
  pretrain_steps: int = 1500
  pretrain_lr: float = 3e-3
  steps: int = 250            # fine-tuning steps per run
  lr: float = 3e-3            # fine-tuning (adapter) learning rate
  weight_decay: float = 0.01
  rank: int = 4
  rho: float = 0.05
  seeds: int = 3
  heldout_every: int = 5      # every fifth block of the fine-tuning text is held out
  block: int = 1024


QUICK = Config(width=32, heads=2, layers=1, seq_len=32, batch=8, pretrain_steps=80, steps=25,
               seeds=1)


# ------------------------------------------------------------------ data: the standard library's
# own source


def stdlib_source(package: str) -> bytes:
  """The ``.py`` files of a standard-library package, sorted by name, as one byte string."""
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), package, "*.py")))
  if not files:
    raise FileNotFoundError(f"no stdlib sources for {package!r} next to {os.__file__}")
  return b"\n".join(open(f, "rb").read() for f in files)


@dataclasses.dataclass
class Corpus:
  pretrain: np.ndarray   # uint8
  train: np.ndarray
  heldout: np.ndarray


def load_corpus(cfg: Config) -> Corpus:
  pre = np.frombuffer(stdlib_source(PRETRAIN_PACKAGE), np.uint8)
  fine = np.frombuffer(stdlib_source(FINETUNE_PACKAGE), np.uint8)
  blocks = [fine[i:i + cfg.block] for i in range(0, len(fine), cfg.block)]
  held = [b for i, b in enumerate(blocks) if i % cfg.heldout_every == cfg.heldout_every - 1]
  train = [b for i, b in enumerate(blocks) if i % cfg.heldout_every != cfg.heldout_every - 1]
  return Corpus(pre, np.concatenate(train), np.concatenate(held))


def sample_batch(data: np.ndarray, cfg: Config,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """``batch`` random windows: inputs ``x[t]`` and next-byte targets ``y[t] = x[t + 1]``."""
  start = rng.integers(0, len(data) - cfg.seq_len - 1, size=cfg.batch)
  w = data[start[:, None] + np.arange(cfg.seq_len + 1)].astype(np.int32)
  return w[:, :-1], w[:, 1:]


def eval_windows(data: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping windows covering ``data``: every byte but each window's first is predicted
  once."""
  n = len(data) // (cfg.seq_len + 1)
  w = data[:n * (cfg.seq_len + 1)].reshape(n, cfg.seq_len + 1).astype(np.int32)
  return w[:, :-1], w[:, 1:]


# ------------------------------------------------------------------ the model


class Block(nnx.Module):
  """Pre-LayerNorm transformer block, causal self-attention and a GELU MLP, all with plain
  ``nnx.Linear``."""

  def __init__(self, width: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1, self.ln2 = nnx.LayerNorm(width, rngs=rngs), nnx.LayerNorm(width, rngs=rngs)
    self.query, self.key, self.value, self.out = (nnx.Linear(width, width,
                                                             rngs=rngs) for _ in range(4))
    self.up, self.down = nnx.Linear(width, 4 * width, rngs=rngs), nnx.Linear(4 * width, width,
                                                                             rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.ln1(x)
    split = lambda z: z.reshape(b, t, self.heads, d // self.heads)
    att = jax.nn.dot_product_attention(split(self.query(h)), split(self.key(h)),
                                       split(self.value(h)),
                                       is_causal=True)
    x = x + self.drop(self.out(att.reshape(b, t, d)))
    return x + self.drop(self.down(nnx.gelu(self.up(self.ln2(x)))))


class ByteLM(nnx.Module):
  """A next-byte language model: 256 input bytes, 256 output logits, learned positions."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, cfg.width, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.width)))
    self.blocks = nnx.List([Block(cfg.width, cfg.heads, cfg.dropout,
                                  rngs=rngs) for _ in range(cfg.layers)])
    self.ln_f = nnx.LayerNorm(cfg.width, rngs=rngs)
    self.head = nnx.Linear(cfg.width, 256, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def add_lora(model: ByteLM, rank: int, seed: int) -> ByteLM:
  """Wraps each block's linear layers in ``nnx.LoRA(..., base_module=...)``, in place.

  ``nnx.LoRA`` computes ``base(x) + x @ A @ B`` with ``A`` He-uniform and ``B`` zero, so the wrapped
  model
  starts as the pretrained one; ``A`` and ``B`` are ``nnx.LoRAParam``.
  """
  rngs = nnx.Rngs(params=seed)
  for block in model.blocks:
    for name in LORA_TARGETS:
      base = getattr(block, name)
      setattr(block, name,
              nnx.LoRA(base.in_features, rank, base.out_features, base_module=base, rngs=rngs))
  return model


# ------------------------------------------------------------------ losses and steps


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_fn(model: ByteLM, x: jax.Array, y: jax.Array) -> jax.Array:
  return token_losses(model(x), y).mean()


def loss_and_logits(model: ByteLM, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits = model(x)
  return token_losses(logits, y).mean(), logits


ADAPTERS = nnx.DiffState(0, nnx.LoRAParam)   # differentiate the adapters only


@nnx.jit
def pretrain_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def adamw_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn, argnums=ADAPTERS)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def sam_step(model, optimizer, x, y):
  # Split (adapters, everything else) BEFORE the clean pass: `rest` holds the frozen base weights
  # and the
  # dropout RNG counters, so the perturbed pass replays the clean pass's dropout masks.
  graphdef, _, rest = nnx.split(model, nnx.LoRAParam, ...)
  value_and_grad_fn = ft.nnx_value_and_grad_fn(graphdef, rest, loss_fn, x, y)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=ADAPTERS)(model, x, y)
  optimizer.update(model, grads, value_and_grad_fn=value_and_grad_fn, value=loss)
  return loss


@nnx.jit
def functional_sam_step(model, optimizer, x, y):
  graphdef, _, rest = nnx.split(model, nnx.LoRAParam, ...)
  rest = jax.tree.map(lambda a: a,
                      rest)   # a snapshot taken before the clean pass advances the RNG counters

  def apply_fn(adapters,
               batch):          # adapters -> logits, the frozen base and dropout state closed over
    return nnx.merge(graphdef, adapters, rest, copy=True)(batch[0])

  def sequence_losses(logits, batch):     # (B,) per-sequence mean next-byte losses
    return token_losses(logits, batch[1]).mean(axis=-1)

  (loss, logits), grads = nnx.value_and_grad(loss_and_logits, argnums=ADAPTERS,
                                             has_aux=True)(model, x, y)
  objective = sam_optax.Objective(apply_fn, sequence_losses, (x, y),
                                  clean_outputs=jax.lax.stop_gradient(logits))
  optimizer.update(model, grads, objective=objective, value=loss)
  return loss


STEPS = {"adamw": adamw_step, "sam": sam_step, "functional_sam": functional_sam_step}


@nnx.jit
def summed_loss(model, x, y):
  return token_losses(model(x), y).sum()


def bits_per_byte(model: ByteLM, windows: tuple[np.ndarray, np.ndarray], chunk: int = 64) -> float:
  """Mean next-byte cross-entropy over the windows, in bits; dropout off."""
  model.eval()
  x, y = windows
  total = sum(float(summed_loss(model, x[i:i + chunk], y[i:i + chunk]))
              for i in range(0, len(x), chunk))
  model.train()
  return total / y.size / math.log(2)


# ------------------------------------------------------------------ the experiment


def make_tx(method: str, cfg: Config) -> optax.GradientTransformation:
  """The adapters' optimizer; built once per method so every seed reuses one compiled step."""
  adamw = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
  if method == "adamw":
    return adamw
  if method == "sam":
    return sam_optax.sam(adamw, cfg.rho)
  if method == "functional_sam":
    return optax.chain(sam_optax.functional_sam(cfg.rho), adamw)
  raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def pretrain(cfg: Config, corpus: Corpus, seed: int = 0, log=print) -> ByteLM:
  model = ByteLM(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.pretrain_lr,
                                                max(cfg.pretrain_steps // 20, 1),
                                                cfg.pretrain_steps)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.1), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  for step in range(cfg.pretrain_steps):
    loss = pretrain_step(model, optimizer, *sample_batch(corpus.pretrain, cfg, rng))
    if step % max(cfg.pretrain_steps // 5, 1) == 0 or step == cfg.pretrain_steps - 1:
      log(f"  pretrain step {step:5d}  loss {float(loss) / math.log(2):.3f} bits/byte")
  return model


def finetune(model: ByteLM, tx: optax.GradientTransformation, method: str, cfg: Config,
             corpus: Corpus,
             seed: int) -> list[float]:
  """Trains the model's LoRAParam leaves only, in place; returns the clean training losses
  (nats)."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  step_fn, rng = STEPS[method], np.random.default_rng(1000 + seed)
  return [float(step_fn(model, optimizer,
                        *sample_batch(corpus.train, cfg, rng))) for _ in range(cfg.steps)]


def run(cfg: Config, log=print) -> dict:
  """Pretrains once, then fine-tunes a fresh LoRA copy of the base per method and seed.

  Returns ``{"base": pretrained model, "bpb": {method: [bits per byte per seed]}, "runs":
  [{"method", "seed",
  "model", "bpb", "losses", "seconds"}], "heldout_bytes"}``; ``"base"`` under ``"bpb"`` is the
  pretrained model's held-out figure (no fine-tuning).
  """
  corpus = load_corpus(cfg)
  log(f"pretrain on stdlib {PRETRAIN_PACKAGE}/*.py ({len(corpus.pretrain)} bytes); fine-tune on "
      f"{FINETUNE_PACKAGE}/*.py ({len(corpus.train)} train, {len(corpus.heldout)} held-out bytes)")
  t0 = time.perf_counter()
  base = pretrain(cfg, corpus, log=log)
  heldout = eval_windows(corpus.heldout, cfg)
  base_bpb = bits_per_byte(base, heldout)
  log(f"  pretrained in {time.perf_counter() - t0:.1f}s; held-out {FINETUNE_PACKAGE} bits/byte "
      f"{base_bpb:.3f}")
  out = {"base": base, "bpb": {"base": [base_bpb]}, "runs": [],
         "heldout_bytes": int(heldout[1].size)}
  for method in METHODS:
    tx = make_tx(method, cfg)
    out["bpb"][method] = []
    for seed in range(cfg.seeds):
      model = add_lora(nnx.clone(base), cfg.rank, seed)
      nnx.reseed(model, dropout=2000 + seed)
      t0 = time.perf_counter()
      losses = finetune(model, tx, method, cfg, corpus, seed)
      seconds = time.perf_counter() - t0
      bpb = bits_per_byte(model, heldout)
      out["bpb"][method].append(bpb)
      out["runs"].append({"method": method, "seed": seed, "model": model, "bpb": bpb,
                          "losses": losses, "seconds": seconds})
      log(f"  {LABELS[method]:15s} seed {seed}  train loss {losses[-1] / math.log(2):.3f}  "
          f"held-out {bpb:.4f} bits/byte  ({seconds:.1f}s)")
  return out


def table(results: dict) -> str:
  """Mean ± std over seeds, and the difference to AdamW paired by seed (same LoRA init, batches,
  dropout)."""
  fmt = lambda v: f"{v.mean():+.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():+.4f}"
  rows = ["| fine-tuning (adapters only) | held-out bits/byte | minus AdamW, paired | seeds |",
          "|---|---|---|---|"]
  adamw = np.asarray(results["bpb"].get("adamw", []))
  for key, values in results["bpb"].items():
    v = np.asarray(values)
    paired = fmt(v - adamw) if key not in ("base", "adamw") and len(v) == len(adamw) else "-"
    rows.append(f"| {LABELS[key]} | {fmt(v).lstrip('+')} | {paired} | "
                f"{len(v) if key != 'base' else '-'} |")
  return "\n".join(rows)


def parse(argv=None) -> Config:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="a tiny model, a few steps, 1 seed (seconds)")
  p.add_argument("--seeds", type=int, help="fine-tuning seeds per method")
  p.add_argument("--steps", type=int, help="fine-tuning steps per run")
  p.add_argument("--pretrain-steps", type=int)
  p.add_argument("--rho", type=float, help="SAM / Functional-SAM radius")
  p.add_argument("--lr", type=float, help="adapter learning rate")
  p.add_argument("--rank", type=int, help="LoRA rank")
  args = p.parse_args(argv)
  cfg = QUICK if args.quick else Config()
  overrides = {k: v for k, v in vars(args).items() if k != "quick" and v is not None}
  return dataclasses.replace(cfg, **overrides)


def main(argv=None) -> dict:
  cfg = parse(argv)
  t0 = time.perf_counter()
  results = run(cfg)
  print(f"\nheld-out {FINETUNE_PACKAGE} bits per byte ({results['heldout_bytes']} bytes; LoRA rank "
        f"{cfg.rank}, {cfg.steps} steps, rho {cfg.rho}; mean ± std over seeds):")
  print(table(results))
  print(f"total {time.perf_counter() - t0:.0f}s")
  return results


if __name__ == "__main__":
  main()
