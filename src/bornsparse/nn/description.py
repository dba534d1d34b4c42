"""How a bornsparse layer describes itself, once, for checkpoints, swapping and sparsify.

A layer class derives from :class:`Described` and says, in one place:

* :attr:`~Described.stands_for`: the dense module it takes the place of ("linear": an
  nn.Linear or transformers' Conv1D; "conv": an nn.Conv2d), and :attr:`~Described.kind`,
  the ``kind=`` of sparsify / pruning at init / RigL that builds it (None: none does);
* :meth:`~Described.fields`: the constructor arguments that change the function it
  computes, each with its check (and, for a format convention, the one value it must hold);
* :meth:`~Described.describe`: those arguments of this layer, as JSON values;
* :meth:`~Described.stored`: the tensors (state_dict entries) a layer with given arguments
  holds, their shapes and roles (a support and permutations are index tensors, checked by
  the ops' own validators on load);
* :meth:`~Described.constructor_arguments`: how its public constructor rebuilds it.

``models.checkpoint`` and ``sparsity.swap`` read only this, so a new layer — or a user's
subclass of one — is saved, loaded and swapped without editing them. Every subclass is
registered when its class statement runs, under :func:`layer_name`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Check = Callable[[object], bool]

#: the modules of bornsparse.nn whose classes are registered when a registry is asked for
_OWN_MODULES = ("sparse_linear", "dct_plus_sparse", "sparse_conv", "permuted",
                "permuted_offset", "structured")
_REGISTRY: dict[str, type[Described]] = {}

DTYPES = {str(d).removeprefix("torch."): d
          for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


@dataclass(frozen=True)
class Field:
    """One described constructor argument: its check, the value a format convention must
    hold (``constant``), and the value of files written before the field existed
    (``before``; None: the field has always been written)."""

    check: Check
    constant: object = None
    before: object = None


@dataclass(frozen=True)
class Stored:
    """One stored tensor: its shape, its role ("float": the layer's dtype; "support": a
    (2, nnz) sorted support of the (rows, cols) matrix ``matrix``; "perms": one
    permutation per row), as :meth:`Described.stored` lists them."""

    shape: tuple[int, ...]
    role: str = "float"
    matrix: tuple[int, int] | None = None


def is_int(v: object, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def at_least(low: int) -> Check:
    return lambda v: is_int(v, low)


def is_pair(low: int) -> Check:
    return lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x, low) for x in v)


def is_bool(v: object) -> bool:
    return isinstance(v, bool)


def is_str(v: object) -> bool:
    return isinstance(v, str)


def is_dtype(v: object) -> bool:
    return v in DTYPES


def one_of(choices: tuple) -> Check:
    return lambda v: v in choices


def constant(value: str) -> Field:
    """A format convention: the field must hold exactly ``value``."""
    return Field(is_str, constant=value)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: in_features, out_features (every "linear" layer); a dtype; a bias flag
LINEAR_FIELDS = {"in_features": Field(is_int), "out_features": Field(is_int)}
DTYPE_FIELD = {"dtype": Field(is_dtype)}
BIAS_FIELD = {"bias": Field(is_bool)}


def layer_name(cls: type) -> str:
    """A layer class's name in checkpoint files: the class name for bornsparse's own,
    ``module.QualName`` for any other (a user's subclass)."""
    if cls.__module__.startswith("bornsparse."):
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_layers() -> dict[str, type[Described]]:
    """Every described layer class by :func:`layer_name`: bornsparse's own (imported here)
    and every subclass defined so far."""
    for module in _OWN_MODULES:
        importlib.import_module(f"bornsparse.nn.{module}")
    return dict(_REGISTRY)


def layer_for(kind: str, stands_for: str) -> type[Described]:
    """bornsparse's layer class of ``kind`` that takes the place of a ``stands_for`` module."""
    for cls in registered_layers().values():
        if cls.__dict__.get("kind") == kind and cls.stands_for == stands_for:
            return cls
    raise ValueError(f"no bornsparse layer of kind {kind!r} replaces a {stands_for} layer")


def support_layer_types() -> tuple[type, ...]:
    """The described classes that store a support (values + indices) sparsity/ can change."""
    return tuple(c for c in registered_layers().values() if c.has_support())


class Described:
    """Mixin of every bornsparse layer: its self-description (see the module docstring)."""

    stands_for: ClassVar[str] = "linear"
    kind: ClassVar[str | None] = None

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not abstract:  # a shared base (abstract=True in its class statement) is no layer
            _REGISTRY[layer_name(cls)] = cls

    @classmethod
    def fields(cls) -> dict[str, Field]:
        """Described constructor argument -> :class:`Field`."""
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        """This layer's :meth:`fields`, as JSON values."""
        raise NotImplementedError

    @classmethod
    def stored(cls, args: Mapping[str, Any]) -> dict[str, Stored]:
        """State_dict key (relative to the layer) -> :class:`Stored`, for a layer described
        by ``args``; ValueError for arguments no layer can have."""
        raise NotImplementedError

    @classmethod
    def constructor_arguments(
        cls, args: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], device: torch.device
    ) -> tuple[tuple, dict[str, Any]]:
        """(positional, keyword) arguments of the public constructor that rebuild a layer
        described by ``args`` on ``device``; ``tensors`` (validated, as :meth:`stored`
        lists them) for what the constructor takes (a support). Draws are overwritten."""
        raise NotImplementedError

    @classmethod
    def has_support(cls) -> bool:
        """Whether the layer stores values plus indices (a dense weight is never right)."""
        return False

    @classmethod
    def rebuild(
        cls, args: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], device: torch.device
    ) -> Described:
        """A new layer through the public constructor, holding ``tensors``."""
        pos, kw = cls.constructor_arguments(args, tensors, device)
        layer = cls(*pos, **kw)
        own = layer.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, tensor in tensors.items():
                # copy_ converts to the dtype of the layer's own tensor (indices may be
                # int32 in the file); a support copied in place is noticed by plan()
                own[key].copy_(tensor)
        return layer
