"""Argument validation shared by every public entry point.

Errors name the argument, the value received and what was expected, and are raised at
the API boundary so a user never sees a stack trace from inside torch or numba.
"""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int, or raise if it is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = type(value).__name__
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({kind})")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_optional_positive_int(name: str, value: object) -> int | None:
    return None if value is None else check_positive_int(name, value)


def check_fraction(name: str, value: object, *, low_open: bool = True) -> float:
    """Return ``value`` as a float in (0, 1] (or [0, 1] with ``low_open=False``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {value!r}")
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return v


def check_float_tensor(name: str, x: object) -> torch.Tensor:
    """Raise unless ``x`` is a real floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    return x


def check_last_dim(name: str, x: torch.Tensor, expected: int) -> None:
    if x.dim() == 0 or x.shape[-1] != expected:
        raise ValueError(
            f"{name} must have shape (..., {expected}), got {tuple(x.shape)}"
        )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming both."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]
