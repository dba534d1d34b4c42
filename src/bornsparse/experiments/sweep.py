"""One sweep runner for every ``reproduce`` command.

:func:`run_sweep` takes the list of run configurations, skips those whose record is already
in ``results.jsonl``, runs the rest on an executor and appends each finished run's record
from this process (the driver) only, so the file has one writer and the torn-line rules of
:mod:`results_io` hold whatever runs the work:

* ``local`` (default): inline for one worker, else a pool of spawned processes (fork after
  torch/numba started their threads is unsafe). A worker process that dies breaks the pool
  and every run in flight with it, and which one died is unknown: those runs are rerun one
  at a time in a fresh pool, and a run whose worker dies while it runs alone is retried up
  to ``max_retries`` times.
* ``ray``: each run is a Ray task with ``cpus_per_run`` CPUs (default: ``threads``) on the
  cluster at ``address`` (``ray start --head`` ...) or, with none, on a local one started here
  and stopped afterwards. Ray retries a task whose worker died ``max_retries`` times.

Every run gets exactly ``threads`` compute threads whichever executor runs it and whatever
thread variables the environment exports (:func:`use_threads`), so records agree across
executors. One failure policy for every experiment: a run that raises, or whose worker keeps
dying, is reported in :attr:`SweepOutcome.failed` and not written, so a rerun retries it
(a record written with an ``error`` field, as failed runs once were, counts as not run:
:func:`results_io.is_finished`); nothing is dropped silently. Under torch.distributed
(``torchrun``) every rank runs each run together (a data-parallel run,
:mod:`bornsparse.experiments.distributed`); rank 0 decides what is left to do and writes the
records.

Only the standard library is imported at module level: the CLI builds its parser from here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

EXECUTORS = ("local", "ray")
DEFAULT_MAX_RETRIES = 2

Record = dict[str, Any]
RunFn = Callable[[dict[str, Any]], Record]


@dataclass
class SweepOutcome:
    """What a sweep ended with.

    ``records``: the records of the given configurations that are finished (old and new), in
    the order given. ``failed``: one ``{"key", "config", "error"}`` per run that did not
    finish. ``ran``: how many runs finished in this call.
    """

    records: list[Record] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    ran: int = 0

    @property
    def complete(self) -> bool:
        """True when every given run has a record."""
        return not self.failed

    def summary(self) -> str:
        """One line per failed run after a count, for the end of a sweep."""
        total = len(self.records) + len(self.failed)
        lines = [f"{len(self.records)} of {total} runs finished ({self.ran} in this call), "
                 f"{len(self.failed)} failed"]
        lines += [f"  failed {f['key']}: {f['error']}" for f in self.failed]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command-line flags shared by the reproduce commands


def add_executor_arguments(parser: argparse.ArgumentParser, *, default_workers: int) -> None:
    """--executor, --address, --cpus-per-run, --workers, --threads, --max-retries."""
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where runs execute: local processes (default) or Ray tasks "
                        "(pip install 'bornsparse[ray]')")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="with --executor ray: the cluster to use (e.g. 'auto' or "
                        "HOST:6379 from `ray start --head`); default: start a local one")
    parser.add_argument("--cpus-per-run", type=int, default=None, metavar="N",
                        help="with --executor ray: CPUs Ray reserves per run (default "
                        "--threads)")
    parser.add_argument("--workers", type=int, default=None,
                        help="with --executor local: parallel worker processes (inline "
                        f"when 1; default: as many as the cores hold at --threads each, at "
                        f"most {default_workers})")
    parser.set_defaults(workers_cap=default_workers)
    parser.add_argument("--threads", type=int, default=1,
                        help="compute threads of every run, on any executor, whatever "
                        "OMP_NUM_THREADS or MKL_NUM_THREADS say (default 1: the runs, not "
                        "the threads, share the cores)")
    parser.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES,
                        help="times a run is resubmitted after its worker process died "
                        f"(default {DEFAULT_MAX_RETRIES}); a run that raises is reported "
                        "failed, not retried in this sweep, and rerun by the next one")


def check_executor_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the flag for bad executor flags, ImportError if Ray is missing."""
    for name, value in (("--workers", args.workers), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if args.cpus_per_run is not None and args.cpus_per_run < 1:
        raise ValueError(f"--cpus-per-run must be a positive integer, got {args.cpus_per_run}")
    if args.max_retries < 0:
        raise ValueError(f"--max-retries must be an integer >= 0, got {args.max_retries}")
    if args.executor != "ray" and (args.address is not None or args.cpus_per_run is not None):
        raise ValueError(f"--address and --cpus-per-run need --executor ray, got --executor "
                         f"{args.executor}")
    if args.executor == "ray":
        import_ray()


def executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`run_sweep` keyword arguments of the executor flags."""
    workers = args.workers
    if workers is None:
        # workers × threads never more than the cores: oversubscribed runs slow each other
        # (and their timings) several times on a small machine
        cap = getattr(args, "workers_cap", 1)
        workers = max(1, min(cap, (os.cpu_count() or 1) // args.threads))
    return {"executor": args.executor, "workers": workers, "threads": args.threads,
            "address": args.address, "cpus_per_run": args.cpus_per_run,
            "max_retries": args.max_retries}


def describe_executor(args: argparse.Namespace) -> str:
    """How the runs execute, for a sweep's first line."""
    if args.executor == "ray":
        return (f"Ray on {args.address or 'a local cluster'}, "
                f"{args.cpus_per_run or args.threads} CPU(s) per run")
    return f"{executor_options(args)['workers']} worker(s), {args.threads} thread(s) each"


def import_ray():
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "--executor ray needs Ray, which is not installed: pip install 'bornsparse[ray]'"
        ) from err
    return ray


