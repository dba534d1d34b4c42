"""PermutedBlockDiagonal(1024, 1024, width=2048, depth=20) against dense nn.Linear(1024, 1024),
and against a Monarch product at equal parameters.

Forward (under no_grad) and forward+backward (gradients of input and parameters, as in
training), at several batch sizes, float32, measured side by side and interleaved after a
warm-up that compiles the numba kernels. Prints a table and one JSON line of ratios
(ours / dense; below 1 means ours is faster).

The equal-parameter comparison: bornsparse's MonarchLinear with ``--monarch-blocks`` blocks
(2n²/blocks parameters) and a G of the depth with as many parameters (depth 16 for 32
blocks at n = 1024, width 2048), both without bias. ``--fly-path DIR`` also times fly's own
``blockdiag_butterfly_multiply`` (HazyResearch/fly, src/models/layers/
blockdiag_butterfly_multiply.py, put in DIR; not shipped here) on the same factors.

    python benchmarks/bench_permuted.py [--threads 2] [--repeats 9] [--reference]
        [--monarch-blocks 32] [--fly-path DIR]

``--block-sizes 2 4 8 16 32`` times, instead, G(θ) at each block size with Monarch's
parameter count (width 2n for k < 16, n for k >= 16, the depth that matches), f+b against
MonarchLinear, fly's multiply (with ``--fly-path``) and dense, and where "auto" takes the
batched-GEMM path (``takes_batched_gemm``) the numba kernel beside it.

On a machine busy with other work, ``--threads 1 --cpu-time`` gives steadier ratios: it
times process CPU time (min over rounds) instead of wall time, which load elsewhere barely
moves. It is only meaningful with one thread (spinning idle threads would count).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bornsparse.nn import MonarchLinear, PermutedBlockDiagonal  # noqa: E402
from bornsparse.ops.permuted import takes_batched_gemm  # noqa: E402
from common import (  # noqa: E402
    cpu_label,
    forward_backward,
    machine_tag,
    print_json_line,
    set_threads,
    time_interleaved,
)


def time_cpu_interleaved(fns, *, repeats: int, inner: int = 3) -> dict[str, float]:
    """Min over rounds of process CPU seconds per call, candidates interleaved per round."""
    for fn in fns.values():
        fn()
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (time.process_time() - t0) / inner)
    return best


def _forward(layer: torch.nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            layer(x)

    return run


class _Fly(torch.nn.Module):
    """fly's multiply on a MonarchLinear's factors (its (k, q, p) / (k, s, q) layout is
    fly's w1_bfly / w2_bfly)."""

    def __init__(self, multiply, monarch: MonarchLinear) -> None:
        super().__init__()
        self.multiply = multiply
        self.monarch = monarch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multiply(x, self.monarch.right, self.monarch.left)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds per case (default 9)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=2)
    ap.add_argument(
        "--cpu-time", action="store_true",
        help="time process CPU time (min over rounds); use with --threads 1 on a busy machine",
    )
    ap.add_argument(
        "--reference", action="store_true",
        help="also time the plain-PyTorch reference backend (slow)",
    )
    ap.add_argument("--monarch-blocks", type=int, default=32,
                    help="blocks of the equal-parameter Monarch (default 32)")
    ap.add_argument("--fly-path", type=Path, default=None,
                    help="folder holding fly's blockdiag_butterfly_multiply.py")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=None, metavar="K",
                    help="time G(θ) at these block sizes at Monarch's parameter count "
                    "instead (see above)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.block_sizes:
        return block_size_table(args)
    torch.manual_seed(0)
    n = args.features
    dense = torch.nn.Linear(n, n)
    ours = PermutedBlockDiagonal(
        n, n, width=args.width, depth=args.depth, block_size=args.block_size, seed=0
    )
    monarch = MonarchLinear(n, n, args.monarch_blocks, bias=False, seed=0)
    monarch_params = monarch.right.numel() + monarch.left.numel()
    # a 2×2-block factor holds 2·width parameters
    eq_depth = max(1, round(monarch_params / (2 * args.width)))
    ours_eq = PermutedBlockDiagonal(n, n, width=args.width, depth=eq_depth, block_size=2,
                                    seed=0)
    fly = _load_fly(args.fly_path)
    ref = None
    if args.reference:
        ref = PermutedBlockDiagonal(
            n, n, width=args.width, depth=args.depth, block_size=args.block_size, seed=0
        )
        ref.backend = "reference"

    rows = []
    for batch in args.batches:
        x = torch.randn(batch, n, requires_grad=True)
        grad = torch.randn(batch, n)
        fns = {
            "dense_fwd": _forward(dense, x),
            "ours_fwd": _forward(ours, x),
            "dense_fwdbwd": forward_backward(dense, x, grad),
            "ours_fwdbwd": forward_backward(ours, x, grad),
            "oursEq_fwdbwd": forward_backward(ours_eq, x, grad),
            "monarch_fwdbwd": forward_backward(monarch, x, grad),
        }
        if fly is not None:
            fns["fly_fwdbwd"] = forward_backward(_Fly(fly, monarch), x, grad)
        if ref is not None:
            fns["ref_fwd"] = _forward(ref, x)
            fns["ref_fwdbwd"] = forward_backward(ref, x, grad)
        if args.cpu_time:
            t = time_cpu_interleaved(fns, repeats=args.repeats)
        else:
            t = time_interleaved(fns, repeats=args.repeats)
        row = {"batch": batch, **{f"{k}_ms": v * 1e3 for k, v in t.items()}}
        row["ratio_fwd"] = t["ours_fwd"] / t["dense_fwd"]
        row["ratio_fwdbwd"] = t["ours_fwdbwd"] / t["dense_fwdbwd"]
        row["eq_over_monarch"] = t["oursEq_fwdbwd"] / t["monarch_fwdbwd"]
        row["monarch_over_dense"] = t["monarch_fwdbwd"] / t["dense_fwdbwd"]
        if fly is not None:
            row["monarch_over_fly"] = t["monarch_fwdbwd"] / t["fly_fwdbwd"]
        if ref is not None:
            row["ref_ratio_fwd"] = t["ref_fwd"] / t["dense_fwd"]
            row["ref_ratio_fwdbwd"] = t["ref_fwdbwd"] / t["dense_fwdbwd"]
        rows.append(row)

    print(
        f"PermutedBlockDiagonal({n}, {n}, width={args.width}, depth={args.depth}, "
        f"block_size={args.block_size}) vs nn.Linear({n}, {n}), float32, "
        f"{args.threads} threads, {'CPU time' if args.cpu_time else 'wall time'}; "
        f"ratio = ours / dense; {cpu_label()}"
    )
    head = f"{'batch':>6} {'dense fwd':>10} {'ours fwd':>10} {'ratio':>7} " \
           f"{'dense f+b':>10} {'ours f+b':>10} {'ratio':>7}"
    if ref is not None:
        head += f" {'ref/dense fwd':>14} {'ref/dense f+b':>14}"
    head += f" {'G_eq/Mon f+b':>12} {'Mon/dense':>9}" + (f" {'Mon/fly':>7}" if fly else "")
    print(head + "   (ms, ratios)")
    for r in rows:
        line = (
            f"{r['batch']:>6} {r['dense_fwd_ms']:>10.3f} {r['ours_fwd_ms']:>10.3f} "
            f"{r['ratio_fwd']:>7.2f} {r['dense_fwdbwd_ms']:>10.3f} "
            f"{r['ours_fwdbwd_ms']:>10.3f} {r['ratio_fwdbwd']:>7.2f}"
        )
        if ref is not None:
            line += f" {r['ref_ratio_fwd']:>14.2f} {r['ref_ratio_fwdbwd']:>14.2f}"
        line += f" {r['eq_over_monarch']:>12.2f} {r['monarch_over_dense']:>9.2f}"
        if fly is not None:
            line += f" {r['monarch_over_fly']:>7.2f}"
        print(line)
    print(f"equal parameters ({monarch_params}): G depth {eq_depth} vs MonarchLinear "
          f"{args.monarch_blocks} blocks" + (" (and fly's multiply on its factors)" if fly
                                             else ""))
    record = {
        "bench": "permuted_vs_dense",
        "config": {
            "features": n, "width": args.width, "depth": args.depth,
            "block_size": args.block_size, "dtype": "float32", "repeats": args.repeats,
            "threads": args.threads, "clock": "process_cpu_min" if args.cpu_time else "wall_median",
        },
        "ratio_fwd": {str(r["batch"]): round(r["ratio_fwd"], 4) for r in rows},
        "ratio_fwdbwd": {str(r["batch"]): round(r["ratio_fwdbwd"], 4) for r in rows},
        "equal_params": {"params": monarch_params, "g_depth": eq_depth,
                         "monarch_blocks": args.monarch_blocks},
        **{key: {str(r["batch"]): round(r[key], 4) for r in rows}
           for key in ("eq_over_monarch", "monarch_over_dense", "monarch_over_fly")
           if key in rows[0]},
        "ms": {str(r["batch"]): {k: round(v, 4) for k, v in r.items() if k.endswith("_ms")}
               for r in rows},
        "machine": machine_tag(),
    }
    print_json_line(record)
    return record


