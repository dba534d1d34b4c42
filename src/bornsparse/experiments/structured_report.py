"""Tables and figures of ``bornsparse reproduce structured`` from its JSONL records.

Accuracy is test accuracy in percent, mean ± sample std over seeds; costs are means over
seeds, except the f+b time: the fastest seed's (each run's median over its warm steps), since
other processes on the machine only ever slow a run down. Parameters on the figures' x axis
are those of the hidden layers (the budgeted ones): the dense input layer and classifier are
the same for every method and listed once.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bornsparse.experiments import report_format as fmt


def series(rec: dict[str, Any]) -> str:
    """What a line of the tables and figures is: the method, and for G(θ) its block size
    ("permuted_k4"; records without a block size are k = 2)."""
    if rec["method"] != "permuted":
        return rec["method"]
    return f"permuted_k{rec.get('block_size') or 2}"


def _block_size(name: str) -> int | None:
    return int(name.removeprefix("permuted_k")) if name.startswith("permuted_k") else None


def _label(name: str) -> str:
    from bornsparse.experiments.structured_methods import METHODS

    k = _block_size(name)
    if k is not None:
        return f"G(θ) k={k}"
    return METHODS[name].label if name in METHODS else name


def _method_order(names: Iterable[str]) -> list[str]:
    from bornsparse.experiments.structured_methods import METHODS

    present = set(names)
    order = []
    for m in METHODS:
        if m == "permuted":  # G(θ) at every block size, smallest first
            order += sorted((n for n in present if _block_size(n) is not None),
                            key=_block_size)
        elif m in present:
            order.append(m)
    return order + sorted(present - set(order))


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, dict[tuple, dict[str, Any]]]:
    """{dataset: {(series, budget): cell}} (:func:`series`: G(θ) once per block size); a
    cell holds ``acc``/``acc_std`` (percent; None
    if every seed diverged), ``seeds``, ``diverged``, and the means over seeds of
    ``hidden_params``, ``hidden_total`` (all hidden blocks), ``trainable_params``, ``fb_ms``,
    ``stored_bytes``, ``hidden_stored_bytes``, ``peak_memory_bytes``, plus ``size`` and
    ``budget_error`` of the first seed; ``fb_ms`` is the minimum over seeds."""
    groups: dict[str, dict[tuple, list[dict]]] = {}
    for r in records:
        groups.setdefault(r["dataset"], {}).setdefault((series(r), r["budget"]), []).append(r)
    out: dict[str, dict[tuple, dict[str, Any]]] = {}
    for dataset, cells in groups.items():  # in the records' order (the sweep's: data set order)
        out[dataset] = {}
        for key, recs in cells.items():
            ok = [r for r in recs if r["accuracy"] is not None]
            acc, sd = fmt.mean_std([100 * r["accuracy"] for r in ok]) if ok else (None, None)

            def mean(field: str, recs=recs) -> float | None:
                vals = [r[field] for r in recs if r.get(field) is not None]
                return statistics.fmean(vals) if vals else None

            out[dataset][key] = {
                "acc": acc, "acc_std": sd, "seeds": len(recs), "diverged": len(recs) - len(ok),
                "hidden_params": mean("hidden_params"),
                "hidden_total": statistics.fmean(r["hidden_params"] * r["config"]["blocks"]
                                                 for r in recs),
                "trainable_params": mean("trainable_params"),
                "fb_ms": min((r["fb_ms"] for r in recs if r.get("fb_ms") is not None),
                             default=None),
                "stored_bytes": mean("stored_bytes"),
                "hidden_stored_bytes": mean("hidden_stored_bytes"),
                "peak_memory_bytes": mean("peak_memory_bytes"),
                "size": recs[0]["size"], "budget_error": recs[0]["budget_error"],
                "train_samples": recs[0].get("train_samples"),
            }
    return out


def _acc(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    if cell["acc"] is None:
        return "diverged"
    s = f"{cell['acc']:.1f}" + ("" if cell["acc_std"] is None else f" ± {cell['acc_std']:.1f}")
    return s + (f" ({cell['diverged']} diverged)" if cell["diverged"] else "")


def budget_text(budget: float) -> str:
    """1/128 for 0.0078125, else the number."""
    inv = 1 / budget
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-9 else f"{budget:g}"


def _size(size: dict[str, int]) -> str:
    # G(θ)'s block size is in its label ("G(θ) k=4"); Monarch's k is its block count
    names = {"rank": "r", "nblocks": "k", "depth": "N", "nnz": "nnz", "offset_depth": "d"}
    return ", ".join(f"{names.get(k, k)}={v}" for k, v in size.items()
                     if k != "block_size") or "—"


def accuracy_table(cells: dict[tuple, dict[str, Any]]) -> str:
    """Markdown: test accuracy per method (rows) and budget (columns)."""
    budgets = sorted({b for (_, b) in cells if b is not None})
    head = ["method"] + [budget_text(b) for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(budgets) + "|"]
    for m in _method_order(m for (m, _) in cells):
        if (m, None) in cells:  # dense: one number, in every column
            row = [_acc(cells[(m, None)])] * len(budgets)
        else:
            row = [_acc(cells.get((m, b))) for b in budgets]
        lines.append(f"| {_label(m)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def cost_table(cells: dict[tuple, dict[str, Any]]) -> str:
    """Markdown: per method and budget, what it got and what it cost."""
    head = ["method", "budget", "size", "params / hidden layer", "vs budget", "model params",
            "accuracy %", "f+b ms / batch (fastest seed)", "stored", "peak memory"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * (len(head) - 3)]
    for m in _method_order(m for (m, _) in cells):
        for b in sorted((b for (mm, b) in cells if mm == m), key=lambda v: v or 2.0):
            c = cells[(m, b)]
            lines.append("| " + " | ".join([
                _label(m), "dense" if b is None else budget_text(b), _size(c["size"]),
                fmt.count_text(c["hidden_params"], grouped=True),
                "—" if b is None else f"{100 * c['budget_error']:+.1f}%",
                fmt.count_text(c["trainable_params"], grouped=True), _acc(c),
                "—" if c["fb_ms"] is None else f"{c['fb_ms']:.2f}",
                fmt.bytes_text(c["stored_bytes"]),
                fmt.bytes_text(c["peak_memory_bytes"])]) + " |")
    return "\n".join(lines) + "\n"


def headline_table(cells: dict[tuple, dict[str, Any]]) -> str:
    """Markdown, per budget: each layer's accuracy gap to dense (points) and f+b time per
    batch, with the time as a fraction of dense's ("vs dense"), best accuracy first."""
    dense = cells.get(("dense", None))
    lines = ["| budget | layer | size | accuracy % | gap to dense (points) | "
             "f+b ms / batch | vs dense |", "|---:|---|---|---:|---:|---:|---:|"]
    if dense is not None:
        fb = "—" if dense["fb_ms"] is None else f"{dense['fb_ms']:.2f}"
        lines.append(f"| dense | dense | — | {_acc(dense)} | 0 | {fb} | 1 |")
    for b in sorted({b for (_, b) in cells if b is not None}):
        row_cells = [(m, c) for (m, bb), c in cells.items() if bb == b]
        row_cells.sort(key=lambda mc: -(mc[1]["acc"] if mc[1]["acc"] is not None else -1))
        for m, c in row_cells:
            gap = ("—" if c["acc"] is None or dense is None or dense["acc"] is None
                   else f"{c['acc'] - dense['acc']:+.1f}")
            ratio = ("—" if c["fb_ms"] is None or dense is None or not dense["fb_ms"]
                     else f"{c['fb_ms'] / dense['fb_ms']:.2f}×")
            fb = "—" if c["fb_ms"] is None else f"{c['fb_ms']:.2f}"
            lines.append(f"| {budget_text(b)} | {_label(m)} | {_size(c['size'])} | {_acc(c)} "
                         f"| {gap} | {fb} | {ratio} |")
    return "\n".join(lines) + "\n"


