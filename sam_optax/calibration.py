"""Uncertainty metrics for classifiers: calibration, likelihood, out-of-distribution detection.

Every function takes predicted class probabilities ``probs`` of shape
``(n, num_classes)`` (rows summing to 1: a softmax, or an average of softmaxes
over posterior samples) and integer ``labels`` of shape ``(n,)``, works under
``jax.jit`` (``num_bins`` is static) and returns float32 (float64 for float64
inputs) scalars or arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

__all__ = (
    "CalibrationBins",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "negative_log_likelihood",
    "ood_auroc",
    "predictive_entropy",
)


def _float(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check(probs: jax.Array, labels: jax.Array | None, fn: str) -> None:
  if jnp.ndim(probs) != 2:
    raise ValueError(f"`{fn}(probs=...)` must have shape (n, num_classes), got "
                     f"{jnp.shape(probs)}.")
  if labels is not None and jnp.shape(labels) != jnp.shape(probs)[:1]:
    raise ValueError(f"`{fn}(labels=...)` must have shape ({jnp.shape(probs)[0]},) to match "
                     f"`probs`, got {jnp.shape(labels)}.")


class CalibrationBins(NamedTuple):
  """Per-bin statistics of the top-label confidence (see :func:`calibration_bins`).

  Attributes:
    confidence: mean confidence in each bin (0 for an empty bin).
    accuracy: fraction of correct top-label predictions in each bin (0 if empty).
    count: number of examples in each bin (int32).

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> bins = calibration.calibration_bins(jnp.array([[0.9, 0.1], [0.4, 0.6]]), jnp.array([0, 0]),
    ...                                     num_bins=2)
    >>> isinstance(bins, calibration.CalibrationBins)
    True
  """
  confidence: jax.Array
  accuracy: jax.Array
  count: jax.Array


def calibration_bins(probs: jax.Array, labels: jax.Array, num_bins: int = 15) -> CalibrationBins:
  r"""Equal-width bins of the top-label confidence, for ECE and reliability diagrams.

  The confidence of example i is :math:`c_i = \max_k p_{ik}` and its prediction
  :math:`\hat y_i = \arg\max_k p_{ik}` (the first maximum on ties). Bin
  :math:`b \in \{1, \dots, B\}` holds the examples with
  :math:`(b-1)/B < c_i \le b/B` (a confidence of exactly 0 goes to the first
  bin).

  Args:
    probs: ``(n, num_classes)`` predicted probabilities.
    labels: ``(n,)`` integer labels.
    num_bins: B, a static int.

  Returns:
    A :class:`CalibrationBins` of arrays of length B.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> probs = jnp.array([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45]])
    >>> bins = calibration.calibration_bins(probs, jnp.array([0, 0, 0]), num_bins=2)
    >>> bins.count.tolist(), bins.accuracy.tolist()
    ([0, 3], [0.0, 0.6666666865348816])
  """
  _check(probs, labels, "calibration_bins")
  if not isinstance(num_bins, int) or num_bins < 1:
    raise ValueError(f"`calibration_bins(num_bins=...)` must be a Python int >= 1, got "
                     f"{num_bins!r}.")
  p = _float(probs)
  conf = jnp.max(p, axis=-1)
  correct = (jnp.argmax(p, axis=-1) == jnp.asarray(labels)).astype(p.dtype)
  # bin index = number of inner edges strictly below the confidence: (lo, hi] bins
  edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=p.dtype)[1:-1]
  idx = jnp.sum(conf[:, None] > edges[None, :], axis=1)
  count = jnp.zeros(num_bins, jnp.int32).at[idx].add(1)
  conf_sum = jnp.zeros(num_bins, p.dtype).at[idx].add(conf)
  correct_sum = jnp.zeros(num_bins, p.dtype).at[idx].add(correct)
  denom = jnp.maximum(count, 1).astype(p.dtype)
  return CalibrationBins(conf_sum / denom, correct_sum / denom, count)


def expected_calibration_error(probs: jax.Array, labels: jax.Array,
                               num_bins: int = 15) -> jax.Array:
  r"""Expected calibration error (top-label, equal-width bins).

  .. math:: \mathrm{ECE} = \sum_{b=1}^{B} \frac{n_b}{n}\,
            \big|\mathrm{acc}(b) - \mathrm{conf}(b)\big|

  with the bins of :func:`calibration_bins`: :math:`n_b` examples in bin b,
  their accuracy and mean confidence. 0 is perfectly calibrated.

  Args:
    probs: ``(n, num_classes)`` predicted probabilities.
    labels: ``(n,)`` integer labels.
    num_bins: B (15 is the usual choice since Guo et al.), a static int.

  Returns:
    A scalar in [0, 1].

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2]])
    >>> # bins (13/15, 14/15] and (11/15, 12/15]: 0.5 * |1 - 0.9| + 0.5 * |0 - 0.8|
    >>> round(float(calibration.expected_calibration_error(probs, jnp.array([0, 1]))), 4)
    0.45

  References:
    Naeini, Cooper, Hauskrecht, `Obtaining Well Calibrated Probabilities Using
    Bayesian Binning <https://ojs.aaai.org/index.php/AAAI/article/view/9602>`_,
    AAAI 2015.

    Guo, Pleiss, Sun, Weinberger, `On Calibration of Modern Neural Networks
    <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
  """
  bins = calibration_bins(probs, labels, num_bins)
  n = jnp.maximum(jnp.sum(bins.count), 1).astype(bins.accuracy.dtype)
  return jnp.sum(bins.count.astype(n.dtype) / n * jnp.abs(bins.accuracy - bins.confidence))


def negative_log_likelihood(probs: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Mean negative log-likelihood of the labels, :math:`-\frac1n\sum_i \log p_{i, y_i}`.

  Probabilities are clipped below at the dtype's smallest normal number, so a
  zero probability on the true class gives a large finite value (about 87.3
  in float32) rather than infinity.

  Args:
    probs: ``(n, num_classes)`` predicted probabilities.
    labels: ``(n,)`` integer labels.

  Returns:
    A scalar >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> probs = jnp.array([[0.5, 0.5], [0.25, 0.75]])
    >>> round(float(calibration.negative_log_likelihood(probs, jnp.array([0, 1]))), 4)
    0.4904
  """
  _check(probs, labels, "negative_log_likelihood")
  p = _float(probs)
  picked = jnp.take_along_axis(p, jnp.asarray(labels)[:, None].astype(jnp.int32), axis=1)[:, 0]
  return -jnp.mean(jnp.log(jnp.maximum(picked, jnp.finfo(p.dtype).tiny)))


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Multi-class Brier score, :math:`\frac1n\sum_i\sum_k (p_{ik} - [y_i = k])^2`.

  The sum over classes (Brier's original definition), in [0, 2]; some papers
  divide it by the number of classes.

  Args:
    probs: ``(n, num_classes)`` predicted probabilities.
    labels: ``(n,)`` integer labels.

  Returns:
    A scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> probs = jnp.array([[1.0, 0.0], [0.5, 0.5]])
    >>> float(calibration.brier_score(probs, jnp.array([0, 0])))
    0.25

  References:
    Brier, `Verification of Forecasts Expressed in Terms of Probability
    <https://doi.org/10.1175/1520-0493(1950)078%3C0001:VOFEIT%3E2.0.CO;2>`_,
    Monthly Weather Review, 1950.
  """
  _check(probs, labels, "brier_score")
  p = _float(probs)
  onehot = jax.nn.one_hot(jnp.asarray(labels), p.shape[-1], dtype=p.dtype)
  return jnp.mean(jnp.sum(jnp.square(p - onehot), axis=-1))


def predictive_entropy(probs: jax.Array) -> jax.Array:
  r"""Entropy of each predictive distribution, :math:`H_i = -\sum_k p_{ik}\log p_{ik}` (nats).

  :math:`0 \log 0 = 0`. Large for uncertain predictions; :math:`-H_i` is an
  in-distribution score for :func:`ood_auroc`.

  Args:
    probs: ``(n, num_classes)`` predicted probabilities.

  Returns:
    An array of shape ``(n,)`` with values in :math:`[0, \log K]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> calibration.predictive_entropy(jnp.array([[1.0, 0.0], [0.5, 0.5]])).round(4).tolist()
    [0.0, 0.6930999755859375]
  """
  _check(probs, None, "predictive_entropy")
  p = _float(probs)
  return jnp.maximum(-jnp.sum(xlogy(p, p), axis=-1), 0.0)  # no -0.0 for one-hot rows


def ood_auroc(scores_in: jax.Array, scores_out: jax.Array) -> jax.Array:
  r"""Area under the ROC curve for telling in-distribution from out-of-distribution inputs.

  Scores are *larger for in-distribution inputs* (the maximum predicted
  probability, or minus :func:`predictive_entropy`). The AUROC is the
  probability that a random in-distribution input scores higher than a
  random out-of-distribution one, ties counting one half:

  .. math:: \mathrm{AUROC} = \frac{1}{n_{in} n_{out}} \sum_{i, j}
            \Big([s^{in}_i > s^{out}_j] + \tfrac12 [s^{in}_i = s^{out}_j]\Big)

  (the Mann-Whitney U statistic over :math:`n_{in} n_{out}`), computed by sorting in
  :math:`O((n_{in} + n_{out})\log n_{out})`. 0.5 is chance, 1 perfect separation.

  Args:
    scores_in: ``(n_in,)`` scores of in-distribution inputs.
    scores_out: ``(n_out,)`` scores of out-of-distribution inputs.

  Returns:
    A scalar in [0, 1].

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import calibration
    >>> float(calibration.ood_auroc(jnp.array([0.9, 0.8, 0.5]), jnp.array([0.5, 0.3])))
    0.9166666865348816

  References:
    Hendrycks, Gimpel, `A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks
    <https://arxiv.org/abs/1610.02136>`_, ICLR 2017.
  """
  s_in, s_out = jnp.ravel(_float(scores_in)), jnp.ravel(_float(scores_out))
  if s_in.size == 0 or s_out.size == 0:
    raise ValueError("`ood_auroc` needs at least one in-distribution and one "
                     "out-of-distribution score.")
  dtype = jnp.promote_types(s_in.dtype, s_out.dtype)
  s_in, s_out = s_in.astype(dtype), s_out.astype(dtype)
  sorted_out = jnp.sort(s_out)
  below = jnp.searchsorted(sorted_out, s_in, side="left")
  not_above = jnp.searchsorted(sorted_out, s_in, side="right")
  wins = below.astype(dtype) + 0.5 * (not_above - below).astype(dtype)
  return jnp.sum(wins) / (s_in.size * s_out.size)
