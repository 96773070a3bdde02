"""The Fashion-MNIST loader: the IDX reader on small files written here (runs everywhere), the
error when the files are missing, and the real files when they are installed (CI installs
Debian's ``dataset-fashion-mnist``)."""

import gzip
import os

import numpy as np
import pytest

from sam_optax import datasets
from sam_optax.datasets import fashion_mnist_available, load_fashion_mnist, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.tobytes()


def write(path, data: bytes, compress: bool = True) -> str:
  with (gzip.open if compress else open)(path, "wb") as f:
    f.write(data)
  return str(path)


def write_fashion(folder, n_train: int = 20, n_test: int = 10, compress: bool = True) -> dict:
  """A miniature Fashion-MNIST under the real file names; returns the arrays written."""
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28)), "y_train": np.arange(n_train) % 10,
            "x_test": rng.integers(0, 256,
                                   (n_test, 28, 28)), "y_test": np.arange(n_test)[::-1] % 10}
  for key, name in datasets._FASHION_FILES.items():
    write(folder / (name + (".gz" if compress else "")), idx_bytes(arrays[key]), compress)
  return arrays


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
  monkeypatch.setattr(datasets, "_FASHION_CACHE", {})


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_images_and_labels(tmp_path, compress):
  images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  out = read_idx(write(tmp_path / "x", idx_bytes(images), compress))
  assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
  np.testing.assert_array_equal(out, images)
  labels = read_idx(write(tmp_path / "y", idx_bytes(np.array([3, 1, 4, 1, 5])), compress))
  np.testing.assert_array_equal(labels, [3, 1, 4, 1, 5])


@pytest.mark.parametrize("data, message", [
    (b"\x12\x34\x08\x01" + (1).to_bytes(4, "big") + b"\0", "not an IDX file"),
    (b"", "not an IDX file"),
    (b"\0\0\x0d\x01" + (1).to_bytes(4, "big") + b"\0\0\0\0", "element type 0x0d"),
    (b"\0\0\x08\x03" + (2).to_bytes(4, "big"), "truncated IDX header"),
    (idx_bytes(np.zeros((4, 28, 28)))[:-5], "truncated or damaged"),
    (idx_bytes(np.zeros(3)) + b"\0", "truncated or damaged"),
])
def test_read_idx_names_what_is_wrong(tmp_path, data, message):
  path = write(tmp_path / "bad.gz", data)
  with pytest.raises(ValueError, match=message) as err:
    read_idx(path)
  assert "read_idx(path=...)" in str(err.value) and "bad.gz" in str(err.value)


def test_read_idx_damaged_gzip(tmp_path):
  good = gzip.compress(idx_bytes(np.arange(100)))
  path = tmp_path / "cut.gz"
  path.write_bytes(good[:len(good) // 2])
  with pytest.raises(ValueError, match="damaged gzip"):
    read_idx(path)


@pytest.mark.parametrize("compress", [True, False])
def test_load_from_a_folder(tmp_path, compress):
  arrays = write_fashion(tmp_path, compress=compress)
  assert fashion_mnist_available(tmp_path)
  x_train, y_train, x_test, y_test = load_fashion_mnist(path=tmp_path)
  assert x_train.shape == (20, 28, 28, 1) and x_test.shape == (10, 28, 28, 1)
  assert x_train.dtype == x_test.dtype == np.float32
  assert y_train.dtype == y_test.dtype == np.int32
  np.testing.assert_allclose(x_train[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y_train, arrays["y_train"])
  np.testing.assert_array_equal(y_test, arrays["y_test"])
  assert x_train.min() >= 0.0 and x_train.max() <= 1.0


def test_label_noise_touches_the_training_labels_only(tmp_path):
  write_fashion(tmp_path, n_train=2000, n_test=500)
  clean = load_fashion_mnist(path=tmp_path)
  noisy = load_fashion_mnist(seed=3, label_noise=0.4, path=tmp_path)
  assert 0.36 < (noisy[1] != clean[1]).mean() < 0.44
  np.testing.assert_array_equal(noisy[3], clean[3])
  np.testing.assert_array_equal(noisy[0], clean[0])
  again = load_fashion_mnist(seed=3, label_noise=0.4, path=tmp_path)
  np.testing.assert_array_equal(again[1], noisy[1])  # the seed fixes the noise


def test_env_folder_is_searched(tmp_path, monkeypatch):
  (tmp_path / "fashion-mnist").mkdir()
  write_fashion(tmp_path / "fashion-mnist")
  monkeypatch.setenv("SAM_OPTAX_DATA", str(tmp_path))
  assert len(load_fashion_mnist()[1]) == 20


def test_missing_files_name_the_folders_and_the_install_line(tmp_path, monkeypatch):
  monkeypatch.setenv("SAM_OPTAX_DATA", str(tmp_path))
  monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "debian"))
  assert not fashion_mnist_available()
  with pytest.raises(FileNotFoundError) as err:
    load_fashion_mnist()
  msg = str(err.value)
  assert str(tmp_path) in msg and str(tmp_path / "debian") in msg
  assert "apt-get install -y dataset-fashion-mnist" in msg and "SAM_OPTAX_DATA" in msg
  with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.gz"):
    load_fashion_mnist(path=tmp_path / "nowhere")


def test_wrong_shapes_are_refused(tmp_path):
  write_fashion(tmp_path)
  write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(9)))  # 10 test images
  with pytest.raises(ValueError, match="test files"):
    load_fashion_mnist(path=tmp_path)


REAL = os.path.join(datasets.FASHION_MNIST_DEBIAN_DIR)
needs_files = pytest.mark.skipif(not fashion_mnist_available(REAL),
                                 reason=f"Fashion-MNIST not installed "
                                        f"({datasets.FASHION_MNIST_APT})")


@needs_files
def test_real_files():
  """One read of the installed files (about a second): the standard split, balanced
  classes, values in [0, 1], noise on the training labels only."""
  clean = load_fashion_mnist(path=REAL)
  noisy = load_fashion_mnist(seed=1, label_noise=0.4, path=REAL)  # from the cache
  x_train, y_train, x_test, y_test = clean
  assert x_train.shape == (60_000, 28, 28, 1) and x_test.shape == (10_000, 28, 28, 1)
  assert x_train.dtype == np.float32 and y_train.dtype == y_test.dtype == np.int32
  assert x_train.min() == 0.0 and x_train.max() == 1.0
  assert np.bincount(y_train).tolist() == [6000] * 10
  assert np.bincount(y_test).tolist() == [1000] * 10
  assert 0.39 < (noisy[1] != y_train).mean() < 0.41
  np.testing.assert_array_equal(noisy[3], y_test)
  np.testing.assert_array_equal(noisy[0], x_train)
  # a known value: the first training image is an ankle boot (class 9), the first test one too
  assert y_train[0] == 9 and y_test[0] == 9
