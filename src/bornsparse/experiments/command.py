"""One skeleton for every ``bornsparse reproduce`` command.

A command (``operators``, ``dctps``, ``structured``) is an :class:`Experiment`: what differs
between them (its own flags, how flags become run configurations, its sweep, the table and
the figures). :func:`add_arguments` gives each the
shared flags with one meaning everywhere, and :func:`main` is the one scaffold:

1. validate every flag (configurations, executor flags, a torchrun launch, the output
   folder) and exit 2 with ``prog: error: ...`` on bad input, before anything trains;
2. prepare (load the data once, so a missing file fails here, and caches exist before
   workers start), print the header line;
3. run the sweep (:func:`bornsparse.experiments.sweep.run_sweep`: finished runs are skipped,
   a run that raises is reported failed, not written, and retried by the next call), or with
   ``--report-only`` read what has finished;
4. print the outcome, write ``table.md`` and the figures, print the table; exit 0 if every
   run finished, else 1.

The helpers below build configurations from flags: :func:`pick` defaults a flag from the
quick or the full recipe, the checks raise ValueError naming the flag, the value and what
was expected. Only the standard library is imported at module level (the CLI builds its
parser from here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")
Record = dict[str, Any]

#: what a bad flag, file or missing optional dependency raises while a command validates
INPUT_ERRORS = (ValueError, TypeError, ImportError)


class Plan(NamedTuple):
    """What a command will run: ``configs`` (one JSON-serialisable dict per run) and
    ``info`` (what the header and the report need: ``info["description"]`` the header's
    text, ``info["notes"]`` lines printed after it)."""

    configs: list[dict[str, Any]]
    info: dict[str, Any]


@dataclass(frozen=True)
class SharedFlags:
    """Where each shared flag applies to a command, as the text its help ends with (None:
    the flag does not apply). ``aliases``: older spellings of a flag, by destination
    (``{"datasets": ("--dataset",)}``), accepted in the same argument."""

    quick: str  # what --quick runs
    seeds: str  # the default count, e.g. "3; quick 1"
    out: str  # the default output folder
    datasets: str | None = None
    models: str | None = None
    methods: str | None = None
    epochs: str | None = None
    batch_size: str | None = None
    lr: str | None = None
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """A ``bornsparse reproduce`` command, by what differs from the others.

    * ``own_arguments(parser)``: its own flags;
    * ``plan(args) -> Plan``: validates every flag (ValueError naming it);
      ``info["description"]`` is the header's text;
    * ``sweep(configs, results_path, **options)``: its ``run_sweep``, given the
      :func:`bornsparse.experiments.sweep.run_sweep` options (progress, executor) and
      ``info["sweep_options"]``; returns the ``SweepOutcome``;
    * ``report(records, info, failed) -> str``: the markdown of ``table.md`` (``failed``:
      ``SweepOutcome.failed``, empty with --report-only);
    * ``figures``: functions ``(records, out) -> [paths]``;
    * ``prepare(plan, args)``: before the first run (load the data); its ValueError or
      FileNotFoundError exits 2;
    * ``data_parallel_batches(info)``: the global batch sizes, for a command that trains
      each run data-parallel under torchrun (None: it does not).
    """

    name: str
    flags: SharedFlags
    own_arguments: Callable[[argparse.ArgumentParser], None]
    plan: Callable[[argparse.Namespace], Plan]
    sweep: Callable[..., Any]
    report: Callable[[list[Record], dict[str, Any], list[dict[str, Any]]], str]
    figures: Sequence[Callable[[list[Record], Path], list[Path]]]
    prepare: Callable[[Plan, argparse.Namespace], None] | None = None
    data_parallel_batches: Callable[[dict[str, Any]], Iterable[int]] | None = None
    # at most 2 parallel runs unless --workers says otherwise (shared 2-core machines)
    default_workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))

    @property
    def prog(self) -> str:
        return f"bornsparse reproduce {self.name}"


# ---------------------------------------------------------------------------------------
# Flags


def add_arguments(parser: argparse.ArgumentParser, experiment: Experiment) -> None:
    """The shared flags, ``experiment``'s own (after --methods) and the executor flags."""
    from bornsparse.experiments.sweep import add_executor_arguments

    f = experiment.flags

    def names(dest: str) -> list[str]:
        return [f"--{dest.replace('_', '-')}", *f.aliases.get(dest, ())]

    parser.add_argument("--quick", action="store_true",
                        help=f"the small version, what `bornsparse demo` runs: {f.quick} "
                        "(explicit flags still override)")
    for dest, what, after in (("datasets", "data sets to run on", ""),
                              ("models", "models to train", ""),
                              ("methods", "methods to compare", "; dense, the reference, is "
                               "always added")):
        text = getattr(f, dest)
        if text is not None:
            parser.add_argument(*names(dest), dest=dest, nargs="+", default=None,
                                metavar=dest[:-1].upper(), help=f"{what}: {text}{after}")
    experiment.own_arguments(parser)
    parser.add_argument(*names("seeds"), dest="seeds", type=int, default=None, metavar="N",
                        help=f"run seeds 0..N-1 (default {f.seeds})")
    for dest, kind, what in (("epochs", int, "training epochs per run"),
                             ("batch_size", int, "examples per training step"),
                             ("lr", float, "peak learning rate, cosine-annealed to 0")):
        text = getattr(f, dest)
        if text is not None:
            parser.add_argument(*names(dest), dest=dest, type=kind, default=None,
                                help=f"{what} (default {text})")
    add_executor_arguments(parser, default_workers=experiment.default_workers)
    parser.add_argument("--out", default=f.out, metavar="DIR",
                        help=f"results.jsonl, table.md and figures go here (default {f.out}); "
                        "rerunning with the same DIR skips finished runs and retries failed "
                        "ones")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the table and figures from the runs of "
                        "this grid already finished in DIR/results.jsonl (missing points "
                        "are left out and counted)")


