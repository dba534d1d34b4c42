import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bornsparse.sparsity import DISTRIBUTIONS, allocate_nnz
from bornsparse.sparsity.distributions import support_layout

shape_st = st.one_of(
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
    st.tuples(st.integers(1, 64), st.integers(1, 64), st.integers(1, 5), st.integers(1, 5)),
)


def budget_of(shapes, density):
    return math.floor(density * sum(math.prod(s) for s in shapes) + 0.5)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(shape_st, min_size=1, max_size=6),
    density=st.floats(1e-3, 1.0),
    distribution=st.sampled_from(DISTRIBUTIONS),
)
def test_exact_counts_within_layer_sizes(shapes, density, distribution):
    budget = budget_of(shapes, density)
    try:
        counts = allocate_nnz(shapes, density, distribution)
    except ValueError as e:
        assert "below one per layer" in str(e) or "zero weights" in str(e)
        assume(False)
    assert sum(counts) == budget
    for c, s in zip(counts, shapes, strict=True):
        assert 1 <= c <= math.prod(s)
    sizes = [math.prod(s) for s in shapes]
    if distribution == "uniform":
        for c, n in zip(counts, sizes, strict=True):
            assert abs(c - density * n) < 1.0 + 1e-9
    if distribution in ("epl", "epf"):
        # layers below capacity share equally; only the remainder makes them differ
        open_counts = [c for c, n in zip(counts, sizes, strict=True) if c < n]
        if open_counts:
            assert max(open_counts) - min(open_counts) < len(shapes)


def test_epl_examples():
    assert allocate_nnz([(10, 10)] * 3, 0.5, "epl") == [50, 50, 50]
    assert allocate_nnz([(10, 10)] * 3, 0.51, "epl") == [51, 51, 51]
    # budget 152: 50 each, remainder 2 to the last
    assert allocate_nnz([(10, 10)] * 3, 152 / 300, "epl") == [50, 50, 52]
    # budget 105: a 10-weight layer cannot take its share of 35, so it is filled and the
    # other 95 are shared by the rest (47 each, the remainder to the last)
    assert allocate_nnz([(10, 10), (2, 5), (10, 10)], 0.5, "epl") == [47, 10, 48]
    assert allocate_nnz([(10, 10), (2, 5), (10, 10)], 0.5, "epf") == [47, 10, 48]


def test_uniform_example():
    assert allocate_nnz([(100, 10), (10, 10)], 0.1, "uniform") == [100, 10]


def test_erk_follows_the_rigl_rule_and_caps_at_density_one():
    shapes = [(200, 200), (200, 20), (10, 200)]
    counts = allocate_nnz(shapes, 0.1, "erk")
    dens = [c / math.prod(s) for c, s in zip(counts, shapes, strict=True)]
    score = [sum(s) / math.prod(s) for s in shapes]
    # density ∝ (Σ dims / Π dims) up to rounding
    assert dens[1] / dens[0] == pytest.approx(score[1] / score[0], rel=0.02)
    assert dens[2] / dens[0] == pytest.approx(score[2] / score[0], rel=0.02)
    # a tiny layer next to a big one overflows, is filled, and the rest is re-solved
    shapes = [(1000, 1000), (3, 3)]
    counts = allocate_nnz(shapes, 0.01, "erk")
    assert counts[1] == 9
    assert counts == [budget_of(shapes, 0.01) - 9, 9]
    # convolution shapes use all four dims
    conv = allocate_nnz([(64, 32, 3, 3), (64, 64, 3, 3)], 0.05, "erk")
    assert conv[0] / (64 * 32 * 9) > conv[1] / (64 * 64 * 9)


def test_support_layout():
    assert support_layout("epf") == "per_row"
    assert {support_layout(d) for d in ("uniform", "epl", "erk")} == {"random"}


def test_bad_input():
    with pytest.raises(ValueError, match="below one per layer"):
        allocate_nnz([(10, 10)] * 3, 0.005, "epl")
    with pytest.raises(ValueError, match=r"gives layer 1 \(shape \(2, 2\)\) zero weights"):
        allocate_nnz([(100, 100), (2, 2)], 0.01, "uniform")
    with pytest.raises(ValueError, match="distribution must be one of"):
        allocate_nnz([(10, 10)], 0.5, "random")
    with pytest.raises(ValueError, match="distribution must be one of"):
        support_layout("EPL")
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0"):
        allocate_nnz([(10, 10)], 0, "epl")
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 2"):
        allocate_nnz([(10, 10)], 2, "erk")
    with pytest.raises(ValueError, match="shapes must be a non-empty sequence"):
        allocate_nnz([], 0.5, "epl")
    with pytest.raises(ValueError, match=r"shapes\[1\] must be a weight shape"):
        allocate_nnz([(3, 3), (3,)], 0.5, "epl")
    with pytest.raises(ValueError, match=r"shapes\[0\] must be a weight shape"):
        allocate_nnz([(3, 0)], 0.5, "epl")
