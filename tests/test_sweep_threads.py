"""Sweep workers run exactly ``--threads`` compute threads whatever the environment exports
(OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 once gave every 1-thread worker a second busy thread:
torch sizes its OpenMP team from MKL's count)."""

from __future__ import annotations

import os
import sys

import pytest

from bornsparse.experiments.results_io import run_key
from bornsparse.experiments.sweep import THREAD_VARIABLES, run_sweep


def _thread_census(cfg: dict) -> dict:
    """Runs torch's and bornsparse's parallel kernels, then counts the process's threads."""
    import torch

    from bornsparse.nn import PermutedBlockDiagonal, SparseLinear

    x = torch.randn(256, 256, requires_grad=True)
    layers = (PermutedBlockDiagonal(256, 256, seed=0), SparseLinear(256, 256, density=0.1,
                                                                     seed=0))
    for _ in range(3):
        sum(layer(x).sum() for layer in layers).add((x @ x).tanh().sum()).backward()
    return {"key": run_key(cfg), "config": cfg, "torch_threads": torch.get_num_threads(),
            "os_threads": len(os.listdir("/proc/self/task")),
            "env": {k: os.environ.get(k) for k in THREAD_VARIABLES}}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/task")
@pytest.mark.parametrize(("workers", "threads"), [(2, 1), (1, 1), (1, 2)])
def test_workers_run_their_threads_whatever_the_environment_says(
        tmp_path, monkeypatch, workers, threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2" if threads == 1 else "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "2" if threads == 1 else "1")
    configs = [{"run": i} for i in range(2)]
    out = run_sweep(configs, tmp_path / "r.jsonl", _thread_census, workers=workers,
                    threads=threads, progress=False)
    assert out.complete, out.failed
    for rec in out.records:
        assert rec["torch_threads"] == threads
        assert set(rec["env"].values()) == {str(threads)}
        if workers > 1:  # a fresh worker: its only threads are the main one and the team's
            assert rec["os_threads"] == threads
    if workers == 1:  # inline runs restore the caller's settings
        assert os.environ["OMP_NUM_THREADS"] == ("2" if threads == 1 else "1")
