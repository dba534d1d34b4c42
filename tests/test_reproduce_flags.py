"""The three ``bornsparse reproduce`` commands share their flags: same names, same parsing,
same meaning in the configurations they build, same errors, and the same scaffold
(experiments/command.py)."""

from __future__ import annotations

import pytest

from bornsparse.cli import build_parser
from bornsparse.cli import main as cli_main
from bornsparse.experiments import dctps, operators, structured

COMMANDS = {"operators": operators, "dctps": dctps, "structured": structured}
# the shared flags that apply to each command (every command has --quick, --seeds, --out,
# --no-plots, --no-progress, --report-only and the executor flags)
APPLIES = {
    "operators": {"--batch-size"},
    "dctps": {"--datasets", "--models", "--methods", "--epochs", "--batch-size", "--lr"},
    "structured": {"--datasets", "--methods", "--epochs", "--batch-size", "--lr"},
}
SHARED = {"--datasets", "--models", "--methods", "--epochs", "--batch-size", "--lr"}
EVERYWHERE = ["--quick", "--seeds", "--out", "--no-plots", "--no-progress", "--report-only",
              "--executor", "--address", "--cpus-per-run", "--workers", "--threads",
              "--max-retries"]
# a small grid per command, so that building its configurations is cheap
SMALL = {
    "operators": ["--tasks", "band", "--ks", "1", "--depths", "2", "--width", "16"],
    "dctps": ["--datasets", "digits", "--models", "mlp", "--methods", "dctps",
              "--densities", "0.1"],
    "structured": ["--datasets", "digits", "--methods", "lowrank", "--budgets", "0.25",
                   "--width", "16"],
}


def _parse(command: str, argv: list[str]):
    return build_parser().parse_args(["reproduce", command, *argv])


def _actions(command: str) -> dict[str, object]:
    """{option string: argparse action} of a command's parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["reproduce"]
    cmd = next(a for a in sub._actions if a.dest == "experiment").choices[command]
    return {s: a for a in cmd._actions for s in a.option_strings}


def _seeds(command: str, configs: list[dict]) -> set[int]:
    return {c["seed"] for c in configs}


def _batch_sizes(command: str, configs: list[dict]) -> set[int]:
    key = (lambda c: c["batch_size"]) if command == "operators" else (
        lambda c: c["train"]["batch_size"])
    return {key(c) for c in configs}


def test_each_command_has_exactly_the_shared_flags_that_apply():
    for command, applies in APPLIES.items():
        flags = _actions(command)
        for flag in EVERYWHERE:
            assert flag in flags, (command, flag)
        for flag in SHARED:
            assert (flag in flags) == (flag in applies), (command, flag)


def test_a_shared_flag_is_parsed_the_same_way_by_every_command():
    seen: dict[str, tuple] = {}
    for command in COMMANDS:
        for flag, action in _actions(command).items():
            if flag not in SHARED and flag not in EVERYWHERE:
                continue
            # the new spelling first; one destination, type, arity and default everywhere
            how = (action.option_strings[0], action.dest, action.type, action.nargs,
                   action.const, action.default if flag != "--out" else None)
            assert seen.setdefault(flag, how) == how, (command, flag)
    argv = ["--quick", "--seeds", "2", "--out", "o", "--no-plots", "--no-progress",
            "--report-only", "--workers", "1", "--threads", "2", "--max-retries", "0"]
    parsed = [vars(_parse(c, argv)) for c in COMMANDS]
    for name in ("quick", "seeds", "out", "no_plots", "no_progress", "report_only",
                 "workers", "threads", "max_retries", "executor"):
        assert len({repr(p[name]) for p in parsed}) == 1, name
    assert parsed[0]["seeds"] == 2 and parsed[0]["threads"] == 2


def test_old_dctps_spellings_are_aliases_of_the_new_ones():
    new = _parse("dctps", ["--datasets", "digits", "mnist1d", "--models", "mlp"])
    old = _parse("dctps", ["--dataset", "digits", "mnist1d", "--model", "mlp"])
    assert (new.datasets, new.models) == (old.datasets, old.models) == (
        ["digits", "mnist1d"], ["mlp"])
    flags = _actions("dctps")
    assert flags["--dataset"] is flags["--datasets"] and flags["--model"] is flags["--models"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_seeds_n_means_seeds_0_to_n_minus_1(command):
    module = COMMANDS[command]
    configs, info = module.build_configs(_parse(command, SMALL[command] + ["--seeds", "3"]))
    assert _seeds(command, configs) == {0, 1, 2} and info["seeds"] == 3
    default, _ = module.build_configs(_parse(command, SMALL[command]))
    # default: 3 seeds for the two training comparisons, seed 0 for operator learning
    assert _seeds(command, default) == ({0} if command == "operators" else {0, 1, 2})
    quick, _ = module.build_configs(_parse(command, SMALL[command] + ["--quick"]
                                           if command != "dctps" else
                                           ["--quick", "--methods", "dctps"]))
    assert _seeds(command, quick) == {0}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_recipe_flags_mean_the_same_in_every_command(command):
    module = COMMANDS[command]
    argv = SMALL[command] + ["--batch-size", "32"]
    if "--epochs" in APPLIES[command]:
        argv += ["--epochs", "2", "--lr", "0.5"]
    args = _parse(command, argv)
    configs, _ = module.build_configs(args)
    assert _batch_sizes(command, configs) == {32}
    if "--epochs" in APPLIES[command]:
        assert {(c["train"]["epochs"], c["train"]["lr"]) for c in configs} == {(2, 0.5)}
    if "--datasets" in APPLIES[command]:
        assert {c["dataset"] for c in configs} == {"digits"}
    if "--methods" in APPLIES[command]:  # dense, the reference, is always added
        assert {c["method"] for c in configs} == {"dense", *args.methods}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("extra", "message"), [
    (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--workers", "0"], "--workers must be a positive integer, got 0"),
])
def test_bad_shared_flags_fail_the_same_way(tmp_path, capsys, command, extra, message):
    out = tmp_path / "o"
    argv = ["reproduce", command, *SMALL[command], "--out", str(out), *extra]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err == f"bornsparse reproduce {command}: error: {message}\n"
    assert not out.exists() or not (out / "results.jsonl").exists()


@pytest.mark.parametrize("command", ["dctps", "structured"])
def test_report_only_trains_nothing_in_every_command(tmp_path, capsys, command):
    out = tmp_path / "o"
    argv = ["reproduce", command, *SMALL[command], "--seeds", "1", "--report-only",
            "--out", str(out)]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "report only: 0 of the 2 runs are finished" in err
    assert not (out / "results.jsonl").exists()
    assert (out / "table.md").read_text() == "(no runs)\n"


def test_commands_not_sharing_a_flag_reject_it(capsys):
    for command, flag in (("operators", "--epochs"), ("operators", "--datasets"),
                          ("structured", "--models")):
        with pytest.raises(SystemExit) as exc:
            _parse(command, [flag, "1"])
        assert exc.value.code == 2
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