# ---------------------------------------------------------------------------------------
# Threads


# Every variable a thread runtime in the process reads at start-up. torch alone is not
# enough to set: it sizes its OpenMP team from MKL's count when both are present (so an
# exported MKL_NUM_THREADS=2 beat OMP_NUM_THREADS=1 and a worker ran two busy threads), and
# child processes and libraries loaded later read the environment, not torch.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def use_threads(threads: int) -> None:
    """Make this process run ``threads`` compute threads, whatever the environment says.

    Sets every thread variable (:data:`THREAD_VARIABLES`) to ``threads`` for what loads
    later, then torch's own count (which also sets MKL's and the OpenMP team every
    bornsparse kernel runs on). numba's parallel runtime is never used (ops/runtime/region.py),
    so its thread count is only capped through NUMBA_NUM_THREADS, never started.
    """
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_with_threads(run: RunFn, cfg: dict[str, Any], threads: int) -> Record:
    """A Ray task: a worker process may have run other tasks before, so set threads here."""
    use_threads(threads)
    return run(cfg)


# ---------------------------------------------------------------------------------------
# The runner


def _error_text(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def run_sweep(
    configs: Iterable[dict[str, Any]],
    results_path: str | os.PathLike,
    run: RunFn,
    *,
    executor: str = "local",
    workers: int = 1,
    threads: int = 1,
    address: str | None = None,
    cpus_per_run: int | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    order: Callable[[dict[str, Any]], Any] | None = None,
    describe: Callable[[Record], str] | None = None,
    progress: bool = True,
    desc: str = "runs",
) -> SweepOutcome:
    """Run every configuration of ``configs`` without a record in ``results_path``.

    ``run(cfg)`` returns the run's record, whose ``key`` must be ``run_key(cfg)``; it must be
    a module-level function (or a ``functools.partial`` of one) so worker processes can
    unpickle it. ``order`` sorts the runs left to do (e.g. longest first); ``describe(record)``
    is the progress bar's text. Records are appended one fsynced line each, by this process
    only, as runs finish. Other arguments: see the module docstring.
    """
    from tqdm.auto import tqdm

    from bornsparse._checks import check_positive_int
    from bornsparse.experiments.distributed import rank_and_world
    from bornsparse.experiments.results_io import append_jsonl, finished_by_key, run_key

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    workers = check_positive_int("workers", workers)
    threads = check_positive_int("threads", threads)
    cpus = threads if cpus_per_run is None else check_positive_int("cpus_per_run",
                                                                    cpus_per_run)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    configs = list(configs)
    keys = [run_key(c) for c in configs]
    by_key = dict(zip(keys, configs, strict=True))
    rank, world = rank_and_world()
    # rank 0 alone decides what is left; an old record with an `error` is not finished
    done = {} if rank else finished_by_key(results_path, by_key)
    todo = [by_key[k] for k in dict.fromkeys(keys) if k not in done]
    if order is not None:
        todo.sort(key=order)
    outcome = SweepOutcome()
    bar = tqdm(total=len(by_key), initial=len(by_key) - len(todo),
               disable=not progress or rank > 0, desc=desc, unit="run", file=sys.stderr)

    def finished(cfg: dict[str, Any], rec: Any) -> None:
        key = run_key(cfg)
        if not isinstance(rec, dict) or rec.get("key") != key:
            failed(cfg, f"run returned a record without key {key}")
            return
        append_jsonl(results_path, rec)
        done[key] = rec
        outcome.ran += 1
        if describe is not None:
            bar.set_postfix_str(describe(rec))
        bar.update(1)

    def failed(cfg: dict[str, Any], error: str) -> None:
        outcome.failed.append({"key": run_key(cfg), "config": cfg, "error": error})

    try:
        if world > 1:
            if executor != "local" or workers != 1:
                raise ValueError(
                    "under torch.distributed every rank runs each run together: use "
                    f"executor='local' with workers=1, got executor={executor!r}, "
                    f"workers={workers}")
            from bornsparse.experiments.distributed import run_data_parallel

            with _threads_here(threads):
                run_data_parallel(todo, run, finished,
                                  lambda cfg, err: failed(cfg, _error_text(err)))
        elif executor == "ray":
            _run_ray(todo, run, threads, cpus, address, max_retries, finished, failed)
        elif workers == 1 or len(todo) <= 1:
            _run_inline(todo, run, threads, finished, failed)
        else:
            _run_pool(todo, run, min(workers, len(todo)), threads, max_retries, finished,
                      failed)
    finally:
        bar.close()
    outcome.records = [done[k] for k in keys if k in done]
    return outcome


@contextlib.contextmanager
def _threads_here(threads: int):
    """``threads`` compute threads in this process for a while (inline runs), restored
    after, with the thread variables as they were."""
    import torch

    before = torch.get_num_threads(), {k: os.environ.get(k) for k in THREAD_VARIABLES}
    use_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        for name, value in before[1].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_inline(todo, run, threads, finished, failed) -> None:
    with _threads_here(threads):
        for cfg in todo:
            try:
                rec = run(cfg)
            except Exception as err:  # reported as failed; the sweep goes on
                failed(cfg, _error_text(err))
            else:
                finished(cfg, rec)


def _run_pool(todo, run, workers, threads, max_retries, finished, failed) -> None:
    """At most ``workers`` runs in flight. A worker that dies breaks the pool and every run in
    flight with it; those are resubmitted to a fresh pool one at a time, so a death is then
    pinned on its run, which is retried ``max_retries`` times before it is reported failed."""
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from bornsparse.experiments.results_io import run_key

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                   initializer=use_threads, initargs=(threads,))

    pending = deque(todo)
    suspects: set[str] = set()  # were in flight when a pool broke: they run alone
    deaths: dict[str, int] = {}
    inflight: dict = {}
    pool = new_pool()
    try:
        while pending or inflight:
            lost = []
            while pending and len(inflight) < workers:
                solo = run_key(pending[0]) in suspects
                if solo and inflight:
                    break
                cfg = pending.popleft()
                try:
                    inflight[pool.submit(run, cfg)] = cfg
                except BrokenProcessPool:  # a worker died since the last wait
                    lost.append(cfg)
                    break
                if solo:
                    break
            ready, _ = wait(inflight, return_when=FIRST_COMPLETED) if inflight else ((), ())
            for fut in ready:
                cfg = inflight.pop(fut)
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    lost.append(cfg)
                except Exception as err:
                    suspects.discard(run_key(cfg))
                    failed(cfg, _error_text(err))
                else:
                    suspects.discard(run_key(cfg))
                    finished(cfg, rec)
            if not lost:
                continue
            lost += inflight.values()  # they went down with the pool
            inflight.clear()
            pool.shutdown(wait=True, cancel_futures=True)
            pool = new_pool()
            for cfg in lost:
                key = run_key(cfg)
                if len(lost) == 1:  # it ran alone: its own death
                    deaths[key] = deaths.get(key, 0) + 1
                if deaths.get(key, 0) > max_retries:
                    suspects.discard(key)
                    failed(cfg, f"its worker process died {deaths[key]} time(s)")
                else:
                    suspects.add(key)
                    pending.appendleft(cfg)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(todo, run, threads, cpus, address, max_retries, finished, failed) -> None:
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False)
    try:
        task = ray.remote(_run_with_threads).options(num_cpus=cpus, max_retries=max_retries)
        refs = {task.remote(run, cfg, threads): cfg for cfg in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                cfg = refs.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayError as err:  # raised, or its worker kept dying
                    failed(cfg, _error_text(err))
                else:
                    finished(cfg, rec)
    finally:
        if started:
            ray.shutdown()
