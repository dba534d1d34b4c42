"""Orthonormal DCT-II and its inverse through torch.fft, O(q log q), differentiable.

Both use Makhoul's (1980) reordering: the DCT-II of ``x`` of length N is the real FFT of
``v = (x[0], x[2], ..., x[3], x[1])`` (even entries, then odd entries reversed) followed by
a twiddle ``exp(-iπk/2N)``. One real FFT of length N, no padding to 2N and no dense matrix.
The reorderings are single gathers with cached index tables (a flip of the FFT's strided
imaginary part measured 7x slower than the FFT itself); on CPU a numba kernel fuses the
twiddle with the output gather (numba_kernels.py), the torch version being its reference.
``scipy.fft.dct(x, norm="ortho")`` is the reference in the tests. The transform is
orthogonal, so the backward of dct is idct and vice versa: gradients are O(q log q) too.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from bornsparse._checks import check_float_tensor, check_positive_int
from bornsparse.ops.backends import check_backend, resolve_backend

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


_TABLES: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
_TABLES_SIZE = 64
_TABLES_LOCK = threading.Lock()


def dct_tables(n: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The length-n tables of :func:`_build_tables`, cached per (n, dtype, device).

    Only real tensors are cached: built while torch.export or torch.compile traces, the
    tables are fake tensors, and a cached fake tensor would turn every later eager call's
    output fake too (found by exporting a fresh layer, then running it).
    """
    key = (n, dtype, torch.device(device))
    with _TABLES_LOCK:
        found = _TABLES.get(key)
        if found is not None:
            _TABLES.move_to_end(key)
            return found
    tables = _build_tables(n, dtype, device)
    if type(tables["reorder"]) is torch.Tensor and not torch.compiler.is_compiling():
        with _TABLES_LOCK:
            _TABLES[key] = tables
            while len(_TABLES) > _TABLES_SIZE:
                _TABLES.popitem(last=False)
    return tables


def _build_tables(n: int, dtype: torch.dtype, device: torch.device
                  ) -> dict[str, torch.Tensor]:
    """Gather indices, signs and twiddles for length n (O(n) each).

    Forward: v = x[reorder]; z = conj(rfft(v))·conj(w) with w_k = 2 f_k exp(-iπk/2N), so
    Re z_k = X[k] and Im z_k = -Im(rfft(v)_k w_k) = X[N-k] (Hermitian symmetry); X is then
    one gather from the interleaved (re, im) buffer of z.
    Inverse: z_j = c_j - i c_{N-j} (c_N = 0) gathered with signs, v = irfft(z / w), and
    x = v[unorder].
    """
    half = n // 2 + 1
    reorder = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)])
    unorder = torch.empty(n, dtype=torch.long)
    unorder[reorder] = torch.arange(n)
    k = torch.arange(half, dtype=torch.float64)
    scale = torch.full_like(k, math.sqrt(2.0 / n))
    scale[0] = math.sqrt(1.0 / n)
    w = torch.polar(scale, -math.pi * k / (2 * n))
    # out[k] = re(z_k) for k <= N/2, im(z_{N-k}) for k > N/2, in the (half, 2) buffer
    kk = torch.arange(n)
    take = torch.where(kk < half, 2 * kk, 2 * (n - kk) + 1)
    # inverse: (re, im) of z_j = (c_j, -c_{N-j}); j = 0 has no imaginary part (sign 0)
    j = torch.arange(half)
    put = torch.stack([j, torch.where(j > 0, n - j, 0)], dim=-1).reshape(-1)
    sign = torch.stack([torch.ones(half), torch.where(j > 0, -1.0, 0.0)], dim=-1).reshape(-1)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return {
        "reorder": reorder.to(device),
        "unorder": unorder.to(device),
        "take": take.to(device),
        "put": put.to(device),
        "sign": sign.to(device=device, dtype=dtype),
        "w_conj": w.conj().resolve_conj().to(device=device, dtype=cdtype),
        "w_real": torch.view_as_real(w).to(device=device, dtype=dtype).contiguous(),
        "w_inv": (1.0 / w).to(device=device, dtype=cdtype),
    }


# below this many entries the plain-torch twiddle wins (no thread-pool wake-up)
_NUMBA_MIN_SIZE = 1 << 15


def use_numba_twiddle(x: torch.Tensor) -> bool:
    """Whether the numba twiddle kernels beat torch's for ``x`` (CPU float32/64, large)."""
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and x.numel() >= _NUMBA_MIN_SIZE
    )


