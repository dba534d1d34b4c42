"""The DCT offset of a DCTPlusSparseConv2d, evaluated three ways, against dense nn.Conv2d:
forward + backward ratios from one run.

    .venv/bin/python benchmarks/bench_dct_conv_offset.py --threads 2

What stands between the DCTpS conv and the "≤ 0.5× dense" it was asked for. Its offset
α·D is a fixed dense kernel, so the candidates are the exact ways to apply it:

* ``cached D``: F.conv2d with the cached dense D (what the layer runs, S folded in);
* ``rank-2 factored``: D[o, c, a] = Σ_t U[o, t, a] · V[2o + t, c] exactly (the DCT's cosine
  of a sum of the patch's (kh, kw) and c parts, cos(A + B) = cos A cos B − sin A sin B), so
  the offset is a 1×1 channel mix to 2·out channels (a batched matmul) and then a 2-input
  grouped conv per output channel (the direct sparse conv kernel with its 2·kh·kw weights
  per channel); a quarter of the dense conv's multiply-adds at 64 → 64, 3×3;
* the layer itself at density 1e-3, the dense conv, and the floor (a "layer" that only
  writes its output and the input gradient).

Each JSON line: the candidate's time and its ratio to the dense conv of the same shape.
The factorisation is checked against ``dct_dense()`` before timing.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.nn import functional as F

from bornsparse.nn import DCTPlusSparseConv2d
from bornsparse.ops.sparse_conv import build_conv_plan, sparse_conv2d
from common import machine_tag, print_json_line, set_threads, time_interleaved

# name -> (in, out, kernel, H·W side): ResNet-20-like stages and a wider layer
SHAPES = {
    "64→64 3×3 32²": (64, 64, 3, 32),
    "32→32 3×3 32²": (32, 32, 3, 32),
    "16→16 3×3 32²": (16, 16, 3, 32),
}


def rank2_factors(cin: int, cout: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V (2·out, in), U (out, 2, k, k)) with D[o, c, a] = Σ_t U[o, t, a]·V[2o+t, c] for the
    "khkwc" patch order (patch index a·in + c, a = kh·k + kw), no groups."""
    q = max(cin * k * k, cout)
    o = torch.arange(cout, dtype=torch.float64)[:, None]
    theta = math.pi * o / (2 * q)
    f = torch.full((cout, 1), math.sqrt(2.0 / q), dtype=torch.float64)
    f[0] = math.sqrt(1.0 / q)
    c = torch.arange(cin, dtype=torch.float64)[None, :]
    a = torch.arange(k * k, dtype=torch.float64)[None, :]
    v = torch.stack([f * torch.cos(theta * (2 * c + 1)), f * torch.sin(theta * (2 * c + 1))], 1)
    u = torch.stack([torch.cos(2 * theta * a * cin), -torch.sin(2 * theta * a * cin)], 1)
    return v.reshape(2 * cout, cin).float(), u.reshape(cout, 2, k, k).float()


def bench_shape(name: str, cin: int, cout: int, k: int, side: int, n: int,
                repeats: int, threads: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(n, cin, side, side, requires_grad=True)
    g = torch.randn(n, cout, side, side)
    dense = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
    layer = DCTPlusSparseConv2d(cin, cout, k, padding=k // 2, density=1e-3, seed=0,
                                init="normal")
    d = layer.dct_dense().detach()
    v, u = rank2_factors(cin, cout, k)
    rebuilt = torch.einsum("otkl,otc->ockl", u, v.view(cout, 2, cin))
    err = (rebuilt - d).abs().max().item()
    if err > 1e-5:
        raise SystemExit(f"rank-2 factors off by {err} for {name}")
    pair_shape = (cout, 2, k, k)
    rows = torch.arange(cout).repeat_interleave(2 * k * k)
    cols = torch.arange(2 * k * k).repeat(cout)
    pair_idx = torch.stack([rows, cols])
    pair_plan = build_conv_plan(pair_idx, pair_shape, cout)
    pair_vals = u.reshape(-1)
    alpha = torch.tensor(1.0, requires_grad=True)

    def fb(fn, params=()):
        def run():
            x.grad = None
            for t in params:
                t.grad = None
            fn().backward(g)
        return run

    def cached():
        return alpha * F.conv2d(x, d, None, 1, k // 2)

    def factored():
        z = torch.matmul(v, x.view(n, cin, side * side)).view(n, 2 * cout, side, side)
        return alpha * sparse_conv2d(z, pair_vals, pair_idx, pair_shape, None, 1, k // 2, 1,
                                     cout, plan=pair_plan)

    def floor():
        torch.empty(g.shape).fill_(1.0)
        torch.empty(x.shape).fill_(1.0)

    cands = {
        "dense nn.Conv2d": fb(lambda: dense(x), list(dense.parameters())),
        "offset: cached D": fb(cached, [alpha]),
        "offset: rank-2 factored": fb(factored, [alpha]),
        "DCTPlusSparseConv2d 1e-3": fb(lambda: layer(x), list(layer.parameters())),
        "floor (write y and grad x)": floor,
    }
    times = time_interleaved(cands, repeats=repeats)
    base = times["dense nn.Conv2d"]
    for cand, t in times.items():
        print_json_line({"layer": name, "batch": n, "candidate": cand, "seconds": round(t, 5),
                         "ratio_to_dense": round(t / base, 3), "threads": threads})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    set_threads(args.threads)
    print_json_line({"machine": machine_tag()})
    for name, (cin, cout, k, side) in SHAPES.items():
        bench_shape(name, cin, cout, k, side, args.batch, args.repeats, args.threads)


if __name__ == "__main__":
    main()
