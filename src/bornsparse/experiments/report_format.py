"""What every experiment's tables and figures format alike: numbers, bytes, figure files.

matplotlib is imported only by :func:`pyplot`, when a figure is drawn.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

NO_RUNS = "(no runs)\n"


def mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation; None for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def count_text(n: float, *, grouped: bool = False) -> str:
    """1.23M, 45.6k (from 10⁴), else the whole number (``grouped``: 1,234)."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{n:,.0f}" if grouped else f"{n:.0f}"


def bytes_text(n: float | None) -> str:
    """1.23 MB, 4.56 kB, 789 B; — for None."""
    if n is None:
        return "—"
    for unit, f in (("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def failed_lines(failed: Iterable[dict[str, Any]]) -> str:
    """Markdown lines under a table for the runs that did not finish
    (``SweepOutcome.failed``: key, config, error); "" when there are none."""
    failed = list(failed)
    if not failed:
        return ""
    lines = [f"Not finished, so not in the table ({len(failed)} run(s); a rerun retries "
             "them):", ""]
    for f in failed:
        # the configuration's scalar fields say which run it was; recipes are shared
        what = ", ".join(f"{k}={v}" for k, v in f["config"].items()
                         if not isinstance(v, dict | list) and k != "experiment")
        lines.append(f"* {what} (`{f['key']}`): {f['error']}")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures are files, never need a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG, 130 dpi), close it, and return ``path``."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def legend_entries(axes: Iterable[Any]) -> dict[str, Any]:
    """{label: handle} over several panels, each label once (a method may be missing from
    a panel), in the order first seen."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return seen
