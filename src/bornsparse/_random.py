"""The one seeded-generator helper: every random draw in bornsparse comes from a
``torch.Generator`` made here, so a seed fixes it and a bad seed is refused the same way
everywhere.

Layers keep the seed they were drawn from (:func:`resolve_seed`) and draw everything in
``reset_parameters()`` from :func:`make_generator` of it, always on the CPU: a layer built
under ``torch.device("meta")`` draws nothing, and ``to_empty()`` plus ``reset_parameters()``
then gives bitwise the layer built directly.
"""

from __future__ import annotations

import numbers
import secrets

import torch


def check_seed(seed: object, *, allow_none: bool = True, non_negative: bool = False,
               name: str = "seed") -> int | None:
    """The one seed check of the package: ``seed`` as an int (or None where allowed);
    TypeError/ValueError naming the argument, the value and what was expected."""
    if seed is None and allow_none:
        return None
    want = "a non-negative int" if non_negative else "an int"
    want += " or None" if allow_none else ""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be {want}, got {seed!r}")
    if non_negative and seed < 0:
        raise ValueError(f"{name} must be {want}, got {seed!r}")
    return int(seed)


def make_generator(seed: object) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (an int), or from fresh entropy when None."""
    check_seed(seed)
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def resolve_seed(seed: object) -> int:
    """``seed`` as an int, or a fresh random one for None, so that a layer built without a
    seed can still redraw exactly its own start (``reset_parameters``)."""
    check_seed(seed)
    return secrets.randbits(63) if seed is None else int(seed)
