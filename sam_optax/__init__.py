"""sam_optax: Sharpness-Aware Minimization and its family as Optax transformations.

The core is :func:`sharpness_aware`, a transformation that receives the clean
gradient as ``updates`` and a loss-gradient closure ``grad_fn`` as a keyword
argument of ``update``, and returns the gradient at the perturbed point.
Every method is one declaration on one engine (``sam_optax._src.engine``):
perturbation geometries are small transformations (:func:`l2`,
:func:`adaptive`, ...); descent rules and schedules are methods or wrappers on it.

The names, grouped as the API reference groups them:

* SAM and its descent rules: :func:`sharpness_aware`, :func:`sam`, :func:`asam`,
  :func:`gsam`, :func:`gradient_norm_penalty`, :func:`wsam`, :func:`wsam_optimizer`,
  :func:`stable_sam`, :func:`functional_sam`, :func:`esam`, :func:`sampa`,
  :func:`msam`, :func:`bsam`, :func:`trace_sam`, :func:`det_sam`, :func:`frob_sam`.
* Schedules that skip the second pass: :func:`looksam`, :func:`randomized`,
  :func:`ae_sam` (also ``adaptive_policy``), :func:`late_phase`, :func:`gated_jit`.
* Geometries: :func:`l2`, :func:`adaptive`, :func:`linf`, :func:`unnormalized`,
  :func:`fisher`, :func:`monge`, :func:`preconditioned`, :func:`friendly`, :func:`variance_suppressed`,
  :func:`stochastic`, :func:`sparse`, :func:`random_weight`, :func:`masked`
  (with :func:`kernel_mask`, :func:`normalization_mask`), :func:`make_perturbation`.
* What a train step calls: :class:`Objective`, :func:`metrics`,
  :func:`local_params`, :func:`skip_if_nonfinite` (also ``apply_if_finite``),
  :func:`weight_ema`, :func:`msam_clean_params`, :func:`bsam_posterior`,
  :func:`bsam_sample`, :func:`rho_schedule_from_lr`.
"""

from sam_optax._src.distributed import local_params
from sam_optax._src.engine import Objective
from sam_optax._src.finite import apply_if_finite, skip_if_nonfinite
from sam_optax._src.gating import Gate, gated_jit
from sam_optax._src.geometries import (
    AdaptiveState,
    FriendlyState,
    MaskedState,
    Perturbation,
    PreconditionedState,
    RandomWeightState,
    SparseState,
    StochasticState,
    VarianceSuppressedState,
    adaptive,
    fisher,
    friendly,
    kernel_mask,
    l2,
    linf,
    make_perturbation,
    masked,
    monge,
    normalization_mask,
    preconditioned,
    random_weight,
    sparse,
    stochastic,
    unnormalized,
    variance_suppressed,
)
from sam_optax._src.methods.bayes import BayesianSAMState, bsam, bsam_posterior, bsam_sample
from sam_optax._src.methods.descent import (
    GradientNormPenaltyState,
    GSAMState,
    gradient_norm_penalty,
    gsam,
    rho_schedule_from_lr,
)
from sam_optax._src.methods.esam import ESAMState, esam
from sam_optax._src.methods.functional import FunctionalSAMState, functional_sam
from sam_optax._src.methods.late_phase import LatePhaseState, late_phase
from sam_optax._src.methods.looksam import LookSAMState, looksam
from sam_optax._src.methods.msam import MomentumSAMState, msam, msam_clean_params
from sam_optax._src.methods.sam import SharpnessAwareState, asam, sam, sharpness_aware
from sam_optax._src.methods.sampa import SAMPaState, sampa
from sam_optax._src.methods.schedules import (
    AdaptivePolicyState,
    RandomizedState,
    adaptive_policy,
    ae_sam,
    randomized,
)
from sam_optax._src.methods.universal import UniversalSAMState, det_sam, frob_sam, trace_sam
from sam_optax._src.methods.weighted import StableSAMState, WSAMState, stable_sam, wsam, wsam_optimizer
from sam_optax._src.telemetry import Telemetry, metrics
from sam_optax.trajectory import WeightEMAState, weight_ema

__version__ = "0.1.0"

__all__ = (
    "AdaptivePolicyState",
    "AdaptiveState",
    "BayesianSAMState",
    "ESAMState",
    "FriendlyState",
    "FunctionalSAMState",
    "GSAMState",
    "Gate",
    "GradientNormPenaltyState",
    "LatePhaseState",
    "LookSAMState",
    "MaskedState",
    "MomentumSAMState",
    "Objective",
    "Perturbation",
    "PreconditionedState",
    "RandomWeightState",
    "RandomizedState",
    "SAMPaState",
    "SharpnessAwareState",
    "SparseState",
    "StableSAMState",
    "StochasticState",
    "Telemetry",
    "UniversalSAMState",
    "VarianceSuppressedState",
    "WSAMState",
    "WeightEMAState",
    "adaptive",
    "adaptive_policy",
    "ae_sam",
    "apply_if_finite",
    "asam",
    "bsam",
    "bsam_posterior",
    "bsam_sample",
    "det_sam",
    "esam",
    "fisher",
    "friendly",
    "frob_sam",
    "functional_sam",
    "gated_jit",
    "gradient_norm_penalty",
    "gsam",
    "kernel_mask",
    "l2",
    "late_phase",
    "linf",
    "local_params",
    "looksam",
    "make_perturbation",
    "masked",
    "metrics",
    "monge",
    "msam",
    "msam_clean_params",
    "normalization_mask",
    "preconditioned",
    "random_weight",
    "randomized",
    "rho_schedule_from_lr",
    "sam",
    "sampa",
    "sharpness_aware",
    "skip_if_nonfinite",
    "sparse",
    "stable_sam",
    "stochastic",
    "trace_sam",
    "unnormalized",
    "variance_suppressed",
    "weight_ema",
    "wsam",
    "wsam_optimizer",
)
