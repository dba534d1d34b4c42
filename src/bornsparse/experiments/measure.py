"""What the experiments measure about a model's memory and storage, in one place.

* :class:`MemoryTracker`: *live tensor bytes*, the distinct storages of every torch tensor
  the Python process holds (found with ``gc.get_objects()``), minus those alive when the
  tracker was made (the data set). tracemalloc does not see torch's allocator and RSS deltas
  of a few kB vanish in allocator noise, so tensors are counted. It sees parameters,
  buffers, gradients, optimizer state, masks, scores and sparse-matmul plans; it does not
  see tensors that live only inside an autograd graph.
* :func:`saved_activation_bytes`: exactly those, what autograd saves for backward in one
  forward (``saved_tensors_hooks``), the part of a step the live-tensor scan cannot see.
* :func:`stored_size`: what a checkpoint holds, the ``state_dict`` tensors.

When to sample is the experiment's choice (``dctps_methods``, ``structured``).
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _tensor_types() -> set[type]:
    """torch.Tensor and every subclass defined so far (Parameter, Buffer, ...)."""
    out, todo = set(), [torch.Tensor]
    while todo:
        t = todo.pop()
        if t not in out:
            out.add(t)
            todo.extend(t.__subclasses__())
    return out


def live_storages() -> dict[int, int]:
    """{storage data_ptr: nbytes} of every tensor object alive in this process."""
    types = _tensor_types()
    # exact type lookups, not isinstance: fast over ~10⁶ objects, and some lazily-loaded
    # objects warn when their __class__ is read
    tensors = [o for o in gc.get_objects() if type(o) in types]
    out: dict[int, int] = {}
    with warnings.catch_warnings():
        # fake tensors left by torch.compile tracing have no real storage; torch warns (and
        # will later raise, caught below) when their data pointer is read
        warnings.simplefilter("ignore", UserWarning)
        for obj in tensors:
            try:
                if obj.layout != torch.strided or obj.device.type == "meta":
                    continue
                st = obj.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without plain storage
                continue
            if nbytes and ptr:
                out[ptr] = nbytes
    return out


class MemoryTracker:
    """Maximum live tensor bytes per phase, excluding storages alive at creation.

    ``peaks``: {phase: bytes}, the maximum over that phase's samples. ``seconds``: the time
    spent sampling, which run times exclude (a scan of every live object is longer once
    numba is loaded, which would bias a method's time by what it imports).
    """

    def __init__(self) -> None:
        self._baseline = set(live_storages())
        self.peaks: dict[str, int] = {}
        self.seconds = 0.0

    def sample(self, phase: str) -> int:
        """Live tensor bytes now (baseline excluded); raises ``peaks[phase]`` to it."""
        t0 = time.perf_counter()
        live = live_storages()
        total = sum(n for p, n in live.items() if p not in self._baseline)
        self.peaks[phase] = max(self.peaks.get(phase, 0), total)
        self.seconds += time.perf_counter() - t0
        return total


def saved_activation_bytes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[Any, int]:
    """(``loss_of(model(x), y)``, bytes autograd saved for its backward that are not
    parameters, buffers or ``x``): the activations of one step, distinct storages counted
    once."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model(x), y)
    return loss, sum(saved.values())


def stored_size(model: nn.Module) -> dict[str, int]:
    """What a checkpoint of ``model`` holds: its state_dict tensors.

    ``params``: floating-point entries (weights or sparse values, biases, α, BN affine);
    ``index_entries``: integer entries (sparse indices, int32 where they fit; BN's step
    counter, G(θ)'s permutations); ``bytes``: everything, at each tensor's element size.
    """
    params = idx = nbytes = 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_floating_point():
            params += t.numel()
        else:
            idx += t.numel()
        nbytes += t.numel() * t.element_size()
    return {"params": params, "index_entries": idx, "bytes": nbytes}
