"""The 8×8-blocked transposes the permuted and DCT kernels share, against numpy's."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bornsparse.ops.runtime.transpose import columns_to_rows, rows_to_columns


@st.composite
def _case(draw):
    # features and samples on both sides of the 8-wide blocks, offsets on both sides
    d = draw(st.integers(1, 27))
    n = draw(st.integers(0, 21))
    s_src = draw(st.integers(0, 9))
    s_dst = draw(st.integers(0, 9))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return d, n, s_src, s_dst, dtype


@settings(max_examples=100, deadline=None)
@given(_case())
def test_rows_to_columns_matches_numpy(case):
    d, n, s_src, s_dst, dtype = case
    rng = np.random.default_rng(d * 1000 + n)
    src = rng.standard_normal((s_src + n + 2, d)).astype(dtype)
    dst = rng.standard_normal((d + 3, s_dst + n + 4)).astype(dtype)
    want = dst.copy()
    want[:d, s_dst:s_dst + n] = src[s_src:s_src + n].T
    rows_to_columns(src, s_src, dst, s_dst, n)
    np.testing.assert_array_equal(dst, want)  # a copy: bit for bit, nothing else touched


@settings(max_examples=100, deadline=None)
@given(_case(), st.booleans())
def test_columns_to_rows_matches_numpy(case, accumulate):
    d, n, s_src, s_dst, dtype = case
    rng = np.random.default_rng(d * 1000 + n + 1)
    src_t = rng.standard_normal((d + 3, s_src + n + 4)).astype(dtype)
    dst = rng.standard_normal((s_dst + n + 2, d)).astype(dtype)
    want = dst.copy()
    block = src_t[:d, s_src:s_src + n].T
    if accumulate:
        want[s_dst:s_dst + n] += block
    else:
        want[s_dst:s_dst + n] = block
    columns_to_rows(src_t, s_src, dst, s_dst, n, accumulate)
    np.testing.assert_array_equal(dst, want)


@pytest.mark.parametrize("d,n", [(4096, 16), (1024, 64), (9, 9)])
def test_large_blocks_round_trip(d, n):
    x = np.arange(n * d, dtype=np.float32).reshape(n, d)
    cols = np.empty((d, n), np.float32)
    rows_to_columns(x, 0, cols, 0, n)
    back = np.zeros_like(x)
    columns_to_rows(cols, 0, back, 0, n, False)
    np.testing.assert_array_equal(back, x)
