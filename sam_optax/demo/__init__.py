"""The main job: SGD versus sharpness-aware optimizers on scikit-learn's digits.

Run ``python -m sam_optax.demo`` (``--help`` for options). It trains a small
Flax CNN with BatchNorm and dropout on the 8x8 digits that ship with
scikit-learn (no download; or MNIST-5k, or Fashion-MNIST when installed), with
symmetric label noise on the training set (where SAM's benefit shows: Foret et
al. 2021, Table 4), for each optimizer and seed; prints a table of test
accuracy (mean ± std over seeds), train time and steps/s, the final solution's
sharpness (top Hessian eigenvalue and max-sharpness in the rho=0.05 L2 ball, on
512 training examples) and the share of dead units; says which runs stalled at
chance, why and what to change; and writes a PNG of test accuracy per epoch.

The package: :mod:`~sam_optax.demo.models` (the CNN and the MLP),
:mod:`~sam_optax.demo.recipes` (the optimizers by name), :mod:`~sam_optax.demo.train` (one
run), :mod:`~sam_optax.demo.report` (the table's stall notes and dead units, the records,
the figure) and :mod:`~sam_optax.demo.cli` (the command line).
"""

from sam_optax.demo.cli import LOADERS, main
from sam_optax.demo.models import HEADS, make_model
from sam_optax.demo.recipes import DEFAULT_RHO, Recipe, optimizers
from sam_optax.demo.report import plot, write_records
from sam_optax.demo.train import Run, final_sharpness, train_one

# the names of the single-module demo before 0.5, kept importable from the package
__all__ = ("DEFAULT_RHO", "HEADS", "LOADERS", "Recipe", "Run", "final_sharpness", "main",
           "make_model", "optimizers", "plot", "train_one", "write_records")
