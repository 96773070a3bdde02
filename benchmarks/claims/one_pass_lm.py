"""Claim 5: SAM's gain is limited when every training example is seen once (one-pass LM).

A byte-level language model trained on the Python standard library's own
``.py`` files (``sysconfig.get_paths()["stdlib"]``, no download; a file goes
to validation when the MD5 of its relative path says so, about 10% of files).
Model: an MLP LM, the previous 24 bytes embedded (16 dims each), two ReLU layers
of 256, softmax over the next byte; metric: validation bits per byte on 20,000
windows. Training examples are disjoint windows of the training text. As in
``repeated_exposure``, every run takes the same number of steps (1,200 at batch
128), so E passes means 153,600 / E distinct windows. AdamW (lr 2e-3, weight
decay 0.01, cosine) against SAM(AdamW) at rho 0.05 at equal steps and at half
the steps (equal gradient evaluations). Predictions (Singh et al. 2025): in one
pass SAM does not pay for its cost, i.e. at equal compute it is worse; its gain
grows with repetition.

Changed from CLAIMS.md: an MLP LM rather than a transformer, and E in {1, 8, 64}
(not up to 500: at 500 passes the pool would be 300 windows), to fit the CPU.

python -m benchmarks.claims.one_pass_lm [--quick] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.claims import common as C

NAME = "one_pass_lm"
CLAIM = ("The effectiveness of SAM can also be domain-dependent. While it has shown benefits for "
         "computer vision tasks, its impact on other areas, such as GPT-style language models where "
         "each training example is seen only once, has been reported as limited in some studies.")
PUBLISHED = ("Singh, Mobahi, Agarwala, Dauphin, ICML 2025 (arXiv 2502.02407): decoder-only LMs on C4 "
             "(24M-1.2B parameters), one pass: SAM 'performs the worst of the lot, even worse than "
             "AdamW', at twice the cost.")

CTX, EMBED, HIDDEN, VAL_WINDOWS = 24, 16, 256, 20_000
BASE = {"lr": 2e-3, "wd": 0.01}
RHO = 0.05
LN2 = float(np.log(2.0))


def settings(quick: bool) -> dict:
  if quick:
    return {"seeds": 3, "steps": 150, "batch": 128, "epochs": [1, 16]}
  return {"seeds": 5, "steps": 1200, "batch": 128, "epochs": [1, 8, 64]}


def init(key):
  k1, k2 = jax.random.split(key)
  return {"embed": 0.5 * jax.random.normal(k1, (256, EMBED), jnp.float32),
          "mlp": C.mlp_init(k2, [CTX * EMBED, HIDDEN, HIDDEN, 256])}


def lm_loss(params, windows):
  """Mean next-byte cross-entropy (nats) of windows (B, CTX + 1) uint8."""
  w = windows.astype(jnp.int32)
  x = params["embed"][w[:, :-1]].reshape(w.shape[0], -1)
  return C.cross_entropy(C.mlp_apply(params["mlp"], x), w[:, -1])


@jax.jit
def bits_per_byte(params, windows):
  return jax.vmap(lambda p: lm_loss(p, windows))(params) / LN2


def windows_of(text: np.ndarray, starts: np.ndarray) -> np.ndarray:
  return text[starts[:, None] + np.arange(CTX + 1)]


def run(quick: bool, out: str) -> dict:
  cfg = settings(quick)
  seeds = list(range(cfg["seeds"]))
  train, val, info = C.stdlib_text()
  n_pool = cfg["steps"] * cfg["batch"]
  slots = len(train) // (CTX + 1)
  if slots < n_pool:
    raise RuntimeError(f"the stdlib text has {slots} windows, fewer than the {n_pool} needed")
  pool = windows_of(train, np.random.default_rng(0).choice(slots, n_pool, replace=False) * (CTX + 1))
  val_w = jnp.asarray(windows_of(val, np.random.default_rng(1).integers(0, len(val) - CTX - 1,
                                                                         VAL_WINDOWS)))
  params0 = jax.vmap(init)(jnp.stack([jax.random.key(s) for s in seeds]))
  runs = {"adamw": ("adamw", BASE, 1.0), "sam": ("sam_adamw", {**BASE, "rho": RHO}, 1.0),
          "sam_half": ("sam_adamw", {**BASE, "rho": RHO}, 0.5)}
  res = C.repetition_sweep(lm_loss, params0, jnp.asarray(pool), steps=cfg["steps"], batch=cfg["batch"],
                           epochs=cfg["epochs"], seeds=seeds, runs=runs,
                           evaluate=lambda p: bits_per_byte(p, val_w))
  es = cfg["epochs"]
  gain = {e: res["adamw"][e] - res["sam"][e] for e in es}  # > 0: SAM has fewer bits per byte
  gain_half = {e: res["adamw"][e] - res["sam_half"][e] for e in es}
  tests = [
      C.sign_test("one pass, equal compute: AdamW bpb - SAM bpb", gain_half[es[0]], predicted="-",
                  unit="bits/byte", what="< 0: SAM at half the steps is worse than AdamW"),
      C.sign_test("growth of SAM's gain with repetition (equal steps)", C.growth(gain),
                  unit="bits/byte", what="mean gain over E > 1 minus the one-pass gain"),
      C.sign_test("one pass, equal steps: AdamW bpb - SAM bpb", gain[es[0]], predicted="-",
                  unit="bits/byte", primary=False, what="the claim expects about 0 or below"),
      C.sign_test(f"E={es[-1]}, equal steps: AdamW bpb - SAM bpb", gain[es[-1]], unit="bits/byte",
                  primary=False),
      C.sign_test("growth of SAM's gain with repetition (equal compute)", C.growth(gain_half),
                  unit="bits/byte", primary=False),
  ]
  figures = {"settings": cfg, "text": {**info, "train_bytes": int(len(train)), "val_bytes": int(len(val)),
                                       "pool_windows": n_pool},
             "validation_bits_per_byte": {n: {e: C.mean_std(v) for e, v in r.items()}
                                          for n, r in res.items()}}
  return C.record(NAME, claim=CLAIM, published=PUBLISHED, protocol=C.protocol_of(__doc__), tests=tests,
                  figures=figures, plots=[plot(res, cfg, out)], quick=quick, seconds=0)


def plot(res: dict, cfg: dict, out: str) -> str:
  plt = C.plt()
  es = cfg["epochs"]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
  labels = {"adamw": "AdamW", "sam": f"SAM rho={RHO}", "sam_half": f"SAM rho={RHO}, half the steps"}
  for name, r in res.items():
    C.errorbar(a1, es, np.stack([r[e] for e in es], 1), labels[name], ls="--" if "half" in name else "-")
  C.errorbar(a2, es, np.stack([res["adamw"][e] - res["sam"][e] for e in es], 1), "equal steps", color="C1")
  C.errorbar(a2, es, np.stack([res["adamw"][e] - res["sam_half"][e] for e in es], 1),
             "equal gradient evaluations", color="C2", ls="--")
  a2.axhline(0, color="k", lw=0.8)
  C.repetition_axes(((a1, "validation bits per byte"),
                     (a2, "AdamW - SAM (bits/byte; > 0: SAM better)")), es, cfg["steps"])
  a1.set_title("byte-level MLP LM on the stdlib's .py files")
  a2.set_title("SAM's gain")
  return C.save(fig, out, NAME)


if __name__ == "__main__":
  C.script_main(NAME, run)