def markdown_report(records: Iterable[dict[str, Any]], info: dict[str, Any] | None = None,
                    failed: Iterable[dict[str, Any]] = ()) -> str:
    """The whole report: per data set, the accuracy table then the cost table; last, the
    runs of ``failed`` (``SweepOutcome.failed``) that are missing from them."""
    records = list(records)
    failed = fmt.failed_lines(failed)
    if not records:
        return "\n".join([fmt.NO_RUNS, failed]) if failed else fmt.NO_RUNS
    parts = []
    if info:
        trains = info["train"]
        any_train = next(iter(trains.values()))
        parts.append(
            f"MLP in → {info['width']} → {' → '.join([str(info['width'])] * info['blocks'])}"
            f" → classes: the {info['blocks']} hidden {info['width']}×{info['width']} layers "
            f"are the method, the input layer and classifier dense. Adam lr {any_train['lr']} "
            f"cosine to 0, batch {any_train['batch_size']}, epochs "
            + ", ".join(f"{d} {t['epochs']}" for d, t in trains.items())
            + f"; {info['seeds']} seed(s). Budget: trainable parameters per hidden layer as a "
            "fraction of its dense weights, plus its bias. f+b: median forward + loss + "
            "backward per batch over the warm steps of a run, the fastest seed's (runs share "
            "the machine); stored: state_dict bytes; "
            "peak memory: live tensor bytes in training plus what autograd saves.\n")
        for method, k, b in info.get("too_big", []):
            what = _label(f"permuted_k{k}") if method == "permuted" else _label(method)
            parts.append(f"Not run: {what} at {budget_text(b)} (its smallest size is more "
                         "than 50% over the budget).\n")
    for dataset, cells in summarize(records).items():
        any_rec = next(r for r in records if r["dataset"] == dataset)
        fixed = any_rec["trainable_params"] - any_rec["hidden_params"] * any_rec["config"]["blocks"]
        n_train = any_rec.get("train_samples")
        parts.append(f"### {dataset}: which layer, per budget\n\n"
                     + ("" if n_train is None else f"{n_train:,} training samples. ")
                     + "Gap: test accuracy minus dense's, in points; vs dense: f+b time "
                     "over dense's.\n\n" + headline_table(cells))
        parts.append(f"### {dataset}: test accuracy (%)\n\n"
                     f"The dense input layer and classifier hold {fixed:,} parameters in every "
                     f"model.\n\n" + accuracy_table(cells))
        parts.append(f"### {dataset}: sizes and costs\n\n" + cost_table(cells))
    return "\n".join([*parts, failed] if failed else parts)


