"""SparseLinear, y = S x + b with S stored as values plus indices (the shared storage and
support logic is :class:`~bornsparse.nn.sparse_weight.SparseWeightBase`)."""

from __future__ import annotations

import torch

from bornsparse._checks import check_choice
from bornsparse._random import make_generator
from bornsparse.nn._layer_parts import check_features, check_features_input, register_bias
from bornsparse.nn.sparse_weight import SparseWeightBase, copy_given_values
from bornsparse.ops.sparse_product import sparse_matmul


class SparseLinear(SparseWeightBase):
    """y = x Sᵀ + b with S (out_features, in_features) holding exactly ``nnz`` entries.

    Give exactly one of ``nnz`` and ``density`` (nnz = round(density·in·out)).
    ``support="random"`` draws positions uniformly; ``"per_row"`` gives every output row
    nnz // out entries (the remainder one each to the first rows). ``init``: "kaiming"
    (N(0, 2/f)), "normal" (N(0, 1/f)), with f = nnz/out the mean fan-in, or "zeros".

    NOTE: the bias starts at zero, unlike nn.Linear; a sparse fan-in makes nn.Linear's
    1/√in bias scale meaningless.
    """

    kind = "sparse"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        nnz: int | None = None,
        density: float | None = None,
        bias: bool = True,
        support: str = "random",
        init: str = "kaiming",
        seed: int | None = None,
        indices: torch.Tensor | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_features(in_features, out_features)
        check_choice("init", init, ("kaiming", "normal", "zeros"))
        self._init_support(
            self.out_features, self.in_features, nnz=nnz, density=density, support=support,
            init=init, indices=indices, seed=seed, backend=backend, device=device,
            dtype=dtype,
        )
        register_bias(self, bias, self.out_features, device, self.values.dtype)
        if self._materialised():
            self._reset_sparse(make_generator(self.seed))

    @classmethod
    def from_indices(
        cls, in_features: int, out_features: int, indices: torch.Tensor,
        values: torch.Tensor | None = None, **kwargs,
    ) -> SparseLinear:
        """A layer on the given support (2, nnz); ``values`` (nnz,) in the same order."""
        layer = cls(in_features, out_features, indices=indices, **kwargs)
        copy_given_values(layer, indices, values)
        return layer

    def _sparse_part(self, x2: torch.Tensor) -> torch.Tensor:
        return sparse_matmul(
            x2, self.values, self.indices, self.dense_shape, plan=self.plan(),
            backend=self._backend,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        check_features_input(x, self.in_features, self.values.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = self._sparse_part(x)
        return y if self.bias is None else y + self.bias

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) weight W with forward(x) = x Wᵀ + b."""
        return self.sparse_dense()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._sparse_repr()}, bias={self.bias is not None}"
        )
