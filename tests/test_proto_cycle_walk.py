"""The cycle-walk prototype (benchmarks/proto_cycle_walk.py) computes what the reference does.

It is not part of the library, but docs/design.md quotes its timings, so its numbers must
come from kernels that are right.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "proto_cycle_walk.py"


@pytest.fixture(scope="module")
def proto():
    sys.path.insert(0, str(_PATH.parent))
    try:
        spec = importlib.util.spec_from_file_location("proto_cycle_walk", _PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(_PATH.parent))
    return module


@pytest.mark.parametrize("width", [2, 4, 10, 64, 202])
def test_schedule_visits_every_block_once_and_moves_every_row_once(proto, width):
    rng = np.random.default_rng(width)
    perms = np.stack([rng.permutation(width) for _ in range(6)]).astype(np.int64)
    sched, final_loc = proto.build_schedule(perms)
    assert sorted(final_loc) == list(range(width))
    for steps in sched:
        assert sorted(steps[:, proto.B1]) == list(range(width // 2))
        assert sorted(steps[:, [proto.RD0, proto.RD1]].ravel()) == list(range(width))
        # one close per cycle, one start per cycle
        assert steps[:, proto.START].sum() == steps[:, proto.CLOSE].sum() >= 1


def test_prototype_matches_reference_forward_and_backward(proto):
    assert proto.check_against_reference(np.random.default_rng(0)) < 1e-10
