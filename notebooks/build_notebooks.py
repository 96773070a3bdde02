"""Writes the four notebooks from the cells below (run once; then execute them).

  python notebooks/build_notebooks.py && for nb in notebooks/0*.ipynb; do
    jupyter nbconvert --execute --inplace "$nb"; done   # or tests/test_notebooks.py
"""

import nbformat as nbf

SMALL = ('''import os
SMALL = os.environ.get("SAM_OPTAX_NOTEBOOK_SMALL") == "1"  # CI runs the notebooks with tiny '''
         '''settings''')


def notebook(cells):
  nb = nbf.v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c)
              for c in cells]
  return nb


QUICKSTART = [
    "md:# Quickstart: SAM in an optax chain\n\n`sam_optax.sharpness_aware` receives the clean "
    "gradient and a `grad_fn` closure, and returns the gradient at `w + rho * g/|g|`. It composes "
    "with any optax chain and runs inside your jitted step.",
    SMALL,
    '''import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from sklearn.datasets import make_moons
import sam_optax

x, y = make_moons(512, noise=0.25, random_state=0)
x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)

def init(key, sizes=(2, 64, 64, 2)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

def loss_fn(params, x, y):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()''',
    "md:The whole integration is one keyword of `update`: `grad_fn=` (a closure returning the "
    "gradient), or `value_and_grad_fn=` with the clean loss as `value=`, which also records the "
    "loss at the perturbed point. `sam_optax.metrics(state)` reads what the step recorded.",
    '''def make_step(opt):
    @jax.jit
    def step(params, state):
        value_and_grad_fn = lambda p: jax.value_and_grad(loss_fn)(p, x, y)
        loss, grads = value_and_grad_fn(params)
        updates, state = opt.update(grads, state, params,
                                    value_and_grad_fn=value_and_grad_fn, value=loss)
        return optax.apply_updates(params, updates), state, loss, sam_optax.metrics(state)
    return step

steps = 100 if SMALL else 1500
curves, solutions, telemetry = {}, {}, {}
for name, opt in {"sgd": optax.sgd(0.1, momentum=0.9),
                  # telemetry="full" also records the cosine (g stays alive through pass two)
                  "sam": optax.chain(sam_optax.sharpness_aware(0.05, telemetry="full"),
                                     optax.sgd(0.1, momentum=0.9))}.items():
    params, step = init(jax.random.key(0)), make_step(opt)
    state = opt.init(params)
    losses, records = [], []
    for _ in range(steps):
        params, state, loss, m = step(params, state)
        losses.append(loss)
        records.append(m)
    curves[name], solutions[name] = np.asarray(losses), params
    telemetry[name] = {k: np.asarray([r[k] for r in records]) for k in records[0]}
plt.figure(figsize=(5, 3))
for name, c in curves.items():
    plt.semilogy(c, label=name)
plt.xlabel("step"); plt.ylabel("training loss"); plt.legend(); plt.grid(alpha=0.3)
plt.show()
print({k: round(float(v[-1]), 4) for k, v in curves.items()})
print("recorded by SAM:", sorted(telemetry["sam"]), "| by SGD:", sorted(telemetry["sgd"]))''',
    "md:What SAM sees during training: the loss at the perturbed point next to the clean loss, "
    "their difference (SAM's one-step sharpness estimate, which it pushes down), and the cosine "
    "between the clean and the perturbed gradient.",
    '''t = telemetry["sam"]
fig, axes = plt.subplots(1, 3, figsize=(13, 3))
axes[0].semilogy(t["clean_loss"], label="clean L(w)")
axes[0].semilogy(t["perturbed_loss"], label="perturbed L(w+ε)")
axes[0].legend()
axes[1].plot(t["sharpness"]); axes[1].set_title("sharpness estimate L(w+ε) − L(w)")
axes[2].plot(t["cosine"]); axes[2].set_title("cos(g, g_adv)")
for ax in axes:
    ax.set_xlabel("step"); ax.grid(alpha=0.3)
plt.tight_layout(); plt.show()
print(f"sharpness estimate: first 10 steps {t['sharpness'][:10].mean():.4f}, "
      f"last 10 steps {t['sharpness'][-10:].mean():.4f}")''',
    "md:The training losses alone say little about SAM: it minimizes the worst loss in a "
    "neighbourhood rather than the loss at the point. The difference is in the geometry of the "
    "solution, which `sam_optax.sharpness` measures: the largest Hessian eigenvalue of the "
    "training loss at each solution.",
    '''from sam_optax import sharpness
for name, p in solutions.items():
    lam, _ = sharpness.hessian_top_eigenvalue(lambda q: loss_fn(q, x, y), p, num_iters=10 if SMALL
    else 50)
    print(f"{name}: top Hessian eigenvalue {float(lam):.3f}")''',
    "md:A smaller top eigenvalue is a flatter minimum; notebooks 02 and 03 show what that buys "
    "on held-out and shifted data.",
]

