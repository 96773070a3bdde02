"""Perturbation geometries: the direction d of the step to the perturbed point w + rho d."""

from sam_optax._src.geometries.base import (
    Perturbation,
    direction_norm,
    make_perturbation,
    project,
    project_l2,
)
from sam_optax._src.geometries.basic import fisher, l2, linf, unnormalized
from sam_optax._src.geometries.history import (
    FriendlyState,
    VarianceSuppressedState,
    friendly,
    variance_suppressed,
)
from sam_optax._src.geometries.metric import PreconditionedState, monge, preconditioned
from sam_optax._src.geometries.random import (
    RandomWeightState,
    SparseState,
    StochasticState,
    random_weight,
    sparse,
    stochastic,
)
from sam_optax._src.geometries.scaled import (
    AdaptiveState,
    MaskedState,
    adaptive,
    kernel_mask,
    masked,
    normalization_mask,
)

__all__ = (
    "AdaptiveState",
    "FriendlyState",
    "MaskedState",
    "Perturbation",
    "RandomWeightState",
    "SparseState",
    "StochasticState",
    "VarianceSuppressedState",
    "direction_norm",
    "adaptive",
    "fisher",
    "friendly",
    "PreconditionedState",
    "kernel_mask",
    "l2",
    "linf",
    "make_perturbation",
    "masked",
    "monge",
    "normalization_mask",
    "preconditioned",
    "project",
    "project_l2",
    "random_weight",
    "sparse",
    "stochastic",
    "unnormalized",
    "variance_suppressed",
)
