"""The sweep runner: Ray and local executors agree, dead workers are retried or reported, a
killed driver loses nothing and writes no duplicate.

One local Ray cluster (2 CPUs) serves the module and is shut down after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bornsparse.experiments import dctps, operators
from bornsparse.experiments.results_io import read_jsonl, run_key
from bornsparse.experiments.sweep import run_sweep

TINY_TRAIN = {"epochs": 1, "batch_size": 128, "lr": 1e-2, "optimizer": "adam",
              "weight_decay": 0.0, "augment": False, "imp_rounds": 1, "jacobian_inputs": 0,
              "pai_rounds": 2}


def _operator_configs(depths, seeds=(0,), width=16):
    return [operators.make_config("band", 1, d, width=width, batch_size=8, steps_scale=0.002,
                                  seed=s, network="linear")
            for d in depths for s in seeds]


def _dctps_configs():
    return [dctps.make_config(dataset="digits", model="mlp", model_kwargs={"hidden_sizes": [64]},
                              method=m, density=p, seed=0, train=TINY_TRAIN)
            for m, p in (("dense", None), ("rigl", 0.1))]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the tests that use Ray (skipped where Ray is not installed;
    the other tests here run without it)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    # Ray workers cannot import this test module by name: ship its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()


def test_ray_and_local_executors_write_the_same_records(ray_cluster, tmp_path):
    ops = _operator_configs([2, 3])
    local = operators.run_sweep(ops, tmp_path / "ops_local.jsonl", progress=False)
    on_ray = operators.run_sweep(ops, tmp_path / "ops_ray.jsonl", progress=False,
                                 executor="ray")
    assert local.complete and on_ray.complete and len(on_ray.records) == 2
    for a, b in zip(local.records, on_ray.records, strict=True):
        assert a["key"] == b["key"]
        assert (a["final_mse"], a["curve"]) == (b["final_mse"], b["curve"])
        assert a["torch_threads"] == b["torch_threads"] == 1

    runs = _dctps_configs()
    local = dctps.run_sweep(runs, tmp_path / "dctps_local.jsonl", progress=False)
    on_ray = dctps.run_sweep(runs, tmp_path / "dctps_ray.jsonl", progress=False,
                             executor="ray")
    assert local.complete and on_ray.complete
    for a, b in zip(local.records, on_ray.records, strict=True):
        assert a.get("error") is None and b.get("error") is None
        assert a["key"] == b["key"] and a["accuracy"] == b["accuracy"]
        assert a["torch_threads"] == b["torch_threads"] == 1
    # each record was appended once, by the driver
    assert len(read_jsonl(tmp_path / "dctps_ray.jsonl")) == 2


def _die(marks: str | None, cfg: dict) -> dict:
    """A run whose process is SIGKILLed: at its first attempt only (a mark left in the folder
    ``marks``), or at every attempt (``marks=None``)."""
    mark = None if marks is None else Path(marks) / run_key(cfg)
    if mark is None or not mark.exists():
        if mark is not None:
            mark.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return {"key": run_key(cfg), "config": cfg, "pid": os.getpid()}


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_dead_workers_are_retried_or_reported_failed(request, tmp_path, executor):
    import functools

    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    configs = [{"run": i} for i in range(3)]
    options = {"executor": executor, "workers": 2, "progress": False, "max_retries": 1}
    out = run_sweep(configs, tmp_path / "none.jsonl", functools.partial(_die, None), **options)
    assert not out.complete and out.records == []
    assert sorted(f["key"] for f in out.failed) == sorted(run_key(c) for c in configs)
    assert "0 of 3 runs finished" in out.summary() and "3 failed" in out.summary()
    assert read_jsonl(tmp_path / "none.jsonl") == []  # a rerun will retry them

    marks = tmp_path / "marks"
    marks.mkdir()
    out = run_sweep(configs, tmp_path / "all.jsonl", functools.partial(_die, str(marks)),
                    **options)
    assert out.complete and out.ran == 3
    assert [r["key"] for r in out.records] == [run_key(c) for c in configs]
    assert len(read_jsonl(tmp_path / "all.jsonl")) == 3


def _raise_once(marks: str, cfg: dict) -> dict:
    """A run that raises at its first attempt (a mark left in the folder ``marks``)."""
    mark = Path(marks) / run_key(cfg)
    if not mark.exists():
        mark.touch()
        raise ValueError(f"no budget for run {cfg['run']}")
    return {"key": run_key(cfg), "config": cfg}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_that_raises_is_failed_not_written_and_retried_next_time(tmp_path, workers):
    import functools

    from bornsparse.experiments.results_io import append_jsonl

    configs = [{"run": i} for i in range(3)]
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / run_key(configs[0])).touch()  # run 0 does not raise
    path = tmp_path / "r.jsonl"
    # run 2 was recorded with an error by an older sweep: it counts as not run
    append_jsonl(path, {"key": run_key(configs[2]), "config": configs[2],
                        "error": "ValueError: old"})
    run = functools.partial(_raise_once, str(marks))
    out = run_sweep(configs, path, run, workers=workers, progress=False, max_retries=2)
    assert out.ran == 1 and sorted(f["key"] for f in out.failed) == sorted(
        run_key(c) for c in configs[1:])
    assert {f["error"] for f in out.failed} == {"ValueError: no budget for run 1",
                                                 "ValueError: no budget for run 2"}
    # raised: not written, and not retried within the sweep (max_retries is for deaths)
    assert [r.get("error") for r in read_jsonl(path)] == ["ValueError: old", None]
    again = run_sweep(configs, path, run, workers=workers, progress=False)
    assert again.complete and again.ran == 2
    assert [r["key"] for r in again.records] == [run_key(c) for c in configs]


def test_killed_driver_loses_nothing_and_writes_no_duplicate(ray_cluster, tmp_path):
    out = tmp_path / "ops"
    argv = [sys.executable, "-m", "bornsparse.cli", "reproduce", "operators", "--tasks", "band",
            "--ks", "1", "--width", "64", "--steps-scale", "0.02", "--batch-size", "8",
            "--depths", "2", "3", "4", "5", "6", "7", "8", "9", "--no-plots", "--no-progress",
            "--executor", "ray", "--address", ray_cluster, "--out", str(out)]
    results = out / "results.jsonl"
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.read_text().count("\n") >= 2):
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no record within 120 s"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    before = results.read_text()
    configs = _operator_configs(range(2, 10), width=64)
    for c in configs:
        c["steps_scale"] = 0.02
    kept = [r["key"] for r in read_jsonl(results)]
    assert 2 <= len(kept) < len(configs)  # killed mid-sweep

    rerun = operators.run_sweep(configs, results, progress=False, executor="ray")
    assert rerun.complete and rerun.ran == len(configs) - len(kept)
    assert results.read_text().startswith(before)  # finished records untouched
    keys = [r["key"] for r in read_jsonl(results)]
    assert sorted(keys) == sorted(run_key(c) for c in configs)  # all there, none twice


@pytest.mark.parametrize(("extra", "message"), [
    (["--executor", "ray"], "pip install 'bornsparse[ray]'"),
    (["--address", "auto"], "--address and --cpus-per-run need --executor ray"),
    (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--max-retries", "-1"], "--max-retries must be an integer >= 0, got -1"),
])
def test_executor_flags_fail_before_training(tmp_path, capsys, monkeypatch, extra, message):
    from bornsparse.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    argv = ["reproduce", "operators", "--tasks", "band", "--ks", "1", "--depths", "2",
            "--width", "16", "--out", str(tmp_path)]
    assert cli_main(argv + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()


def test_default_workers_never_oversubscribe_the_cores(monkeypatch):
    import argparse

    from bornsparse.experiments.sweep import add_executor_arguments, executor_options

    parser = argparse.ArgumentParser()
    add_executor_arguments(parser, default_workers=2)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert executor_options(parser.parse_args([]))["workers"] == 2  # 2 runs × 1 thread
    assert executor_options(parser.parse_args(["--threads", "2"]))["workers"] == 1
    assert executor_options(parser.parse_args(["--threads", "4"]))["workers"] == 1
    assert executor_options(parser.parse_args(["--threads", "2", "--workers", "2"]))[
        "workers"] == 2  # asked for explicitly: as asked