FLAX = [
    "md:# Flax training with BatchNorm and dropout: SGD vs SAM vs ASAM\n\n"
    "`sam_optax.flax.make_linen_train_step` builds a jitted step for a `TrainState` with "
    "`batch_stats`: the running statistics come from the clean pass only and both passes use the "
    "same dropout key. Data: scikit-learn's digits with 40% symmetric label noise.",
    SMALL,
    '''import numpy as np, matplotlib.pyplot as plt
from sam_optax.datasets import load_digits
from sam_optax.demo.models import make_model
from sam_optax.demo.recipes import optimizers
from sam_optax.demo.train import train_one

epochs, seeds = (3, 1) if SMALL else (25, 2)
model = make_model("cnn")
table = optimizers(lr=0.05, steps=epochs * (1203 // 64), rho=0.1)
runs = {}
for name in ("sgd", "sam", "asam"):
    runs[name] = [train_one(model, table[name], load_digits(seed, 0.4), epochs=epochs,
                                 batch_size=64, seed=seed, with_sharpness=not SMALL)
                  for seed in range(seeds)]''',
    '''plt.figure(figsize=(6, 4))
for name, rs in runs.items():
    acc = np.array([r.accs for r in rs]) * 100
    plt.plot(np.arange(1, epochs + 1), acc.mean(0), label=name)
plt.xlabel("epoch"); plt.ylabel("test accuracy (%)"); plt.title("digits, 40% label noise")
plt.legend(); plt.grid(alpha=0.3); plt.show()
for name, rs in runs.items():
    final = np.array([r.accs[-1] for r in rs]) * 100
    sharp = "" if rs[0].sharpness is None else (
        f"  top Hessian eigenvalue {np.mean([r.sharpness[0] for r in rs]):.2f}")
    print(f"{name:5s} final test accuracy {final.mean():.2f} ± {final.std():.2f}{sharp}")''',
    "md:With the full settings (25 epochs, 2 seeds): SAM and ASAM start slower, then settle about "
    "1.5–2 points above SGD, which plateaus near 95% while fitting the wrong labels; and they end "
    "at much flatter solutions (top Hessian eigenvalue about 9 for SAM and 4 for ASAM against "
    "about 29 for SGD). With `SAM_OPTAX_NOTEBOOK_SMALL=1` (3 epochs) the run is only a smoke test.",
]

SHARPNESS = [
    "md:# Loss landscapes and Hessian eigenvalues of SGD vs SAM solutions\n\n"
    "`sam_optax.sharpness` works on any pytree model through a `loss_fn(params)` closure.",
    SMALL,
    '''import jax, jax.numpy as jnp, numpy as np, matplotlib.pyplot as plt
from sam_optax import flax as ft
from sam_optax import sharpness
from sam_optax.datasets import load_digits
from sam_optax.demo.models import make_model
from sam_optax.demo.recipes import optimizers
from sam_optax.demo.train import train_one

epochs = 3 if SMALL else 25
model = make_model("cnn")
table = optimizers(lr=0.05, steps=epochs * (1203 // 64), rho=0.1)
data = load_digits(0, 0.4)
sol = {name: train_one(model, table[name], data, epochs=epochs, batch_size=64, seed=0,
                            with_sharpness=False).state for name in ("sgd", "sam")}
x, y = jnp.asarray(data[0][:512]), jnp.asarray(data[1][:512])

def loss_at(state):
    return lambda p: ft.softmax_cross_entropy(
        state.apply_fn({"params": p, "batch_stats": state.batch_stats}, x, train=False), y)''',
    "md:1D slices along a filter-normalized random direction (Li et al., 2018), one per solution:",
    '''n_pts = 11 if SMALL else 41
alphas = jnp.linspace(-1, 1, n_pts)
curves = {name: sharpness.loss_landscape_1d(loss_at(s), s.params, alphas=alphas,
key=jax.random.key(1))
          for name, s in sol.items()}
sharpness.plot_landscape_1d(curves); plt.title("training loss along a random "
                                               "direction"); plt.show()''',
    "md:The straight line from the SGD solution to the SAM solution. The loss rises between them: "
    "they lie in different basins. SGD's has the lower training loss on these noisy labels (it "
    "fits more of them), SAM's the flatter shape. The kink at 0.5 is where the plot switches from "
    "SGD's BatchNorm statistics to SAM's.",
    '''d = jax.tree.map(lambda a, b: b - a, sol["sgd"].params, sol["sam"].params)
# BatchNorm statistics differ between the solutions; use each end's for its half of the path
t = jnp.linspace(0, 1, n_pts)
interp = [float(loss_at(sol["sgd"] if ti < 0.5 else sol["sam"])(
    jax.tree.map(lambda a, di: a + ti * di, sol["sgd"].params, d))) for ti in t]
plt.figure(figsize=(5, 3)); plt.plot(t, interp); plt.xlabel("0 = SGD solution, 1 = SAM solution")
plt.ylabel("training loss"); plt.grid(alpha=0.3); plt.show()''',
    "md:Top Hessian eigenvalue (power iteration on Hessian-vector products), max-sharpness in the "
    "rho = 0.05 ball, and the eigenvalue density (stochastic Lanczos quadrature):",
    '''iters = 5 if SMALL else 20
fig, ax = plt.subplots(figsize=(5, 3))
for name, s in sol.items():
    f = loss_at(s)
    lam, _ = jax.jit(lambda p: sharpness.hessian_top_eigenvalue(f, p, num_iters=iters,
    unroll=True))(s.params)
    ms = sharpness.max_sharpness(f, s.params, 0.05, steps=3 if SMALL else 5, unroll=True)
    print(f"{name}: top eigenvalue {float(lam):.2f}, max-sharpness {float(ms):.4f}")
    sharpness.plot_spectrum(sharpness.hessian_spectrum(f, s.params, num_iters=8 if SMALL else 25),
    ax, label=name)
ax.set_title("Hessian eigenvalue density"); plt.show()''',
    "md:The SAM solution sits in a wider basin: its slice is flatter, its top eigenvalue and its "
    "worst-case loss increase in the rho-ball are smaller, and its spectrum has less mass at large "
    "eigenvalues.",
]

