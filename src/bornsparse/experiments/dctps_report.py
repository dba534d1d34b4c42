"""Tables and figures of the DCTpS comparison from its JSONL records.

Δ accuracy is in percentage points (accuracy of the method minus that of the dense model of
the same seed), mean ± sample std over seeds, as in the DCTpS slides' table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bornsparse.experiments import report_format as fmt

# a singular value below this fraction of the dense network's largest counts as zero
ZERO_SV = 1e-6


def _label(method: str) -> str:
    from bornsparse.experiments.dctps_methods import METHODS

    return METHODS[method].label if method in METHODS else method


def _groups(records: Iterable[dict[str, Any]]) -> dict[tuple, dict[tuple, list[dict]]]:
    """{(dataset, model, model_kwargs repr): {(method, density): [records by seed]}}."""
    out: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in records:
        c = r["config"]
        g = out.setdefault((c["dataset"], c["model"], repr(sorted(c["model_kwargs"].items()))),
                           {})
        g.setdefault((c["method"], c["density"]), []).append(r)
    return out


def _pm(mean: float, std: float | None, digits: int = 1) -> str:
    s = f"{mean:+.{digits}f}"
    return s if std is None else f"{s} ± {std:.{digits}f}"


def delta_table(group: dict[tuple, list[dict]]) -> tuple[str, dict[str, Any]]:
    """Markdown rows: Δ accuracy per method (rows) and density (columns), and the dense line."""
    dense_acc = {r["config"]["seed"]: r["accuracy"] for r in group.get(("dense", None), [])
                 if r.get("accuracy") is not None}
    densities = sorted({p for (_, p) in group if p is not None}, reverse=True)
    methods = [m for m in _method_order(group) if m != "dense"]
    head = ["method"] + [f"P = {p:g}" for p in densities]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(densities) + "|"]
    notes: dict[str, Any] = {}
    for m in methods:
        cells = [_label(m)]
        for p in densities:
            recs = group.get((m, p), [])
            errs = [r["error"] for r in recs if r.get("error")]
            deltas = [100 * (r["accuracy"] - dense_acc[r["config"]["seed"]])
                      for r in recs if r.get("accuracy") is not None
                      and r["config"]["seed"] in dense_acc]
            if deltas:
                # a sweep stopped early: say how many seeds a cell rests on
                n = "" if len(deltas) == len(dense_acc) else f" (n={len(deltas)})"
                cells.append(_pm(*fmt.mean_std(deltas)) + n + ("*" if errs else ""))
            elif errs:
                notes.setdefault("errors", []).append(f"{_label(m)} at P = {p:g}: {errs[0]}")
                cells.append("n/a†")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    if dense_acc:
        notes["dense"] = fmt.mean_std([100 * a for a in dense_acc.values()])
        notes["seeds"] = len(dense_acc)
    return "\n".join(lines) + "\n", notes


def _method_order(group: dict[tuple, list[dict]]) -> list[str]:
    from bornsparse.experiments.dctps_methods import METHODS

    present = {m for (m, _) in group}
    order = [m for m in METHODS if m in present]
    return order + sorted(present - set(order))


def cost_table(group: dict[tuple, list[dict]]) -> str:
    """Measured cost columns per method and density (means over seeds)."""
    head = ["method", "P", "accuracy %", "nnz", "stored params", "index entries",
            "stored bytes", "memory at init", "memory in training", "memory final", "run s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:" + "|---:" * (len(head) - 2) + "|"]
    for m in _method_order(group):
        for p in sorted({p for (mm, p) in group if mm == m}, key=lambda v: -(v or 2)):
            recs = [r for r in group[(m, p)] if r.get("accuracy") is not None]
            if not recs:
                continue

            def mean(f, recs=recs):
                vals = [f(r) for r in recs]
                vals = [v for v in vals if v is not None]
                return statistics.fmean(vals) if vals else None

            acc, sd = fmt.mean_std([100 * r["accuracy"] for r in recs])
            mem = {k: mean(lambda r, k=k: r["memory_bytes"].get(k))
                   for k in ("init", "training", "final")}
            nnz = mean(lambda r: r.get("nnz"))
            cells = [
                _label(m), "1" if p is None else f"{p:g}",
                f"{acc:.1f}" + ("" if sd is None else f" ± {sd:.1f}"),
                "—" if nnz is None else fmt.count_text(nnz),
                fmt.count_text(mean(lambda r: r["stored"]["params"])),
                fmt.count_text(mean(lambda r: r["stored"]["index_entries"])),
                fmt.bytes_text(mean(lambda r: r["stored"]["bytes"])),
                *(fmt.bytes_text(mem[k]) for k in ("init", "training", "final")),
                f"{mean(lambda r: r['wall_s']):.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def spectra_table(group: dict[tuple, list[dict]]) -> str:
    """Jacobian spectra at init: median largest singular value and the share of zero ones."""
    dense = [r for r in group.get(("dense", None), []) if r.get("jacobian_sv")]
    if not dense:
        return ""
    ref = max(max(row) for r in dense for row in r["jacobian_sv"])
    densities = sorted({p for (_, p) in group if p is not None}, reverse=True)
    head = ["method"] + [f"P = {p:g}" for p in densities]
    lines = [f"Largest singular value (median over inputs and seeds) / share of singular values "
             f"below {ZERO_SV:g}× the dense net's largest ({ref:.3g}):", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * len(densities) + "|"]
    d_top = statistics.median(row[0] for r in dense for row in r["jacobian_sv"])
    lines.append("| Dense | " + " | ".join(f"{d_top:.3g} / 0%" for _ in densities) + " |")
    for m in _method_order(group):
        if m == "dense":
            continue
        cells = [_label(m)]
        for p in densities:
            rows = [row for r in group.get((m, p), []) if r.get("jacobian_sv")
                    for row in r["jacobian_sv"]]
            if not rows:
                cells.append("")
                continue
            top = statistics.median(row[0] for row in rows)
            flat = [v for row in rows for v in row]
            zero = sum(v < ZERO_SV * ref for v in flat) / len(flat)
            cells.append(f"{top:.3g} / {100 * zero:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _model_title(records: list[dict]) -> str:
    c = records[0]["config"]
    kw = ", ".join(f"{k}={v}" for k, v in sorted(c["model_kwargs"].items()))
    n = next((r.get("dense_weights") for r in records if r.get("dense_weights")), None)
    size = f", N = {n:,} prunable weights" if n else ""
    return f"{c['dataset']} / {c['model']}" + (f" ({kw})" if kw else "") + size


def _recipe_lines(info: dict[str, Any]) -> list[str]:
    """The training line(s) above the tables, one per data set (``info["train"]``:
    {dataset: the configurations' ``train`` field})."""
    trains = info["train"]
    lines = []
    for dataset, t in trains.items():
        on = f" on {dataset}" if len(trains) > 1 else ""
        lines.append(
            f"Training{on}: {t['optimizer']} (lr {t['lr']}, cosine to 0, weight decay "
            f"{t['weight_decay']}{', crop+flip' if t['augment'] else ''}), batch "
            f"{t['batch_size']}, {t['epochs']} epochs; IMP {t['imp_rounds']} rounds; "
            f"{info['seeds']} seed(s). Δ accuracy in percentage points against the dense model "
            "of the same seed, mean ± std over seeds.\n")
    return lines


def markdown_report(records: Iterable[dict[str, Any]], info: dict[str, Any] | None = None,
                    failed: Iterable[dict[str, Any]] = ()) -> str:
    """The whole report: per model, Δ accuracy table, cost table, spectra table.

    ``failed``: the sweep's failed runs (``SweepOutcome.failed``: key, config, error); a
    setting with no finished seed is shown as n/a† with the first reason under its table.
    """
    # a failed run is a record without accuracy that carries its error, for delta_table
    records = list(records) + [{"key": f["key"], "config": f["config"], "accuracy": None,
                                "error": f["error"]} for f in failed]
    if not records:
        return fmt.NO_RUNS
    parts = _recipe_lines(info) if info else []
    for _, group in _groups(records).items():
        all_recs = [r for recs in group.values() for r in recs]
        table, notes = delta_table(group)
        head = f"### {_model_title(all_recs)}\n\n"
        if "dense" in notes:
            d, s = notes["dense"]
            head += (f"Dense test accuracy {d:.1f}%" + ("" if s is None else f" ± {s:.1f}")
                     + f" ({notes['seeds']} seed(s)).\n\n")
        parts.append(head + table)
        for e in notes.get("errors", []):
            parts.append(f"† {e}\n")
        parts.append("Measured costs (stored = state_dict tensors; memory = live tensor bytes, "
                     "see docs/design.md):\n\n" + cost_table(group))
        spectra = spectra_table(group)
        if spectra:
            parts.append("Input-output Jacobian at initialisation. " + spectra)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Figures


# one colour per family, line style per variant, so 11 methods stay apart on one axis
_STYLE = {
    "random_uniform": ("tab:blue", ":"), "random_epl": ("tab:blue", "-"),
    "snip": ("tab:green", "-"), "grasp": ("tab:olive", "-"), "force": ("tab:red", "-"),
    "synflow": ("tab:purple", "-"), "imp": ("tab:brown", "-"), "rigl": ("tab:pink", "-"),
    "dctps": ("tab:orange", "-"), "dctps_rigl": ("tab:orange", "--"),
    "dctps_fixed_alpha": ("tab:cyan", ":"),
}


def _style(method: str) -> dict[str, Any]:
    colour, ls = _STYLE.get(method, (None, "-"))
    return {"color": colour, "ls": ls, "lw": 2.2 if method.startswith("dctps") else 1.4}


def _slug(key: tuple) -> str:
    dataset, model, _ = key
    return f"{dataset}_{model}"


def plot_accuracy(records: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per model: test accuracy against density (log x), one line per method, the
    dense model as a horizontal line; error bars are the std over seeds."""
    plt = fmt.pyplot()
    out_dir = Path(out_dir)
    paths = []
    for key, group in _groups(records).items():
        fig, ax = plt.subplots(figsize=(8.4, 4.6))
        for m in _method_order(group):
            if m == "dense":
                accs = [100 * r["accuracy"] for r in group[(m, None)]
                        if r.get("accuracy") is not None]
                if accs:
                    ax.axhline(statistics.fmean(accs), color="black", ls="--", lw=1.2,
                               label="Dense")
                continue
            pts = []
            for p in sorted(p for (mm, p) in group if mm == m):
                accs = [100 * r["accuracy"] for r in group[(m, p)]
                        if r.get("accuracy") is not None]
                if accs:
                    mu, sd = fmt.mean_std(accs)
                    pts.append((p, mu, sd or 0.0))
            if pts:
                xs, ys, es = zip(*pts, strict=True)
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3.5, capsize=2, label=_label(m),
                            **_style(m))
        ax.set_xscale("log")
        ax.set_xlabel("density P (fraction of weights trained)")
        ax.set_ylabel("test accuracy (%)")
        title = _model_title([r for recs in group.values() for r in recs])
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        paths.append(fmt.save_figure(fig, out_dir / f"accuracy_{_slug(key)}.png"))
    return paths


def plot_spectra(records: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per model: Jacobian singular values at init, one panel per density, one line
    per method (mean over inputs and seeds of the sorted spectrum). Zeros are drawn at the
    floor of the axis."""
    plt = fmt.pyplot()
    out_dir = Path(out_dir)
    paths = []
    for key, group in _groups(records).items():
        densities = sorted({p for (_, p) in group if p is not None}, reverse=True)
        if not densities or not any(r.get("jacobian_sv") for recs in group.values()
                                    for r in recs):
            continue
        dense = [row for r in group.get(("dense", None), []) if r.get("jacobian_sv")
                 for row in r["jacobian_sv"]]
        ref = max((max(row) for row in dense), default=1.0)
        floor = ZERO_SV * ref
        fig, axes = plt.subplots(1, len(densities), figsize=(4.2 * len(densities) + 2, 4.0),
                                 sharey=True, squeeze=False)
        for ax, p in zip(axes[0], densities, strict=True):
            if dense:
                ax.plot(_mean_spectrum(dense, floor), color="black", ls="--", lw=1.2,
                        label="Dense")
            for m in _method_order(group):
                rows = [row for r in group.get((m, p), []) if r.get("jacobian_sv")
                        for row in r["jacobian_sv"]]
                if m != "dense" and rows:
                    ax.plot(_mean_spectrum(rows, floor), marker=".", ms=3, label=_label(m),
                            **_style(m))
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor / 2)
            ax.set_title(f"P = {p:g}")
            ax.set_xlabel("singular value index")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("singular value of ∂logits/∂x at init")
        handles = fmt.legend_entries(axes[0])  # a method may be n/a at some density
        axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left",
                           bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(_model_title([r for recs in group.values() for r in recs])
                     + ": when is training possible?", fontsize=9)
        fig.tight_layout()
        paths.append(fmt.save_figure(fig, out_dir / f"jacobian_{_slug(key)}.png"))
    return paths


def _mean_spectrum(rows: list[list[float]], floor: float) -> list[float]:
    """Geometric mean over inputs of each sorted singular value, zeros clamped to ``floor``."""
    n = min(len(r) for r in rows)
    return [math.exp(statistics.fmean(math.log(max(r[i], floor)) for r in rows))
            for i in range(n)]
