"""sam_optax.calibration against plain-Python loops."""

import math

import jax
import numpy as np
import pytest

from sam_optax import calibration as cal


def random_probs(seed, n=300, k=5, sharp=3.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, k)) * sharp
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  labels = np.where(rng.random(n) < 0.7, p.argmax(1), rng.integers(0, k, n))
  return p.astype(np.float32), labels.astype(np.int32)


def ece_loop(p, y, num_bins):
  p = np.asarray(p, np.float64)
  edges = [b / num_bins for b in range(num_bins + 1)]
  total = 0.0
  for b in range(num_bins):
    members = []
    for i in range(len(y)):
      conf = max(p[i])
      if (edges[b] < conf <= edges[b + 1]) or (b == 0 and conf == 0.0):
        members.append(i)
    if members:
      acc = sum(int(np.argmax(p[i]) == y[i]) for i in members) / len(members)
      conf = sum(max(p[i]) for i in members) / len(members)
      total += len(members) / len(y) * abs(acc - conf)
  return total


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_the_binning_loop(seed, num_bins):
  p, y = random_probs(seed)
  got = jax.jit(cal.expected_calibration_error, static_argnums=2)(p, y, num_bins)
  np.testing.assert_allclose(float(got), ece_loop(p, y, num_bins), rtol=1e-5, atol=1e-6)


def test_bins_are_closed_on_the_right():
  # confidence exactly 0.5 goes to (0.4, 0.5], not (0.5, 0.6]
  p = np.array([[0.5, 0.5], [0.55, 0.45], [1.0, 0.0]], np.float32)
  bins = cal.calibration_bins(p, np.array([1, 0, 0]), num_bins=10)
  assert bins.count.tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 1]
  assert bins.accuracy.tolist()[4] == 0.0  # argmax of a tie is the first class
  np.testing.assert_allclose(float(cal.expected_calibration_error(p, np.array([1, 0, 0]), 10)),
                             ece_loop(p, np.array([1, 0, 0]), 10), atol=1e-7)
  perfect = np.eye(3, dtype=np.float32)
  assert float(cal.expected_calibration_error(perfect, np.arange(3))) == 0.0


def test_nll_brier_entropy_match_loops():
  p, y = random_probs(3)
  n, k = p.shape
  pd = p.astype(np.float64)
  nll = -sum(math.log(pd[i, y[i]]) for i in range(n)) / n
  brier = sum(sum((pd[i, c] - (c == y[i])) ** 2 for c in range(k)) for i in range(n)) / n
  ent = [-sum(pd[i, c] * math.log(pd[i, c]) for c in range(k) if pd[i, c] > 0) for i in range(n)]
  f = jax.jit(lambda p, y: (cal.negative_log_likelihood(p, y), cal.brier_score(p, y),
                            cal.predictive_entropy(p)))
  got_nll, got_brier, got_ent = f(p, y)
  np.testing.assert_allclose(float(got_nll), nll, rtol=1e-5)
  np.testing.assert_allclose(float(got_brier), brier, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_ent), ent, rtol=1e-5, atol=1e-6)
  # edge cases: 0 log 0 = 0, uniform = log k, a zero on the true class stays finite
  edge = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], np.float32)
  np.testing.assert_allclose(np.asarray(cal.predictive_entropy(edge)), [0.0, math.log(3)],
                             rtol=1e-6)
  assert np.isfinite(float(cal.negative_log_likelihood(edge, np.array([1, 0]))))


def auroc_pairs(s_in, s_out):
  total = 0.0
  for a in s_in:
    for b in s_out:
      total += 1.0 if a > b else 0.5 if a == b else 0.0
  return total / (len(s_in) * len(s_out))


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_matches_the_pairwise_definition_with_ties(seed):
  rng = np.random.default_rng(seed)
  s_in = np.round(rng.normal(0.5, 1.0, 120), 1).astype(np.float32)  # rounding makes ties
  s_out = np.round(rng.normal(0.0, 1.0, 90), 1).astype(np.float32)
  assert len(np.intersect1d(s_in, s_out)) > 5
  got = jax.jit(cal.ood_auroc)(s_in, s_out)
  np.testing.assert_allclose(float(got), auroc_pairs(s_in, s_out), rtol=1e-6)
  assert float(cal.ood_auroc(np.ones(4), np.ones(3))) == 0.5
  assert float(cal.ood_auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0]))) == 1.0
  assert float(cal.ood_auroc(np.array([0.0]), np.array([1.0, 2.0]))) == 0.0


def test_shape_errors_and_public_names():
  with pytest.raises(ValueError, match="shape"):
    cal.expected_calibration_error(np.ones(3), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="labels"):
    cal.brier_score(np.ones((3, 2)) / 2, np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="num_bins"):
    cal.calibration_bins(np.ones((3, 2)) / 2, np.zeros(3, np.int32), num_bins=0)
  with pytest.raises(ValueError, match="at least one"):
    cal.ood_auroc(np.ones(3), np.ones(0))
  assert set(cal.__all__) == {n for n in dir(cal) if not n.startswith("_")
                              and callable(getattr(cal, n)) and getattr(cal, n).__module__ ==
                              "sam_optax.calibration"}