EFFICIENT = [
    "md:# Efficient variants: accuracy versus gradient evaluations\n\n"
    "LookSAM runs the second pass every k steps, randomized SAM (RST) with probability p, and "
    "Momentum-SAM never (it perturbs along the momentum). `sam_optax.gated_jit` makes the skipped "
    "passes real on CPU too. We count gradient evaluations (forward+backward passes) and plot test "
    "accuracy against them.",
    SMALL,
    '''import numpy as np, matplotlib.pyplot as plt
from sam_optax.datasets import load_digits
from sam_optax.demo.models import make_model
from sam_optax.demo.recipes import optimizers
from sam_optax.demo.train import train_one

epochs, seeds = (3, 1) if SMALL else (25, 2)
steps_per_epoch = 1203 // 64
model = make_model("cnn")
table = optimizers(lr=0.05, steps=epochs * steps_per_epoch, rho=0.1)
passes = {"sgd": 1.0, "sam": 2.0, "looksam": 1.2, "randomized": 1.5, "msam": 1.0}
runs = {name: [train_one(model, table[name], load_digits(seed, 0.4), epochs=epochs,
                              batch_size=64, seed=seed, with_sharpness=False) for seed in
                              range(seeds)]
        for name in passes}''',
    '''fig, ax = plt.subplots(figsize=(6, 4))
for name, rs in runs.items():
    acc = np.array([r.accs for r in rs]).mean(0) * 100
    evals = np.arange(1, epochs + 1) * steps_per_epoch * passes[name]
    ax.plot(evals, acc, marker=".", label=f"{name} ({passes[name]:g} passes/step)")
ax.set_xlabel("gradient evaluations"); ax.set_ylabel("test accuracy (%)")
ax.set_title("digits, 40% label noise"); ax.legend(fontsize=8); ax.grid(alpha=0.3); plt.show()
for name, rs in runs.items():
    print(f"{name:11s} final {100 * np.mean([r.accs[-1] for r in rs]):.2f}%  "
          f"steps/s {np.mean([r.steps_per_s for r in rs]):.0f}")''',
    "md:Read the curves at equal cost (a vertical line). With the full settings MSAM is the best "
    "buy here: near SAM's accuracy at SGD's cost. Randomized SAM reaches SAM's final accuracy with "
    "a quarter fewer gradient evaluations. LookSAM (k = 5, alpha = 0.7) is cheap per step but "
    "unstable with this BatchNorm CNN and 40% label noise: it ends well below the others (see "
    "`benchmarks/ARCHIVE.md`; a smaller alpha is the first thing to try). The steps/s column is "
    "the real time per step on this machine, with skipped passes not run.",
]

if __name__ == "__main__":
  import os
  here = os.path.dirname(os.path.abspath(__file__))
  for name, cells in [("01_quickstart", QUICKSTART), ("02_flax_training", FLAX),
                      ("03_sharpness", SHARPNESS), ("04_efficient_variants", EFFICIENT)]:
    nbf.write(notebook(cells), os.path.join(here, f"{name}.ipynb"))