def entry_points(
    make: Callable[[], Experiment],
) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """A command module's ``(add_arguments(parser), main(args) -> int)``, what the CLI and
    the demo call, for the :class:`Experiment` that ``make()`` builds when first needed (its
    parts import the command's heavier modules)."""

    def add(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser, make())

    def run(args: argparse.Namespace) -> int:
        return main(make(), args)

    return add, run


# ---------------------------------------------------------------------------------------
# Configurations from flags


def pick(value: T | None, *, quick: bool, quick_value: T, full_value: T) -> T:
    """A flag's value, or when it was not given, the quick or the full recipe's."""
    if value is not None:
        return value
    return quick_value if quick else full_value


def positive_int(flag: str, value: int) -> int:
    """``value``, or ValueError naming ``flag`` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")
    return value


def positive_float(flag: str, value: float) -> float:
    """``value``, or ValueError naming ``flag`` unless it is a number > 0."""
    if not value > 0:
        raise ValueError(f"{flag} must be positive, got {value}")
    return float(value)


def positive_ints(flag: str, values: Sequence[int], *, what: str = "entry") -> list[int]:
    """``values`` as a list, or ValueError naming ``flag`` and the first entry below 1."""
    for v in values:
        if v < 1:
            raise ValueError(f"{flag}: every {what} must be a positive integer, got {v}")
    return list(values)


def distinct(flag: str, values: Sequence[T]) -> list[T]:
    """``values`` as a list, or ValueError naming ``flag`` if one is repeated."""
    if len(set(values)) != len(values):
        raise ValueError(f"{flag}: repeated values in {list(values)}")
    return list(values)


def fractions(flag: str, values: Sequence[float], *, what: str) -> list[float]:
    """Distinct values in (0, 1) (densities, budgets), or ValueError naming ``flag``."""
    for v in values:
        if not 0.0 < v < 1.0:
            raise ValueError(f"{flag}: every {what} must lie in (0, 1), got {v!r}")
    return distinct(flag, values)


def choices(flag: str, values: Sequence[str], allowed: Iterable[str], *, what: str) -> list[str]:
    """Distinct names among ``allowed``, or ValueError naming ``flag``, the value and the
    expected names."""
    allowed = list(allowed)
    for v in values:
        if v not in allowed:
            raise ValueError(f"{flag}: unknown {what} {v!r}; expected one of "
                             f"{', '.join(allowed)}")
    return distinct(flag, values)


def seed_list(value: int | None, *, quick: bool, quick_count: int = 1,
              full_count: int = 3) -> list[int]:
    """--seeds N: seeds 0..N-1 (default ``full_count``, quick ``quick_count``)."""
    n = pick(value, quick=quick, quick_value=quick_count, full_value=full_count)
    return list(range(positive_int("--seeds", n)))


# ---------------------------------------------------------------------------------------
# The scaffold


def main(experiment: Experiment, args: argparse.Namespace) -> int:
    """Validate, prepare, sweep (or read what finished), report; the exit code (0 every
    run finished, 1 some did not, 2 bad input)."""
    from bornsparse.experiments.distributed import launch_world, process_group
    from bornsparse.experiments.results_io import ensure_writable_dir
    from bornsparse.experiments.sweep import check_executor_arguments

    try:
        plan = experiment.plan(args)
        check_executor_arguments(args)
        world = 1
        if experiment.data_parallel_batches is not None:
            world = launch_world(args.executor, experiment.data_parallel_batches(plan.info))
        out = ensure_writable_dir(args.out, name="--out directory")
    except INPUT_ERRORS as err:
        return _bad_input(experiment, err)
    with process_group(world):
        return _run_and_report(experiment, args, plan, out)


def _bad_input(experiment: Experiment, err: BaseException) -> int:
    print(f"{experiment.prog}: error: {err}", file=sys.stderr)
    return 2


def _run_and_report(experiment: Experiment, args: argparse.Namespace, plan: Plan,
                    out: Path) -> int:
    """Steps 2-4 of the module docstring; under torchrun rank 0 alone prints and writes."""
    from bornsparse.experiments.distributed import rank_and_world
    from bornsparse.experiments.results_io import finished_records
    from bornsparse.experiments.sweep import describe_executor, executor_options

    rank, world = rank_and_world()
    if experiment.prepare is not None and not args.report_only:
        try:
            experiment.prepare(plan, args)
        except (*INPUT_ERRORS, FileNotFoundError) as err:
            return _bad_input(experiment, err)
    path = out / "results.jsonl"
    say = print if rank == 0 else (lambda *a, **k: None)
    how = f"{world} data-parallel ranks" if world > 1 else describe_executor(args)
    say(f"{len(plan.configs)} runs: {plan.info['description']}, {how}; results in "
        f"{path}", file=sys.stderr)
    for note in plan.info.get("notes", ()):
        say(note, file=sys.stderr)
    t0 = time.perf_counter()
    if args.report_only:
        records, failed, complete = finished_records(plan.configs, path), [], True
        say(f"report only: {len(records)} of the {len(plan.configs)} runs are finished",
            file=sys.stderr)
    else:
        options = {"progress": not args.no_progress, **executor_options(args)}
        if world > 1:
            options["workers"] = 1  # the ranks are the parallelism
        outcome = experiment.sweep(plan.configs, path, **options,
                                   **plan.info.get("sweep_options", {}))
        records, failed, complete = outcome.records, outcome.failed, outcome.complete
        say(outcome.summary(), file=sys.stderr)
    if rank > 0:
        return 0
    text = experiment.report(records, plan.info, failed)
    (out / "table.md").write_text(text)
    if not args.no_plots:
        for plot in experiment.figures:
            for figure in plot(records, out):
                print(f"wrote {figure}", file=sys.stderr)
    print(text)
    print(f"sweep wall time {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0 if complete else 1