# ---------------------------------------------------------------------------------------
# Figures


_STYLE = {
    "lowrank": ("tab:blue", "s"), "monarch": ("tab:green", "^"),
    "permuted_k2": ("tab:red", "o"), "permuted_k4": ("firebrick", "p"),
    "permuted_k8": ("indianred", "h"), "permuted_k16": ("salmon", "8"),
    "permuted_k32": ("darkred", "P"), "permuted_tanh": ("tab:orange", "D"),
    "sparse": ("tab:gray", "x"), "dctps": ("tab:purple", "v"),
    "permuted_offset_small": ("tab:brown", "<"), "permuted_offset": ("tab:pink", ">"),
}


def plot_figures(records: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per data set, ``accuracy_{dataset}.png``: test accuracy against the hidden
    layers' trainable parameters (left) and against the measured f+b time per batch
    (right), one line per method over its budgets, dense as a black point and a dashed
    line. Error bars: std over seeds. Returns the written paths."""
    plt = fmt.pyplot()
    out_dir = Path(out_dir)
    paths = []
    for dataset, cells in summarize(records).items():
        fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6), sharey=True)
        for ax, xkey, xlabel in ((axes[0], "hidden_total", "trainable parameters of the "
                                  "hidden layers"),
                                 (axes[1], "fb_ms", "f+b time per batch (ms, measured in "
                                  "training, fastest seed)")):
            for m in _method_order(m for (m, _) in cells):
                # in budget order on both panels: a line joins a method's budgets
                pts = sorted((b or 1.0, c[xkey], c["acc"], c["acc_std"] or 0.0)
                             for (mm, b), c in cells.items()
                             if mm == m and c["acc"] is not None and c[xkey] is not None)
                if not pts:
                    continue
                _, xs, ys, es = zip(*pts, strict=True)
                if m == "dense":
                    ax.errorbar(xs, ys, yerr=es, fmt="*", color="black", ms=9, label="dense")
                    ax.axhline(ys[0], color="black", lw=0.8, ls="--")
                    continue
                colour, marker = _STYLE.get(m, ("tab:olive", "."))
                ax.errorbar(xs, ys, yerr=es, fmt=f"{marker}-", color=colour, ms=5, lw=1.3,
                            capsize=2, label=_label(m))
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.25)
        axes[0].set_ylabel("test accuracy (%)")
        axes[1].legend(fontsize=7, loc="best")
        budgets = sorted({b for (_, b) in cells if b is not None})
        fig.suptitle(f"{dataset}: structured hidden layers at "
                     f"{', '.join(budget_text(b) for b in budgets)} of the dense weights",
                     fontsize=10)
        fig.tight_layout()
        paths.append(fmt.save_figure(fig, out_dir / f"accuracy_{dataset}.png"))
    return paths


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (time, accuracy) points no other point beats on both, by time."""
    front, best = [], -float("inf")
    for t, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((t, a))
            best = a
    return front


def plot_pareto(records: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per data set, ``pareto_{dataset}.png``: a panel per budget, test accuracy
    against f+b time per batch, a point per layer (std over seeds as error bars), dense as
    the reference star and dashed line, the Pareto front as a grey line. Returns the paths."""
    from matplotlib import ticker

    plt = fmt.pyplot()
    out_dir = Path(out_dir)
    paths = []
    for dataset, cells in summarize(records).items():
        budgets = sorted({b for (_, b) in cells if b is not None})
        if not budgets:
            continue
        dense = cells.get(("dense", None))
        fig, axes = plt.subplots(1, len(budgets), figsize=(4.4 * len(budgets) + 2, 4.2),
                                 sharey=True, squeeze=False)
        for ax, b in zip(axes[0], budgets, strict=True):
            pts = []
            for m in _method_order(m for (m, bb) in cells if bb == b):
                c = cells[(m, b)]
                if c["acc"] is None or c["fb_ms"] is None:
                    continue
                colour, marker = _STYLE.get(m, ("tab:olive", "."))
                ax.errorbar([c["fb_ms"]], [c["acc"]], yerr=[c["acc_std"] or 0.0], fmt=marker,
                            color=colour, ms=7, capsize=2, label=_label(m))
                pts.append((c["fb_ms"], c["acc"]))
            if dense is not None and dense["acc"] is not None and dense["fb_ms"] is not None:
                ax.errorbar([dense["fb_ms"]], [dense["acc"]], yerr=[dense["acc_std"] or 0.0],
                            fmt="*", color="black", ms=11, label="dense")
                ax.axhline(dense["acc"], color="black", lw=0.8, ls="--")
                pts.append((dense["fb_ms"], dense["acc"]))
            front = _pareto(pts)
            if len(front) > 1:
                ax.plot(*zip(*front, strict=True), color="0.6", lw=1, zorder=0)
            ax.set_xscale("log")
            # plain numbers at 1-2-5 steps: the default 3×10⁰ labels run into each other
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"budget {budget_text(b)} of the dense weights", fontsize=9)
            ax.set_xlabel("f+b time per batch (ms, fastest seed)")
            ax.grid(True, which="both", alpha=0.25)
        axes[0][0].set_ylabel("test accuracy (%)")
        # one legend for all panels, outside them: no panel's points hidden under it
        seen = fmt.legend_entries(axes[0])
        fig.legend(list(seen.values()), list(seen), fontsize=7, loc="center right")
        n_train = next(iter(cells.values())).get("train_samples")
        fig.suptitle(f"{dataset}" + ("" if n_train is None else f", {n_train:,} training "
                     "samples") + ": accuracy against cost, per budget", fontsize=10)
        fig.tight_layout(rect=(0, 0, 0.84, 1))
        paths.append(fmt.save_figure(fig, out_dir / f"pareto_{dataset}.png"))
    return paths
