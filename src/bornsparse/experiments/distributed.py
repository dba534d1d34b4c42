"""Data-parallel sweeps under ``torchrun``: every rank runs each run together.

A command that supports it (``reproduce dctps``) checks the launch before anything starts
(:func:`launch_world`), forms a gloo group over the ranks (:func:`process_group`), loads its
data on rank 0 first (:func:`rank_zero_first`), and hands its runs to the sweep runner, which
lets rank 0 decide what is left and write the records (:func:`run_data_parallel`). Inside a
run each rank trains on its own shard of the data (:func:`data_parallel_context`).

Only the standard library is imported at module level: the CLI's parser and the sweep
runner import this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def torchrun_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer (torchrun sets it), got "
                         f"{value!r}")
    return int(value)


def check_data_parallel(batch_size: int, world: int) -> None:
    """ValueError unless the global batch splits evenly over ``world`` ranks."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the {world} ranks "
                         "of the torchrun launch (each rank trains on an equal share)")


def launch_world(executor: str, batch_sizes: Iterable[int]) -> int:
    """torchrun's world size, once the flags are checked to fit it (1 without torchrun).

    Under torchrun the ranks are the parallelism: ``--executor`` must be local, and every
    global batch of ``batch_sizes`` must split evenly over the ranks. ValueError otherwise.
    """
    world = torchrun_world_size()
    if world > 1:
        if executor != "local":
            raise ValueError(f"launched by torchrun (WORLD_SIZE={world}) the ranks run each "
                             f"run together: use --executor local, got --executor {executor}")
        for batch_size in batch_sizes:
            check_data_parallel(batch_size, world)
    return world


@contextlib.contextmanager
def process_group(world: int) -> Iterator[None]:
    """torch.distributed's default group over torchrun's ranks (gloo: CPU runs), or nothing
    when ``world`` is 1."""
    if world == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_zero_first(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, rank 0's call finished before the others start (they read
    the cache rank 0 wrote instead of racing to write it); plain ``fn()`` without a group.
    Rank 0 raising leaves the others waiting, as any collective does."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    import torch.distributed as dist

    out = fn() if rank == 0 else None
    dist.barrier()
    return fn() if rank else out


def run_data_parallel(todo: list[dict[str, Any]], run: Callable[[dict[str, Any]], Any],
                      finished: Callable[[dict[str, Any], Any], None],
                      failed: Callable[[dict[str, Any], Exception], None]) -> None:
    """Every rank runs every run of ``todo``, in rank 0's order of what is left (broadcast:
    the ranks' results files may differ); only rank 0 reports ``finished(cfg, record)`` or
    ``failed(cfg, error)``.

    A run that raises on every rank (a reason of the setting, e.g. a budget below one weight
    per layer, found before any collective) is reported failed and the ranks go on together.
    Known limit: a run that raises on some ranks only leaves the others waiting in its next
    collective.
    """
    import torch.distributed as dist

    from bornsparse.experiments.results_io import run_key

    rank, _ = rank_and_world()
    box = [[run_key(c) for c in todo] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    by_key = {run_key(c): c for c in todo}
    for key in box[0]:
        try:
            rec = run(by_key[key])
        except Exception as err:  # the sweep's failure policy: reported, not written
            if rank == 0:
                failed(by_key[key], err)
        else:
            if rank == 0:
                finished(by_key[key], rec)


def data_parallel_context(splits: Any, cfg: dict[str, Any], memory: Any) -> Any:
    """This rank's ``dctps_methods.RunContext`` in a torchrun launch: one run trained
    data-parallel.

    Rank r trains on the r-th of ``world`` interleaved equal shards of the training set
    (the last ``n mod world`` examples are left out) with batch ``batch_size / world``, in
    DistributedDataParallel, so a step sees ``batch_size`` examples in all and the step
    count is the single-process one. Pruning at initialisation scores the full data's
    batches, as one process would; RigL/SET/IMP keep the ranks' supports identical
    (sparsity/dynamic.py).
    """
    import dataclasses

    from torch.nn.parallel import DistributedDataParallel

    from bornsparse.experiments.dctps_methods import RunContext, TrainConfig

    rank, world = rank_and_world()
    full = TrainConfig(**cfg["train"])
    check_data_parallel(full.batch_size, world)
    per_rank = dataclasses.replace(full, batch_size=full.batch_size // world)
    n = splits.train_x.shape[0] // world * world
    shard = dataclasses.replace(splits, train_x=splits.train_x[rank:n:world],
                                train_y=splits.train_y[rank:n:world])

    class DataParallelRunContext(RunContext):
        def pai_batches(self):
            self.splits, self.train_cfg = splits, full
            try:
                return super().pai_batches()
            finally:
                self.splits, self.train_cfg = shard, per_rank

        def train(self, model, optimizer, **hooks):
            # a new wrapper per call: IMP's to_sparse() replaces layers between trainings
            return super().train(DistributedDataParallel(model), optimizer, **hooks)

    return DataParallelRunContext(splits=shard, model_name=cfg["model"],
                                  model_kwargs=dict(cfg["model_kwargs"]), train_cfg=per_rank,
                                  seed=cfg["seed"], memory=memory)
