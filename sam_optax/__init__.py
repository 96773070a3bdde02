"""sam_optax: Sharpness-Aware Minimization and its family as Optax transformations.

The core is :func:`sharpness_aware`, a transformation that receives the clean
gradient as ``updates`` and a loss-gradient closure ``grad_fn`` as a keyword
argument of ``update``, and returns the gradient at the perturbed point.
Every method is one declaration on one engine (``sam_optax._src.engine``):
perturbation geometries are small transformations (:func:`l2`,
:func:`adaptive`, ...); descent rules and schedules are methods on it.

The names, grouped as the API reference groups them (``sam_optax._src.registry``
lists every one, with its section):

* SAM and its aliases: :func:`sharpness_aware`, :func:`sam`, :func:`asam`.
* Descent rules on the SAM point: :func:`gsam`, :func:`rho_schedule_from_lr`,
  :func:`gradient_norm_penalty`, :func:`wsam`, :func:`wsam_optimizer`,
  :func:`stable_sam`, :func:`functional_sam`.
* Data selection, parallel and one-pass methods: :func:`esam`, :func:`sampa`,
  :func:`msam`, :func:`msam_clean_params`, :func:`weight_ema`.
* Schedules that skip the second pass: :func:`looksam`, :func:`randomized`,
  :func:`ae_sam`, :func:`late_phase`, :func:`gated_jit`.
* Perturbation geometries: :func:`l2`, :func:`adaptive`, :func:`linf`,
  :func:`unnormalized`, :func:`fisher`, :func:`monge`, :func:`preconditioned`,
  :func:`friendly`, :func:`variance_suppressed`, :func:`stochastic`, :func:`sparse`,
  :func:`random_weight`, :func:`masked` (with :func:`kernel_mask`,
  :func:`normalization_mask`), :func:`make_perturbation`, :class:`Perturbation`.
* Broader sharpness measures and Bayesian SAM: :func:`trace_sam`, :func:`frob_sam`,
  :func:`det_sam`, :func:`bsam`, :func:`bsam_posterior`, :func:`bsam_sample`.
* The radius without a grid: ``rho="auto"``, :func:`auto_rho`, :class:`RadiusState`.
* What a train step passes and reads: :class:`Objective`, :func:`metrics`,
  :class:`Telemetry`, :func:`clean_params`, :func:`skip_if_nonfinite`,
  :func:`local_params`.

Earlier names (``adaptive_policy``, ``apply_if_finite``, ``ESAMState``, ``Gate``) still
work for one release, with a ``DeprecationWarning``.
"""

import warnings as _warnings

from sam_optax._src.closures import Objective
from sam_optax._src.distributed import local_params
from sam_optax._src.finite import skip_if_nonfinite
from sam_optax._src.gating import gated_jit
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
from sam_optax._src.methods.ae_sam import AdaptivePolicyState, ae_sam
from sam_optax._src.methods.bayes import BayesianSAMState, bsam, bsam_posterior, bsam_sample
from sam_optax._src.methods.esam import esam
from sam_optax._src.methods.functional import FunctionalSAMState, functional_sam
from sam_optax._src.methods.gradient_norm_penalty import (
    GradientNormPenaltyState,
    gradient_norm_penalty,
)
from sam_optax._src.methods.gsam import GSAMState, gsam, rho_schedule_from_lr
from sam_optax._src.methods.late_phase import LatePhaseState, late_phase
from sam_optax._src.methods.lookbehind import LookbehindSAMState, lookbehind_sam
from sam_optax._src.methods.looksam import LookSAMState, looksam
from sam_optax._src.methods.msam import MomentumSAMState, msam, msam_clean_params
from sam_optax._src.methods.randomized import RandomizedState, randomized
from sam_optax._src.methods.sam import SharpnessAwareState, asam, sam, sharpness_aware
from sam_optax._src.methods.sampa import SAMPaState, sampa
from sam_optax._src.methods.stable_sam import StableSAMState, stable_sam
from sam_optax._src.methods.universal import UniversalSAMState, det_sam, frob_sam, trace_sam
from sam_optax._src.methods.wsam import WSAMState, wsam, wsam_optimizer
from sam_optax._src.protocol import clean_params
from sam_optax._src.radius import RadiusState, auto_rho
from sam_optax._src.telemetry import Telemetry, metrics
from sam_optax.trajectory import WeightEMAState, weight_ema

__version__ = "0.1.0"

__all__ = (
    "AdaptivePolicyState",
    "AdaptiveState",
    "BayesianSAMState",
    "FriendlyState",
    "FunctionalSAMState",
    "GSAMState",
    "GradientNormPenaltyState",
    "LatePhaseState",
    "LookSAMState",
    "LookbehindSAMState",
    "MaskedState",
    "MomentumSAMState",
    "Objective",
    "Perturbation",
    "PreconditionedState",
    "RandomWeightState",
    "RadiusState",
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
    "ae_sam",
    "asam",
    "auto_rho",
    "bsam",
    "bsam_posterior",
    "bsam_sample",
    "clean_params",
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
    "lookbehind_sam",
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

# Earlier names: (the object, the name to use instead). They warn for one release.
_DEPRECATED = {
    "adaptive_policy": (ae_sam, "sam_optax.ae_sam"),
    "apply_if_finite": (skip_if_nonfinite, "sam_optax.skip_if_nonfinite (it does not shadow "
                        "optax.apply_if_finite, which checks the gradient only)"),
    "ESAMState": (SharpnessAwareState, "sam_optax.SharpnessAwareState (ESAM's state is SAM's)"),
}


def __getattr__(name: str):
  if name == "Gate":  # an internal of gated_jit; no train step needs it
    from sam_optax._src.gating import Gate
    found = (Gate, "nothing: the gate is internal to sam_optax.gated_jit")
  elif name in _DEPRECATED:
    found = _DEPRECATED[name]
  else:
    raise AttributeError(f"module 'sam_optax' has no attribute {name!r}")
  _warnings.warn(f"`sam_optax.{name}` is deprecated and will be removed in the next release; use "
                 f"{found[1]}.", DeprecationWarning, stacklevel=2)
  return found[0]
