"""MNIST-1D (Greydanus 2020) generated offline with the mnist1d package, cached as .npz.

The package's ``get_dataset`` downloads a pickle by default; this module only calls its
``make_dataset``, which builds the signals from templates with numpy, and caches the arrays.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from bornsparse._checks import check_positive_int
from bornsparse._random import check_seed

#: length of an MNIST-1D signal with the package's default ``final_seq_length``
MNIST1D_LENGTH = 40
#: the package's defaults: 5000 samples (4000 train, 1000 test) from seed 42
MNIST1D_NUM_SAMPLES = 5000
MNIST1D_SEED = 42
_KEYS = ("x", "y", "x_test", "y_test")


def default_cache_dir() -> Path:
    """$BORNSPARSE_CACHE_DIR, else $XDG_CACHE_HOME/bornsparse, else ~/.cache/bornsparse."""
    env = os.environ.get("BORNSPARSE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bornsparse"


def _cache_key(num_samples: int, seed: int) -> str:
    # the package version is part of the key: a release that changes the generator or its
    # defaults gets a fresh cache entry instead of silently reusing old arrays
    spec = {
        "generator": "mnist1d.data.make_dataset",
        "version": importlib.metadata.version("mnist1d"),
        "num_samples": num_samples,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"mnist1d-n{num_samples}-s{seed}-{digest}.npz"


def _expected_sizes(num_samples: int) -> tuple[int, int]:
    total = (num_samples // 10) * 10  # the package draws num_samples // 10 per class
    n_train = int(total * 0.8)  # its default train_split
    return n_train, total - n_train


def generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset`` with the package defaults except num_samples and seed.

    Returns x (n_train, 40) float64, y (n_train,) int64, x_test, y_test. The package seeds
    numpy's and Python's global generators; their states are restored afterwards so that
    loading data does not change the caller's random streams.
    """
    from mnist1d.data import get_dataset_args, make_dataset  # heavy import (matplotlib)

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # the package draws from the legacy global generator, hence the legacy calls here
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float64),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float64),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _valid(arrays: dict[str, np.ndarray], num_samples: int) -> bool:
    n_train, n_test = _expected_sizes(num_samples)
    return (
        arrays["x"].shape == (n_train, MNIST1D_LENGTH)
        and arrays["x_test"].shape == (n_test, MNIST1D_LENGTH)
        and arrays["y"].shape == (n_train,)
        and arrays["y_test"].shape == (n_test,)
    )


def _read_cache(path: Path, num_samples: int) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _KEYS}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        warnings.warn(f"ignoring unreadable MNIST-1D cache {path}: {err}", stacklevel=3)
        return None
    if not _valid(arrays, num_samples):
        warnings.warn(f"ignoring MNIST-1D cache {path}: unexpected array shapes", stacklevel=3)
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # write to a temporary file in the same folder, then rename: a reader never sees a
    # half-written file, and concurrent writers just replace each other's identical arrays
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        warnings.warn(f"could not cache MNIST-1D in {path.parent}: {err}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def load_mnist1d_arrays(
    *,
    num_samples: int = MNIST1D_NUM_SAMPLES,
    seed: int = MNIST1D_SEED,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> dict[str, np.ndarray]:
    """MNIST-1D arrays (see :func:`generate_mnist1d`), read from or written to the cache.

    ``cache_dir`` defaults to :func:`default_cache_dir`; ``cache=False`` always regenerates
    and writes nothing. An unreadable cache file is regenerated with a warning.
    """
    num_samples = check_positive_int("num_samples", num_samples)
    if num_samples < 10:
        raise ValueError(f"num_samples must be at least 10 (one per class), got {num_samples}")
    check_seed(seed, allow_none=False, non_negative=True)
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be a bool, got {cache!r}")
    if not cache:
        return generate_mnist1d(num_samples, seed)
    path = Path(default_cache_dir() if cache_dir is None else cache_dir) / _cache_key(
        num_samples, seed
    )
    arrays = _read_cache(path, num_samples)
    if arrays is None:
        arrays = generate_mnist1d(num_samples, seed)
        _write_cache(path, arrays)
    return arrays
