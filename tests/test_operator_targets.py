"""Ground-truth matrices of the operator-learning experiments (seed 000, §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bornsparse.data import TARGETS, make_target
from bornsparse.data.operators import K_TARGETS, load_target, target_dof, validate_target


def _k_for(name: str, k: int) -> int | None:
    return k if name in K_TARGETS else None


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(TARGETS), m=st.integers(1, 40), k=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_shape_dtype_determinism(name, m, k, seed):
    k = min(k, m)
    a = make_target(name, m, _k_for(name, k), seed)
    assert a.shape == (m, m) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, make_target(name, m, _k_for(name, k), seed))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 40), k=st.integers(1, 5), seed=st.integers(0, 1000))
def test_structure(m, k, seed):
    k = min(k, m)
    lowrank = make_target("lowrank", m, k, seed).double()
    assert torch.linalg.matrix_rank(lowrank, rtol=1e-4) == k  # float32 rounding: loose rtol

    band = make_target("band", m, k, seed)
    rows, cols = torch.nonzero(band, as_tuple=True)
    assert (torch.bincount(rows, minlength=m) == k).all()  # exactly k weights per row
    offsets = (cols - rows) % m  # wrap-around band centred on the diagonal
    allowed = {(j - k // 2) % m for j in range(k)}
    assert set(offsets.tolist()) <= allowed

    sparse = make_target("sparse", m, k, seed)
    assert int((sparse != 0).sum()) == k * m

    perm = make_target("permutation", m, None, seed)
    assert set(perm.unique().tolist()) <= {0.0, 1.0}
    assert (perm.sum(0) == 1).all() and (perm.sum(1) == 1).all()


def test_targets_differ_across_seeds_tasks_and_k():
    assert not torch.equal(make_target("dense", 16, None, 0), make_target("dense", 16, None, 1))
    assert not torch.equal(make_target("band", 16, 2, 0), make_target("sparse", 16, 2, 0))
    b1, b2 = make_target("band", 16, 1, 0), make_target("band", 16, 2, 0)
    assert not torch.equal(b1, b2)


@pytest.mark.parametrize(("name", "k", "entry_var"), [
    ("lowrank", 3, None), ("band", 3, 1 / 3), ("sparse", 3, 1 / 3), ("dense", None, 1 / 512),
    ("permutation", None, None),
])
def test_scales_rows_have_unit_squared_norm(name, k, entry_var):
    # every target is scaled so that E (A x)_i² ≈ 1 for x ~ N(0, I): the zero map scores ≈ 1
    a = make_target(name, 512, k, seed=3).double()
    assert (a**2).sum(1).mean() == pytest.approx(1.0, rel=0.08)
    if entry_var is not None:
        nz = a[a != 0]
        assert nz.var() == pytest.approx(entry_var, rel=0.1)


def test_dof_matches_paper_where_the_paper_is_consistent():
    m = 1024  # the paper's n = 2048
    assert [target_dof("band", m, k) for k in (1, 5)] == [1024, 5120]
    assert [target_dof("sparse", m, k) for k in (1, 5)] == [1024, 5120]
    assert target_dof("lowrank", m, 1) == 2047  # the paper's label for k = 1
    assert target_dof("lowrank", m, 5) == 5 * (2 * m - 5)  # rank-5 manifold dimension
    assert target_dof("permutation", m) == 0
    assert target_dof("dense", m) == m * m


@pytest.mark.parametrize(("args", "exc", "match"), [
    (("circulant", 8, None), ValueError, "name must be one of"),
    (("lowrank", 8, None), ValueError, "needs a difficulty k"),
    (("lowrank", 8, 0), ValueError, "k must be a positive integer"),
    (("band", 8, 9), ValueError, r"k must lie in 1..n_half = 1..8"),
    (("sparse", 8, 2.5), TypeError, "k must be a positive integer"),
    (("sparse", 8, True), TypeError, "k must be a positive integer"),
    (("permutation", 8, 2), ValueError, "takes no k"),
    (("dense", 0, None), ValueError, "n_half must be a positive integer"),
])
def test_make_target_rejects_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        make_target(*args)
    if args[0] in TARGETS and args[1] > 0:
        with pytest.raises(exc, match=match):
            target_dof(*args)


def test_make_target_rejects_bad_seed_and_dtype():
    with pytest.raises(TypeError, match="seed must be an int"):
        make_target("dense", 4, None, seed=1.5)
    with pytest.raises(TypeError, match="dtype"):
        make_target("dense", 4, None, dtype=torch.int64)


def test_validate_target_accepts_tensor_and_numpy():
    a = np.arange(9, dtype=np.int64).reshape(3, 3)
    out = validate_target(a)
    assert out.dtype == torch.float32 and torch.equal(out, torch.arange(9.0).reshape(3, 3))
    assert torch.equal(validate_target(torch.eye(4, dtype=torch.float64), 4), torch.eye(4))


@pytest.mark.parametrize(("a", "exc", "match"), [
    (torch.zeros(3, 4), ValueError, "square 2-d"),
    (torch.zeros(4), ValueError, "square 2-d"),
    (torch.zeros(0, 0), ValueError, "non-empty"),
    (torch.tensor([[1.0, math.nan], [0.0, 1.0]]), ValueError, "finite, found 1"),
    (torch.tensor([[1.0, math.inf], [-math.inf, 1.0]]), ValueError, "finite, found 2"),
    (torch.zeros(2, 2, dtype=torch.complex64), TypeError, "real numbers"),
    (np.array([["a", "b"], ["c", "d"]]), TypeError, "real numbers"),
    ([[1.0, 0.0], [0.0, 1.0]], TypeError, "torch.Tensor or numpy array"),
])
def test_validate_target_rejects(a, exc, match):
    with pytest.raises(exc, match=match):
        validate_target(a)


def test_validate_target_names_the_fitting_width():
    with pytest.raises(ValueError, match=r"shape \(8, 8\) for width n = 16.*use width 6"):
        validate_target(torch.zeros(3, 3), 8)


def test_load_target(tmp_path):
    good = tmp_path / "a.npy"
    np.save(good, np.eye(5))
    assert torch.equal(load_target(good, 5), torch.eye(5))
    with pytest.raises(ValueError, match=r"shape \(4, 4\)"):
        load_target(good, 4)
    bad = tmp_path / "nan.npy"
    np.save(bad, np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="finite"):
        load_target(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_target(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match=r"must be a \.npy file"):
        load_target(tmp_path / "a.txt")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not an array")
    with pytest.raises(ValueError, match="not a readable .npy array"):
        load_target(junk)
    objs = tmp_path / "objects.npy"
    np.save(objs, np.array([[None, 1], [2, 3]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy array"):
        load_target(objs)
