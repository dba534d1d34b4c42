"""DCTPlusSparseLinear: y = α·DCT(x) + S x + b, the DCTpS layer of Price & Tanner's
"Dense for the Price of Sparse".

The dense offset is the orthonormal DCT-II, applied with an FFT in O(q log q) and never
stored: T(x) is the first out_features coefficients of the DCT of x zero-padded to
q = max(in_features, out_features), i.e. x @ D with
D = scipy.fft.dct(eye(q), norm="ortho")[:in_features, :out_features].
"""

from __future__ import annotations

import torch
from torch import nn

from bornsparse._checks import check_choice
from bornsparse.nn.sparse_linear import SparseLinear
from bornsparse.nn.sparse_weight import ScaledOffset
from bornsparse.ops.dct_sparse import dct_sparse_affine
from bornsparse.ops.discrete_cosine import dct_matrix

#: how the offset is computed, as checkpoint files name it (a later library that computes
#: another DCT must change the string, so old files fail loudly instead of loading into
#: another function)
DCT_OFFSET = "dct-ii-ortho: first out coefficients of the input zero-padded to max(in, out)"


class DCTPlusSparseLinear(ScaledOffset, SparseLinear):
    """y = α·T(x) + x Sᵀ + b: a fixed DCT offset plus a trainable sparse S (the DCTpS slides).

    Other arguments (nnz or density, bias, support, seed, indices, backend, device,
    dtype) as :class:`SparseLinear`; ``alpha`` is α's start value, a Parameter when
    ``train_alpha`` else a buffer. ``init`` for S: "zeros" (default, the paper's), "normal"
    (N(0, 1/f), f = nnz/out) or "kaiming" (N(0, 2/f)). Stored: values, indices, α, bias.
    ``backend`` (ops/backends.py): with "auto" or "numba" on CPU the whole layer is one
    fused op (:func:`~bornsparse.ops.dct_sparse.dct_sparse_affine`); "reference" is
    plain PyTorch all the way down (gradients of any order, e.g. for GraSP).
    """

    kind = "dctps"
    offset_convention = DCT_OFFSET

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        alpha: float = 1.0,
        train_alpha: bool = True,
        init: str = "zeros",
        **kwargs,
    ) -> None:
        check_choice("init", init, ("zeros", "normal", "kaiming"))
        super().__init__(in_features, out_features, init=init, **kwargs)
        register_alpha(self, alpha, train_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return dct_sparse_affine(
            x, self.out_features, self.alpha, self.values, self.plan(), self.bias,
            backend=self._backend,
        )

    def dct_dense(self) -> torch.Tensor:
        """The fixed offset Dᵀ as an (out_features, in_features) matrix, without α."""
        return dct_matrix(
            self.in_features, self.out_features, dtype=self.values.dtype,
            device=self.values.device,
        ).T

    def to_dense(self) -> torch.Tensor:
        """The effective (out, in) weight α·Dᵀ + S, with forward(x) = x Wᵀ + b."""
        return self.alpha * self.dct_dense() + self.sparse_dense()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", train_alpha={isinstance(self.alpha, nn.Parameter)}"


def register_alpha(module: nn.Module, alpha: object, train_alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"alpha must be a real number, got {alpha!r}")
    if not isinstance(train_alpha, bool):
        raise TypeError(f"train_alpha must be a bool, got {train_alpha!r}")
    # reset_parameters puts α back to this start
    module._alpha_start = float(alpha)
    t = torch.tensor(float(alpha), dtype=module.values.dtype, device=module.values.device)
    if train_alpha:
        module.alpha = nn.Parameter(t)
    else:
        module.register_buffer("alpha", t)
