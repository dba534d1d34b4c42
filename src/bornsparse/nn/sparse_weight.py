"""SparseWeightBase: values, indices, plan cache and support updates shared by every sparse
layer (SparseLinear, the convolutions, the DCT-plus-sparse and permuted-offset layers).

Storage is O(nnz) from the first line of the constructor on: the support is drawn by
``_support.sample_support`` without a dense mask, the weight is the ``values`` Parameter
(nnz,) and the ``indices`` buffer (2, nnz), and the state_dict holds nothing else (plus
bias, and α for the DCT layers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from bornsparse._checks import check_choice, check_fraction
from bornsparse._random import make_generator, resolve_seed
from bornsparse.nn import description as desc
from bornsparse.nn._support import sample_support
from bornsparse.ops.backends import check_backend
from bornsparse.ops.sparse_product import (
    SparsePlan,
    build_plan,
    check_indices,
    index_dtype,
    sort_support,
)

SUPPORTS = ("random", "per_row")


def resolve_nnz(nnz: object, density: object, rows: int, cols: int) -> int:
    """The exact entry count from exactly one of ``nnz`` and ``density`` (rounded, >= 1)."""
    total = rows * cols
    if (nnz is None) == (density is None):
        raise ValueError(
            f"pass exactly one of nnz and density, got nnz={nnz!r}, density={density!r}"
        )
    if nnz is not None:
        if isinstance(nnz, bool) or not isinstance(nnz, numbers.Integral):
            raise TypeError(f"nnz must be an int, got {nnz!r} ({type(nnz).__name__})")
        if not 1 <= nnz <= total:
            raise ValueError(
                f"nnz must lie in [1, {total}] for a ({rows}, {cols}) weight, got {nnz}"
            )
        return int(nnz)
    d = check_fraction("density", density)
    n = min(total, math.floor(d * total + 0.5))  # half up, so density >= 0.5/total gives 1
    if n < 1:
        raise ValueError(
            f"density={density!r} gives {d * total:.3g} < 1 entries for a ({rows}, {cols}) "
            f"weight; use density >= {0.5 / total:.3g} or pass nnz"
        )
    return n


#: what every sparse layer describes beside its geometry
SPARSE_FIELDS = {"nnz": desc.Field(desc.is_int), **desc.BIAS_FIELD,
                 "support": desc.Field(desc.is_str), **desc.DTYPE_FIELD}


# the compressed forms of the support kept beside ``indices`` (SparsePlan's fields)
_PLAN_BUFFERS = ("_rowptr", "_colptr", "_csc_perm", "_csc_rows")


def _support_key(idx: torch.Tensor) -> tuple:
    # in-place writes bump _version; a new tensor (.to(), assignment) has a new data_ptr
    return (idx.data_ptr(), idx._version, idx.device)


class SparseWeightBase(desc.Described, nn.Module, abstract=True):
    """Values, indices, plan cache and support updates shared by every sparse layer.

    Subclasses call :meth:`_init_support` with the dense weight's (rows, cols): rows are
    outputs (out features / out channels), cols the flattened inputs of one row. The
    description (:mod:`bornsparse.nn.description`) given here is a linear layer's
    (in_features, out_features, the support); the convolutions extend it.
    """

    values: nn.Parameter
    indices: torch.Tensor
    _backend_family = "sparse"  # which backends the layer's ops have (ops/backends.py)

    # ---- description -----------------------------------------------------------------

    @classmethod
    def has_support(cls) -> bool:
        return True

    @classmethod
    def fields(cls) -> dict[str, desc.Field]:
        return {**desc.LINEAR_FIELDS, **SPARSE_FIELDS}

    def describe(self) -> dict[str, object]:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    **self._sparse_description())

    @classmethod
    def stored(cls, args: Mapping[str, Any]) -> dict[str, desc.Stored]:
        return cls._sparse_stored(args, args["out_features"], args["in_features"])

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        return (args["in_features"], args["out_features"]), cls._sparse_kwargs(
            args, tensors, device)

    def _sparse_description(self) -> dict[str, object]:
        # support= does not change the function; kept so a rebuilt layer reads alike
        return dict(nnz=self.nnz, bias=self.bias is not None, support=self.support,
                    dtype=desc.dtype_name(self.values.dtype))

    @staticmethod
    def _sparse_stored(args: Mapping[str, Any], rows: int, cols: int) -> dict[str, desc.Stored]:
        nnz = args["nnz"]
        out = {"values": desc.Stored((nnz,)),
               "indices": desc.Stored((2, nnz), "support", (rows, cols))}
        if args["bias"]:
            out["bias"] = desc.Stored((rows,))
        return out

    @staticmethod
    def _sparse_kwargs(args, tensors, device) -> dict[str, Any]:
        # seed: the drawn values are overwritten by the file's
        return dict(bias=args["bias"], support=args["support"], init="zeros", seed=0,
                    indices=tensors["indices"].to(torch.int64), device=device,
                    dtype=desc.DTYPES[args["dtype"]])

    def _init_support(
        self,
        rows: int,
        cols: int,
        *,
        nnz: object,
        density: object,
        support: str,
        init: str,
        indices: torch.Tensor | None,
        seed: object,
        backend: object = "auto",
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """Validate and allocate the support and values; nothing is drawn here (see
        :meth:`reset_parameters`), so this works on the meta device."""
        self._rows, self._cols = rows, cols
        self.backend = backend
        self.support = check_choice("support", support, SUPPORTS)
        self.init = init
        self.seed = resolve_seed(seed)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a real floating torch.dtype, got {dtype!r}")
        # a given support is put in by the first reset_parameters and kept by later ones
        self._given_indices: torch.Tensor | None = None
        self._support_given = indices is not None
        if indices is not None:
            if nnz is not None or density is not None:
                raise ValueError("pass either indices or nnz/density, not both")
            self._given_indices, _ = sort_support(indices.detach().cpu(), (rows, cols))
            check_indices(self._given_indices, (rows, cols))
            n = self._given_indices.shape[1]
        else:
            n = resolve_nnz(nnz, density, rows, cols)
        # int32 where it fits: 12 bytes per float32 stored weight instead of 20
        self.register_buffer("indices", torch.empty(
            (2, n), device=device, dtype=index_dtype(rows, cols)))
        self.values = nn.Parameter(torch.empty(n, device=device, dtype=dtype))
        self._plan_key: tuple | None = None
        for name in _PLAN_BUFFERS:
            self.register_buffer(name, None, persistent=False)

    def _materialised(self) -> bool:
        return self.values.device.type != "meta"

    @torch.no_grad()
    def _reset_sparse(self, gen: torch.Generator) -> None:
        """The support (drawn from ``gen``, or the given one), then S's values from ``gen``,
        then a zero bias and α at its start value; the plan is rebuilt."""
        if not self._support_given:
            self.indices.copy_(sample_support(self._rows, self._cols, self.nnz, gen,
                                              per_row=self.support == "per_row"))
        elif self._given_indices is not None:
            self.indices.copy_(self._given_indices)
            self._given_indices = None
        self._init_values(self.init, gen)
        if getattr(self, "bias", None) is not None:
            self.bias.zero_()
        alpha = getattr(self, "alpha", None)
        if isinstance(alpha, torch.Tensor):
            alpha.fill_(self._alpha_start)
        self.refresh_plan()

    def reset_parameters(self) -> None:
        """Draw the layer's start anew from its ``seed``: bitwise the layer its constructor
        built (support, values, bias, α). For a layer built on the meta device, after
        ``to_empty(device=...)``. A layer built on given ``indices`` keeps its support."""
        self._reset_sparse(make_generator(self.seed))

    # ---- support ---------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        """Number of stored (trainable) weight entries."""
        return self.values.numel()

    @property
    def dense_shape(self) -> tuple[int, int]:
        """(rows, cols) of the dense weight matrix that ``indices`` address."""
        return (self._rows, self._cols)

    @property
    def density(self) -> float:
        return self.nnz / (self._rows * self._cols)

    @property
    def backend(self) -> str:
        """Kernel choice (ops/backends.py): "auto", "reference", "numba" or "torch_sparse"
        for the linear layers; "auto" or "reference" for the convolutions."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value, self._backend_family)

    @torch.no_grad()
    def refresh_plan(self) -> None:
        """Rebuild (and re-validate) the support's compressed form from ``indices``.

        The plan's tensors are non-persistent buffers, so they move with the module and
        torch.compile sees them as plain inputs; nothing is built on the meta device.
        """
        idx = self.indices
        if idx.device.type == "meta":
            for name in _PLAN_BUFFERS:
                setattr(self, name, None)
            self._plan_key = None
            return
        plan = build_plan(idx, self.dense_shape)
        for name, t in zip(_PLAN_BUFFERS, plan.tensors()[2:], strict=True):
            setattr(self, name, t)
        self._plan_key = _support_key(idx)

    def plan(self) -> SparsePlan:
        """The support's compressed structure (:class:`SparsePlan`).

        Eagerly, an ``indices`` changed since the last build (in place, or replaced) is
        noticed and the plan rebuilt; a compiled graph takes the buffers as they are
        (``update_support_`` and ``load_state_dict`` refresh them).
        """
        if not torch.compiler.is_compiling() and self._plan_key != _support_key(self.indices):
            self.refresh_plan()
        if self._rowptr is None:
            raise RuntimeError("the layer's support is on the meta device; materialise it "
                               "(to_empty plus load_state_dict, or bornsparse.load) first")
        idx = self.indices
        return SparsePlan(self.dense_shape, idx[0], idx[1], self._rowptr, self._colptr,
                          self._csc_perm, self._csc_rows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._plan_key = None  # indices were copied in place: rebuild at the next plan()

    @torch.no_grad()
    def update_support_(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the support and its values in place, keeping nnz (RigL/SET, pruning).

        ``indices`` (2, nnz) integer, any order, unique, in range; ``values`` (nnz,).
        The ``values`` Parameter object is kept, so optimizers still hold it; their state
        for moved entries is the caller's business.
        """
        if not isinstance(indices, torch.Tensor) or indices.shape != (2, self.nnz):
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices)
            raise ValueError(f"indices must have shape (2, {self.nnz}), got {got}")
        if not isinstance(values, torch.Tensor) or values.shape != (self.nnz,):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
            raise ValueError(f"values must have shape ({self.nnz},), got {got}")
        idx, vals = sort_support(indices.detach(), self.dense_shape, values.detach())
        check_indices(idx, self.dense_shape, nnz=self.nnz)
        self.indices.copy_(idx)
        self.values.copy_(vals)
        self.refresh_plan()

    def _linear_indices(self) -> torch.Tensor:
        # int64: rows · cols may pass 2³¹ even where each index fits int32
        return self.indices[0].long() * self._cols + self.indices[1].long()

    def sparse_dense(self) -> torch.Tensor:
        """S as a dense (rows, cols) matrix; differentiable in ``values``."""
        flat = self.values.new_zeros(self._rows * self._cols)
        return flat.scatter(0, self._linear_indices(), self.values).view(self._rows, self._cols)

    def _init_values(self, init: str, gen: torch.Generator) -> None:
        with torch.no_grad():
            if init == "zeros":
                self.values.zero_()
                return
            # fan-in of the sparse weight: the mean number of entries per output row
            fan = max(1.0, self.nnz / self._rows)
            std = math.sqrt((2.0 if init == "kaiming" else 1.0) / fan)
            v = torch.randn(self.nnz, generator=gen, dtype=torch.float64, device="cpu") * std
            self.values.copy_(v.to(self.values.dtype))

    def _check_dtype(self, x: torch.Tensor) -> None:
        if x.dtype != self.values.dtype:
            raise TypeError(
                f"input must have the layer's dtype {self.values.dtype}, got {x.dtype}"
            )

    def _sparse_repr(self) -> str:
        return f"nnz={self.nnz}, density={self.density:.3g}, support={self.support!r}"


def copy_given_values(
    layer: SparseWeightBase, indices: torch.Tensor, values: torch.Tensor | None
) -> None:
    """Put ``values`` (ordered like the caller's ``indices``) into the sorted layer."""
    if values is None:
        return
    if layer.values.device.type == "meta":
        raise ValueError("values cannot be put into a layer on the meta device; build it "
                         "on a real device, or load the values after to_empty()")
    if not isinstance(values, torch.Tensor) or values.shape != (layer.nnz,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
        raise ValueError(f"values must have shape ({layer.nnz},), got {got}")
    _, vals = sort_support(indices.detach().cpu(), layer.dense_shape, values.detach().cpu())
    with torch.no_grad():
        layer.values.copy_(vals)


class ScaledOffset(desc.Described, abstract=True):
    """The description of a layer with a fixed offset scaled by α (a Parameter when
    ``train_alpha``): put before the layer's base class. ``offset_convention``: the
    format's name for how the offset is computed (None: the layer describes its offset
    itself)."""

    offset_convention: ClassVar[str | None] = None

    @classmethod
    def fields(cls) -> dict[str, desc.Field]:
        out = {**super().fields(), "train_alpha": desc.Field(desc.is_bool)}
        if cls.offset_convention is not None:
            out["offset"] = desc.constant(cls.offset_convention)
        return out

    def describe(self) -> dict[str, object]:
        out = {**super().describe(), "train_alpha": isinstance(self.alpha, nn.Parameter)}
        if self.offset_convention is not None:
            out["offset"] = self.offset_convention
        return out

    @classmethod
    def stored(cls, args: Mapping[str, Any]) -> dict[str, desc.Stored]:
        return {**super().stored(args), "alpha": desc.Stored(())}

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        pos, kw = super().constructor_arguments(args, tensors, device)
        return pos, {**kw, "train_alpha": args["train_alpha"]}
