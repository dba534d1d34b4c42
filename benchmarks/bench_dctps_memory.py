"""Peak memory of training a 1024 → 65536 → 65536 → 10 DCTpS MLP at density 1e-4.

    .venv/bin/python benchmarks/bench_dctps_memory.py --threads 2

20 Adam steps at batch 64. Prints the process's peak resident memory (ru_maxrss, which
includes the Python interpreter and torch themselves) and what the dense model would need
for weights, gradients and Adam's two moments in float32.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

from bornsparse.nn.dct_plus_sparse import DCTPlusSparseLinear
from common import machine_tag, print_json_line, set_threads

WIDTHS = (1024, 65536, 65536, 10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--density", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers.append(DCTPlusSparseLinear(a, b, density=args.density, seed=i))
        if i < len(WIDTHS) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    built = time.perf_counter() - t0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, WIDTHS[0])
    y = torch.randint(0, WIDTHS[-1], (args.batch,))
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train = time.perf_counter() - t0

    dense_weights = sum(a * b + b for a, b in zip(WIDTHS[:-1], WIDTHS[1:], strict=True))
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print_json_line({
        "bench": "dctps_mlp_memory", "widths": list(WIDTHS), "density": args.density,
        "batch": args.batch, "steps": args.steps,
        "nnz": sum(m.nnz for m in model if isinstance(m, DCTPlusSparseLinear)),
        "model_state_bytes": stored,
        "peak_rss_bytes": peak, "peak_rss_gib": round(peak / 2**30, 3),
        "dense_weights_grads_adam_bytes": 4 * 4 * dense_weights,
        "dense_weights_grads_adam_gib": round(16 * dense_weights / 2**30, 1),
        "build_seconds": round(built, 3), "train_seconds": round(train, 3),
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
        **machine_tag(),
    })


if __name__ == "__main__":
    main()
