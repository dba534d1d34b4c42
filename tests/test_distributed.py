"""Data-parallel training: every layer under DistributedDataParallel, and RigL, SET and IMP
keeping the ranks identical.

One ``torch.multiprocessing`` spawn of two gloo ranks (module fixture) runs every scenario and
saves what each rank ends with; the tests compare the ranks with each other and with one
process that sees both ranks' batches.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from bornsparse.nn import (
    DCTPlusSparseConv2d,
    DCTPlusSparseLinear,
    PermutedBlockDiagonal,
    PermutedTanhNetwork,
    SparseConv2d,
    SparseLinear,
)
from bornsparse.sparsity import IMP, SET, RigL

WORLD = 2
BATCH = 16  # per rank
STEPS, DELTA = 100, 10

# name -> (layer from a seed, input shape)
LAYERS = {
    "SparseLinear": (lambda s: SparseLinear(12, 10, density=0.3, seed=s), (8, 12)),
    "DCTPlusSparseLinear": (lambda s: DCTPlusSparseLinear(12, 10, density=0.3, init="normal",
                                                          seed=s), (8, 12)),
    "SparseConv2d": (lambda s: SparseConv2d(3, 4, 3, padding=1, density=0.3, seed=s),
                     (4, 3, 6, 6)),
    "DCTPlusSparseConv2d": (lambda s: DCTPlusSparseConv2d(3, 4, 3, padding=1, density=0.3,
                                                          init="normal", seed=s), (4, 3, 6, 6)),
    "PermutedBlockDiagonal": (lambda s: PermutedBlockDiagonal(8, 8, width=16, depth=4, seed=s),
                              (8, 8)),
    "PermutedTanhNetwork": (lambda s: PermutedTanhNetwork(8, 8, width=16, depth=3, seed=s),
                            (8, 8)),
}


def _reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's function from its dense weight, independent of its cached plan."""
    if isinstance(layer, SparseConv2d):
        return F.conv2d(x, layer.to_dense(), layer.bias, layer.stride, layer.padding)
    if isinstance(layer, PermutedTanhNetwork):
        return None
    return F.linear(x, layer.to_dense(), getattr(layer, "bias", None))


