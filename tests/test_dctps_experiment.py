"""The DCTpS comparison: CLI end to end, resume, bad input, and the parts it is built from."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from torch import nn

from bornsparse.cli import main as cli_main
from bornsparse.experiments.dctps_methods import METHODS, RunContext, TrainConfig, run_method
from bornsparse.experiments.dctps_report import delta_table, markdown_report
from bornsparse.experiments.jacobian import input_output_jacobian, jacobian_singular_values
from bornsparse.experiments.measure import MemoryTracker, stored_size

TINY = ["--datasets", "digits", "--models", "mlp", "--mlp-hidden", "256", "--seeds", "1",
        "--epochs", "1", "--imp-rounds", "1", "--pai-rounds", "2", "--jacobian-inputs", "2",
        "--workers", "1", "--no-progress"]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dctps")
    argv = ["reproduce", "dctps", *TINY, "--methods", "dctps", "snip", "rigl", "imp",
            "--densities", "0.05", "--out", str(out)]
    rc = cli_main(argv)
    return out, argv, rc


def test_cli_end_to_end_writes_records_table_and_figures(tiny_run):
    out, _, rc = tiny_run
    assert rc == 0
    recs = _lines(out / "results.jsonl")
    # dense is added automatically; one run per method at the single density
    assert sorted(r["config"]["method"] for r in recs) == sorted(
        ["dense", "dctps", "snip", "rigl", "imp"])
    assert len({r["key"] for r in recs}) == len(recs)
    for r in recs:
        assert r.get("error") is None, r.get("error")
        assert 0.0 <= r["accuracy"] <= 1.0
        assert set(r["memory_bytes"]) == {"init", "training", "final"}
        assert len(r["jacobian_sv"]) == 2  # two inputs, min(10, 64) values each
        assert all(len(row) == 10 for row in r["jacobian_sv"])
        # the method's time excludes its measurements (memory scans, Jacobian spectra)
        assert r["measure_s"] > 0 and r["train_wall_s"] > 0
        assert r["train_wall_s"] + r["measure_s"] <= r["wall_s"]
        if r["config"]["method"] != "dense":
            n = r["dense_weights"]
            assert r["nnz"] == round(0.05 * n) or abs(r["nnz"] - 0.05 * n) <= 3
            # values (float) and their (row, col) indices (int32) are what is stored
            assert r["stored"]["index_entries"] == 2 * r["nnz"]
            assert r["stored"]["params"] < 0.2 * n
    dense = next(r for r in recs if r["config"]["method"] == "dense")
    assert dense["stored"]["index_entries"] == 0
    # a sparse network holds far less during training than the dense one (Adam: 4 copies)
    dctps = next(r for r in recs if r["config"]["method"] == "dctps")
    assert dctps["memory_bytes"]["training"] < dense["memory_bytes"]["training"] / 2
    table = (out / "table.md").read_text()
    assert "| DCTpS |" in table and "| RigL (ERK) |" in table and "P = 0.05" in table
    assert (out / "accuracy_digits_mlp.png").stat().st_size > 0
    assert (out / "jacobian_digits_mlp.png").stat().st_size > 0


def test_cli_rerun_skips_finished_runs_and_redoes_a_torn_one(tiny_run):
    out, argv, _ = tiny_run
    path = out / "results.jsonl"
    before = path.read_text()
    assert cli_main(argv + ["--no-plots"]) == 0
    assert path.read_text() == before  # nothing rerun
    # drop the last record and leave a torn fragment: exactly that run is redone
    lines = before.splitlines(keepends=True)
    lost = json.loads(lines[-1])
    path.write_text("".join(lines[:-1]) + '{"key": "torn')
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        assert cli_main(argv + ["--no-plots"]) == 0
    recs = _lines_skipping_torn(path)
    assert len(recs) == len(lines)
    assert recs[-1]["key"] == lost["key"]


def _lines_skipping_torn(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ---------------------------------------------------------------------------------------
# One failure policy: a run that raises is reported failed, not written, retried on rerun

TINY_TRAIN = {"epochs": 1, "batch_size": 128, "lr": 1e-2, "optimizer": "adam",
              "weight_decay": 0.0, "augment": False, "imp_rounds": 1, "jacobian_inputs": 0,
              "pai_rounds": 2}


def _tiny_config(method, density):
    from bornsparse.experiments.dctps import make_config

    return make_config(dataset="digits", model="mlp", model_kwargs={"hidden_sizes": [24]},
                       method=method, density=density, seed=0, train=TINY_TRAIN)


def test_a_run_that_raises_is_failed_not_written_and_retried(tmp_path, monkeypatch):
    from bornsparse.experiments import dctps, dctps_methods
    from bornsparse.experiments.results_io import read_jsonl, run_key

    # uniform density 1e-4 leaves 0 weights in the 1,776-weight MLP's layers: allocate_nnz
    # refuses it, a reason of the setting
    dense, below = _tiny_config("dense", None), _tiny_config("random_uniform", 1e-4)
    path = tmp_path / "results.jsonl"
    out = dctps.run_sweep([dense, below], path, progress=False, workers=1)
    assert not out.complete and out.ran == 1
    (fail,) = out.failed
    assert fail["key"] == run_key(below) and fail["config"] == below
    assert fail["error"].startswith("ValueError: density=0.0001 gives a budget of 0 weights")
    assert [r["key"] for r in read_jsonl(path)] == [run_key(dense)]  # not written
    # the table shows the setting as n/a† with the reason under it, from the failed runs
    text = markdown_report(out.records, None, failed=out.failed)
    assert "| Random (Uniform) | n/a† |" in text
    assert "† Random (Uniform) at P = 0.0001: ValueError: density=0.0001" in text

    # a rerun retries it (here the method has been made to run, so it finishes and is written)
    monkeypatch.setitem(dctps_methods.METHODS, "random_uniform", METHODS["dense"])
    again = dctps.run_sweep([dense, below], path, progress=False, workers=1)
    assert again.complete and again.ran == 1
    assert [r["key"] for r in read_jsonl(path)] == [run_key(dense), run_key(below)]


def test_an_old_error_record_counts_as_not_run(tmp_path):
    from bornsparse.experiments import dctps
    from bornsparse.experiments.results_io import (
        append_jsonl,
        finished_records,
        read_jsonl,
        run_key,
    )

    cfg = _tiny_config("dense", None)
    path = tmp_path / "results.jsonl"
    # how a raising run was recorded before the one failure policy
    append_jsonl(path, {"key": run_key(cfg), "config": cfg, "accuracy": None,
                        "error": "RuntimeError: out of memory"})
    assert finished_records([cfg], path) == []  # what --report-only would show
    out = dctps.run_sweep([cfg], path, progress=False, workers=1)
    assert out.complete and out.ran == 1 and out.records[0]["accuracy"] > 0
    lines = read_jsonl(path)
    assert [r["key"] for r in lines] == [run_key(cfg)] * 2 and "error" not in lines[1]
    assert finished_records([cfg], path) == [lines[1]]
    assert dctps.run_sweep([cfg], path, progress=False, workers=1).ran == 0  # now done


def test_cli_exits_1_and_shows_a_failed_setting_as_na(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["reproduce", "dctps", *TINY, "--methods", "random_uniform", "--densities",
            "0.0001", "--no-plots", "--out", str(out)]
    assert cli_main(argv) == 1  # not every run finished
    err = capsys.readouterr().err
    assert "1 of 2 runs finished (1 in this call), 1 failed" in err
    table = (out / "table.md").read_text()
    assert "| Random (Uniform) | n/a† |" in table and "† Random (Uniform) at P = 0.0001" in table
    assert len(_lines(out / "results.jsonl")) == 1  # dense only
    assert cli_main(argv) == 1  # retried, and it fails again for the same reason
    assert "1 of 2 runs finished (0 in this call), 1 failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--datasets", "imagenet"], "--datasets: unknown data set 'imagenet'; expected one "
         "of mnist1d, digits, cifar10, cifar100"),
        (["--dataset", "digits", "digits"], "--datasets: repeated values"),
        (["--methods", "lottery"], "--methods: unknown method 'lottery'"),
        (["--model", "vgg"], "--models: unknown model 'vgg'"),
        (["--densities", "0"], "--densities: every density must lie in (0, 1), got 0.0"),
        (["--densities", "1.5"], "got 1.5"),
        (["--densities", "0.1", "0.1"], "repeated"),
        (["--seeds", "0"], "--seeds must be a positive integer"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--quick", "--datasets", "digits"], "--quick runs on mnist1d"),
        (["--quick", "--datasets", "mnist1d", "digits"], "drop --quick to use digits"),
    ],
)
def test_cli_rejects_bad_input(tmp_path, capsys, extra, message):
    rc = cli_main(["reproduce", "dctps", *TINY, *extra, "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("bornsparse reproduce dctps: error: ") and message in err
    assert not (tmp_path / "results.jsonl").exists()


def test_cli_missing_cifar_folder(tmp_path, capsys):
    base = ["reproduce", "dctps", "--dataset", "cifar10", "--model", "lenet5", "--out",
            str(tmp_path / "o"), "--no-progress"]
    assert cli_main(base) == 2
    assert "data_dir" in capsys.readouterr().err
    assert cli_main(base + ["--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "test_batch" in err


# ---------------------------------------------------------------------------------------
# Parts


def test_jacobian_of_a_linear_map_is_its_matrix():
    torch.manual_seed(0)
    lin = nn.Linear(7, 3)
    x = torch.randn(4, 7)
    j = input_output_jacobian(lin, x)
    assert j.shape == (4, 3, 7)
    torch.testing.assert_close(j, lin.weight.detach().expand(4, 3, 7))
    sv = jacobian_singular_values(lin, x)
    torch.testing.assert_close(sv[0], torch.linalg.svdvals(lin.weight.detach().double()))


def test_jacobian_matches_autograd_per_sample_and_restores_mode():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.BatchNorm1d(6), nn.Linear(6, 4))
    model.train()
    x = torch.randn(3, 5, dtype=torch.float64)
    model.double()
    j = input_output_jacobian(model, x)
    assert model.training
    model.eval()
    for i in range(3):
        ref = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[i])
        torch.testing.assert_close(j[i], ref)


def test_jacobian_rejects_bad_input():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        input_output_jacobian(lambda x: x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="x must have shape"):
        input_output_jacobian(nn.Linear(3, 2), torch.randn(3))
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        input_output_jacobian(nn.Linear(3, 2), torch.ones(2, 3, dtype=torch.int64))


def test_stored_size_counts_values_indices_bias_and_alpha():
    from bornsparse.nn import DCTPlusSparseLinear, SparseLinear

    sl = SparseLinear(20, 10, nnz=7, seed=0)
    # int32 indices: 4 bytes an entry
    assert stored_size(sl) == {"params": 7 + 10, "index_entries": 14,
                               "bytes": 4 * 17 + 4 * 14}
    dl = DCTPlusSparseLinear(20, 10, nnz=7, seed=0)
    assert stored_size(dl) == {"params": 7 + 10 + 1, "index_entries": 14,
                               "bytes": 4 * 18 + 4 * 14}
    assert stored_size(nn.Linear(20, 10))["params"] == 210


def test_memory_tracker_sees_new_tensors_not_old_ones():
    old = torch.zeros(50_000)  # alive before the tracker: baseline
    mem = MemoryTracker()
    base = mem.sample("a")
    assert base < old.numel() * 4  # the baseline's storage is not counted
    held = torch.zeros(100_000)
    held_bytes = held.numel() * 4
    with_held = mem.sample("a")
    assert with_held - base >= held_bytes
    view = held[10:]  # a view shares the storage: not counted twice
    assert mem.sample("b") - base < 2 * held_bytes
    del held, view
    after = mem.sample("a")
    assert after - base < held_bytes  # freed tensors are no longer counted
    assert mem.peaks["a"] == with_held  # while the phase's peak keeps the maximum


def _ctx(seed=0, epochs=1):
    from bornsparse.data import load_dataset

    splits = load_dataset("digits")
    cfg = TrainConfig(epochs=epochs, batch_size=256, lr=1e-2, optimizer="adam",
                      jacobian_inputs=0, pai_rounds=2, imp_rounds=1)
    return RunContext(splits=splits, model_name="mlp", model_kwargs={"hidden_sizes": [24]},
                      train_cfg=cfg, seed=seed)


def test_dctps_starts_with_zero_s_and_fixed_alpha_stays_one():
    from bornsparse.nn import DCTPlusSparseLinear

    seen = {}
    ctx = _ctx()
    original = ctx.initialised

    def spy(model):
        layers = [m for m in model.modules() if isinstance(m, DCTPlusSparseLinear)]
        seen["zero_s"] = all(bool((m.values == 0).all()) for m in layers)
        seen["layers"] = len(layers)
        original(model)

    ctx.initialised = spy
    model, _ = run_method("dctps_fixed_alpha", ctx, 0.05)
    assert seen == {"zero_s": True, "layers": 2}
    alphas = [m.alpha for m in model.modules() if isinstance(m, DCTPlusSparseLinear)]
    assert all(float(a) == 1.0 for a in alphas)
    model, _ = run_method("dctps", _ctx(), 0.05)
    alphas = [m.alpha for m in model.modules() if isinstance(m, DCTPlusSparseLinear)]
    assert any(float(a.detach()) != 1.0 for a in alphas)  # trainable α moved


def test_every_registered_method_has_a_label_and_callable():
    assert {"dense", "random_uniform", "random_epl", "snip", "force", "synflow", "imp", "rigl",
            "dctps", "dctps_rigl", "dctps_fixed_alpha"} <= set(METHODS)
    labels = [m.label for m in METHODS.values()]
    assert len(set(labels)) == len(labels) and all(labels)  # a table row each
    for m in METHODS.values():  # every method runs as fn(ctx, density)
        assert list(inspect.signature(m.fn).parameters)[:2] == ["ctx", "density"], m


def _rec(method, density, seed, acc):
    return {"key": f"{method}{density}{seed}", "accuracy": acc,
            "config": {"dataset": "d", "model": "m", "model_kwargs": {}, "method": method,
                       "density": density, "seed": seed},
            "stored": {"params": 1, "index_entries": 2, "bytes": 20},
            "memory_bytes": {"init": 1, "training": 2, "final": 1}, "wall_s": 1.0}


def test_delta_table_pairs_seeds_and_reports_mean_and_std():
    recs = [_rec("dense", None, 0, 0.8), _rec("dense", None, 1, 0.9),
            _rec("dctps", 0.01, 0, 0.7), _rec("dctps", 0.01, 1, 0.7)]
    groups = {(r["config"]["method"], r["config"]["density"]): [] for r in recs}
    for r in recs:
        groups[(r["config"]["method"], r["config"]["density"])].append(r)
    table, notes = delta_table(groups)
    # Δ = -10 and -20 points: mean -15, sample std √50 ≈ 7.1
    assert f"-15.0 ± {math.sqrt(50):.1f}" in table
    assert notes["seeds"] == 2
    text = markdown_report(recs)
    assert "Dense test accuracy 85.0% ± 7.1" in text


def test_born_sparse_methods_never_hold_the_dense_model_at_init():
    dense_weight_bytes = 4 * (64 * 24 + 24 * 10)  # digits (64 inputs) -> 24 -> 10
    peaks = {}
    for name in ("random_epl", "dctps", "rigl", "snip"):
        ctx = _ctx()
        run_method(name, ctx, 0.05)
        peaks[name] = ctx.memory.peaks["init"]
    # born sparse: values, indices, biases (and α), and the support's compressed form
    # (row and column pointers, the column order: O(nnz + rows + cols) int32); pruning at
    # init scores the dense net
    nnz = round(0.05 * (64 * 24 + 24 * 10))
    held = 4 * nnz + 4 * 2 * nnz + 4 * 34 + 4 * (25 + 11 + 65 + 25 + 2 * nnz)
    for name in ("random_epl", "dctps", "rigl"):
        assert 0 < peaks[name] <= held + 64 < dense_weight_bytes, (name, peaks, held)
    assert peaks["snip"] >= dense_weight_bytes


@pytest.mark.parametrize("name", ["random_uniform", "dctps_rigl"])
def test_born_sparse_methods_are_reproducible_per_seed(name):
    a, acc_a = run_method(name, _ctx(seed=2), 0.1)
    b, acc_b = run_method(name, _ctx(seed=2), 0.1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert acc_a == acc_b
    c, _ = run_method(name, _ctx(seed=3), 0.1)
    assert not all(torch.equal(sa[k], v) for k, v in c.state_dict().items())


def test_run_key_carries_the_conv_dct_order_the_layers_use():
    from bornsparse.experiments.dctps import DEFAULT_DCT_ORDER, make_config
    from bornsparse.experiments.results_io import run_key
    from bornsparse.nn import DCTPlusSparseConv2d

    default = inspect.signature(DCTPlusSparseConv2d).parameters["dct_order"].default
    assert default == DEFAULT_DCT_ORDER
    cfg = make_config(dataset="digits", model="lenet5", model_kwargs={}, method="dctps",
                      density=0.01, seed=0, train={})
    assert cfg["dct_order"] == default
    old = {k: v for k, v in cfg.items() if k != "dct_order"}
    assert run_key(old) != run_key(cfg)  # records from before the field never resume as these
