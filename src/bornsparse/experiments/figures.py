"""Figures in the style of seed 000's Figures 1-4 (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_TITLES = {
    "lowrank": "Figure 1: rank-k matrices",
    "band": "Figure 2: band matrices (convolutions without weight sharing)",
    "sparse": "Figure 3: random sparse matrices with k·n/2 nonzeros",
    "permutation": "Figure 4: a random permutation",
}


def plot_operator_figures(
    records: Iterable[dict[str, Any]], out_dir: str | Path, *, width: int
) -> list[Path]:
    """One PNG per task: final MSE against parameter count, log-log, one red line per k
    (labelled with its dof), the dense baseline in black when it was run, a vertical line
    at n²/4 and a dotted one at the depth where the receptive field first covers the input.
    Returns the written paths. Seeds are averaged.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from bornsparse.experiments.operators import summarize

    summary = summarize(records)
    out_dir = Path(out_dir)
    m = width // 2
    dense = next((row for key, row in summary.items() if key[0] == "dense"), None)
    groups: dict[tuple[str, str | None], list[tuple]] = {}
    for key in summary:
        task, _, path = key
        if task != "dense":
            groups.setdefault((task, path), []).append(key)
    if not groups and dense is not None:
        groups[("dense", None)] = []

    paths = []
    for (task, path), keys in groups.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        keys = sorted(keys, key=lambda t: t[1] or 0)
        cmap = plt.get_cmap("Reds")
        per_factor = None
        for i, key in enumerate(keys):
            row = summary[key]
            pts = sorted((c["params"], c["mse"]) for c in row.values() if c["mse"] is not None)
            d0, c0 = next(iter(row.items()))
            per_factor = c0["params"] / d0
            if not pts:
                continue
            colour = cmap(0.45 + 0.55 * (i + 1) / max(1, len(keys)))
            if task == "file":
                label = c0["label"]
            elif task == "permutation":
                label = "permutation"
            else:
                label = f"dof={c0['dof']}"
            ax.plot(*zip(*pts, strict=True), "o-", color=colour, ms=3.5, lw=1.4, label=label)
        if dense is not None:
            pts = sorted((c["params"], c["mse"]) for c in dense.values() if c["mse"] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color="black", ms=3.5, lw=1.4,
                        label=f"dense (dof={m * m})")
            d0, c0 = next(iter(dense.items()))
            per_factor = per_factor or c0["params"] / d0
        ax.axvline(m * m, color="0.35", lw=1.0, ls="--", label=f"n²/4 = {m * m}")
        if per_factor:
            rf_depth = math.ceil(math.log2(m))
            ax.axvline(rf_depth * per_factor, color="0.6", lw=1.0, ls=":",
                       label=f"full receptive field (N={rf_depth})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if per_factor:
            # depth on top: comparable with the paper whatever parameter count it used
            pf = per_factor
            top = ax.secondary_xaxis("top", functions=(lambda p, pf=pf: p / pf,
                                                       lambda d, pf=pf: d * pf))
            depths = sorted({d for row in summary.values() for d in row})
            top.set_xticks(depths, [str(d) for d in depths])
            top.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            top.set_xlabel("depth N", fontsize=8)
            top.tick_params(labelsize=7)
        ax.set_xlabel("parameters of G(θ)")
        ax.set_ylabel("final MSE (mean of last window)")
        title = _TITLES.get(task, "dense baseline" if task == "dense" else f"user matrix {path}")
        ax.set_title(f"{title}\nn = {width}", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        name = task if task != "file" else f"file_{Path(path).stem}"
        target = out_dir / f"{name}.png"
        fig.savefig(target, dpi=130)
        plt.close(fig)
        paths.append(target)
    return paths
