"""sam_optax: Sharpness-Aware Minimization and its family as Optax transformations.

The core is :func:`sharpness_aware`, a transformation that receives the clean
gradient as ``updates`` and a loss-gradient closure ``grad_fn`` as a keyword
argument of ``update``, and returns the gradient at the perturbed point.
Perturbation geometries are small transformations (:func:`l2`,
:func:`adaptive`, ...); descent rules and schedules wrap the core.
"""

from sam_optax._src.aliases import asam, sam
from sam_optax._src.bayes import BayesianSAMState, bsam, bsam_posterior, bsam_sample
from sam_optax._src.core import SharpnessAwareState, Telemetry, sharpness_aware
from sam_optax._src.distributed import local_params
from sam_optax._src.gating import gated_jit
from sam_optax._src.penalty import GradientNormPenaltyState, gradient_norm_penalty
from sam_optax._src.perturbations import (
    AdaptiveState,
    FriendlyState,
    MaskedState,
    Perturbation,
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
    normalization_mask,
    random_weight,
    sparse,
    stochastic,
    unnormalized,
    variance_suppressed,
)
from sam_optax._src.telemetry import metrics
from sam_optax._src.universal import UniversalSAMState, det_sam, frob_sam, trace_sam
from sam_optax._src.variants import (
    AdaptivePolicyState,
    GSAMState,
    LookSAMState,
    MomentumSAMState,
    RandomizedState,
    adaptive_policy,
    gsam,
    looksam,
    msam,
    msam_clean_params,
    randomized,
    rho_schedule_from_lr,
)

__version__ = "0.1.0"

__all__ = (
    "AdaptivePolicyState",
    "AdaptiveState",
    "BayesianSAMState",
    "FriendlyState",
    "GSAMState",
    "GradientNormPenaltyState",
    "LookSAMState",
    "MaskedState",
    "MomentumSAMState",
    "Perturbation",
    "RandomWeightState",
    "RandomizedState",
    "SharpnessAwareState",
    "SparseState",
    "StochasticState",
    "Telemetry",
    "UniversalSAMState",
    "VarianceSuppressedState",
    "adaptive",
    "adaptive_policy",
    "asam",
    "bsam",
    "bsam_posterior",
    "bsam_sample",
    "det_sam",
    "fisher",
    "friendly",
    "frob_sam",
    "gated_jit",
    "gradient_norm_penalty",
    "gsam",
    "kernel_mask",
    "l2",
    "linf",
    "local_params",
    "looksam",
    "make_perturbation",
    "masked",
    "metrics",
    "msam",
    "msam_clean_params",
    "normalization_mask",
    "random_weight",
    "randomized",
    "rho_schedule_from_lr",
    "sam",
    "sharpness_aware",
    "sparse",
    "stochastic",
    "trace_sam",
    "unnormalized",
    "variance_suppressed",
)
