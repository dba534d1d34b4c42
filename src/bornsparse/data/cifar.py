"""CIFAR-10 and CIFAR-100 read from the "python version" pickle batches in a local folder.

CIFAR-10 (cifar-10-batches-py/): data_batch_1 … data_batch_5 and test_batch, each a pickled
dict with b"data", a uint8 array (N, 3072) of rows R(32×32) G(32×32) B(32×32), and b"labels".
CIFAR-100 (cifar-100-python/): train and test, with b"fine_labels" (100 classes).
Nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

CIFAR_SPECS = {
    # name: (folder inside the archive, train files, test files, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", 100),
}
_ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
_ROW = 3 * 32 * 32

# globals a CIFAR batch may reference: numpy's array reconstruction and, in pickles written
# by Python 3, _codecs.encode for bytes; anything else is refused, so a hostile file cannot
# run code on load
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy >= 2 name
        return super().find_class(module, name)


def find_cifar_dir(name: str, data_dir: str | os.PathLike) -> Path:
    """The folder holding ``name``'s batch files: ``data_dir`` itself or its standard
    subfolder (cifar-10-batches-py / cifar-100-python). Raises FileNotFoundError naming the
    files expected."""
    subdir, train, test, _, _ = CIFAR_SPECS[name]
    files = train + test
    root = Path(data_dir)
    candidates = (root, root / subdir)
    for folder in candidates:
        if all((folder / f).is_file() for f in files):
            return folder
    missing = [f for f in files if not (root / subdir / f).is_file()]
    raise FileNotFoundError(
        f"{name}: expected the files {', '.join(files)} in {root} or in {root / subdir} "
        f"(missing from the latter: {', '.join(missing)}); extract the python version "
        f"({_ARCHIVE[name]}) there"
    )


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a CIFAR python-pickle batch: {err}") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: missing key b'{key}' (keys: {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != _ROW
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array (N, {_ROW}), got {desc}")
    labels = np.asarray(batch[label_key])
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: b'{label_key}' must hold {data.shape[0]} integer labels, "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path}: labels must lie in [0, {num_classes}), "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_files(folder: Path, files: tuple[str, ...], key: str, k: int):
    parts = [_read_batch(folder / f, key, k) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar_arrays(
    name: str, data_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 or CIFAR-100 from ``data_dir`` (see :func:`find_cifar_dir`).

    Returns train_x (50000, 3, 32, 32) uint8, train_y (50000,) int64, test_x (10000, 3, 32, 32),
    test_y, in file order. Missing files raise FileNotFoundError, malformed ones ValueError,
    both naming the file.
    """
    if name not in CIFAR_SPECS:
        raise ValueError(f"name must be one of {tuple(CIFAR_SPECS)}, got {name!r}")
    _, train, test, key, k = CIFAR_SPECS[name]
    folder = find_cifar_dir(name, data_dir)
    train_x, train_y = _read_files(folder, train, key, k)
    test_x, test_y = _read_files(folder, test, key, k)
    return train_x, train_y, test_x, test_y
