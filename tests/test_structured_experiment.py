"""``bornsparse reproduce structured``: budgets, records, resume, report, CLI, the demo step."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bornsparse.cli import build_parser
from bornsparse.cli import main as cli_main
from bornsparse.experiments import demo, structured
from bornsparse.experiments.results_io import read_jsonl
from bornsparse.experiments.structured_methods import (
    BUDGET_TOLERANCE,
    METHODS,
    block_size_choice,
    budget_params,
    build_block,
    build_mlp,
    trainable_params,
)
from bornsparse.experiments.structured_report import accuracy_table, markdown_report, summarize

# width 16, one hidden block, one epoch of digits (12 steps), one budget: every method in ~1 s
TINY = ["reproduce", "structured", "--datasets", "digits", "--width", "16", "--blocks", "1",
        "--epochs", "1", "--budgets", "0.25", "--seeds", "1", "--workers", "1",
        "--no-progress"]
RECORD_FIELDS = ("key", "config", "method", "dataset", "budget", "seed", "accuracy",
                 "trainable_params", "hidden_params", "budget_params", "budget_error", "size",
                 "stored_bytes", "hidden_stored_bytes", "fb_ms", "step_ms", "timed_steps",
                 "memory_bytes", "peak_memory_bytes", "wall_s", "versions")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    structured.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("structured")
    argv = TINY + ["--out", str(out)]
    return out, argv, cli_main(argv)


# --- budgets ----------------------------------------------------------------------------

@pytest.mark.parametrize("budget", structured.BUDGETS)
def test_budgets_are_met_at_the_default_width(budget):
    n = structured.WIDTH
    target = budget_params(n, budget)
    assert target == round(budget * n * n) + n
    for method in METHODS:
        if method == "dense":
            continue
        block, size = build_block(method, n, budget, seed=0)
        got = trainable_params(block)
        assert size == block_size_choice(method, n, budget)
        # powers of two: every structure but h_θ (3·n per factor) hits the count exactly
        if method == "permuted_tanh":
            assert got != target and abs(got / target - 1) <= BUDGET_TOLERANCE
        else:
            assert got == target, (method, size)


def test_budget_choices_are_the_closest_the_structure_allows():
    n, budget = 512, 1 / 32
    target = budget_params(n, budget)
    assert block_size_choice("lowrank", n, budget) == {"rank": 8}
    assert block_size_choice("monarch", n, budget) == {"nblocks": 64}  # 8×8 blocks
    assert block_size_choice("permuted", n, budget) == {"depth": 8}
    assert block_size_choice("permuted", n, budget, block_size=8) == {"depth": 2,
                                                                       "block_size": 8}
    d = block_size_choice("permuted_tanh", n, budget)["depth"]
    for other in (d - 1, d + 1):  # neighbours are further off in ratio
        assert abs(math.log(3 * n * other / target)) > abs(math.log(3 * n * d / target))
    assert block_size_choice("permuted_offset", n, budget)["offset_depth"] == 18  # 2·log2 512
    assert block_size_choice("permuted_offset_small", n, budget)["offset_depth"] == 2
    # a width that is not a power of two still gets the nearest Monarch block count
    assert block_size_choice("monarch", 96, 1 / 32) == {"nblocks": 48}


@pytest.mark.parametrize(("args", "match"), [
    (("lowrank", 16, None), "needs a budget"),
    (("lowrank", 16, 1.5), "budget must be a fraction"),
    (("circulant", 16, 0.1), "method must be one of"),
    (("permuted", 15, 0.1), "block_size must be at least 2 and divide width = 15"),
])
def test_block_size_choice_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        block_size_choice(*args)


def test_blocks_map_width_to_width_and_the_mlp_only_varies_its_blocks():
    x = torch.randn(5, 1, 8, 8)
    dense, _ = build_mlp("dense", input_shape=(1, 8, 8), num_classes=10, width=16, blocks=2,
                         budget=None, seed=3)
    for method in METHODS:
        model, _ = build_mlp(method, input_shape=(1, 8, 8), num_classes=10, width=16,
                             blocks=2, budget=0.25, seed=3)
        assert model(x).shape == (5, 10)
        # same seed, same input layer and classifier whatever the hidden blocks are
        torch.testing.assert_close(model.inp.weight, dense.inp.weight)
        torch.testing.assert_close(model.out.weight, dense.out.weight)
        assert (model.penalty() is not None) == (method in ("permuted", "permuted_tanh"))


def test_penalty_weight_follows_the_papers_schedule():
    sched = [list(p) for p in structured.PENALTY_SCHEDULE]
    assert [structured.penalty_weight(sched, s, 120) for s in (0, 69, 70, 119)] == [
        3.0, 3.0, 0.3, 0.3]


# --- the command end to end -----------------------------------------------------------

def test_records_have_the_fields_and_budgets_are_matched(tiny_run):
    out, _, rc = tiny_run
    assert rc == 0
    recs = read_jsonl(out / "results.jsonl")
    # width 16 at 1/4: G(θ) at k = 2, 4, 8 (k = 8: 128 + 16 against 80, +80%, not run)
    assert sorted(r["method"] for r in recs) == sorted([*METHODS, "permuted"])
    assert sorted(r["block_size"] for r in recs if r["method"] == "permuted") == [2, 4]
    assert {r["train_samples"] for r in recs} == {1437}
    for r in recs:
        for field in RECORD_FIELDS:
            assert field in r, (r["method"], field)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["dataset"] == "digits" and r["seed"] == 0
        assert r["fb_ms"] > 0 and r["step_ms"] > 0
        # 1437 training images in batches of 128: 12 steps, the first 6 not timed (warm-up)
        assert r["steps"] == 12 and r["timed_steps"] == 6
        assert r["peak_memory_bytes"] == r["memory_bytes"]["training"] + \
            r["memory_bytes"]["activations"] > 0
        assert r["stored_bytes"] > r["hidden_stored_bytes"] > 0
        if r["method"] == "dense":
            assert r["budget"] is None and r["hidden_params"] == 16 * 16 + 16
        else:
            assert r["budget"] == 0.25 and r["budget_params"] == 64 + 16
            assert abs(r["budget_error"]) <= BUDGET_TOLERANCE
            assert r["hidden_params"] == round(r["budget_params"] * (1 + r["budget_error"]))
        assert (r["final_penalty"] is not None) == (r["method"] in ("permuted",
                                                                    "permuted_tanh"))
    by = {r["method"]: r for r in recs if r["block_size"] in (None, 2)}
    # the input layer (64·16 + 16) and classifier (16·10 + 10) are dense for everyone
    assert by["lowrank"]["trainable_params"] == 1040 + 80 + 170
    assert by["dense"]["peak_memory_bytes"] > by["lowrank"]["peak_memory_bytes"]


def test_table_and_figures_are_written(tiny_run, capsys):
    out, _, _ = tiny_run
    table = (out / "table.md").read_text()
    assert "### digits: test accuracy (%)" in table and "| 1/4 |" in table
    for name, m in METHODS.items():
        assert f"| {'G(θ) k=2' if name == 'permuted' else m.label} |" in table
    assert "| low rank | 1/4 | r=2 | 80 | +0.0% |" in table
    assert "| G(θ) k=4 | 1/4 | N=1 | 80 | +0.0% |" in table
    assert "Not run: G(θ) k=8 at 1/4" in table
    # the headline: every layer's gap to dense and its time against dense's
    head = table.split("### digits: which layer, per budget")[1].split("###")[0]
    assert "1,437 training samples" in head and "| dense | dense | — |" in head
    assert head.count("| 1/4 |") == len(METHODS) - 1 + 1  # + G(θ) k=4
    assert (out / "accuracy_digits.png").stat().st_size > 10_000
    assert (out / "pareto_digits.png").stat().st_size > 10_000


def test_rerun_does_no_new_runs_and_a_partial_file_is_completed(tiny_run):
    out, argv, _ = tiny_run
    path = out / "results.jsonl"
    before = path.read_text()
    assert cli_main(argv + ["--no-plots"]) == 0
    assert path.read_text() == before  # nothing was run

    # a run killed before its record and a run torn mid-write: only those two are redone
    lines = before.splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-1][: len(lines[-1]) // 2])
    with pytest.warns(UserWarning, match="skipped 1"):
        assert cli_main(argv + ["--no-plots"]) == 0
    with pytest.warns(UserWarning, match="skipped 1"):
        recs = read_jsonl(path)
    assert len(recs) == len(lines)
    assert {r["key"] for r in recs} == {json.loads(ln)["key"] for ln in lines}
    assert path.read_text().startswith("".join(lines[:-2]))  # old records kept as they were


def test_report_keeps_methods_in_order_and_marks_diverged_runs():
    base = {"dataset": "mnist1d", "seed": 0, "hidden_params": 80, "trainable_params": 300,
            "budget_error": 0.0, "size": {"rank": 2}, "fb_ms": 1.0, "stored_bytes": 10,
            "hidden_stored_bytes": 5, "peak_memory_bytes": 100, "config": {"blocks": 1}}
    recs = [dict(base, method="lowrank", budget=0.25, accuracy=0.5),
            dict(base, method="lowrank", budget=0.25, accuracy=0.7, seed=1),
            dict(base, method="monarch", budget=0.25, accuracy=None),
            dict(base, method="dense", budget=None, accuracy=0.9)]
    cell = summarize(recs)["mnist1d"][("lowrank", 0.25)]
    assert cell["acc"] == pytest.approx(60.0) and cell["acc_std"] == pytest.approx(14.142, 1e-3)
    table = accuracy_table(summarize(recs)["mnist1d"])
    assert table.splitlines()[2:] == ["| dense | 90.0 |", "| low rank | 60.0 ± 14.1 |",
                                      "| Monarch | diverged |"]
    assert "hold 220 parameters" in markdown_report(recs)


# --- command line and the demo ----------------------------------------------------------

@pytest.mark.parametrize(("extra", "match"), [
    (["--datasets", "cifar10"], "unknown data set 'cifar10'"),
    (["--methods", "butterfly"], "unknown method 'butterfly'"),
    (["--budgets", "1.0"], "every budget must lie in (0, 1)"),
    (["--budgets", "0.1", "0.1"], "repeated values"),
    (["--width", "15"], "--width must be an even integer"),
    (["--seeds", "0"], "--seeds must be a positive integer"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--lr", "0"], "--lr must be positive"),
    (["--workers", "0"], "--workers"),
])
def test_cli_rejects_bad_input_before_training(tmp_path, capsys, extra, match):
    out = tmp_path / "s"
    assert cli_main(TINY + ["--out", str(out)] + extra) == 2
    assert match in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()


def test_cli_parses_and_help_lists_the_command(capsys):
    args = build_parser().parse_args(["reproduce", "structured", "--quick", "--seeds", "2"])
    assert args._main is structured.main and args.quick and args.seeds == 2
    for argv in (["reproduce", "--help"], ["reproduce", "structured", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "structured" in text and "--budgets" in text and "1/128 1/32 1/8" in text


def test_quick_config_is_what_the_demo_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "_run_experiment", lambda name, argv: calls.append((name, argv)))
    assert cli_main(["demo", "--out", str(tmp_path), "--n-half", "4", "--steps", "12"]) == 0
    (argv,) = [a for name, a in calls if name == "structured"]
    assert argv == demo.QUICK_STRUCTURED_ARGV + ["--out", str(tmp_path / "structured")]
    configs, info = structured.build_configs(_parse(argv))
    assert configs == structured.build_configs(_parse(["--quick"]))[0]
    # one seed of every method at every budget on MNIST-1D, a few epochs
    assert info["datasets"] == ["mnist1d"] and info["seeds"] == 1
    # quick: G(θ) at k = 2 at every budget, k = 8 at 1/32 and 1/8 (one factor: 1/64 of 512²)
    assert len(configs) == 1 + (len(METHODS) - 2) * len(structured.BUDGETS) + 3 + 2
    assert {c["samples"] for c in configs} == {structured.QUICK_SAMPLES}
    assert info["too_big"] == [("permuted", 8, 1 / 128)]
    assert {c["train"]["epochs"] for c in configs} == {structured.QUICK["epochs"]}
    full, full_info = structured.build_configs(_parse([]))
    # three seeds, both data sets, G(θ) at k = 2, 4 at 1/128, 2, 4, 8 at 1/32, all at 1/8
    assert len(full) == 3 * 2 * (len(configs) + 4)
    assert [b for _, k, b in full_info["too_big"] if k == 32] == [1 / 128, 1 / 32]
    assert {c["samples"] for c in full} == {structured.SAMPLES, None}  # None: digits
    bigger, _ = structured.build_configs(_parse(["--quick", "--samples", "20000"]))
    assert {c["samples"] for c in bigger} == {20000}


def test_samples_and_block_sizes_are_checked():
    with pytest.raises(ValueError, match="--samples must be at least 100"):
        structured.build_configs(_parse(["--samples", "50"]))
    with pytest.raises(ValueError, match="--block-sizes: every block size must be at least 2 "
                                         "and divide --width 512, got 3"):
        structured.build_configs(_parse(["--block-sizes", "2", "3"]))
    configs, _ = structured.build_configs(_parse(["--quick", "--block-sizes", "16",
                                                  "--methods", "permuted"]))
    assert {c["block_size"] for c in configs if c["method"] == "permuted"} == {16}
