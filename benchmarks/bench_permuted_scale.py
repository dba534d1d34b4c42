"""PermutedBlockDiagonal at the widths its O(n log n) parameters exist for, against a
memory-bandwidth reference measured in the same run.

For each width w (depth 2·log2(w), in = out = w/2, 2×2 blocks, float32) and batch:
forward (no_grad), forward+backward, the orthogonality penalty's forward+backward, one
Adam step (zero_grad, f+b of output and penalty, step) and the peak RSS growth over that
step (fused Adam). The bandwidth reference copies a (batch, width) float32 buffer ``depth`` times:
exactly the bytes a forward must move if every factor streams the activation in and out
once, with the same working set. ``fwd/bw`` = forward time / that copy time (1.0 would be
the bound); f+b and the Adam step are printed against it too (backward moves at least twice
what forward does). The gather reference applies the layer's ``depth`` permutations to a
(width, batch) buffer with ``torch.index_select`` (random rows, no arithmetic): what one
random-row pass per factor costs on this machine. All cases of one width and batch are
timed interleaved after a warm-up that compiles the numba kernels. Prints a table, the CPU
model, and one JSON line.

    python benchmarks/bench_permuted_scale.py [--widths 12 16 18 20] [--batches 16 64]
        [--threads 2] [--repeats 5] [--quick]

``--widths`` takes log2 of the width. ``--quick``: widths 2^12 and 2^16, batch 16 and 64,
three rounds. A batch is skipped where its estimated training footprint would not fit in
half the available memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bornsparse.nn import PermutedBlockDiagonal  # noqa: E402
from common import (  # noqa: E402
    available_bytes,
    cpu_label,
    machine_tag,
    peak_rss_growth,
    print_json_line,
    set_threads,
    time_interleaved,
)


def _cases(layer: PermutedBlockDiagonal, batch: int) -> dict[str, object]:
    width, depth = layer.width, layer.depth
    x = torch.randn(batch, layer.in_features)
    grad = torch.randn(batch, layer.out_features)
    src = torch.randn(batch, width)
    dst = torch.empty_like(src)
    rows = torch.randn(width, batch)  # the kernels' layout: one row of batch floats per index
    rows_out = torch.empty_like(rows)
    perms = layer.perms
    # fused: one pass over each parameter; the default foreach Adam measured 5× slower
    # (0.93 vs 0.18 s for the 84M weights of width 2^20, depth 40, 2 threads)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3, fused=True)

    def bandwidth() -> None:
        for _ in range(depth):
            dst.copy_(src)

    def gather() -> None:
        # the layer's own permutations applied to rows of batch floats, no arithmetic: what
        # one random-row pass per factor costs here (torch.index_select)
        for t in range(depth):
            torch.index_select(rows, 0, perms[t], out=rows_out)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    def penalty() -> None:
        layer.zero_grad(set_to_none=True)
        layer.orthogonality_penalty().backward()

    def adam_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = (layer(x) * grad).sum() + 1e-3 * layer.orthogonality_penalty()
        loss.backward()
        opt.step()

    return {"bandwidth": bandwidth, "gather": gather, "fwd": forward, "fwdbwd": forward_backward,
            "penalty": penalty, "adam": adam_step}


def _fits(width: int, depth: int, batch: int) -> bool:
    """Rough training footprint: weight, perms, grad and two Adam moments (weight-sized,
    float32 2×2 blocks: 8 bytes per row per factor), plus activations, kept state and the
    per-thread scratch (~a depth-sized slab of (width, tile) per thread, generously)."""
    params = 5 * depth * width * 8
    acts = 8 * batch * width * 4 + 2 * (depth // 2) * width * max(8, batch // 2) * 4
    return params + acts < available_bytes() / 2


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[12, 16, 18, 20],
                    help="log2 of the widths (default 12 16 18 20)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="widths 2^12 and 2^16, three rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.repeats = [12, 16], 3
    set_threads(args.threads)
    machine = machine_tag()
    print(f"PermutedBlockDiagonal(w/2, w/2, width w, depth 2·log2 w, 2×2 blocks), float32, "
          f"{args.threads} threads, CPU {cpu_label()}; times in ms (median of "
          f"{args.repeats} interleaved rounds); x/bw = time / bandwidth reference")
    print(f"{'width':>8} {'depth':>5} {'batch':>5} {'bw ref':>9} {'GB/s':>6} {'fwd':>9} "
          f"{'fwd/bw':>7} {'gath/bw':>7} {'fwd/gath':>8} {'f+b':>9} {'f+b/bw':>7} "
          f"{'penalty':>9} {'adam':>9} "
          f"{'adam/bw':>7} {'peak RSS MiB':>12}")
    rows = []
    for lg in args.widths:
        width = 1 << lg
        depth = 2 * lg
        torch.manual_seed(0)
        layer = PermutedBlockDiagonal(width // 2, width // 2, width=width, depth=depth,
                                      block_size=2, seed=0)
        for batch in args.batches:
            if not _fits(width, depth, batch):
                print(f"{width:>8} {depth:>5} {batch:>5}  skipped: would not fit in memory")
                continue
            fns = _cases(layer, batch)
            # a single call of the wide cases lasts seconds: no inner loop there
            t = time_interleaved(fns, repeats=args.repeats, min_time=0.05 if lg < 18 else 0,
                                 warmup=1)
            peak = peak_rss_growth(fns["adam"])
            moved = 2 * depth * batch * width * 4  # bytes in and out per factor, forward
            bw = t["bandwidth"]
            row = {"width": width, "depth": depth, "batch": batch,
                   **{f"{k}_ms": round(v * 1e3, 3) for k, v in t.items()},
                   "gb_per_s": round(moved / bw / 1e9, 2),
                   "fwd_over_bw": round(t["fwd"] / bw, 3),
                   "gather_over_bw": round(t["gather"] / bw, 3),
                   "fwd_over_gather": round(t["fwd"] / t["gather"], 3),
                   "fwdbwd_over_bw": round(t["fwdbwd"] / bw, 3),
                   "adam_over_bw": round(t["adam"] / bw, 3),
                   "peak_rss_mib": None if peak is None else round(peak / 2**20, 1)}
            rows.append(row)
            print(f"{width:>8} {depth:>5} {batch:>5} {bw * 1e3:>9.2f} {row['gb_per_s']:>6.1f} "
                  f"{t['fwd'] * 1e3:>9.2f} {row['fwd_over_bw']:>7.2f} "
                  f"{row['gather_over_bw']:>7.2f} {row['fwd_over_gather']:>8.2f} "
                  f"{t['fwdbwd'] * 1e3:>9.2f} {row['fwdbwd_over_bw']:>7.2f} "
                  f"{t['penalty'] * 1e3:>9.2f} {t['adam'] * 1e3:>9.2f} "
                  f"{row['adam_over_bw']:>7.2f} "
                  f"{'n/a' if peak is None else f'{peak / 2**20:.0f}':>12}", flush=True)
        del layer
    record = {"bench": "permuted_scale",
              "config": {"threads": args.threads, "repeats": args.repeats,
                         "dtype": "float32", "block_size": 2,
                         "clock": "wall_median", "depth": "2·log2(width)"},
              "rows": rows, "machine": machine,
              "ratio_note": "x_over_bw = time / (depth copies of a (batch, width) float32 "
                            "buffer)"}
    print_json_line(record)
    return record


if __name__ == "__main__":
    main()
