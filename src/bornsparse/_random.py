"""The one seeded-generator helper: every random draw in bornsparse comes from a
``torch.Generator`` made here, so a seed fixes it and a bad seed is refused the same way
everywhere."""

from __future__ import annotations

import numbers

import torch


def make_generator(seed: object) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (an int), or from fresh entropy when None."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
