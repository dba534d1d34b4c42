"""Layers built on the permuted block-diagonal operator of Liao's "Parameter-Efficient
Approximation by Exploitation of Sparsity" (§3, eq. 1-5)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bornsparse._checks import (
    check_float_tensor,
    check_last_dim,
    check_optional_positive_int,
    check_positive_int,
)
from bornsparse._random import make_generator, resolve_seed
from bornsparse.nn import description as desc
from bornsparse.nn._layer_parts import check_features, register_bias
from bornsparse.ops.backends import check_backend
from bornsparse.ops.memory import advise_huge_pages
from bornsparse.ops.penalty import orthogonality_penalty
from bornsparse.ops.permuted import permuted_block_diagonal, permuted_tanh_network

#: the order the factors are stored in, as checkpoint files name it
PERM_ORDER = "application order: factor 0 first"


def default_width(in_features: int, out_features: int, block_size: int) -> int:
    """2·max(in, out), the paper's choice, rounded up to a multiple of block_size."""
    w = 2 * max(in_features, out_features)
    return -(-w // block_size) * block_size


def budget_depth(budget: int, width: int, block_size: int = 2) -> int:
    """The depth whose depth · width · block_size weights come closest to ``budget`` (>= 1)."""
    return max(1, math.floor(budget / (width * block_size) + 0.5))


def default_depth(width: int, block_size: int) -> int:
    """2·⌈log_k(width)⌉ factors.

    ⌈log_k(width)⌉ factors are the fewest for which every output can depend on every input
    (each factor multiplies the receptive field by at most k); the paper finds learning sets in
    a little above that depth (§5.1), so the default doubles it.
    """
    return 2 * max(1, math.ceil(math.log(width) / math.log(block_size) - 1e-9))


def haar_orthogonal(n: int, k: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """n Haar-random k×k orthogonal matrices, shape (n, k, k) (QR with sign correction)."""
    a = torch.randn(n, k, k, generator=generator, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(a)
    # QR alone is not Haar: fix the signs so diag(r) > 0 (Mezzadri 2007)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.to(dtype)


def draw_factors(depth: int, width: int, block_size: int, generator: torch.Generator,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random permutations (depth, width) int64, then Haar-orthogonal blocks
    (depth, width/k, k, k) in ``dtype``, both on the CPU, in that order from ``generator``."""
    perms = torch.stack([torch.randperm(width, generator=generator, device="cpu")
                         for _ in range(depth)])
    nblocks = width // block_size
    blocks = haar_orthogonal(depth * nblocks, block_size, generator, dtype)
    return perms, blocks.reshape(depth, nblocks, block_size, block_size)


class _PermutedBase(desc.Described, nn.Module, abstract=True):
    """Shared construction, validation, description and utilities of the two layers."""

    @classmethod
    def fields(cls) -> dict[str, desc.Field]:
        return {**desc.LINEAR_FIELDS, "width": desc.Field(desc.is_int),
                "depth": desc.Field(desc.is_int), "block_size": desc.Field(desc.at_least(2)),
                **desc.DTYPE_FIELD,
                "perm_order": desc.constant(PERM_ORDER)}

    def describe(self) -> dict[str, object]:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    width=self.width, depth=self.depth, block_size=self.block_size,
                    dtype=desc.dtype_name(self.weight.dtype), perm_order=PERM_ORDER)

    @classmethod
    def stored(cls, args) -> dict[str, desc.Stored]:
        w, k, d = args["width"], args["block_size"], args["depth"]
        return {"weight": desc.Stored((d, w // k, k, k)), "perms": desc.Stored((d, w), "perms")}

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        # seed: the drawn permutations and blocks are overwritten by the file's
        return (args["in_features"], args["out_features"]), dict(
            width=args["width"], depth=args["depth"], block_size=args["block_size"], seed=0,
            device=device, dtype=desc.DTYPES[args["dtype"]])

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        width: int | None,
        depth: int | None,
        block_size: int,
        seed: int | None,
        backend: str,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.in_features, self.out_features = check_features(in_features, out_features)
        self.block_size = check_positive_int("block_size", block_size)
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size!r}")
        width = check_optional_positive_int("width", width)
        if width is None:
            width = default_width(self.in_features, self.out_features, self.block_size)
        if width < max(self.in_features, self.out_features):
            raise ValueError(
                f"width must be at least max(in_features, out_features) = "
                f"{max(self.in_features, self.out_features)}, got {width}"
            )
        if width % self.block_size:
            raise ValueError(
                f"width must be divisible by block_size = {self.block_size}, got {width}"
            )
        self.width = width
        depth = check_optional_positive_int("depth", depth)
        self.depth = default_depth(width, self.block_size) if depth is None else depth
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a real floating dtype, got {dtype}")

        self.seed = resolve_seed(seed)
        nblocks = width // self.block_size
        shape = (self.depth, nblocks, self.block_size, self.block_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        # a buffer, so the state_dict carries the permutations and a loaded module is the
        # same function
        self.register_buffer("perms", torch.empty(
            (self.depth, width), device=device, dtype=torch.int64))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the permutations and blocks anew from ``seed`` and zero the biases: bitwise
        the layer its constructor built. For a layer built on the meta device, after
        ``to_empty(device=...)``."""
        perms, blocks = draw_factors(self.depth, self.width, self.block_size,
                                     make_generator(self.seed), self.weight.dtype)
        # the kernels read the weight at random blocks: memory advised for huge pages
        # (ops/runtime/memory.py) before its first touch
        advise_huge_pages(self.weight)
        self.weight.copy_(blocks)
        self.perms.copy_(perms)
        for name in ("bias", "biases"):
            if getattr(self, name, None) is not None:
                getattr(self, name).zero_()

    @property
    def backend(self) -> str:
        """Kernel choice (ops/backends.py): "auto" (numba on CPU float32/64, else
        reference), "reference" (plain PyTorch, any order of gradients) or "numba"."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value, "permuted")

    def orthogonality_penalty(self) -> torch.Tensor:
        """Mean over all blocks of 2‖I − BᵀB‖²_F (eq. 2); differentiable, a scalar. With the
        numba backend the value and its gradient come from one pass over the blocks."""
        return orthogonality_penalty(self.weight, backend=self.backend)

    def _check_input(self, x: torch.Tensor) -> None:
        check_float_tensor("input", x)
        check_last_dim("input", x, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"width={self.width}, depth={self.depth}, block_size={self.block_size}"
        )


class PermutedBlockDiagonal(_PermutedBase):
    """The linear operator G(θ) = Π_{i=1..N} B(θ_i) P_i of the permuted block-diagonal paper, eq. 1.

    Input (..., in_features) is zero-padded to ``width``, the factors are applied (P_N first),
    and the first ``out_features`` entries are returned (plus ``bias`` if enabled).
    Parameters: ``depth · width · block_size`` block entries. Defaults: ``width`` is
    2·max(in, out) (the paper's), ``depth`` is 2·⌈log_{block_size}(width)⌉.

    NOTE: blocks start Haar-orthogonal, so G starts orthogonal; with ``width > in_features``
    the map in -> out is a slice of it and has norm at most 1.
    """

    kind = "permuted"

    @classmethod
    def fields(cls) -> dict[str, desc.Field]:
        return {**super().fields(), **desc.BIAS_FIELD}

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "bias": self.bias is not None}

    @classmethod
    def stored(cls, args) -> dict[str, desc.Stored]:
        out = super().stored(args)
        if args["bias"]:
            out["bias"] = desc.Stored((args["out_features"],))
        return out

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        pos, kw = super().constructor_arguments(args, tensors, device)
        return pos, {**kw, "bias": args["bias"]}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        width: int | None = None,
        depth: int | None = None,
        block_size: int = 2,
        bias: bool = False,
        seed: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, width=width, depth=depth, block_size=block_size,
            seed=seed, backend=backend, device=device, dtype=dtype,
        )
        register_bias(self, bias, self.out_features, device, self.weight.dtype)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # the op pads to width and slices to out_features itself (the kernel never
        # materialises either)
        y = permuted_block_diagonal(
            x, self.weight, self.perms, out_features=self.out_features, backend=self.backend
        )
        if self.bias is not None:
            y = y + self.bias
        return y

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        depth: int | None = None,
        width: int | None = None,
        block_size: int = 2,
        steps: int = 2000,
        lr: float = 1e-2,
        batch_size: int = 64,
        penalty: float = 1.0,
        seed: int | None = None,
        progress: bool = True,
        backend: str = "auto",
    ) -> PermutedBlockDiagonal:
        """A bias-free layer whose ``to_dense()`` approximates ``weight``, fitted by training.

        ``weight``: (out_features, in_features), as ``nn.Linear.weight``; the layer gets its
        device and dtype. ``depth``/``width``/``block_size``/``backend`` as the constructor
        (defaults: 2·max(in, out) wide, 2·⌈log_k(width)⌉ deep). The blocks are trained by
        the operator-learning objective (random Gaussian inputs, Adam at ``lr``, the
        orthogonality penalty's schedule scaled by ``penalty``, ``steps`` steps of
        ``batch_size`` inputs; see :mod:`bornsparse.nn.fit`), with a tqdm bar unless
        ``progress=False``. ``seed`` fixes the permutations, the start and the inputs.
        The penalty biases the fit towards orthogonal blocks: ``penalty=0`` fits a matrix
        whose factors are far from orthogonal more closely.

        Returns the layer; its attribute ``fit_error`` (a float, not part of the state_dict)
        is the relative Frobenius error ‖to_dense() − weight‖_F / ‖weight‖_F. The
        permutations stay the random ones drawn from ``seed``: only the blocks are fitted,
        so how close it gets depends on the depth and on how much structure ``weight`` has
        (``depth · width · block_size`` parameters against its out·in entries).
        """
        from bornsparse.nn.fit import fit_operator_

        check_float_tensor("weight", weight)
        if weight.dim() != 2:
            raise ValueError(
                f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
            )
        if weight.device.type == "meta":
            raise ValueError("weight is on the meta device: from_dense needs its values")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight must be finite, got NaN or infinite entries")
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, width=width, depth=depth, block_size=block_size,
            seed=seed, backend=backend, device=weight.device, dtype=weight.dtype,
        )
        layer.fit_error = fit_operator_(
            layer, weight, steps=steps, lr=lr, batch_size=batch_size, penalty=penalty,
            seed=seed, progress=progress,
        )
        return layer

    @classmethod
    def from_budget(
        cls, in_features: int, out_features: int, budget: int, *, bias: bool,
        seed: int | None, device: torch.device, dtype: torch.dtype,
        dense_weight: torch.Tensor | None = None, fit: dict | None = None,
    ) -> PermutedBlockDiagonal:
        """The layer ``sparsify(kind="permuted")`` puts in for a budget of ``budget``
        weights: 2×2 blocks, the default width, the depth of :func:`budget_depth`. With
        ``fit`` (keyword arguments of :meth:`from_dense`) its blocks are fitted to
        ``dense_weight`` (out, in), bias-free (the caller puts the bias in)."""
        depth = budget_depth(budget, default_width(in_features, out_features, 2))
        if fit is None:
            return cls(in_features, out_features, depth=depth, bias=bias, seed=seed,
                       device=device, dtype=dtype)
        # the same seed as the unfitted layer: the same permutations, fitted blocks
        return cls.from_dense(dense_weight, depth=depth, seed=seed, **fit).to(device)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix W with forward(x) == x @ W.T (+ bias)."""
        eye = torch.eye(self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        cols = permuted_block_diagonal(
            eye, self.weight, self.perms, out_features=self.out_features, backend="reference"
        )
        return cols.T.contiguous()


class PermutedTanhNetwork(_PermutedBase):
    """The tanh network h_θ of the permuted block-diagonal paper, eq. 3-5.

    h⁰ = x (zero-padded to width); hⁱ = tanh(bᵢ + B(θᵢ)Pᵢ hⁱ⁻¹) for i < N; the output is
    b_N + B(θ_N)P_N h^{N-1}, sliced to out_features. Biases start at zero, so at
    initialisation the Jacobian at x = 0 equals the PermutedBlockDiagonal with the same
    weight and perms. Factors are indexed in application order, as in that layer.
    """

    @classmethod
    def stored(cls, args) -> dict[str, desc.Stored]:
        return {**super().stored(args), "biases": desc.Stored((args["depth"], args["width"]))}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        width: int | None = None,
        depth: int | None = None,
        block_size: int = 2,
        seed: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, width=width, depth=depth, block_size=block_size,
            seed=seed, backend=backend, device=device, dtype=dtype,
        )
        self.biases = nn.Parameter(
            torch.empty(self.depth, self.width, device=device, dtype=self.weight.dtype)
        )
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return permuted_tanh_network(
            x, self.weight, self.perms, self.biases, out_features=self.out_features,
            backend=self.backend,
        )
