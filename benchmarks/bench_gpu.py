"""The Triton kernels on a GPU: accuracy in every dtype, then f+b time and peak memory against
the plain-PyTorch reference, dense nn.Linear (cuBLAS) and the Monarch product.

One prepared command for a CUDA machine (GPU time is short; about 3-5 minutes on an H200):

    PYTHONPATH=src python benchmarks/bench_gpu.py --out bench_gpu.json

Stages, each case in its own try/except (an out-of-memory case is recorded as "oom" and the
run goes on), the JSON rewritten after every case so a killed run still leaves its results:

1. accuracy: every Triton op (the permuted product on both backward paths and with k = 4,
   the tanh network, the sparse product, the DCT-plus-sparse layer), forward and every
   gradient, in float32, float16 and bfloat16, as a relative Frobenius error against the
   float64 reference on the same rounded inputs, divided by plain PyTorch's own error in
   that dtype (the issue's tolerance: flagged above 2). This is the first time the
   kernels are compiled rather than interpreted.
2. permuted: widths 4096, 16384, 65536 (in = out = width/2, depth 2·log2(width), 2×2
   blocks) at batch 1024 and 8192: PermutedBlockDiagonal with backend "triton" and
   "reference", dense nn.Linear(in, out) and MonarchLinear with the block count whose
   parameter count is nearest the permuted layer's.
3. depth: width 16384, batch 8192, depth 4, 14 and 28: peak memory above the parameters
   and input (flat in depth for triton, growing for the reference).
4. tanh: PermutedTanhNetwork at width 16384, batch 8192, "triton" against "reference".
5. dctps: DCTPlusSparseLinear 16384² and 65536², density 1e-3, at batch 1024 and 8192,
   "triton" (sparse part in Triton, DCT through torch.fft) and "reference" against dense.

f+b is ``layer(x).backward(g)`` with x requiring grad (input and parameter gradients, as in
training), float32 (TF32 off, torch's default, unless --tf32), median over repeats after
two warm-up steps (the first compiles the kernels), torch.cuda.synchronize() around each.

``--smoke`` runs every stage on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set
here) at toy sizes, to check that the script runs without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

GOAL_VS_REFERENCE = 5.0  # the issue: triton at least 5× faster than the reference
HALF_FACTOR = 2.0  # the accuracy bound, a multiple of torch's own error


class Run:
    """Collects results, prints them and rewrites the JSON after each case."""

    def __init__(self, out: Path | None, budget_s: float, meta: dict) -> None:
        self.out, self.budget_s, self.t0 = out, budget_s, time.perf_counter()
        self.data: dict = {"meta": meta, "accuracy": [], "cases": [], "ratios": {},
                           "goals": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def save(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.data, indent=1))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _status(e: BaseException) -> str:
    oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
    return "oom" if oom else f"error: {type(e).__name__}: {str(e)[:300]}"


def _drop(e: BaseException) -> None:
    # a traceback's frames keep the failed case's tensors alive
    traceback.clear_frames(e.__traceback__)


# ---------------------------------------------------------------------------------------
# 1. accuracy

def _rel_err(got: torch.Tensor, want64: torch.Tensor) -> float:
    got, want64 = got.detach().double(), want64.detach()
    return float((got - want64).norm() / want64.norm().clamp_min(1e-300))


def _accuracy_cases(dev: torch.device, smoke: bool) -> dict[str, tuple[Callable, Callable,
                                                                        list[torch.Tensor]]]:
    """name -> (ours(*leaves), reference(*leaves), float64 leaves): both callables take the
    floating inputs and return the output; index tensors are closed over."""
    from bornsparse.ops.dct_sparse import dct_sparse_affine, dct_sparse_affine_reference
    from bornsparse.ops.permuted import (
        permuted_block_diagonal,
        permuted_block_diagonal_reference,
        permuted_tanh_network,
        permuted_tanh_network_reference,
    )
    from bornsparse.ops.sparse_product import build_plan, sparse_matmul, sparse_matmul_reference

    gen = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    batch, width = (8, 32) if smoke else (256, 512)
    n = width // 2

    def perms(depth: int) -> torch.Tensor:
        return torch.stack([torch.randperm(width, generator=gen) for _ in range(depth)]).to(dev)

    def blocks(depth: int, k: int, conditioned: bool) -> torch.Tensor:
        w = torch.linalg.qr(torch.randn(depth, width // k, k, k, generator=gen, **f64)).Q
        if not conditioned:  # a nearly singular block: the backward recomputes
            w[:, 0] = torch.ones(k, k, **f64) + 1e-3 * torch.eye(k, **f64)
        return w.to(dev)

    x = torch.randn(batch, n, generator=gen, **f64).to(dev)
    cases = {}
    for name, k, depth, cond in (("permuted inverse", 2, 8, True),
                                 ("permuted recompute", 2, 8, False),
                                 ("permuted k=4", 4, 4, True)):
        p = perms(depth)
        cases[name] = (
            lambda x, w, p=p: permuted_block_diagonal(x, w, p, out_features=n, backend="triton"),
            lambda x, w, p=p: permuted_block_diagonal_reference(x, w, p, out_features=n),
            [x, blocks(depth, k, cond)],
        )
    p = perms(8)
    biases = (0.5 * torch.randn(8, width, generator=gen, **f64)).to(dev)
    cases["tanh network"] = (
        lambda x, w, b: permuted_tanh_network(x, w, p, b, out_features=n, backend="triton"),
        lambda x, w, b: permuted_tanh_network_reference(x, w, p, b, out_features=n),
        [x, blocks(8, 2, True), biases],
    )
    rows, nnz = 2 * n, 8 * n
    lin = torch.randperm(rows * n, generator=gen)[:nnz].sort().values
    idx = torch.stack((lin // n, lin % n)).to(dev)
    plan = build_plan(idx, (rows, n))
    values = torch.randn(nnz, generator=gen, **f64).to(dev)
    cases["sparse matmul"] = (
        lambda x, v: sparse_matmul(x, v, idx, (rows, n), plan=plan, backend="triton"),
        lambda x, v: sparse_matmul_reference(x, v, idx, (rows, n)),
        [x, values],
    )
    out = 3 * n // 2  # out > in: the DCT pads x
    lin = torch.randperm(out * n, generator=gen)[:nnz].sort().values
    idx2 = torch.stack((lin // n, lin % n)).to(dev)
    plan2 = build_plan(idx2, (out, n))
    alpha = torch.tensor(0.7, **f64).to(dev)
    bias = torch.randn(out, generator=gen, **f64).to(dev)
    cases["dct plus sparse"] = (
        lambda x, a, v, b: dct_sparse_affine(x, out, a, v, plan2, b, backend="triton"),
        lambda x, a, v, b: dct_sparse_affine_reference(x, out, a, v, idx2, b),
        [x, alpha, values, bias],
    )
    return cases


def stage_accuracy(run: Run, dev: torch.device, dtypes: list[torch.dtype], smoke: bool) -> None:
    print("\n== accuracy: error vs float64, as a multiple of torch's own error (flag > 2)")
    print(f"{'case':<20} {'dtype':<9} {'what':<8} {'ours':>9} {'torch':>9} {'ratio':>6}")
    for name, (ours_fn, ref_fn, leaves64) in _accuracy_cases(dev, smoke).items():
        for dtype in dtypes:
            row = {"case": name, "dtype": str(dtype).removeprefix("torch."), "worst_ratio": None}
            try:
                leaves = [t.to(dtype) for t in leaves64]
                base = [t.double() for t in leaves]  # the same rounded inputs, in float64
                results = []
                for fn, inputs in ((ours_fn, leaves), (ref_fn, leaves), (ref_fn, base)):
                    inputs = [t.detach().clone().requires_grad_() for t in inputs]
                    y = fn(*inputs)
                    gen = torch.Generator().manual_seed(1)
                    g = torch.randn(y.shape, generator=gen).to(device=dev, dtype=y.dtype)
                    results.append([y, *torch.autograd.grad(y, inputs, g)])
                names = ["out"] + [f"grad{i}" for i in range(len(leaves))]
                eps = torch.finfo(dtype).eps
                worst = 0.0
                for what, a, b, c in zip(names, *results, strict=True):
                    ours, theirs = _rel_err(a, c), _rel_err(b, c)
                    ratio = ours / max(theirs, eps)
                    worst = max(worst, ratio)
                    row[what] = {"ours": ours, "torch": theirs, "ratio": ratio}
                    print(f"{name:<20} {row['dtype']:<9} {what:<8} {ours:>9.2e} {theirs:>9.2e} "
                          f"{ratio:>6.2f}{'  <-- over 2' if ratio > HALF_FACTOR else ''}")
                row["worst_ratio"] = worst
                row["status"] = "ok" if worst <= HALF_FACTOR else "over bound"
            except Exception as e:  # noqa: BLE001 (a failed compile must not end the run)
                row["status"] = _status(e)
                print(f"{name:<20} {row['dtype']:<9} {row['status']}")
                _drop(e)
            run.data["accuracy"].append(row)
            run.save()


# ---------------------------------------------------------------------------------------
# timing

def measure(run: Run, dev: torch.device, group: str, impl: str,
            build: Callable[[], torch.nn.Module], in_features: int, out_features: int,
            batch: int, *, warmup: int, min_reps: int, max_reps: int, case_s: float,
            **info) -> dict:
    """Build a layer, time f+b (median seconds) and record peak memory; never raises."""
    row = {"group": group, "impl": impl, "batch": batch, "in": in_features,
           "out": out_features, **info, "ms": None, "peak_mib": None, "extra_mib": None}
    if run.over_budget():
        row["status"] = "skipped (time budget)"
    else:
        try:
            layer = build()
            row["params"] = sum(p.numel() for p in layer.parameters())
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, in_features, generator=gen).to(dev).requires_grad_()
            g = torch.randn(batch, out_features, generator=gen).to(dev)

            def step() -> None:
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).backward(g)

            for _ in range(warmup):
                step()
            _sync(dev)
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < min_reps or (
                len(times) < max_reps and time.perf_counter() - start < case_s
            ):
                _sync(dev)
                t0 = time.perf_counter()
                step()
                _sync(dev)
                times.append(time.perf_counter() - t0)
            row["ms"] = statistics.median(times) * 1e3
            row["reps"] = len(times)
            if dev.type == "cuda":
                layer.zero_grad(set_to_none=True)
                x.grad = None
                _sync(dev)
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                step()
                _sync(dev)
                peak = torch.cuda.max_memory_allocated(dev)
                row["peak_mib"] = peak / 2**20
                row["extra_mib"] = (peak - base) / 2**20
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 (one failed case must not end the run)
            row["status"] = _status(e)
            _drop(e)
        finally:
            layer = x = g = None  # noqa: F841 (free before the next case)
            _free()
    shown = "—" if row["ms"] is None else f"{row['ms']:.3f}"
    mem = "—" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} / {row['extra_mib']:.0f}"
    extra = " ".join(f"{k}={v}" for k, v in info.items())
    print(f"{group:<9} {impl:<18} b={batch:<5} {extra:<22} {shown:>10} ms  "
          f"{mem:>15} MiB  {row['status'] if row['status'] != 'ok' else ''}", flush=True)
    run.data["cases"].append(row)
    run.save()
    return row


def _fmt(r: float | None) -> str:
    return "—" if r is None else f"{r:.3g}"


def monarch_blocks(n: int, params: int) -> int:
    """The divisor k of n whose Monarch parameter count 2n²/k is nearest ``params`` (in log)."""
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: abs(math.log(2 * n * n / k / params)))


def _ratio(a: dict, b: dict) -> float | None:
    return a["ms"] / b["ms"] if a.get("ms") and b.get("ms") else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on the CPU under TRITON_INTERPRET=1 (no GPU needed)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the remaining cases after this many seconds")
    parser.add_argument("--case-s", type=float, default=1.5,
                        help="time each case for about this long (at least 3 steps)")
    parser.add_argument("--tf32", action="store_true", help="let dense matmuls use TF32")
    parser.add_argument("--stages", default="accuracy,permuted,depth,tanh,dctps")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))

    if args.smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here (torch.cuda.is_available() is False); run "
              "it on a GPU machine, or with --smoke on the CPU. Nothing measured.")
        return 0
    else:
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    import triton

    from bornsparse.nn import (
        DCTPlusSparseLinear,
        MonarchLinear,
        PermutedBlockDiagonal,
        PermutedTanhNetwork,
    )

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter smoke)"
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "smoke": args.smoke, "tf32": bool(args.tf32), "dtype": "float32"}
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"float32, TF32 {'on' if args.tf32 else 'off'}", flush=True)
    run = Run(args.out, args.budget_s, meta)
    timing = dict(warmup=0 if args.smoke else 2, min_reps=1 if args.smoke else 3,
                  max_reps=1 if args.smoke else 20, case_s=0.0 if args.smoke else args.case_s)
    widths = [16, 32] if args.smoke else [4096, 16384, 65536]
    batches = [4, 8] if args.smoke else [1024, 8192]
    big_w, big_b = (32, 8) if args.smoke else (16384, 8192)
    ratios, goals = run.data["ratios"], run.data["goals"]

    if "accuracy" in stages:
        dtypes = [torch.float32, torch.float16] + ([] if args.smoke else [torch.bfloat16])
        stage_accuracy(run, dev, dtypes, args.smoke)
        acc = run.data["accuracy"]
        goals["accuracy: every op within 2x torch's own error"] = all(
            r["status"] == "ok" for r in acc)

    print(f"\n{'group':<9} {'impl':<18} {'batch':<7} {'':<22} {'f+b':>10}     "
          f"{'peak / above base':>15}")
    if "permuted" in stages:
        for width in widths:
            n, depth = width // 2, 2 * int(math.log2(width))
            params = depth * width * 2
            nb = monarch_blocks(n, params)
            for batch in batches:
                key = f"w{width}_b{batch}"
                info = dict(width=width, depth=depth)

                def perm(backend, width=width, depth=depth, n=n):
                    return lambda: PermutedBlockDiagonal(n, n, width=width, depth=depth,
                                                         seed=0, backend=backend, device=dev)

                rows = {impl: measure(run, dev, "permuted", impl, build, n, n, batch,
                                      **timing, **info)
                        for impl, build in (
                            ("triton", perm("triton")),
                            ("dense", lambda n=n: torch.nn.Linear(n, n, device=dev)),
                            (f"monarch nb={nb}", lambda n=n, nb=nb: MonarchLinear(
                                n, n, nb, bias=False, seed=0, device=dev)),
                            ("reference", perm("reference")))}
                t, d, r = rows["triton"], rows["dense"], rows["reference"]
                m = rows[f"monarch nb={nb}"]
                ratios[key] = {
                    "reference/triton": _ratio(r, t), "dense/triton": _ratio(d, t),
                    "triton/monarch (G/Monarch)": _ratio(t, m),
                    "params triton, monarch": [t.get("params"), m.get("params")],
                }
                print(f"  {key}: reference/triton {_fmt(ratios[key]['reference/triton'])}, "
                      f"dense/triton {_fmt(ratios[key]['dense/triton'])}, G/Monarch "
                      f"{_fmt(ratios[key]['triton/monarch (G/Monarch)'])}", flush=True)
                s = ratios[key]["reference/triton"]
                goals[f"{key}: triton >= {GOAL_VS_REFERENCE:g}x faster than reference"] = (
                    None if s is None else s >= GOAL_VS_REFERENCE)
                if width >= (32 if args.smoke else 16384):
                    s = ratios[key]["dense/triton"]
                    goals[f"{key}: triton faster than dense"] = None if s is None else s > 1

    if "depth" in stages:
        depths = [2, 4] if args.smoke else [4, 14, 28]
        extra = {}
        for backend in ("triton", "reference"):
            for depth in depths:
                row = measure(run, dev, "depth", backend, lambda d=depth, b=backend:
                              PermutedBlockDiagonal(big_w // 2, big_w // 2, width=big_w,
                                                    depth=d, seed=0, backend=b, device=dev),
                              big_w // 2, big_w // 2, big_b, **timing, width=big_w,
                              depth=depth)
                extra[(backend, depth)] = row["extra_mib"]
        for backend in ("triton", "reference"):
            lo, hi = extra[(backend, depths[0])], extra[(backend, depths[-1])]
            ratios[f"depth {depths[-1]}/{depths[0]} memory above base, {backend}"] = (
                hi / lo if lo and hi else None)
        flat = ratios[f"depth {depths[-1]}/{depths[0]} memory above base, triton"]
        goals["triton memory flat in depth (within 1.25x)"] = (
            None if flat is None else flat <= 1.25)

    if "tanh" in stages:
        depth = 2 * int(math.log2(big_w))
        rows = [measure(run, dev, "tanh", backend, lambda b=backend, d=depth: PermutedTanhNetwork(
            big_w // 2, big_w // 2, width=big_w, depth=d, seed=0, backend=b, device=dev),
            big_w // 2, big_w // 2, big_b, **timing, width=big_w, depth=depth)
            for backend in ("triton", "reference")]
        ratios[f"tanh w{big_w}_b{big_b}: reference/triton"] = _ratio(rows[1], rows[0])

    if "dctps" in stages:
        sizes = [32, 64] if args.smoke else [16384, 65536]
        density = 0.05 if args.smoke else 1e-3
        for size in sizes:
            for batch in batches:
                key = f"dctps {size}^2 b{batch}"
                rows = {impl: measure(run, dev, "dctps", impl, build, size, size, batch,
                                      **timing, density=density)
                        for impl, build in (
                            ("triton", lambda s=size: DCTPlusSparseLinear(
                                s, s, density=density, init="normal", seed=0,
                                backend="triton", device=dev)),
                            ("dense", lambda s=size: torch.nn.Linear(s, s, device=dev)),
                            ("reference", lambda s=size: DCTPlusSparseLinear(
                                s, s, density=density, init="normal", seed=0,
                                backend="reference", device=dev)))}
                ratios[key] = {"dense/triton": _ratio(rows["dense"], rows["triton"]),
                               "reference/triton": _ratio(rows["reference"], rows["triton"])}
                print(f"  {key}: dense/triton {_fmt(ratios[key]['dense/triton'])}, "
                      f"reference/triton {_fmt(ratios[key]['reference/triton'])}", flush=True)

    if args.smoke:  # interpreter timings say nothing about a GPU
        for goal in goals:
            goals[goal] = None if "accuracy" not in goal else goals[goal]
    note = "; smoke: timings mean nothing" if args.smoke else ""
    print(f"\n== goals ({run.elapsed():.0f} s in all{note})")
    for goal, ok in goals.items():
        print(f"  {'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {goal}")
    run.data["meta"]["seconds"] = run.elapsed()
    run.save()
    print(json.dumps({"device": name, "ratios": ratios}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
