"""The demo (`bornsparse demo`, what `make demo` runs): its steps and their exit codes."""

from __future__ import annotations

from bornsparse.cli import main as cli_main
from bornsparse.experiments import demo

ARGV = ["--n-half", "4", "--steps", "12"]


def _fake_steps(monkeypatch, status_of):
    calls = []

    def run(name, argv):
        calls.append(name)
        return status_of.get(name, 0)

    monkeypatch.setattr(demo, "_run_experiment", run)
    return calls


def test_a_step_with_failed_runs_does_not_stop_the_tour(tmp_path, monkeypatch, capsys):
    # exit 1: some runs raised (listed, n/a† in the table, retried on rerun)
    calls = _fake_steps(monkeypatch, {"dctps": 1})
    assert cli_main(["demo", "--out", str(tmp_path), *ARGV]) == 0
    assert calls == ["operators", "dctps", "structured"]
    assert "Runs failed in: dctps" in capsys.readouterr().out


def test_bad_input_in_a_step_stops_the_tour(tmp_path, monkeypatch):
    calls = _fake_steps(monkeypatch, {"dctps": 2})
    assert cli_main(["demo", "--out", str(tmp_path), *ARGV]) == 2
    assert calls == ["operators", "dctps"]
