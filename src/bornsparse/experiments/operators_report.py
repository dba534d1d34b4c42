"""Table and figures of the operator-learning experiment from its JSONL records.

The figures are in the style of Figures 1-4 of the permuted block-diagonal paper (§5):
final MSE against the parameter count of G(θ), one PNG per task (matplotlib, Agg backend).
Runs of ``--baselines`` (low rank U Vᵀ and Monarch at G(θ)'s parameter count) are extra rows
of the table and extra lines of the figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bornsparse.experiments import report_format as fmt

#: names of the --baselines methods in the table and legends
BASELINE_LABELS = {"lowrank": "low rank U Vᵀ", "monarch": "Monarch"}


def _label(cfg: dict[str, Any]) -> str:
    if cfg["task"] == "file":
        name = f"file:{Path(cfg['target_file']).name}"
    else:
        name = cfg["task"] if cfg["k"] is None else f"{cfg['task']} k={cfg['k']}"
    base = cfg.get("baseline")
    return name if base is None else f"{name}, {BASELINE_LABELS.get(base, base)}"


def summarize(records: Iterable[dict[str, Any]]) -> dict[tuple, dict[int, dict[str, Any]]]:
    """{(task, k, file, baseline): {depth: {"params", "dof", "mse" (mean over seeds),
    "seeds", "wall_s"}}}; ``baseline`` is None for G(θ), else "lowrank" or "monarch" (its
    runs are keyed by the depth of the G(θ) whose parameter count they match)."""
    out: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in records:
        c = r["config"]
        row = out.setdefault((c["task"], c["k"], c.get("target_file"), c.get("baseline")),
                             {})
        cell = row.setdefault(c["depth"], {"params": r["params"], "dof": r["dof"], "mses": [],
                                           "wall_s": 0.0, "label": _label(c)})
        cell["mses"].append(r["final_mse"])
        cell["wall_s"] += r["wall_s"]
    for row in out.values():
        for cell in row.values():
            ok = [v for v in cell["mses"] if v is not None]
            cell["mse"] = sum(ok) / len(ok) if ok else None
            cell["seeds"] = len(cell["mses"])
    return out


def markdown_table(records: Iterable[dict[str, Any]]) -> str:
    """Final MSE (mean over seeds) per target (rows) and depth N (columns, with G(θ)'s
    #params). A baseline row's cell is its run matched to that depth; where its own
    parameter count differs from G(θ)'s by more than 1% it follows in brackets."""
    from bornsparse.data.operators import TARGETS

    summary = summarize(records)
    if not summary:
        return fmt.NO_RUNS
    depths = sorted({d for row in summary.values() for d in row})
    params = {}
    for _, row in sorted(summary.items(), key=lambda kv: kv[0][3] is not None):
        for d, cell in row.items():
            params.setdefault(d, cell["params"])  # G(θ)'s where it ran
    head = ["target", "dof"] + [f"N={d} ({_short(params[d])})" for d in depths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {t: i for i, t in enumerate(TARGETS + ("file",))}
    methods = {None: 0, **{b: i + 1 for i, b in enumerate(BASELINE_LABELS)}}
    for key in sorted(summary, key=lambda t: (order[t[0]], t[1] or 0, t[2] or "",
                                              methods.get(t[3], 9))):
        row = summary[key]
        any_cell = next(iter(row.values()))
        cells = [any_cell["label"], "—" if any_cell["dof"] is None else str(any_cell["dof"])]
        for d in depths:
            cell = row.get(d)
            if cell is None:
                cells.append("")
            elif cell["mse"] is None:
                cells.append("diverged")
            else:
                own = "" if abs(cell["params"] / params[d] - 1) <= 0.01 else (
                    f" ({_short(cell['params'])})")
                cells.append(f"{cell['mse']:.2e}{own}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


# ---------------------------------------------------------------------------------------
# Figures


_TITLES = {
    "lowrank": "Figure 1: rank-k matrices",
    "band": "Figure 2: band matrices (convolutions without weight sharing)",
    "sparse": "Figure 3: random sparse matrices with k·n/2 nonzeros",
    "permutation": "Figure 4: a random permutation",
}


def markdown_report(records: Iterable[dict[str, Any]], info: dict[str, Any],
                    failed: Iterable[dict[str, Any]] = ()) -> str:
    """table.md: what the numbers are (``info``: the plan's window, width, batch_size,
    network, baselines), the final-MSE table (:func:`markdown_table`), then the runs of
    ``failed`` (``SweepOutcome.failed``) that are missing from it."""
    return (f"Final MSE (mean over the last {info['window']} steps), width n = "
            f"{info['width']}, batch {info['batch_size']}, network {info['network']}; column "
            "headers give depth N and the parameter count"
            + ("; low-rank and Monarch rows are matched to G(θ)'s count at each depth, their "
               "own count in brackets where it differs by more than 1%"
               if info["baselines"] else "")
            + f".\n\n{markdown_table(records)}"
            + ("\n" + fmt.failed_lines(failed) if failed else ""))


def plot_operator_figures(
    records: Iterable[dict[str, Any]], out_dir: str | Path, *, width: int | None = None
) -> list[Path]:
    """One PNG per task: final MSE against parameter count, log-log, one red line per k
    (labelled with its dof), the dense baseline in black when it was run, a vertical line
    at n²/4 and a dotted one at the depth where the receptive field first covers the input.
    Low-rank and Monarch runs (``--baselines``) are blue dashed and green dotted lines, one
    per k in the same light-to-dark order, each at its own parameter count. Returns the
    written paths. Seeds are averaged. ``width``: the operators' n (default: the first
    record's; a sweep has one).
    """
    import matplotlib.ticker

    plt = fmt.pyplot()
    records = list(records)
    if not records:
        return []
    width = records[0]["config"]["width"] if width is None else width
    summary = summarize(records)
    out_dir = Path(out_dir)
    m = width // 2
    # the dense target's G(θ) is every figure's black reference; baselines learning the
    # dense target are in the table only
    dense = next((row for key, row in summary.items() if key[0] == "dense" and key[3] is None),
                 None)
    groups: dict[tuple[str, str | None], list[tuple]] = {}
    for key in summary:
        task, _, path, _ = key
        if task != "dense":
            groups.setdefault((task, path), []).append(key)
    if not groups and dense is not None:
        groups[("dense", None)] = []
    styles = {None: ("Reds", "o-"), "lowrank": ("Blues", "s--"), "monarch": ("Greens", "^:")}

    paths = []
    for (task, path), keys in groups.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        per_factor = None
        for baseline, (cmap_name, line_style) in styles.items():
            mine = sorted((t for t in keys if t[3] == baseline), key=lambda t: t[1] or 0)
            cmap = plt.get_cmap(cmap_name)
            for i, key in enumerate(mine):
                row = summary[key]
                pts = sorted((c["params"], c["mse"]) for c in row.values()
                             if c["mse"] is not None)
                d0, c0 = next(iter(row.items()))
                if baseline is None:
                    per_factor = c0["params"] / d0
                if not pts:
                    continue
                colour = cmap(0.45 + 0.55 * (i + 1) / max(1, len(mine)))
                if baseline is not None:  # one legend entry per baseline, not per k
                    label = BASELINE_LABELS.get(baseline, baseline) if i == len(mine) - 1 \
                        else None
                elif task == "file":
                    label = c0["label"]
                elif task == "permutation":
                    label = "permutation"
                else:
                    label = f"dof={c0['dof']}"
                ax.plot(*zip(*pts, strict=True), line_style, color=colour, ms=3.5, lw=1.4,
                        label=label)
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
        ax.set_xlabel("parameters of G(θ)" if not any(t[3] for t in keys) else "parameters")
        ax.set_ylabel("final MSE (mean of last window)")
        title = _TITLES.get(task, "dense baseline" if task == "dense" else f"user matrix {path}")
        ax.set_title(f"{title}\nn = {width}", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        name = task if task != "file" else f"file_{Path(path).stem}"
        paths.append(fmt.save_figure(fig, out_dir / f"{name}.png"))
    return paths