def _diverge(layer: nn.Module) -> None:
    """Change rank 1's structure buffers, as a replica that went its own way would."""
    with torch.no_grad():
        if isinstance(layer, PermutedBlockDiagonal | PermutedTanhNetwork):
            layer.perms[0] = layer.perms[0].flip(0)
        else:
            # a new support under the same values (DDP sends buffers, never parameters)
            rows, cols = layer.dense_shape
            flat = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(9))
            flat = flat[:layer.nnz].sort().values
            layer.indices.copy_(torch.stack([flat // cols, flat % cols]))
            layer.refresh_plan()


def _layers_under_ddp(rank: int) -> dict:
    # torch >= 2.13 deprecates broadcast_buffers for forward_sync_buffers; the old flag is
    # the one every supported torch has
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    out = {}
    for name, (make, shape) in LAYERS.items():
        for broadcast in (True, False):
            # broadcast_buffers=False never sends buffers, so the replicas must be built alike
            layer = make(rank if broadcast else 0)
            model = DDP(layer, broadcast_buffers=broadcast)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(3):
                g = torch.Generator().manual_seed(100 * step + rank)
                x = torch.randn(*shape, generator=g)
                if broadcast and rank == 1 and step == 1:
                    _diverge(layer)  # the next forward must restore rank 0's buffers
                loss = model(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                y, ref = layer(x), _reference(layer, x)
            out[(name, broadcast)] = {"state": _cloned(layer), "y": y, "ref": ref}
    return out


def _cloned(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batch(step: int, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch, or rank ``rank``'s share of it."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * BATCH, 20, generator=g)
    y = x[:, :4].argmax(1)
    if rank is None:
        return x, y
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


def _dynamic_run(cls, rank: int | None) -> dict:
    """STEPS steps of ``cls`` at ΔT = DELTA on a small MLP; ``rank=None`` is one process on
    the global batches, as rank 0 would build it."""
    # ranks seeded differently: DDP (dense init) and RigL/SET (seed) must make them agree
    r = 0 if rank is None else rank
    torch.manual_seed(r)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dyn = cls(model, opt, density=0.2, total_steps=STEPS, delta=DELTA, seed=r + 1)
    initial = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("indices")}
    # wrapped after the conversion: DDP registers the sparse layers' parameters
    net = model if rank is None else DDP(model)
    for step in range(STEPS):
        x, y = _batch(step, rank)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        if dyn.step():
            opt.step()
    return {"state": _cloned(model), "initial": initial, "updates": dyn.updates}


def _imp_masks(rank: int) -> list[torch.Tensor]:
    """IMP's masks on replicas that differ (no DDP): the averaged magnitudes decide."""
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    imp = IMP(model, rounds=2, density=0.25)
    imp.prune()
    imp.prune()
    return [m.clone() for m in imp.masks]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import numba

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        result = {"layers": _layers_under_ddp(rank), "rigl": _dynamic_run(RigL, rank),
                  "set": _dynamic_run(SET, rank), "imp": _imp_masks(rank)}
    finally:
        dist.destroy_process_group()
    torch.save(result, f"{out_dir}/rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_trains_under_ddp(ranks, name, broadcast):
    r0, r1 = (r["layers"][(name, broadcast)] for r in ranks)
    _assert_same(r0["state"], r1["state"])
    torch.testing.assert_close(r0["y"], r1["y"], rtol=0, atol=0)
    if r0["ref"] is not None:  # the plan follows the indices DDP broadcast into the layer
        for r in (r0, r1):
            torch.testing.assert_close(r["y"], r["ref"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_dynamic_sparse_ranks_stay_identical_and_match_one_process(ranks, method):
    r0, r1 = (r[method] for r in ranks)
    _assert_same(r0["state"], r1["state"])
    # ΔT = 10 with t_end = 75: updates at steps 10, 20, ..., 70, and the supports moved
    assert r0["updates"] == r1["updates"] == 7
    assert any(not torch.equal(r0["initial"][k], r0["state"][k]) for k in r0["initial"])
    single = _dynamic_run(RigL if method == "rigl" else SET, None)
    assert single["updates"] == 7
    for k, v in single["state"].items():
        if k.endswith("indices"):
            assert torch.equal(v, r0["state"][k]), k
        else:  # the gradient all-reduce sums in another order than one batch's backward
            torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5)


def test_imp_masks_agree_across_differing_replicas(ranks):
    (m0, m1) = (r["imp"] for r in ranks)
    assert all(torch.equal(a, b) for a, b in zip(m0, m1, strict=True))
    # the replicas really differed: alone, each would have kept its own weights
    assert not all(torch.equal(a, b) for a, b in zip(_imp_masks(0), _imp_masks(1),
                                                      strict=True))


# ---------------------------------------------------------------------------------------
# The experiments' distributed helpers (experiments/distributed.py): a torchrun launch of
# `bornsparse reproduce dctps`, and the checks that refuse a launch before anything starts


def test_torchrun_world_size_reads_world_size(monkeypatch):
    from bornsparse.experiments.distributed import torchrun_world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert torchrun_world_size() == 4
    for bad in ("0", "two"):
        monkeypatch.setenv("WORLD_SIZE", bad)
        with pytest.raises(ValueError, match=f"WORLD_SIZE must be a positive integer .* got "
                                             f"'{bad}'"):
            torchrun_world_size()


def test_launch_world_checks_executor_and_batches(monkeypatch):
    from bornsparse.experiments.distributed import check_data_parallel, launch_world

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_world("ray", [7]) == 1  # not under torchrun: nothing to check
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_world("local", [128, 64]) == 2
    with pytest.raises(ValueError, match="use --executor local, got --executor ray"):
        launch_world("ray", [128])
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--batch-size 128 must be divisible by the 3 ranks"):
        launch_world("local", [128])
    check_data_parallel(129, 3)  # divisible: no error


def test_without_a_group_the_helpers_are_one_process():
    from bornsparse.experiments.distributed import process_group, rank_and_world, rank_zero_first

    calls = []
    with process_group(1):
        assert not dist.is_initialized()
        assert rank_and_world() == (0, 1)
        assert rank_zero_first(lambda: calls.append(1) or "data") == "data"
    assert calls == [1]


def test_cli_refuses_a_launch_whose_batch_does_not_split(tmp_path, capsys, monkeypatch):
    from bornsparse.cli import main as cli_main

    monkeypatch.setenv("WORLD_SIZE", "3")
    argv = ["reproduce", "dctps", "--datasets", "digits", "--models", "mlp", "--batch-size",
            "64", "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 2
    assert ("bornsparse reproduce dctps: error: --batch-size 64 must be divisible by the 3 "
            "ranks") in capsys.readouterr().err
    assert not dist.is_initialized()


def _reproduce_worker(rank: int, ports: tuple[int, int], out: str) -> None:
    """One torchrun rank: the environment torchrun sets, then the command, twice, each
    call with its own rendezvous port as two torchrun launches would have (one port for
    both raced: a rank fast out of the first call joined the first call's store, which
    rank 0 then closed)."""
    import os

    from bornsparse.cli import main as cli_main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    argv = ["reproduce", "dctps", "--datasets", "digits", "--models", "mlp", "--mlp-hidden",
            "24", "--methods", "snip", "--densities", "0.1", "0.0001", "--seeds", "1",
            "--epochs", "1", "--batch-size", "64", "--jacobian-inputs", "0", "--pai-rounds", "2",
            "--workers", "1", "--no-plots", "--no-progress", "--out", out]
    codes = [cli_main(argv)]
    first = (Path(out) / "results.jsonl").read_text() if rank == 0 else ""
    os.environ["MASTER_PORT"] = str(ports[1])
    codes.append(cli_main(argv))  # a rerun: rank 0 finds everything done, for both ranks
    again = (Path(out) / "results.jsonl").read_text() if rank == 0 else ""
    torch.save({"codes": codes, "unchanged": first == again}, f"{out}/rank{rank}.pt")


def test_reproduce_dctps_under_torchrun_trains_each_run_on_every_rank(tmp_path):
    import json

    out = tmp_path / "dctps"
    ports = (_free_port(), _free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], _free_port())
    mp.spawn(_reproduce_worker, args=(ports, str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    # SNIP at 1e-4 cannot keep a weight per layer: rank 0 exits 1 (a run failed), twice,
    # since the rerun retries it; the other ranks leave the reporting to it
    assert [r["codes"] for r in ranks] == [[1, 1], [0, 0]]
    assert ranks[0]["unchanged"]  # the finished runs were not rerun or written twice
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # dense and SNIP at 0.1, each written once, by rank 0, each trained by both ranks
    assert sorted((r["config"]["method"], r["config"]["density"]) for r in records) == [
        ("dense", None), ("snip", 0.1)]
    assert all(r["data_parallel_ranks"] == WORLD and 0 < r["accuracy"] <= 1 for r in records)
    table = (out / "table.md").read_text()
    assert "| SNIP |" in table and "n/a†" in table
    assert "† SNIP at P = 0.0001: ValueError: keeping 1 weights cannot give" in table
