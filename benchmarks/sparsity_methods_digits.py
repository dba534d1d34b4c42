"""Sparse-training methods on sklearn digits: per-layer counts at density 1e-3, test accuracies.

Usage: python benchmarks/sparsity_methods_digits.py counts|accuracy
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from bornsparse.data.digits import load_digits_arrays
from bornsparse.models import build_model
from bornsparse.models.sparsify_model import sparsify
from bornsparse.sparsity.dynamic import SET, RigL
from bornsparse.sparsity.imp import IMP
from bornsparse.sparsity.pruning_at_init import prune_at_init

torch.set_num_threads(1)
tx, ty, vx, vy = load_digits_arrays(seed=0)
tx = torch.tensor(tx, dtype=torch.float32) / 16
vx = torch.tensor(vx, dtype=torch.float32) / 16
ty, vy = torch.tensor(ty), torch.tensor(vy)
EPOCHS, BATCH, LR = 30, 64, 3e-3
STEPS = EPOCHS * -(-len(ty) // BATCH)
SEEDS = [0, 1, 2]


def net(name, seed):
    torch.manual_seed(seed)
    if name == "mlp":  # LeNet-300-100 on 8×8 inputs
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100),
                             nn.ReLU(), nn.Linear(100, 10))
    return build_model("lenet5", num_classes=10, input_shape=(1, 8, 8))


def batches(n=4, size=128):
    return [(tx[i * size:(i + 1) * size], ty[i * size:(i + 1) * size]) for i in range(n)]


def train(model, steps, seed, sched=None, imp=None, opt=None):
    opt = opt or torch.optim.Adam(model.parameters(), lr=LR)
    if sched is not None:
        sched.optimizer = opt
    g = torch.Generator().manual_seed(seed)
    t = 0
    while t < steps:
        perm = torch.randperm(len(ty), generator=g)
        for i in range(0, len(ty), BATCH):
            if t == steps:
                break
            j = perm[i:i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(tx[j]), ty[j]).backward()
            if sched is None or sched.step():
                opt.step()
            if imp is not None:
                imp.step()
            t += 1
    with torch.no_grad():
        model.eval()
        acc = (model(vx).argmax(1) == vy).float().mean().item()
        model.train()
    return acc


def run(method, arch, density, seed):
    m = net(arch, seed)
    if method == "dense":
        return train(m, STEPS, seed)
    if method in ("random (ERK)", "DCTpS (EPL)"):
        kind, dist = ("sparse", "erk") if method == "random (ERK)" else ("dctps", "epl")
        sparsify(m, kind=kind, density=density, distribution=dist, seed=seed)
        return train(m, STEPS, seed)
    if method in ("snip", "grasp", "synflow", "force"):
        prune_at_init(m, method, density, data=batches())
        return train(m, STEPS, seed)
    if method == "imp":
        opt = torch.optim.Adam(m.parameters(), lr=LR)
        imp = IMP(m, opt, rounds=3, density=density, rewind_iteration=50)
        for _ in range(3):
            train(m, STEPS // 3, seed, imp=imp, opt=opt)
            imp.prune()
        imp.to_sparse()
        return train(m, STEPS, seed)
    cls, kind = {"RigL (ERK)": (RigL, "sparse"), "SET (ERK)": (SET, "sparse"),
                 "DCTpS + RigL (ERK)": (RigL, "dctps")}[method]
    sched = cls(m, None, density=density, total_steps=STEPS, delta=25, kind=kind, seed=seed)
    return train(m, STEPS, seed, sched=sched)


if "counts" in sys.argv:
    for arch in ("mlp", "lenet5"):
        for method in ("synflow", "force"):
            m = net(arch, 0)
            t0 = time.process_time()
            rep = prune_at_init(m, method, 1e-3, data=batches())
            print(f"\n{arch} {method} density 1e-3, {rep.rounds} rounds, floor moved "
                  f"{rep.floor_moved} (final round) / {rep.floor_moved_total} (all rounds), "
                  f"{time.process_time() - t0:.1f} s CPU\n")
            print(rep.table())

if "accuracy" in sys.argv:
    methods = ["dense", "random (ERK)", "snip", "grasp", "synflow", "force", "imp",
               "RigL (ERK)", "SET (ERK)", "DCTpS (EPL)", "DCTpS + RigL (ERK)"]
    for arch in ("mlp", "lenet5"):
        print(f"\n{arch}: test accuracy (%), mean ± std over seeds {SEEDS}, {EPOCHS} epochs\n")
        print("| method | density 0.1 | density 0.01 |\n|---|---:|---:|")
        for method in methods:
            cells = []
            for density in (0.1, 0.01):
                accs = [100 * run(method, arch, density, s) for s in SEEDS]
                cells.append(f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}")
                if method == "dense":
                    cells.append("(dense)")
                    break
            print(f"| {method} | " + " | ".join(cells[:2]) + " |", flush=True)
