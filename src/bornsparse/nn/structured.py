"""Structured dense-replacement baselines: low rank (U Vᵀ) and Monarch, in plain PyTorch.

They are what the permuted operator G(θ) and the DCTpS layers are compared against at equal
parameter counts, so they are written from their definitions with matmul / bmm only (no
custom op; Monarch's backward is written out by hand, from the same bmm calls): easy to
check against their dense matrices, and any device, dtype or order of derivative works.
Both start with nn.Linear's output scale: for inputs of unit variance each output has
variance 1/3 (nn.Linear's U(±1/√in) weights), and the bias is nn.Linear's
U(±1/√in).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bornsparse._checks import check_positive_int
from bornsparse._random import make_generator, resolve_seed
from bornsparse.nn import description as desc
from bornsparse.nn._layer_parts import check_features, check_features_input

#: the Monarch factors' layout, as checkpoint files name it
MONARCH_LAYOUT = "y = P_s^T L P_q R x: right (k, q, p) on x as (k, p), u[l*q + r] = z[r*k + l]"


def _empty(shape: tuple[int, ...], dtype: torch.dtype | None,
           device: torch.device | str | None) -> nn.Parameter:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a real floating torch.dtype, got {dtype!r}")
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


@torch.no_grad()
def _fill_uniform(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    # drawn in float64 on the CPU so a seed gives the same start on every device and dtype
    t.copy_((torch.rand(t.shape, generator=gen, dtype=torch.float64, device="cpu") * 2 - 1)
            * bound)


def _bmm_into(a: torch.Tensor, b: torch.Tensor, batch: int, k: int, n: int) -> torch.Tensor:
    """bmm(a, b) for a (k, batch, ·), written straight into (batch, k, n) memory and returned
    as its (k, batch, n) view: the stride permutations that follow then cost one contiguous
    copy, not a copy per reshape."""
    out = torch.empty(batch, k, n, dtype=a.dtype, device=a.device).transpose(0, 1)
    return torch.bmm(a, b, out=out)


def _monarch_plain(x2: torch.Tensor, right: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """_MonarchMultiply's forward in differentiable ops only: what torch.compile and
    torch.export trace (dynamo refuses bmm's non-contiguous ``out=``; inductor fuses the
    copies anyway)."""
    k, q, p = right.shape
    batch = x2.shape[0]
    h = torch.bmm(x2.reshape(batch, k, p).transpose(0, 1), right.transpose(1, 2))
    u = h.transpose(0, 1).reshape(batch, q, k).transpose(1, 2).transpose(0, 1)
    o = torch.bmm(u, left.transpose(1, 2))
    return o.permute(1, 2, 0).reshape(batch, left.shape[1] * k)


class _MonarchMultiply(torch.autograd.Function):
    """M x with a hand-written backward, the memory layout of fly's
    ``blockdiag_butterfly_multiply`` (written here from the definition in MonarchLinear's
    docstring): autograd through the plain bmm / permute / reshape chain copied every
    intermediate once more in backward and measured 1.24-1.37× slower than fly's at
    1024 → 1024, 32 blocks (batch 64 / 256, one thread); this one 0.85-1.0×.

    x2 (batch, in), right (k, q, p), left (k, s, q) -> (batch, s·k).
    """

    @staticmethod
    def forward(ctx, x2: torch.Tensor, right: torch.Tensor, left: torch.Tensor
                ) -> torch.Tensor:
        k, q, p = right.shape
        s = left.shape[1]
        batch = x2.shape[0]
        xk = x2.reshape(batch, k, p).transpose(0, 1)  # (k, batch, p)
        h = _bmm_into(xk, right.transpose(1, 2), batch, k, q)
        # P_q: block l of L reads entries r·k + l of R x, i.e. (batch, q, k) transposed
        u = h.transpose(0, 1).reshape(batch, q, k).transpose(1, 2).contiguous().transpose(0, 1)
        o = _bmm_into(u, left.transpose(1, 2), batch, k, s)
        ctx.save_for_backward(x2, right, left, u)
        return o.permute(1, 2, 0).reshape(batch, s * k)  # y[t·k + l] = o[l, :, t]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, right, left, u = ctx.saved_tensors
        k, q, p = right.shape
        s = left.shape[1]
        batch = x2.shape[0]
        xk = x2.reshape(batch, k, p).transpose(0, 1)
        do = dy.reshape(batch, s, k).transpose(1, 2).contiguous().transpose(0, 1)
        if torch.is_grad_enabled():
            # create_graph: only differentiable ops (no out=), and u rebuilt from x2 and
            # right so that higher derivatives see its dependence on them
            u = torch.bmm(xk, right.transpose(1, 2)).transpose(0, 1).reshape(batch, q, k)
            u = u.permute(2, 0, 1)
            dh = torch.bmm(do, left).permute(1, 2, 0).reshape(batch, k, q).transpose(0, 1)
            dx = torch.bmm(dh, right).transpose(0, 1).reshape(batch, k * p)
        else:
            du = _bmm_into(do, left, batch, k, q)
            dh = du.transpose(0, 1).transpose(1, 2).contiguous().reshape(batch, k, q)
            dh = dh.transpose(0, 1)
            dx = _bmm_into(dh, right, batch, k, p).transpose(0, 1).reshape(batch, k * p)
        return dx, torch.bmm(dh.transpose(1, 2), xk), torch.bmm(do.transpose(1, 2), u)


class _StructuredLinear(desc.Described, nn.Module, abstract=True):
    """Shape checks, bias, description and repr shared by the two layers."""

    in_features: int
    out_features: int
    _size: str  # the constructor's third argument: "rank" or "nblocks"

    @classmethod
    def fields(cls) -> dict[str, desc.Field]:
        return {**desc.LINEAR_FIELDS, **desc.BIAS_FIELD, **desc.DTYPE_FIELD,
                cls._size: desc.Field(desc.is_int)}

    def describe(self) -> dict[str, object]:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None, dtype=desc.dtype_name(self._factors()[0][0].dtype),
                    **{self._size: getattr(self, self._size)})

    @classmethod
    def stored(cls, args) -> dict[str, desc.Stored]:
        out = {name: desc.Stored(shape) for name, shape in cls._factor_shapes(args).items()}
        if args["bias"]:
            out["bias"] = desc.Stored((args["out_features"],))
        return out

    @classmethod
    def _factor_shapes(cls, args) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        # seed: the drawn factors are overwritten by the file's
        return (args["in_features"], args["out_features"], args[cls._size]), dict(
            bias=args["bias"], seed=0, device=device, dtype=desc.DTYPES[args["dtype"]])

    def _init_bias(self, bias: object, dtype, device) -> None:
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        if bias:
            self.bias = _empty((self.out_features,), dtype, device)
        else:
            self.register_parameter("bias", None)

    def _factors(self) -> tuple[tuple[torch.Tensor, float], ...]:
        """Each factor with its init bound, in drawing order."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Draw the factors and the bias anew from ``seed``: bitwise the layer its
        constructor built. For a layer built on the meta device, after
        ``to_empty(device=...)``."""
        gen = make_generator(self.seed)
        for t, bound in self._factors():
            _fill_uniform(t, bound, gen)
        if self.bias is not None:
            _fill_uniform(self.bias, 1 / math.sqrt(self.in_features), gen)

    def _reset_unless_meta(self) -> None:
        if self._factors()[0][0].device.type != "meta":
            self.reset_parameters()

    def _check_input(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        check_features_input(x, self.in_features, dtype)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class LowRankLinear(_StructuredLinear):
    """y = x (U Vᵀ)ᵀ + b = (x V) Uᵀ + b with U (out_features, rank) and V (in_features, rank).

    Parameters: rank · (in_features + out_features), plus out_features for the bias.
    ``rank`` at most min(in_features, out_features) (a larger one adds parameters, not
    expressiveness). Init: V ~ U(±1/√in), U ~ U(±√(3/rank)), so every entry of U Vᵀ has
    nn.Linear's weight variance 1/(3·in); ``seed`` fixes U, V and the bias.
    """

    _size = "rank"

    @classmethod
    def _factor_shapes(cls, args) -> dict[str, tuple[int, ...]]:
        return {"u": (args["out_features"], args["rank"]),
                "v": (args["in_features"], args["rank"])}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_features(in_features, out_features)
        self.rank = check_positive_int("rank", rank)
        if self.rank > min(self.in_features, self.out_features):
            raise ValueError(
                f"rank must be at most min(in_features, out_features) = "
                f"{min(self.in_features, self.out_features)}, got {rank}"
            )
        self.seed = resolve_seed(seed)
        self.v = _empty((self.in_features, self.rank), dtype, device)
        self.u = _empty((self.out_features, self.rank), dtype, device)
        self._init_bias(bias, dtype, device)
        self._reset_unless_meta()

    def _factors(self) -> tuple[tuple[torch.Tensor, float], ...]:
        return ((self.v, 1 / math.sqrt(self.in_features)), (self.u, math.sqrt(3 / self.rank)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.u.dtype)
        return self._add_bias((x @ self.v) @ self.u.T)

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) weight U Vᵀ, with forward(x) = x Wᵀ + b;
        differentiable in U and V."""
        return self.u @ self.v.T

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class MonarchLinear(_StructuredLinear):
    """y = Pₛᵀ L P_q R x + b, the Monarch matrix of Dao et al. (ICML 2022) with ``nblocks``
    blocks per factor.

    With k = ``nblocks`` (dividing in_features and out_features), p = in/k,
    m = min(in, out), q = m/k and s = out/k:

    * R = diag(R_1, …, R_k), blocks q×p (``right``, shape (k, q, p)), on x seen as (k, p);
    * P_q: the stride permutation of the m outputs of R, z ↦ u with u[l·q + r] = z[r·k + l]
      (block l of the next factor reads every k-th entry, starting at l);
    * L = diag(L_1, …, L_k), blocks s×q (``left``, shape (k, s, q));
    * Pₛᵀ: y[t·k + l] = (L P_q R x)[l·s + t], the inverse stride permutation.

    For a square n × n layer with k = √n this is the paper's M = P L Pᵀ R (P an involution
    there); for other k it is the block layout of the authors' reference code
    (``blockdiag_butterfly_multiply`` in HazyResearch/fly). Parameters:
    m · (in + out) / k (2n²/k when square), plus out_features for the bias. Init: R ~
    U(±1/√p), L ~ U(±√(3/q)), so each output has nn.Linear's variance (1/3 for inputs of
    unit variance); ``seed`` fixes both factors and the bias.
    """

    _size = "nblocks"

    @classmethod
    def fields(cls) -> dict[str, desc.Field]:
        return {**super().fields(), "monarch_layout": desc.constant(MONARCH_LAYOUT)}

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "monarch_layout": MONARCH_LAYOUT}

    @classmethod
    def _factor_shapes(cls, args) -> dict[str, tuple[int, ...]]:
        n_in, n_out, k = args["in_features"], args["out_features"], args["nblocks"]
        if n_in % k or n_out % k:
            raise ValueError(f"a MonarchLinear's nblocks must divide in_features and "
                             f"out_features, got nblocks={k} for {n_in} -> {n_out}")
        q = min(n_in, n_out) // k
        return {"right": (k, q, n_in // k), "left": (k, n_out // k, q)}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int,
        *,
        bias: bool = True,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_features(in_features, out_features)
        self.nblocks = check_positive_int("nblocks", nblocks)
        for name, n in (("in_features", self.in_features), ("out_features", self.out_features)):
            if n % self.nblocks:
                raise ValueError(f"nblocks must divide {name} = {n}, got nblocks={nblocks}")
        k = self.nblocks
        p, q = self.in_features // k, min(self.in_features, self.out_features) // k
        s = self.out_features // k
        self.seed = resolve_seed(seed)
        self.right = _empty((k, q, p), dtype, device)
        self.left = _empty((k, s, q), dtype, device)
        self._init_bias(bias, dtype, device)
        self._reset_unless_meta()

    def _factors(self) -> tuple[tuple[torch.Tensor, float], ...]:
        k = self.nblocks
        p, q = self.in_features // k, min(self.in_features, self.out_features) // k
        return ((self.right, 1 / math.sqrt(p)), (self.left, math.sqrt(3 / q)))

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """M x for the rows of x2 (batch, in) -> (batch, out), without the bias."""
        if torch.compiler.is_compiling():
            return _monarch_plain(x2, self.right, self.left)
        return _MonarchMultiply.apply(x2, self.right, self.left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.right.dtype)
        y = self._matmul(x.reshape(-1, self.in_features))
        return self._add_bias(y.reshape(*x.shape[:-1], self.out_features))

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) Monarch matrix M, with forward(x) = x Mᵀ + b;
        differentiable in both factors."""
        eye = torch.eye(self.in_features, dtype=self.right.dtype, device=self.right.device)
        return self._matmul(eye).T

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nblocks={self.nblocks}, bias={self.bias is not None}")