def _load_fly(path: Path | None):
    if path is None:
        return None
    sys.path.insert(0, str(path))
    with warnings.catch_warnings():  # its torch.cuda.amp decorators are deprecated
        warnings.simplefilter("ignore")
        from blockdiag_butterfly_multiply import blockdiag_butterfly_multiply
    return blockdiag_butterfly_multiply


def block_size_table(args: argparse.Namespace) -> dict[str, object]:
    """f+b of G(θ) at each of ``args.block_sizes`` with Monarch's parameter count, as ratios
    to fly's multiply (or MonarchLinear without ``--fly-path``), MonarchLinear and dense."""
    n = args.features
    torch.manual_seed(0)
    monarch = MonarchLinear(n, n, args.monarch_blocks, bias=False, seed=0)
    params = monarch.right.numel() + monarch.left.numel()
    fly = _load_fly(args.fly_path)
    layers: dict[str, torch.nn.Module] = {"dense": torch.nn.Linear(n, n, bias=False),
                                          "MonarchLinear": monarch}
    if fly is not None:
        layers["fly"] = _Fly(fly, monarch)
    shapes = {}
    for k in args.block_sizes:
        width = n if k >= 16 else 2 * n
        depth = max(1, round(params / (width * k)))
        shapes[k] = (width, depth)
        layers[f"G k={k}"] = PermutedBlockDiagonal(n, n, width=width, depth=depth,
                                                   block_size=k, seed=0)
        if takes_batched_gemm(k):
            layers[f"G k={k} numba"] = PermutedBlockDiagonal(
                n, n, width=width, depth=depth, block_size=k, seed=0, backend="numba")
    anchor = "fly" if fly is not None else "MonarchLinear"
    ratios: dict[str, dict[str, float]] = {}
    for batch in args.batches:
        x = torch.randn(batch, n, requires_grad=True)
        grad = torch.randn(batch, n)
        t = time_interleaved({name: forward_backward(layer, x, grad)
                              for name, layer in layers.items()}, repeats=args.repeats)
        ratios[str(batch)] = {name: v / t[anchor] for name, v in t.items()}
    print(f"G(θ) {n} → {n} at {params:,} parameters (Monarch, {args.monarch_blocks} blocks), "
          f"f+b / {anchor}, float32, {args.threads} threads, {cpu_label()}")
    print(f"{'layer':<24} {'width':>6} {'depth':>6} "
          + " ".join(f"{'b=' + b:>8}" for b in ratios))
    for name in layers:
        k = int(name.split("=")[1].split()[0]) if name.startswith("G k=") else None
        w, d = shapes[k] if k is not None else ("", "")
        print(f"{name:<24} {w!s:>6} {d!s:>6} "
              + " ".join(f"{ratios[b][name]:>8.2f}" for b in ratios))
    record = {"bench": "permuted_block_sizes", "anchor": anchor, "params": params,
              "shapes": {str(k): list(v) for k, v in shapes.items()},
              "ratios": {b: {k: round(v, 4) for k, v in r.items()} for b, r in ratios.items()},
              "threads": args.threads, "machine": machine_tag()}
    print_json_line(record)
    return record


if __name__ == "__main__":
    main()
