"""The operator-learning experiment: training loop, sweep/resume, JSONL, CLI, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bornsparse.cli import main as cli_main
from bornsparse.data import make_target
from bornsparse.experiments.operators import (
    PAPER_SCHEDULE,
    Phase,
    scaled_schedule,
    train_operator,
)
from bornsparse.experiments.operators_report import markdown_table
from bornsparse.experiments.results_io import (
    append_jsonl,
    ensure_writable_dir,
    read_jsonl,
    run_key,
)
from bornsparse.nn import PermutedBlockDiagonal
from bornsparse.nn.permuted import default_depth

# a tiny sweep: width 16, 14/6/4 steps with a 2-step final window
TINY = ["reproduce", "operators", "--width", "16", "--steps-scale", "0.002", "--batch-size", "8",
        "--no-progress"]


def _lines(path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


# --- schedule and training loop -------------------------------------------------------

def test_scaled_schedule():
    assert scaled_schedule(1.0) == (PAPER_SCHEDULE, 1000)
    assert [(p.steps, p.lr, p.penalty) for p in PAPER_SCHEDULE] == [
        (7000, 0.01, 3.0), (3000, 0.01, 0.3), (2000, 0.001, 0.3)]
    phases, window = scaled_schedule(0.1)
    assert [p.steps for p in phases] == [700, 300, 200] and window == 100
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="steps_scale"):
            scaled_schedule(bad)
    with pytest.raises(TypeError, match="steps_scale"):
        scaled_schedule("1")


def test_final_mse_is_the_papers_loss():
    # lr = 0 freezes G, so the mean MSE over many online batches estimates
    # E (2/n)‖G x − A x‖² = ‖W − A‖²_F / m for x ~ N(0, I), W the (m, m) map of G
    m, width, depth, seed = 6, 12, 5, 4
    a = make_target("dense", m, None, seed=1)
    out = train_operator(a, depth=depth, width=width, batch_size=256, seed=seed,
                         schedule=[Phase(150, 0.0, 0.0)], final_window=150)
    w = PermutedBlockDiagonal(m, m, width=width, depth=depth, seed=seed).to_dense()
    expected = float(((w - a) ** 2).sum() / m)
    assert out["final_mse"] == pytest.approx(expected, rel=0.05)
    assert out["params"] == depth * width * 2  # 2×2 blocks: 2 entries per neuron and factor
    assert out["steps"] == 150 and not out["diverged"]


def test_training_learns_a_permutation_and_accepts_numpy():
    a = make_target("permutation", 4, None, seed=0).numpy()
    out = train_operator(a, depth=8, batch_size=16, seed=0,
                         schedule=[Phase(300, 0.01, 3.0), Phase(100, 0.01, 0.3)],
                         final_window=50, curve_points=10)
    first, last = out["curve"][0][1], out["curve"][-1][1]
    assert [s for s, _ in out["curve"]] == list(range(40, 401, 40))
    assert last < 0.2 * first and out["final_mse"] < 0.2 * first


def test_curve_and_final_mse_are_means_over_windows_of_steps():
    # a frozen G (lr 0) sees the same inputs in both runs: one point per step unthinned
    a = make_target("band", 6, 2, seed=0)
    args = {"depth": 3, "batch_size": 4, "seed": 1, "schedule": [Phase(120, 0.0, 0.0)],
            "final_window": 30}
    full = train_operator(a, curve_points=120, **args)
    thin = train_operator(a, curve_points=6, **args)
    mses = [v for _, v in full["curve"]]
    assert [s for s, _ in full["curve"]] == list(range(1, 121))
    assert len(set(mses)) > 100  # a fresh batch every step
    assert [s for s, _ in thin["curve"]] == list(range(20, 121, 20))
    for i, (_, v) in enumerate(thin["curve"]):
        assert v == pytest.approx(sum(mses[20 * i:20 * (i + 1)]) / 20, rel=1e-9)
    assert full["final_mse"] == pytest.approx(sum(mses[-30:]) / 30, rel=1e-9)
    assert thin["final_mse"] == pytest.approx(full["final_mse"], rel=1e-9)


def test_default_operator_is_the_layers_and_any_model_trains_on_the_same_loop():
    m = 8
    a = make_target("lowrank", m, 1, seed=0)
    phases = [Phase(40, 0.01, 3.0)]
    g = train_operator(a, schedule=phases, final_window=10)
    assert g["params"] == default_depth(2 * m, 2) * 2 * m * 2  # width 2m, depth 2·log2(2m)
    assert g["final_penalty"] is not None

    torch.manual_seed(0)
    dense = torch.nn.Linear(m, m, bias=False)
    before = dense.weight.detach().clone()
    out = train_operator(a, model=dense, schedule=phases, final_window=10)
    assert out["params"] == m * m and out["final_penalty"] is None and out["steps"] == 40
    assert not torch.equal(dense.weight.detach(), before)  # trained in place
    assert out["curve"][-1][1] < out["curve"][0][1]
    # the same inputs whatever the model: a zero map scores the MSE of ‖A x‖² alone
    zero = torch.nn.Linear(m, m, bias=False)
    torch.nn.init.zeros_(zero.weight)
    frozen = train_operator(a, model=zero, schedule=[Phase(10, 0.0, 0.0)], final_window=10)
    expected = float((a ** 2).sum() / m)  # E (1/m)‖A x‖² for x ~ N(0, I)
    assert frozen["final_mse"] == pytest.approx(expected, rel=0.3)


def test_tanh_network_trains_and_counts_its_biases():
    a = make_target("band", 4, 2, seed=0)
    out = train_operator(a, depth=3, network="tanh", batch_size=4,
                         schedule=[Phase(5, 0.01, 3.0)], final_window=5)
    assert out["params"] == 3 * 8 * 2 + 3 * 8
    assert out["final_mse"] is not None and out["final_mse"] > 0


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"depth": 0}, ValueError, "depth"),
    ({"depth": 2, "network": "relu"}, ValueError, "network must be one of"),
    ({"depth": 2, "batch_size": 0}, ValueError, "batch_size"),
    ({"depth": 2, "final_window": 99}, ValueError, "final_window"),
    ({"depth": 2, "schedule": []}, TypeError, "schedule"),
    ({"depth": 2, "width": 3}, ValueError, "width must be at least"),
    ({"model": "linear"}, TypeError, "model must be a torch.nn.Module"),
    ({"model": torch.nn.Linear(4, 4), "depth": 2}, ValueError, "leave them out"),
    ({"model": torch.nn.Linear(4, 4), "network": "tanh"}, ValueError, "leave them out"),
])
def test_train_operator_rejects_bad_arguments(kwargs, exc, match):
    args = {"schedule": [Phase(3, 0.01, 0.0)], "final_window": 3, **kwargs}
    with pytest.raises(exc, match=match):
        train_operator(torch.eye(4), **args)


# --- results file -------------------------------------------------------------------

def test_jsonl_append_survives_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"key": "a", "x": 1})
    with open(path, "a") as f:
        f.write('{"key": "b", "x"')  # a writer killed mid-line
    with pytest.warns(UserWarning, match="skipped 1"):
        assert read_jsonl(path) == [{"key": "a", "x": 1}]
    append_jsonl(path, {"key": "c", "x": 3})
    with pytest.warns(UserWarning, match="skipped 1"):
        assert [r["key"] for r in read_jsonl(path)] == ["a", "c"]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_run_key_ignores_key_order_and_sees_values():
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})


def test_ensure_writable_dir(tmp_path):
    assert ensure_writable_dir(tmp_path / "x" / "y").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot be written"):
        ensure_writable_dir(blocker / "sub")


# --- the command line -----------------------------------------------------------------

def test_cli_end_to_end_then_resume(tmp_path, capsys):
    out = tmp_path / "ops"
    argv = TINY + ["--depths", "2", "4", "--ks", "1", "2", "--workers", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    results = out / "results.jsonl"
    # lowrank, band, sparse: 2 k × 2 depths; permutation, dense: 2 depths
    lines = _lines(results)
    assert len(lines) == 3 * 4 + 2 + 2
    rec = json.loads(lines[0])
    for field in ("key", "config", "seed", "params", "dof", "final_mse", "curve", "wall_s",
                  "versions", "steps_per_s"):
        assert field in rec
    assert rec["config"]["width"] == 16 and rec["steps"] == 24
    assert rec["versions"]["torch"] == torch.__version__
    for task in ("lowrank", "band", "sparse", "permutation"):
        assert (out / f"{task}.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| lowrank k=2 | 28 |" in printed  # dof of rank 2 at m = 8: 2·(2·8 − 2)
    assert (out / "table.md").read_text().count("|\n") >= 9

    # a rerun finds every run done and trains nothing
    before = results.read_text()
    assert cli_main(argv + ["--no-plots"]) == 0
    assert results.read_text() == before

    # lose the last run to a torn write: only that run is redone
    text = results.read_text().splitlines(keepends=True)
    results.write_text("".join(text[:-1]) + text[-1][: len(text[-1]) // 2])
    with pytest.warns(UserWarning, match="skipped 1"):
        assert cli_main(argv + ["--no-plots"]) == 0
    with pytest.warns(UserWarning, match="skipped 1"):
        records = read_jsonl(results)
    assert len(records) == len(lines)
    assert {r["key"] for r in records} == {json.loads(ln)["key"] for ln in lines}


def test_cli_report_only_trains_nothing_and_reports_what_finished(tmp_path, capsys):
    out = tmp_path / "ops"
    base = TINY + ["--tasks", "band", "--ks", "1", "--workers", "1", "--no-plots",
                   "--out", str(out)]
    assert cli_main(base + ["--depths", "2"]) == 0
    before = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert cli_main(base + ["--depths", "2", "4", "--report-only"]) == 0
    assert (out / "results.jsonl").read_text() == before  # nothing was trained
    captured = capsys.readouterr()
    assert "1 of the 2 runs are finished" in captured.err
    assert "| band k=1 |" in captured.out and "N=4" not in captured.out


def test_cli_parallel_workers_and_user_matrix(tmp_path):
    target = tmp_path / "mine.npy"
    np.save(target, np.eye(8)[::-1].copy())  # the reversal permutation
    out = tmp_path / "ops"
    argv = TINY + ["--depths", "2", "3", "--target-file", str(target), "--workers", "2",
                   "--out", str(out)]
    assert cli_main(argv) == 0
    records = read_jsonl(out / "results.jsonl")
    assert sorted(r["config"]["depth"] for r in records) == [2, 3]
    assert all(r["config"]["task"] == "file" and r["dof"] is None for r in records)
    assert all(r["torch_threads"] == 1 for r in records)  # workers run one thread each
    assert (out / "file_mine.png").exists()
    assert "file:mine.npy" in markdown_table(records)


@pytest.mark.parametrize(("extra", "match"), [
    (["--tasks", "circulant"], "unknown task 'circulant'"),
    (["--ks", "0"], r"k must lie in 1..width/2 = 1..8, got 0"),
    (["--ks", "9"], r"k must lie in 1..width/2 = 1..8, got 9"),
    (["--depths", "0"], "depth must be a positive integer"),
    (["--batch-size", "0"], "--batch-size"),
    (["--workers", "0"], "--workers"),
    (["--steps-scale", "-1"], "steps_scale"),
    (["--width", "7"], "--width must be an even integer"),
])
def test_cli_rejects_bad_input_before_training(tmp_path, capsys, extra, match):
    out = tmp_path / "ops"
    assert cli_main(TINY + ["--out", str(out)] + extra) == 2
    assert match in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()


def test_cli_rejects_bad_target_files_and_output_dir(tmp_path, capsys):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 4)))
    nan = tmp_path / "nan.npy"
    arr = np.zeros((8, 8))
    arr[1, 2] = np.inf
    np.save(nan, arr)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["--tasks", f"file:{wrong}", "--out", str(tmp_path / "o1")],
         r"must have shape (8, 8) for width n = 16"),
        (["--target-file", str(nan), "--out", str(tmp_path / "o2")], "must be finite"),
        (["--target-file", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "o3")],
         "does not exist"),
        (["--out", str(blocker / "sub")], "--out directory"),
    ]
    for extra, match in cases:
        assert cli_main(TINY + extra) == 2
        assert match in capsys.readouterr().err
    assert not list(tmp_path.glob("o*/results.jsonl"))


@pytest.mark.parametrize(("name", "k"), [("lowrank", 2), ("band", 3), ("sparse", 1),
                                         ("permutation", None), ("dense", None)])
def test_fast_target_products_match_dense(name, k):
    from bornsparse.experiments.operators import _target_matmul

    a = make_target(name, 96, k, seed=5)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_target_matmul(a)(x), x @ a.T, rtol=1e-5, atol=1e-5)


def test_cli_tanh_network(tmp_path):
    out = tmp_path / "ops"
    argv = TINY + ["--tasks", "band", "--ks", "1", "--depths", "2", "--network", "tanh",
                   "--workers", "1", "--no-plots", "--out", str(out)]
    assert cli_main(argv) == 0
    (rec,) = read_jsonl(out / "results.jsonl")
    assert rec["config"]["network"] == "tanh"
    assert rec["params"] == 2 * 16 * 2 + 2 * 16  # block entries plus one bias per neuron and layer
    assert not list(out.glob("*.png"))


# --- --baselines: low rank and Monarch at G(θ)'s parameter count ------------------------

def test_baseline_sizes_match_g_params():
    from bornsparse.experiments.operators import baseline_size, operator_params

    # m = 128 (width 256): G(θ) has 512 parameters a factor
    assert baseline_size("lowrank", 128, operator_params("linear", 256, 4)) == {"rank": 8}
    assert baseline_size("monarch", 128, operator_params("linear", 256, 4)) == {"nblocks": 16}
    # past the dense count the structures stop at full size
    assert baseline_size("lowrank", 128, operator_params("linear", 256, 200)) == {"rank": 128}
    assert baseline_size("monarch", 128, operator_params("linear", 256, 200)) == {"nblocks": 1}
    # h_θ counts 3·width a factor
    assert baseline_size("lowrank", 128, operator_params("tanh", 256, 4)) == {"rank": 12}
    with pytest.raises(ValueError, match="baseline must be one of"):
        baseline_size("butterfly", 8, 64)


def test_low_rank_learns_low_rank_targets_but_not_permutations():
    # rank 2 of an 8 × 8 map: a rank-1 target is reachable, a permutation (orthogonal) is
    # not: its best rank-2 approximation leaves ‖P − P₂‖²_F / m = (m − 2)/m = 0.75
    from bornsparse.experiments.operators import build_baseline

    cfg = {"width": 16, "baseline": "lowrank", "rank": 2, "seed": 0}
    phases = [Phase(600, 0.01, 0.0), Phase(200, 0.001, 0.0)]
    easy = train_operator(make_target("lowrank", 8, 1, seed=0), model=build_baseline(cfg),
                          schedule=phases, final_window=50, batch_size=32)
    hard = train_operator(make_target("permutation", 8, None, seed=0),
                          model=build_baseline(cfg), schedule=phases, final_window=50,
                          batch_size=32)
    assert easy["params"] == hard["params"] == 2 * 8 * 2
    assert easy["final_mse"] < 0.01
    assert hard["final_mse"] > 0.7


def test_cli_baselines_add_rows_and_keep_the_g_runs(tmp_path, capsys):
    out = tmp_path / "ops"
    base = TINY + ["--tasks", "lowrank", "permutation", "--ks", "1", "--depths", "2", "4",
                   "--workers", "1", "--out", str(out)]
    assert cli_main(base + ["--no-plots"]) == 0
    g_only = read_jsonl(out / "results.jsonl")
    assert len(g_only) == 4 and not any("baseline" in r["config"] for r in g_only)
    capsys.readouterr()
    assert cli_main(base + ["--baselines"]) == 0
    records = read_jsonl(out / "results.jsonl")
    # the G(θ) runs were not redone: only the 2 baselines × 2 tasks × 2 depths ran
    assert len(records) == 12
    assert [r["key"] for r in records[:4]] == [r["key"] for r in g_only]
    g_params = {(r["config"]["task"], r["config"]["depth"]): r["params"] for r in g_only}
    for r in records[4:]:
        c = r["config"]
        assert c["baseline"] in ("lowrank", "monarch")
        # width 16, m = 8: 64 and 128 parameters are met exactly (rank 4 / 8, 2 / 1 blocks)
        assert r["params"] == g_params[(c["task"], c["depth"])]
        assert r["final_penalty"] is None
    table = capsys.readouterr().out
    for row in ("| lowrank k=1 |", "| lowrank k=1, low rank U Vᵀ |",
                "| lowrank k=1, Monarch |", "| permutation, low rank U Vᵀ |",
                "| permutation, Monarch |"):
        assert row in table
    assert "matched to G(θ)'s count" in (out / "table.md").read_text()
    assert (out / "lowrank.png").stat().st_size > 1000
