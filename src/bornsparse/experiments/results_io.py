"""Crash-safe JSON-lines results shared by every sweep.

One run = one line. Lines are appended whole, flushed and fsynced by a single writer, so a
sweep killed at any moment loses at most the run in flight; a torn last line (power loss
mid-write) is skipped on reading and fenced off with a newline before the next append.
Each record carries a ``key``, a hash of its configuration, so a rerun skips finished runs;
only finished runs are written (:func:`is_finished`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def run_key(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a JSON-serialisable configuration (key order ignored)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of what a result depends on, recorded with every run."""
    import numpy
    import torch

    import bornsparse

    out = {
        "bornsparse": bornsparse.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
    try:
        import numba

        out["numba"] = numba.__version__
    except ImportError:  # recorded when present; numba is not needed to read results
        pass
    return out


def ensure_writable_dir(path: str | os.PathLike, *, name: str = "output directory") -> Path:
    """Create ``path`` if needed and prove it writable; raise ValueError naming it if not."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{name} {str(path)!r} cannot be written: {err.strerror or err}") from err
    return p


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one line, durably (write, flush, fsync).

    If the file ends in a torn line, a newline is written first so the new record stays
    parseable; the torn fragment is then skipped by ``read_jsonl``.
    """
    line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
    p = Path(path)
    with open(p, "a+b") as f:
        f.seek(0, os.SEEK_END)
        prefix = b""
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                prefix = b"\n"
        # one write call: with O_APPEND it lands contiguously after whatever is there
        f.write(prefix + line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of ``path`` ([] if it does not exist); torn lines are skipped."""
    p = Path(path)
    if not p.exists():
        return []
    records: list[dict[str, Any]] = []
    bad = 0
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    if bad:
        warnings.warn(f"{p}: skipped {bad} incomplete or corrupt line(s)", stacklevel=2)
    return records


def is_finished(record: Mapping[str, Any]) -> bool:
    """True for the record of a finished run: it has a ``key`` and no ``error``.

    A run that raises is never written (the sweep reports it failed), but records written
    before that rule carried an ``error`` field; they count as not run, so a rerun retries
    them.
    """
    return "key" in record and record.get("error") is None


def finished_by_key(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{key: record} of the finished runs (:func:`is_finished`) among ``keys`` in ``path``."""
    wanted = set(keys)
    return {str(r["key"]): r for r in read_jsonl(path)
            if is_finished(r) and r["key"] in wanted}


def finished_records(configs: Iterable[Mapping[str, Any]],
                     path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records in ``path`` of those ``configs`` that finished, in the order given (each
    configuration once); nothing is run."""
    keys = list(dict.fromkeys(run_key(c) for c in configs))
    done = finished_by_key(path, keys)
    return [done[k] for k in keys if k in done]
