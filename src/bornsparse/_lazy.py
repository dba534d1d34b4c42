"""Lazy attribute loading for package ``__init__`` files (PEP 562).

Each subpackage lists ``submodule -> names`` once; the submodule is imported on first use,
which keeps ``import bornsparse`` fast and keeps optional backends unloaded until needed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_module(
    package: str, exports: dict[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` of ``package``, whose submodule ``m``
    defines the names ``exports[m]``."""
    table = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(table)

    return __getattr__, __dir__, sorted(table)
