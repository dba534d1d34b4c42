"""PermutedOffsetSparseLinear: y = α·G₀ x + S x + b, DCTpS with a fixed random G₀ in place
of the DCT.

Price & Tanner's DCTpS layer adds a trainable sparse S to a fixed dense orthogonal offset,
the DCT, which costs O(q log q) per sample with a large constant. Here the offset is a
permuted block-diagonal operator G₀ = Π B(θᵢ)Pᵢ (Liao's eq. 1) with Haar-orthogonal 2×2
blocks and random permutations, drawn once and never trained: O(width · depth) per sample,
through the fused ``bornsparse.ops.permuted.permuted_block_diagonal`` kernel. At depth
2·⌈log2 width⌉ every output depends on every input, as with the DCT; a smaller depth is a
cheaper, less mixing offset.
"""

from __future__ import annotations

import torch
from torch import nn

from bornsparse._checks import check_choice, check_optional_positive_int
from bornsparse._random import make_generator
from bornsparse.nn._layer_parts import check_features, check_features_input, register_bias
from bornsparse.nn.dct_plus_sparse import register_alpha
from bornsparse.nn.description import Field, Stored, at_least, constant, is_int
from bornsparse.nn.permuted import PERM_ORDER, default_depth, draw_factors
from bornsparse.nn.sparse_weight import ScaledOffset, SparseWeightBase
from bornsparse.ops.permuted import permuted_block_diagonal
from bornsparse.ops.sparse_product import sparse_matmul

# the offset's blocks: 2×2, the size the cycle-walk kernel is fastest at
OFFSET_BLOCK = 2
# the layer's backend (the sparse family's) -> the permuted op's; "torch_sparse" concerns
# the sparse product only
_OFFSET_BACKEND = {"auto": "auto", "reference": "reference", "numba": "numba",
                   "torch_sparse": "auto", "triton": "triton"}


def default_offset_width(in_features: int, out_features: int) -> int:
    """max(in, out) rounded up to even: like the DCT's q, the smallest width that holds
    both sides (so a square layer's G₀ is an orthogonal matrix)."""
    q = max(in_features, out_features)
    return q + q % OFFSET_BLOCK