def _dct_last(x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim; float32/float64, any device. With ``fused``
    false it is plain torch (differentiable by autograd); else the numba twiddle may run."""
    n = x.shape[-1]
    if x.numel() == 0:  # MKL's FFT rejects an empty batch
        return torch.empty_like(x)
    t = dct_tables(n, x.dtype, x.device)
    v = x.index_select(-1, t["reorder"])
    spec = torch.fft.rfft(v, dim=-1)  # (..., n//2 + 1)
    if fused and use_numba_twiddle(x):
        from bornsparse.ops.discrete_cosine.numba_kernels import _twiddle_take_kernel

        out = torch.empty_like(x)
        _twiddle_take_kernel(
            torch.view_as_real(spec).reshape(-1, n // 2 + 1, 2).numpy(),
            t["w_real"].numpy(), out.view(-1, n).numpy(),
        )
        return out
    return _dct_twiddle_reference(spec, t)


def _dct_twiddle_reference(spec: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    # conj_physical, not the lazy conj bit: inside the op run by an aot-compiled graph a lazy
    # conj gave silently wrong values (torch 2.13, tests/test_compile.py)
    z = torch.conj_physical(spec) * t["w_conj"]
    return torch.view_as_real(z).flatten(-2).index_select(-1, t["take"])


def _idct_last(c: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Orthonormal DCT-III (inverse of _dct_last) along the last dim; ``fused`` as there."""
    n = c.shape[-1]
    if c.numel() == 0:
        return torch.empty_like(c)
    t = dct_tables(n, c.dtype, c.device)
    if fused and use_numba_twiddle(c):
        from bornsparse.ops.discrete_cosine.numba_kernels import _untake_twiddle_kernel

        cdtype = torch.complex128 if c.dtype == torch.float64 else torch.complex64
        z = torch.empty(*c.shape[:-1], n // 2 + 1, dtype=cdtype)
        _untake_twiddle_kernel(
            c.reshape(-1, n).numpy(), torch.view_as_real(t["w_inv"]).numpy(),
            torch.view_as_real(z).reshape(-1, n // 2 + 1, 2).numpy(),
        )
    else:
        z = _idct_twiddle_reference(c, t)
    return torch.fft.irfft(z, n=n, dim=-1).index_select(-1, t["unorder"])


def _idct_twiddle_reference(c: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    zr = c.index_select(-1, t["put"]) * t["sign"]  # (..., 2·(n//2 + 1)) interleaved re, im
    return torch.view_as_complex(zr.unflatten(-1, (-1, 2))) * t["w_inv"]


@torch.library.custom_op("bornsparse::dct", mutates_args=())
def _dct_op(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Orthonormal DCT-II (DCT-III if ``inverse``) along the last dim of a CPU float32/64
    tensor, with the numba twiddle kernels for large inputs."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"bornsparse::dct needs a CPU float32/float64 tensor, got {x.dtype} "
                         f"on {x.device}")
    x = x.contiguous()
    return _idct_last(x) if inverse else _dct_last(x)


@_dct_op.register_fake
def _(x, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dct_setup(ctx, inputs, output):
    ctx.inverse = inputs[1]


def _dct_backward(ctx, g):
    # the transform is orthogonal: the backward of dct is idct and vice versa, itself this
    # op, so gradients of any order go through the kernels
    return torch.ops.bornsparse.dct(g, not ctx.inverse), None


_dct_op.register_autograd(_dct_backward, setup_context=_dct_setup)


def _apply(x: torch.Tensor, dim: object, inverse: bool, backend: object) -> torch.Tensor:
    check_float_tensor("x", x)
    d = _check_dim(x, dim)
    orig = x.dtype
    y = x.movedim(d, -1).to(_COMPUTE.get(orig, orig)).contiguous()
    if resolve_backend(backend, y, "dct") == "reference":
        out = _idct_last(y, fused=False) if inverse else _dct_last(y, fused=False)
    else:
        out = torch.ops.bornsparse.dct(y, inverse)
    return out.to(orig).movedim(-1, d)


def dct(x: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (scipy.fft.dct(x, norm="ortho")).

    ``X[k] = f_k · 2 Σ_n x[n] cos(πk(2n+1)/2N)`` with ``f_0 = √(1/4N)``, ``f_k = √(1/2N)``.
    Any length N >= 1, any real floating dtype, same shape and dtype as ``x``.
    Differentiable to any order; the backward pass is :func:`idct` (the transform is
    orthogonal). ``backend`` (ops/backends.py): "auto"/"numba" run the op
    ``torch.ops.bornsparse.dct`` on CPU float32/float64, "reference" plain torch.
    """
    return _apply(x, dim, False, backend)


def idct(x: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`dct` (the orthonormal DCT-III, scipy.fft.idct(x, norm="ortho"))."""
    return _apply(x, dim, True, backend)


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


def dct_project_affine_reference(
    x: torch.Tensor,
    out_features: int,
    alpha: torch.Tensor,
    y: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y + α·T(x) + bias in plain torch; T(x) = dct(x zero-padded to q)[..., :out_features]."""
    return dct_project_affine(x, out_features, alpha, y, bias, backend="reference")


def dct_project_affine(
    x: torch.Tensor,
    out_features: int,
    alpha: torch.Tensor,
    y: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """y + α·T(x) + bias for x (..., in): the DCTpS offset plus the rest.

    T(x) is the first ``out_features`` orthonormal DCT-II coefficients of x zero-padded to
    q = max(in, out_features); ``alpha`` a 0-d tensor, ``y`` (..., out_features) or None,
    ``bias`` (out_features,) or None. The DCT runs through :func:`dct` with ``backend``.
    """
    check_backend(backend, "dct")
    n = x.shape[-1]
    q = max(n, out_features)
    xp = torch.nn.functional.pad(x, (0, q - n)) if q > n else x
    out = dct(xp, backend=backend)[..., :out_features] * alpha
    if y is not None:
        out = out + y
    return out if bias is None else out + bias


