"""Training time per epoch of whole CNNs, dense against born-sparse, through the dctps runner.

    python benchmarks/bench_whole_model.py [--epochs 5] [--threads 2]

LeNet-5 on digits and the cnn1d on MNIST-1D, methods dense, random_epl and dctps at density
1e-3, batch 128, Adam: each configuration runs twice in this one process and the second
run's train_wall_s (its memory scans and Jacobian spectra excluded) is reported per epoch,
beside the first run's whole wall time, which also pays loading the numba kernels.
"""

from __future__ import annotations

import argparse
import time

import torch

from bornsparse.experiments.dctps import dctps_run, make_config
from common import machine_tag, print_json_line, set_threads

CASES = (("lenet5", "digits"), ("cnn1d", "mnist1d"))
METHODS = ("dense", "random_epl", "dctps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    print_json_line({"machine": machine_tag()})
    train = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
             "batch_size": 128, "epochs": args.epochs, "augment": False}
    for model, dataset in CASES:
        for method in METHODS:
            cfg = make_config(dataset=dataset, model=model, model_kwargs={}, method=method,
                              density=None if method == "dense" else 1e-3, seed=0, train=train)
            t0 = time.perf_counter()
            dctps_run(cfg)
            first = time.perf_counter() - t0
            rec = dctps_run(cfg)
            print_json_line({"model": model, "dataset": dataset, "method": method,
                             "epochs": args.epochs, "threads": torch.get_num_threads(),
                             "train_s_per_epoch": round(rec["train_wall_s"] / args.epochs, 3),
                             "first_run_s": round(first, 2), "accuracy": rec["accuracy"]})


if __name__ == "__main__":
    main()
