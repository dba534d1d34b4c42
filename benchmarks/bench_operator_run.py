"""Wall time of one full-scale operator-learning run (the permuted block-diagonal paper,
§5) and its steps per second.

Default: n = 2048, depth 12, low rank k = 1, batch 64, the paper's 12000-step schedule,
one thread. Target: at most 60 s per run. ``--steps-scale`` shortens the run for
a smoke test; the JSON line says which scale was used.

    .venv/bin/python benchmarks/bench_operator_run.py [--steps-scale 0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

from bornsparse.data.operators import make_target
from bornsparse.experiments.operators import (
    DEFAULT_BATCH_SIZE,
    PAPER_WIDTH,
    Phase,
    scaled_schedule,
    train_operator,
)
from common import machine_tag, print_json_line, set_threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=PAPER_WIDTH)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--task", default="lowrank")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--network", default="linear", choices=("linear", "tanh"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)

    k = args.k if args.task in ("lowrank", "band", "sparse") else None
    a = make_target(args.task, args.width // 2, k, seed=0)
    phases, window = scaled_schedule(args.steps_scale)
    # warm-up: numba compiles (or loads its cache) outside the timed run
    train_operator(a, depth=args.depth, width=args.width, batch_size=args.batch_size,
                   schedule=[Phase(3, 0.01, 3.0)], final_window=1, network=args.network)
    t0 = time.perf_counter()
    out = train_operator(a, depth=args.depth, width=args.width, batch_size=args.batch_size,
                         schedule=phases, final_window=window, network=args.network)
    total = time.perf_counter() - t0  # includes model and optimiser set-up, as a sweep pays it
    print_json_line({
        "bench": "operator_run", "width": args.width, "depth": args.depth, "task": args.task,
        "k": k, "batch_size": args.batch_size, "network": args.network,
        "steps_scale": args.steps_scale, "steps": out["steps"], "params": out["params"],
        "wall_s": round(total, 2), "train_loop_s": round(out["wall_s"], 2),
        "steps_per_s": round(out["steps"] / out["wall_s"], 1),
        "final_mse": out["final_mse"], "target_s": 60.0, **machine_tag(),
    })


if __name__ == "__main__":
    main()
