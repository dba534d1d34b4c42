"""Orthonormal DCT-II and its inverse through torch.fft, O(q log q), differentiable.

Both use Makhoul's (1980) reordering: the DCT-II of ``x`` of length N is the real FFT of
``v = (x[0], x[2], ..., x[3], x[1])`` (even entries, then odd entries reversed) followed by
a twiddle ``exp(-iπk/2N)``. One real FFT of length N, no padding to 2N and no dense matrix.
``scipy.fft.dct(x, norm="ortho")`` is the reference in the tests; autograd flows through
torch.fft, whose backward is itself an FFT, so gradients are O(q log q) as well.
"""

from __future__ import annotations

import math

import torch

from bornsparse._checks import check_float_tensor, check_positive_int

# torch.fft has no half-precision CPU kernels; compute those in float32 and cast back
_COMPUTE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _check_dim(x: torch.Tensor, dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must lie in [{-x.dim()}, {x.dim() - 1}] for x of shape "
                         f"{tuple(x.shape)}, got {dim}")
    return dim % x.dim()


def _reorder_index(n: int, device: torch.device) -> torch.Tensor:
    """Gather index for v = x[idx]: even positions ascending, then odd positions descending."""
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)]).to(device)


def _unorder_index(n: int, device: torch.device) -> torch.Tensor:
    """Inverse of :func:`_reorder_index`: x = v[idx]."""
    idx = torch.empty(n, dtype=torch.long)
    idx[_reorder_index(n, torch.device("cpu"))] = torch.arange(n)
    return idx.to(device)


def _twiddle(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """exp(-iπk/2N)·2·f_k for k = 0..N//2, f the orthonormal scale, as a complex tensor."""
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    scale = torch.full_like(k, math.sqrt(2.0 / n))
    scale[0] = math.sqrt(1.0 / n)
    w = torch.polar(scale, -math.pi * k / (2 * n))
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return w.to(device=device, dtype=cdtype)


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (scipy.fft.dct(x, norm="ortho")).

    ``X[k] = f_k · 2 Σ_n x[n] cos(πk(2n+1)/2N)`` with ``f_0 = √(1/4N)``, ``f_k = √(1/2N)``.
    Any length N >= 1, any real floating dtype, same shape and dtype as ``x``.
    """
    check_float_tensor("x", x)
    d = _check_dim(x, dim)
    orig = x.dtype
    x = x.movedim(d, -1).to(_COMPUTE.get(orig, orig))
    n = x.shape[-1]
    v = x.index_select(-1, _reorder_index(n, x.device))
    z = torch.fft.rfft(v, dim=-1) * _twiddle(n, x.dtype, x.device)  # (..., n//2 + 1)
    # For k > N/2 the real FFT's Hermitian symmetry gives X[N-j] = -Im(z[j]).
    out = torch.cat([z.real, -z.imag[..., 1 : (n - 1) // 2 + 1].flip(-1)], dim=-1)
    return out.to(orig).movedim(-1, d)


def idct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`dct` (the orthonormal DCT-III, scipy.fft.idct(x, norm="ortho"))."""
    check_float_tensor("x", x)
    d = _check_dim(x, dim)
    orig = x.dtype
    c = x.movedim(d, -1).to(_COMPUTE.get(orig, orig))
    n = c.shape[-1]
    half = n // 2 + 1
    # z[j] = c[j] - i·c[N-j] (with c[N] = 0) undoes the split done in dct()
    mirrored = torch.cat([torch.zeros_like(c[..., :1]), c[..., 1:].flip(-1)], dim=-1)[..., :half]
    z = torch.complex(c[..., :half], -mirrored)
    v = torch.fft.irfft(z / _twiddle(n, c.dtype, c.device), n=n, dim=-1)
    out = v.index_select(-1, _unorder_index(n, c.device))
    return out.to(orig).movedim(-1, d)


def dct_matrix(
    rows: int,
    cols: int,
    *,
    length: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``scipy.fft.dct(eye(q), norm="ortho")[:rows, :cols]`` in closed form, q = ``length``.

    ``length`` defaults to max(rows, cols). Entry (n, k) is ``f_k · 2 cos(πk(2n+1)/2q)``;
    ``x @ dct_matrix(...)`` is the first ``cols`` DCT-II coefficients of ``x`` zero-padded to q.
    Costs O(rows·cols), no FFT; meant for ``to_dense()``, conv kernels and tests.
    """
    rows = check_positive_int("rows", rows)
    cols = check_positive_int("cols", cols)
    q = max(rows, cols) if length is None else check_positive_int("length", length)
    if q < max(rows, cols):
        raise ValueError(f"length must be at least max(rows, cols) = {max(rows, cols)}, got {q}")
    dtype = dtype or torch.get_default_dtype()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n = torch.arange(rows, dtype=torch.int64, device=device)
    k = torch.arange(cols, dtype=torch.int64, device=device)
    # reducing k(2n+1) modulo the period 4q in integers keeps the angle below 2π, so even
    # a float32 cosine is accurate to a few ulps (conv layers rebuild this every forward)
    phase = torch.outer(2 * n + 1, k) % (4 * q)
    m = torch.cos(phase.to(work) * (math.pi / (2 * q)))
    scale = torch.full((cols,), math.sqrt(2.0 / q), dtype=work, device=device)
    scale[0] = math.sqrt(1.0 / q)
    return (m * scale).to(dtype)