class PermutedOffsetSparseLinear(ScaledOffset, SparseWeightBase):
    """y = α·G₀ x + x Sᵀ + b: a fixed random permuted offset plus a trainable sparse S.

    Shapes: input (..., in_features), output (..., out_features); W = α·G₀ + S is
    (out_features, in_features) (see :meth:`to_dense`). S: exactly one of ``nnz`` and
    ``density``, on a ``support`` drawn like :class:`~bornsparse.nn.SparseLinear`'s;
    ``init`` for S: "zeros" (default, as DCTpS), "normal" (N(0, 1/f), f = nnz/out) or
    "kaiming" (N(0, 2/f)). ``alpha``: α's start, a Parameter when ``train_alpha`` else a
    buffer (as :class:`~bornsparse.nn.DCTPlusSparseLinear`).

    G₀: ``offset_depth`` factors (default 2·⌈log2 offset_width⌉) of Haar-orthogonal 2×2
    blocks with random permutations, ``offset_width`` wide (default max(in, out) rounded up
    to even); the input is zero-padded to the width and the first out_features outputs
    kept. G₀ is drawn from ``seed`` after S's support and is never trained: its blocks
    (``offset_weight``, (depth, width/2, 2, 2), the layer's dtype) and permutations
    (``offset_perms``, (depth, width), int64, application order) are buffers, stored in the
    state_dict and in checkpoints as they are (not regenerated from the seed, so a file
    does not depend on this library's random streams). Trainable: values (nnz), α, bias.

    ``backend``: as the sparse layers' ("auto", "reference", "numba", "torch_sparse"); the
    offset runs the permuted op with the same choice ("torch_sparse": "auto").
    """

    kind = "permuted_offset"

    @classmethod
    def fields(cls) -> dict[str, Field]:
        # G₀ is described by its blocks and permutations, stored as they are
        return {**super().fields(), "offset_depth": Field(is_int),
                "offset_width": Field(at_least(OFFSET_BLOCK)),
                "perm_order": constant(PERM_ORDER)}

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "offset_depth": self.offset_depth,
                "offset_width": self.offset_width, "perm_order": PERM_ORDER}

    @classmethod
    def stored(cls, args) -> dict[str, Stored]:
        d, w, b = args["offset_depth"], args["offset_width"], OFFSET_BLOCK
        return {**super().stored(args), "offset_weight": Stored((d, w // b, b, b)),
                "offset_perms": Stored((d, w), "perms")}

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        pos, kw = super().constructor_arguments(args, tensors, device)
        return pos, {**kw, "offset_depth": args["offset_depth"],
                     "offset_width": args["offset_width"]}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        nnz: int | None = None,
        density: float | None = None,
        bias: bool = True,
        alpha: float = 1.0,
        train_alpha: bool = True,
        offset_depth: int | None = None,
        offset_width: int | None = None,
        support: str = "random",
        init: str = "zeros",
        seed: int | None = None,
        indices: torch.Tensor | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_features(in_features, out_features)
        check_choice("init", init, ("zeros", "normal", "kaiming"))
        width = check_optional_positive_int("offset_width", offset_width)
        if width is None:
            width = default_offset_width(self.in_features, self.out_features)
        if width < max(self.in_features, self.out_features) or width % OFFSET_BLOCK:
            raise ValueError(
                f"offset_width must be even and at least max(in_features, out_features) = "
                f"{max(self.in_features, self.out_features)}, got {width}"
            )
        depth = check_optional_positive_int("offset_depth", offset_depth)
        self.offset_width = width
        self.offset_depth = default_depth(width, OFFSET_BLOCK) if depth is None else depth
        self._init_support(
            self.out_features, self.in_features, nnz=nnz, density=density, support=support,
            init=init, indices=indices, seed=seed, backend=backend, device=device,
            dtype=dtype,
        )
        register_alpha(self, alpha, train_alpha)
        dtype = self.values.dtype
        self.register_buffer("offset_weight", torch.empty(
            (self.offset_depth, width // OFFSET_BLOCK, OFFSET_BLOCK, OFFSET_BLOCK),
            device=device, dtype=dtype))
        self.register_buffer("offset_perms", torch.empty(
            (self.offset_depth, width), device=device, dtype=torch.int64))
        register_bias(self, bias, self.out_features, device, dtype)
        if self._materialised():
            self.reset_parameters()

    @classmethod
    def from_budget(
        cls, in_features: int, out_features: int, budget: int, *, bias: bool,
        seed: int | None, device: torch.device, dtype: torch.dtype,
        offset_depth: int | None = None,
    ) -> PermutedOffsetSparseLinear:
        """The layer ``sparsify(kind="permuted_offset")`` puts in for a budget of
        ``budget`` weights: ``budget`` entries in S, an offset ``offset_depth`` deep."""
        return cls(in_features, out_features, nnz=budget, offset_depth=offset_depth,
                   bias=bias, seed=seed, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw S's support and values, then G₀, anew from ``seed`` (zero bias, α at its
        start): bitwise the layer its constructor built. For a layer built on the meta
        device, after ``to_empty(device=...)``."""
        gen = make_generator(self.seed)
        self._reset_sparse(gen)
        perms, blocks = draw_factors(self.offset_depth, self.offset_width, OFFSET_BLOCK, gen,
                                     self.values.dtype)
        self.offset_weight.copy_(blocks)
        self.offset_perms.copy_(perms)

    def _check_input(self, x: torch.Tensor) -> None:
        check_features_input(x, self.in_features, self.values.dtype)

    def _offset(self, x: torch.Tensor) -> torch.Tensor:
        return permuted_block_diagonal(
            x, self.offset_weight, self.offset_perms, out_features=self.out_features,
            backend=_OFFSET_BACKEND[self._backend],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = self.alpha * self._offset(x) + sparse_matmul(
            x, self.values, self.indices, self.dense_shape, plan=self.plan(),
            backend=self._backend,
        )
        return y if self.bias is None else y + self.bias

    def offset_dense(self) -> torch.Tensor:
        """G₀ as an (out_features, in_features) matrix, without α (no gradient)."""
        with torch.no_grad():
            eye = torch.eye(self.in_features, dtype=self.values.dtype,
                            device=self.values.device)
            cols = permuted_block_diagonal(
                eye, self.offset_weight, self.offset_perms, out_features=self.out_features,
                backend="reference",
            )
        return cols.T.contiguous()

    def to_dense(self) -> torch.Tensor:
        """The effective (out, in) weight α·G₀ + S, with forward(x) = x Wᵀ + b;
        differentiable in α and the values."""
        return self.alpha * self.offset_dense() + self.sparse_dense()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._sparse_repr()}, offset_depth={self.offset_depth}, "
            f"offset_width={self.offset_width}, bias={self.bias is not None}, "
            f"train_alpha={isinstance(self.alpha, nn.Parameter)}"
        )
