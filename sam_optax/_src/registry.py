"""The method registry: every public name of :mod:`sam_optax`, once.

One :class:`Entry` per public function (a transformation, a geometry, a wrapper or a
helper) or public class that is not a method's state. It says where the name goes in
the API reference, what the README's API table says of it, which closure its ``update``
needs, and how the test suite builds a small instance of it. The contract, hardening,
soak, export, golden, resume and Flax-step tests, the docs' API page and the README's API
table all read this table; a name in ``sam_optax.__all__`` without an entry fails the
tests. Adding a method: its module, its export in ``sam_optax/__init__.py``, one entry
here, one line in ``CHANGELOG.md`` (see the guide "How a method is built").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

# The API reference's sections, in the order the pages show them.
SAM = "SAM and its aliases"
DESCENT = "Descent rules on the SAM point"
SELECTION = "Data selection, parallel and one-pass methods"
SKIPPING = "Schedules that skip the second pass"
GEOMETRY = "Perturbation geometries"
BROADER = "Broader sharpness measures and Bayesian SAM"
STEP = "What a train step passes and reads"
SECTIONS = (SAM, DESCENT, SELECTION, SKIPPING, GEOMETRY, BROADER, STEP)

# How the tests make a full optimizer of an entry's example (``role``):
#   "first":     chain(example, sgd): a transformation that comes first in the chain;
#   "optimizer": the example is a complete optimizer (it wraps or owns the base);
#   "geometry":  chain(sharpness_aware(0.05, perturbation=example), sgd);
#   "wrapper":   chain(example, sgd), the example wrapping sharpness_aware(0.05);
#   "last":      chain(sgd, example): after the base optimizer (weight_ema);
#   "helper":    not a transformation (no example).
ROLES = ("first", "optimizer", "geometry", "wrapper", "last", "helper")
# What ``update`` needs besides (updates, state, params):
#   "gradient":  grad_fn= or value_and_grad_fn= (or objective=, which gives both);
#   "loss":      value_and_grad_fn= (and value=) or objective=;
#   "objective": objective= (model outputs and per-example losses);
#   "none":      no closure (MSAM, weight_ema).
CLOSURES = ("gradient", "loss", "objective", "none")


class Fresh(NamedTuple):
  """An argument made anew for each use of an :class:`Example` (a base optimizer, a wrapped
  transformation): ``make()`` builds it."""
  make: Callable[[], Any]


class Example(NamedTuple):
  """How the tests call a public function: ``fn(*args, **kwargs)``, each :class:`Fresh`
  argument built anew. The same arguments serve ``optax.inject_hyperparams(fn)``.
  ``closure``: what this row's ``update`` needs where it differs from the entry's
  (``rho="auto"`` needs the losses); ``splits_batch``: the row splits the objective's
  batch into groups (``group_size``), so its objective must carry one."""
  args: tuple = ()
  kwargs: dict = {}
  closure: str | None = None
  splits_batch: bool = False

  def resolve(self) -> tuple[tuple, dict]:
    make = lambda v: v.make() if isinstance(v, Fresh) else v
    return tuple(make(a) for a in self.args), {k: make(v) for k, v in self.kwargs.items()}

  def build(self, fn: Callable) -> Any:
    args, kwargs = self.resolve()
    return fn(*args, **kwargs)


class Entry(NamedTuple):
  """One public name.

  Attributes:
    name: the name in ``sam_optax.__all__``.
    section: its section of the API reference (one of :data:`SECTIONS`).
    what: the README API table's description (math welcome).
    paper: the README API table's reference (authors, venue, arXiv link), or "".
    state: the name of its state class, also in ``__all__`` (or None).
    role: how the tests build a full optimizer from ``example`` (see :data:`ROLES`).
    closure: what its ``update`` needs (see :data:`CLOSURES`).
    example: the :class:`Example` call with small test hyperparameters, or None.
    variants: more test rows, ``{row name: Example}`` (the same function and role).
    golden: the row of ``tests/golden`` that holds its recorded outputs (default: the
      name), or "" for a name added after the goldens were recorded.
    complex_params: whether it accepts complex parameters.
    closure_every_step: whether every step calls the closure (False for the methods that
      skip it on some steps, and those that never call it).
    aliases: earlier names that still work for one release, with a DeprecationWarning.
    static: hyperparameters that fix the program's shapes (``inject_hyperparams``
      must get them in ``static_args``).
  """
  name: str
  section: str
  what: str
  paper: str = ""
  state: str | None = None
  role: str = "first"
  closure: str = "gradient"
  example: Example | None = None
  variants: dict = {}
  golden: str | None = None
  complex_params: bool = True
  closure_every_step: bool = True
  aliases: tuple = ()
  static: tuple = ()

  @property
  def golden_row(self) -> str:
    return self.name if self.golden is None else self.golden

  @property
  def fn(self) -> Callable:
    """The public function (or class) itself."""
    import sam_optax
    return getattr(sam_optax, self.name)

  def rows(self) -> dict[str, Example]:
    """The test rows of this entry: ``{row name: Example}``."""
    if self.example is None:
      return {}
    return {self.name: self.example, **self.variants}


def _so():
  import sam_optax
  return sam_optax


def _optax():
  import optax
  return optax


def E(*args, **kwargs) -> Example:  # noqa: N802 (reads as the call it stands for)
  return Example(args, kwargs)


SGD = Fresh(lambda: _optax().sgd(0.05, momentum=0.9))
SAM_05 = Fresh(lambda: _so().sharpness_aware(0.05))


FOREST = "Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021 ([2010.01412](https://arxiv.org/abs/2010.01412))"
KWON = "Kwon et al., ICML 2021 ([2102.11600](https://arxiv.org/abs/2102.11600))"
MUELLER = "Mueller et al., NeurIPS 2023 ([2306.04226](https://arxiv.org/abs/2306.04226))"
TAHMASEBI = "Tahmasebi et al., ICML 2024 ([2406.03682](https://arxiv.org/abs/2406.03682))"
SINGH = "Singh et al., ICML 2025 ([2502.02407](https://arxiv.org/abs/2502.02407))"
DU_ESAM = "Du et al., ICLR 2022 ([2110.03141](https://arxiv.org/abs/2110.03141))"
DU_SAF = "Du et al., NeurIPS 2022 ([2205.14083](https://arxiv.org/abs/2205.14083))"
ZHUANG = "Zhuang et al., ICLR 2022 ([2203.08065](https://arxiv.org/abs/2203.08065))"
YUE = "Yue et al., KDD 2023 ([2305.15817](https://arxiv.org/abs/2305.15817))"
MOLLENHOFF = "Möllenhoff & Khan, ICLR 2023 ([2210.01620](https://arxiv.org/abs/2210.01620))"


ENTRIES: tuple[Entry, ...] = (
    # ------------------------------------------------------------------ SAM itself
    Entry("sharpness_aware", SAM,
          "the core: ∇L(w + ρ d), d from the perturbation geometry; `rho` a float, a schedule "
          "or `\"auto\"`; `ascent_steps=K` multi-step projected ascent; `group_size=m` "
          "m-sharpness on one device; `axis_name` per-device perturbation",
          FOREST, state="SharpnessAwareState",
          example=E(0.05), variants={
              "ascent_steps": E(0.05, ascent_steps=3),
              "sharpness_aware_auto": Example(("auto",), {}, closure="loss"),
              "sharpness_aware_groups": Example((0.05,), {"group_size": 1}, closure="objective",
                                                splits_batch=True)},
          static=("ascent_steps", "group_size", "group_chunk")),
    Entry("sam", SAM, "`chain(sharpness_aware(rho), base)`", FOREST, role="optimizer",
          example=E(SGD), static=("group_size", "group_chunk")),
    Entry("asam", SAM, "`chain(sharpness_aware(rho, perturbation=adaptive(eta)), base)`", KWON,
          role="optimizer", example=E(SGD),
          variants={"asam_kernels_only": E(SGD, kernels_only=True)},
          static=("group_size", "group_chunk")),
    Entry("auto_rho", SAM,
          "`rho=\"auto\"` spelled out: ρ follows the measured one-step sharpness "
          "(L(w+ε) − L(w))/L(w) towards a target", FOREST, role="helper"),
    Entry("RadiusState", SAM, "the state of `rho=\"auto\"` (the radius of the next and last step)",
          role="helper"),
    # -------------------------------------------------------------- descent rules
    Entry("gsam", DESCENT, "GSAM: descend g_p − α g_⊥ (g_⊥: g's part orthogonal to g_p)", ZHUANG,
          state="GSAMState", example=E(0.05)),
    Entry("rho_schedule_from_lr", DESCENT, "GSAM's ρ_t following the learning rate", ZHUANG,
          role="helper"),
    Entry("gradient_norm_penalty", DESCENT,
          "PGN: (1−α) g + α ∇L(w + ρ d); α = 1 is SAM, α = 0 the base; α may be a schedule",
          "Zhao et al., ICML 2022 ([2202.03599](https://arxiv.org/abs/2202.03599))",
          state="GradientNormPenaltyState", example=E(0.1, 0.8)),
    Entry("wsam", DESCENT, "WSAM: g + γ/(1−γ)(g̃ − g); γ = 0.5 is SAM", YUE, state="WSAMState",
          example=E(0.05, 0.9)),
    Entry("wsam_optimizer", DESCENT,
          "WSAM as a complete optimizer; `decoupled=True` applies the sharpness term outside the "
          "base optimizer's momentum and weight decay", YUE, role="optimizer",
          example=E(SGD, 0.05, 0.9, decoupled=True, learning_rate=0.05),
          golden="wsam_optimizer_decoupled"),
    Entry("lookbehind_sam", DESCENT,
          "Lookbehind-SAM: k ascent steps, each descent gradient on the fast weights, then the "
          "slow weights step α of the way to them; evaluate the slow weights (`clean_params`)",
          "Mordido et al., ICML 2024 ([2307.16704](https://arxiv.org/abs/2307.16704))",
          state="LookbehindSAMState", role="optimizer", example=E(SGD, 0.05, k=2),
          variants={"lookbehind_sam_adaptive": E(SGD, 0.05, k=3, alpha="adaptive")}, golden=""),
    Entry("stable_sam", DESCENT, "StableSAM: g̃·‖g‖/‖g̃‖",
          "Tan et al., JMLR 2025 ([2401.07250](https://arxiv.org/abs/2401.07250))",
          state="StableSAMState", example=E(0.05)),
    Entry("functional_sam", DESCENT,
          "Functional-SAM: J_F(w+ε)ᵀ∇_Fℓ(F(w)), one VJP at w + ε; needs `objective=`", SINGH,
          state="FunctionalSAMState", closure="objective", example=E(),
          variants={"esam_functional_preconditioned": E(
              perturbation=Fresh(lambda: _so().preconditioned()))},
          golden="functional_sam_objective"),
    # --------------------------------------------------------- one-pass, selection
    Entry("esam", SELECTION,
          "ESAM: the second pass on the ⌈γB⌉ examples whose loss rises most at w + ε; "
          "default perturbation `stochastic(0.6)`; needs `objective=`", DU_ESAM,
          closure="objective", example=E(),
          variants={"esam_l2": E(0.05, 0.25, perturbation=Fresh(lambda: _so().l2()))}),
    Entry("sampa", SELECTION,
          "SAMPa: both gradients at sequential depth one (one vmapped call, or one per device of "
          "a 2-device mesh axis); no clean gradient needed",
          "Xie et al., NeurIPS 2024 ([2410.10683](https://arxiv.org/abs/2410.10683))",
          state="SAMPaState", role="optimizer", example=E(SGD),
          variants={"sampa_unvectorized": E(SGD, vectorize=False)}),
    Entry("msam", SELECTION, "Momentum-SAM: perturb along −momentum, one pass per step",
          "Becker et al. 2024 ([2401.12033](https://arxiv.org/abs/2401.12033))",
          state="MomentumSAMState", role="optimizer", closure="none",
          example=E(SGD), variants={"msam_adamw": E(Fresh(lambda: _optax().adamw(1e-3)), rho=1.0)},
          closure_every_step=False),
    Entry("msam_clean_params", SELECTION, "the clean weights w = w̃ − ε of an MSAM run",
          role="helper"),
    Entry("clean_params", STEP,
          "the parameters to evaluate: the clean ones where a method keeps the training loop's "
          "perturbed (MSAM), else `params`", role="helper"),
    Entry("weight_ema", SELECTION,
          "EMA of the weights in the optimizer state (last in the chain): MESA's teacher", DU_SAF,
          state="WeightEMAState", role="last", closure="none",
          example=E(0.9), closure_every_step=False),
    # ------------------------------------------------------ schedules that skip passes
    Entry("looksam", SKIPPING, "the SAM pass every k steps, the stored direction reused between",
          "Liu et al., CVPR 2022 ([2203.02714](https://arxiv.org/abs/2203.02714))",
          state="LookSAMState", example=E(0.05, k=2), closure_every_step=False),
    Entry("randomized", SKIPPING, "RST: a Bernoulli draw per step picks a SAM or a plain step",
          "Zhao et al. 2022 ([2203.09962](https://arxiv.org/abs/2203.09962))",
          state="RandomizedState", role="wrapper",
          example=E(SAM_05, 0.5),
          closure_every_step=False),
    Entry("ae_sam", SKIPPING, "AE-SAM: the SAM step only where ‖g‖² ≥ μ + c_t σ",
          "Jiang et al., ICLR 2023 ([2304.14647](https://arxiv.org/abs/2304.14647))",
          state="AdaptivePolicyState", role="wrapper",
          example=E(SAM_05, total_steps=10),
          golden="adaptive_policy", closure_every_step=False, aliases=("adaptive_policy",)),
    Entry("late_phase", SKIPPING, "the plain gradient before `start_step`, then `transform`",
          "Zhou et al., ICLR 2025 ([2410.10373](https://arxiv.org/abs/2410.10373))",
          state="LatePhaseState", role="wrapper",
          example=E(SAM_05, 0), variants={"late_phase_start_2": E(SAM_05, 2)},
          closure_every_step=False),
    Entry("gated_jit", SKIPPING,
          "`jax.jit` that keeps the skipped passes skipped on XLA:CPU: one program per branch",
          role="helper"),
    # ------------------------------------------------------------------ geometries
    Entry("l2", GEOMETRY, "d = g/‖g‖ (global norm)", FOREST, role="geometry",
          example=E()),
    Entry("adaptive", GEOMETRY, "ASAM's ball: d = T⊙base(T⊙g), T = |w| + η", KWON,
          state="AdaptiveState", role="geometry", example=E(),
          variants={"adaptive_linf": E(base=Fresh(lambda: _so().linf()))}),
    Entry("linf", GEOMETRY, "d = sign(g); `adaptive(base=linf())` gives T⊙sign(g)", MUELLER,
          role="geometry", example=E()),
    Entry("unnormalized", GEOMETRY, "USAM: d = g",
          "Andriushchenko & Flammarion, ICML 2022 ([2206.06232](https://arxiv.org/abs/2206.06232))",
          role="geometry", example=E()),
    Entry("fisher", GEOMETRY, "Fisher-SAM: f = g/(1+ηg²), d = f/√(g·f)",
          "Kim et al., ICML 2022 ([2206.04920](https://arxiv.org/abs/2206.04920))", role="geometry",
          example=E()),
    Entry("monge", GEOMETRY, "Monge-SAM: d = (g/‖g‖)/√(1+‖g‖²), the ball of the metric I + ggᵀ",
          "Jacobsen & Arvanitidis 2025 ([2502.08448](https://arxiv.org/abs/2502.08448))",
          role="geometry", example=E()),
    Entry("preconditioned", GEOMETRY,
          "d = u/‖u‖, u = g/(√v̂ + adam_eps), v an EMA of g² (or the base Adam's, "
          "`moments=\"adam\"`)",
          SINGH, state="PreconditionedState", role="geometry", example=E()),
    Entry("friendly", GEOMETRY, "F-SAM: d = normalize(g − σ m), m an EMA of g",
          "Li et al., CVPR 2024 ([2403.12350](https://arxiv.org/abs/2403.12350))",
          state="FriendlyState", role="geometry", example=E()),
    Entry("variance_suppressed", GEOMETRY, "VaSSO: d an EMA of g, normalized",
          "Li & Giannakis, NeurIPS 2023 ([2309.15639](https://arxiv.org/abs/2309.15639))",
          state="VarianceSuppressedState", role="geometry", example=E()),
    Entry("stochastic", GEOMETRY, "ESAM's stochastic weight perturbation: a tensor-wise mask",
          DU_ESAM, state="StochasticState", role="geometry", example=E()),
    Entry("sparse", GEOMETRY, "SSAM: a sparse mask from a running g² (Fisher) estimate",
          "Mi et al., NeurIPS 2022 ([2210.05177](https://arxiv.org/abs/2210.05177))",
          state="SparseState", role="geometry", example=E(refresh_every=2)),
    Entry("random_weight", GEOMETRY, "RWP: filter-wise Gaussian noise σ‖W_i‖ (use `rho=1`)",
          "Li et al., TMLR 2024 ([2404.00357](https://arxiv.org/abs/2404.00357))",
          state="RandomWeightState", role="geometry", example=E()),
    Entry("masked", GEOMETRY, "a geometry on the masked leaves only, its norm over them", MUELLER,
          state="MaskedState", role="geometry",
          example=E(Fresh(lambda: _so().adaptive()), Fresh(lambda: _so().kernel_mask)),
          variants={"masked_norm_layers": E(Fresh(lambda: _so().l2()),
                                            Fresh(lambda: _so().normalization_mask))},
          golden="masked_kernels"),
    Entry("kernel_mask", GEOMETRY, "the mask of weight tensors (ASAM's kernels-only setting)", KWON,
          role="helper"),
    Entry("normalization_mask", GEOMETRY,
          "the mask of normalization-layer scales and biases (SAM-ON)",
          MUELLER, role="helper"),
    Entry("make_perturbation", GEOMETRY,
          "a geometry from its direction, and optionally its projection and closed-form norm",
          role="helper"),
    Entry("Perturbation", GEOMETRY, "the class of geometries: an optax transformation that also "
          "projects onto its ball", role="helper"),
    # ---------------------------------------------------------- broader measures, Bayes
    Entry("trace_sam", BROADER, "mean of ∇L(w + ρ z_i), z_i ~ N(0, I): penalizes tr H", TAHMASEBI,
          state="UniversalSAMState", example=E(0.01, num_samples=2),
          variants={"trace_sam_sphere": E(0.01, distribution="sphere")},
          static=("num_samples",)),
    Entry("frob_sam", BROADER, "g + (λ/ρ²) Ĉov(L(w+ε_i), ∇L(w+ε_i)): penalizes ‖H‖_F", TAHMASEBI,
          closure="loss", example=E(0.005), static=("num_samples",)),
    Entry("det_sam", BROADER, "the gradient of L + λ φ(mean ψ(Δ_i)): penalizes det H", TAHMASEBI,
          closure="loss", example=E(1.0, num_samples=2), static=("num_samples",)),
    Entry("bsam", BROADER,
          "Bayesian SAM, a complete optimizer: the gradient at a posterior sample, ascent ρ g/s, "
          "an Adam-like precision s", MOLLENHOFF, state="BayesianSAMState", role="optimizer",
          example=E(0.05, num_data=32), complex_params=False),
    Entry("bsam_posterior", BROADER, "bSAM's posterior N(w, 1/(N s)): its mean and std", MOLLENHOFF,
          role="helper"),
    Entry("bsam_sample", BROADER, "one sample of bSAM's posterior", MOLLENHOFF, role="helper"),
    # -------------------------------------------------------- what a train step uses
    Entry("Objective", STEP,
          "the closure for methods that need model outputs or per-example losses: "
          "`Objective(apply_fn, loss_fn, batch, clean_outputs=None, clean_losses=None)`",
          role="helper"),
    Entry("metrics", STEP,
          "the last step's telemetry anywhere in a state: ‖g‖, ‖ε‖, ρ, ‖g_adv‖, the losses, "
          "the one-step sharpness, `sam_step`, `skipped_steps`", role="helper"),
    Entry("Telemetry", STEP, "what a step recorded (read it with `metrics`)", role="helper"),
    Entry("skip_if_nonfinite", STEP,
          "skip a step whose gradient or output (the perturbed gradient) is not finite, keeping "
          "the inner state", role="optimizer",
          example=E(Fresh(lambda: _so().sam(SGD.make()))), golden="apply_if_finite"),
    Entry("local_params", STEP, "keep per-device gradients local under `shard_map(check_vma=True)`",
          role="helper"),
)

# Names in ``sam_optax.__all__`` that are covered by an entry's ``state``.
STATES = {e.state: e.name for e in ENTRIES if e.state}
# The state classes two methods share (the state of one listed at the other).
SHARED_STATES = {"UniversalSAMState": ("trace_sam", "frob_sam", "det_sam"),
                 "WSAMState": ("wsam", "wsam_optimizer"),
                 "SharpnessAwareState": ("sharpness_aware", "sam", "asam", "esam")}


def by_name() -> dict[str, Entry]:
  return {e.name: e for e in ENTRIES}


def test_rows() -> dict[str, tuple[Entry, Example]]:
  """Every test row: ``{row name: (entry, Example)}``."""
  out = {}
  for e in ENTRIES:
    for row, make in e.rows().items():
      if row in out:
        raise ValueError(f"two registry rows are named {row!r}")
      out[row] = (e, make)
  return out
