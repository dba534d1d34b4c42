"""Find prunable layers, turn index sets into bornsparse.nn sparse layers, swap them in place.

This is the one place that knows how a dense ``nn.Linear``/``nn.Conv2d`` maps onto the sparse
layers of ``bornsparse.nn``: sparsity/ (pruning at init, IMP, RigL/SET) and
``bornsparse.models.sparsify_model`` all walk, filter, build and swap through it. A support
is always described on the layer's *dense shape* ``(rows, cols)``: ``rows`` = out features /
out channels, ``cols`` = in features, or the flattened ``(in_channels // groups, kh, kw)`` of
a convolution, which is how the sparse layers index their ``values``.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

# bornsparse.nn imports its layers lazily: this loads neither them nor numba
from bornsparse.nn.description import layer_for

LAYER_KINDS = ("sparse", "dctps")
# layer kinds that only models.sparsify builds: G(θ) has no support to score, prune or
# regrow, and the permuted offset layer is left out of the support methods
STRUCTURED_KINDS = ("permuted", "permuted_offset")

Selector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None
"""Which layers to take: glob pattern(s) on the qualified module name ("features.*"), or a
callable ``(name, module) -> bool``; None means no filter."""


def _hf_conv1d() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight stored (in, out)) where
    transformers is loaded; a model holding one has loaded it, so it is never imported here."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def is_dense_linear(module: nn.Module) -> bool:
    """An exact ``nn.Linear``, or transformers' ``Conv1D`` (a linear layer whose weight is
    the transpose of nn.Linear's)."""
    conv1d = _hf_conv1d()
    return type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d)


def is_dense_target(module: nn.Module) -> bool:
    """What the sparse kinds replace: :func:`is_dense_linear` layers and exact nn.Conv2d."""
    return is_dense_linear(module) or type(module) is nn.Conv2d


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a :func:`is_dense_linear` layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D: (nx, nf) = (in, out)


def _transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear | nn.Conv2d) and is_dense_linear(module)


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The dense weight's shape in nn.Linear / nn.Conv2d layout ((out, in) for a Conv1D)."""
    shape = tuple(module.weight.shape)
    return shape[::-1] if _transposed(module) else shape


def _sparse_classes() -> dict[str, tuple[type, type]]:
    """kind -> (linear class, conv class), as the layers describe themselves."""
    return {kind: (layer_for(kind, "linear"), layer_for(kind, "conv")) for kind in LAYER_KINDS}


def sparse_layer_types() -> tuple[type, ...]:
    """Every sparse layer class whose support sparsity/ can change."""
    return tuple(c for pair in _sparse_classes().values() for c in pair)


def check_kind(kind: object) -> str:
    """``kind`` if it is one of :data:`LAYER_KINDS` (the kinds with a support), else raise."""
    if kind in STRUCTURED_KINDS:
        raise ValueError(
            f"kind={kind!r} is a layer kind of bornsparse.sparsify only (no support to score, "
            f"prune or regrow); pruning at init, IMP and RigL/SET take kind in {LAYER_KINDS}"
        )
    if kind not in LAYER_KINDS:
        raise ValueError(f"kind must be one of {LAYER_KINDS}, got {kind!r}")
    return str(kind)


def as_matcher(arg: str, sel: object) -> Callable[[str, nn.Module], bool] | None:
    """Check an include/exclude :data:`Selector` named ``arg``; return it as a predicate."""
    if sel is None:
        return None
    if callable(sel):
        return sel
    pats = [sel] if isinstance(sel, str) else list(sel) if isinstance(sel, Iterable) else [sel]
    if not all(isinstance(p, str) for p in pats):
        raise TypeError(
            f"{arg} must be a glob string, a list of them or a callable, got {sel!r}"
        )
    return lambda name, _mod: any(fnmatch.fnmatchcase(name, p) for p in pats)


def _select(
    model: nn.Module, accept: Callable[[nn.Module], bool], include: Selector, exclude: Selector
) -> list[tuple[str, nn.Module]]:
    """Accepted submodules passing include/exclude, each once, under its first passing name.

    Every name a module is reachable under is tried (weight sharing), pre-order, so the order
    is the one a forward pass usually meets the layers in. The root is never a target: it has
    no parent to be swapped in.
    """
    inc, exc = as_matcher("include", include), as_matcher("exclude", exclude)
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name or id(mod) in found or not accept(mod):
            continue
        if inc is not None and not inc(name, mod):
            continue
        if exc is not None and exc(name, mod):
            continue
        found[id(mod)] = (name, mod)
    return list(found.values())


def dense_targets(
    model: nn.Module,
    *,
    include: Selector = None,
    exclude: Selector = None,
    allow_meta: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Dense ``nn.Linear``/``nn.Conv2d`` submodules by qualified name, in pre-order.

    ``include``/``exclude``: a :data:`Selector`; with ``include`` given only matching layers
    are kept. A module reachable under several names is listed once, under its first name
    that passes the filters. Raises ValueError when nothing is left or a chosen layer's
    weight is not materialised (lazy module; meta device unless ``allow_meta``: callers that
    build the sparse layers from shapes alone accept meta weights).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # exact types: subclasses of nn.Linear may carry their own weight semantics
    # (nn.MultiheadAttention reads its out_proj weight directly)
    found = _select(model, is_dense_target, include, exclude)
    tied = tied_weights(model)
    found = [(name, mod) for name, mod in found if id(mod) not in tied]
    if not found:
        untied = "" if not tied else (
            " (layers whose weight is shared with another module are never swapped: "
            + ", ".join(sorted({n for names in tied.values() for n in names[:1]})) + ")")
        raise ValueError(
            "model has no prunable layers: found no nn.Linear, transformers Conv1D or "
            f"nn.Conv2d with include={include!r}, exclude={exclude!r}{untied}"
        )
    for name, mod in found:
        w = mod.weight
        if isinstance(w, nn.parameter.UninitializedParameter) or (
            w.device.type == "meta" and not allow_meta
        ):
            raise ValueError(f"layer {name!r} has no materialised weight; build it first")
    return found


def tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(layer) -> [its name, the names of the other modules holding its weight] for every
    dense target layer whose ``weight`` Parameter another module shares (GPT-2's and BERT's
    output layer and token embedding). Such a layer is never swapped: replacing it would
    break the tie (two weights where one is trained) and take ``weight`` from the other."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, mod))
    tied = {}
    for name, mod in model.named_modules():
        if is_dense_target(mod) and len(owners.get(id(mod.weight), ())) > 1:
            tied[id(mod)] = [name] + [n for n, m in owners[id(mod.weight)] if m is not mod]
    return tied


def tied_targets(model: nn.Module, *, include: Selector = None,
                 exclude: Selector = None) -> list[tuple[str, list[str]]]:
    """The selected dense layers :func:`dense_targets` leaves out because their weight is
    tied, each with the names of the modules sharing it."""
    tied = tied_weights(model)
    return [(name, tied[id(mod)][1:])
            for name, mod in _select(model, is_dense_target, include, exclude)
            if id(mod) in tied]


def sparse_targets(
    model: nn.Module, *, include: Selector = None, exclude: Selector = None
) -> list[tuple[str, nn.Module]]:
    """bornsparse sparse layers (plain and DCT-plus-sparse) by qualified name; may be empty.

    Same walk and filters as :func:`dense_targets`.
    """
    types = sparse_layer_types()
    return _select(model, lambda m: isinstance(m, types), include, exclude)


def dense_shape(module: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the matrix a support indexes, for dense and sparse layers alike."""
    if isinstance(module, nn.Linear) or is_dense_linear(module):
        in_features, out_features = linear_features(module)
        return out_features, in_features
    if isinstance(module, nn.Conv2d):
        w = module.weight
        return w.shape[0], w.shape[1] * w.shape[2] * w.shape[3]
    if hasattr(module, "dense_shape"):
        return tuple(module.dense_shape)
    raise TypeError(f"no dense shape for {type(module).__name__}")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The dense weight of an nn.Linear/Conv1D/nn.Conv2d viewed as (rows, cols) (a view, no
    copy; a Conv1D's is its transpose)."""
    return dense_layout(module, module.weight)


def dense_layout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t``, shaped like the module's weight, as its (rows, cols) matrix (a view)."""
    return t.T if _transposed(module) else t.reshape(dense_shape(module))


def weight_positions(module: nn.Module, flat: torch.Tensor) -> torch.Tensor:
    """Positions in the flattened (rows, cols) matrix as positions in the flattened weight
    (the same for every layer but a Conv1D, whose weight is the transpose)."""
    if not _transposed(module):
        return flat
    rows, cols = dense_shape(module)
    return (flat % cols) * rows + flat // cols


def support_of_weight(module: nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``flat`` in the module's flattened ``weight`` (a mask's nonzeros) as
    sorted (2, k) indices of its (rows, cols) matrix, and the same positions in that order
    (what per-element state is gathered at). Equal to ``flat_to_indices`` and ``flat``
    sorted except for a Conv1D, whose weight is stored transposed."""
    flat = torch.sort(flat.to(torch.int64)).values
    if not _transposed(module):
        return flat_to_indices(flat, dense_shape(module)[1]), flat
    out_features = module.weight.shape[1]
    rows, cols = flat % out_features, flat // out_features  # weight is (in, out)
    order = torch.argsort(rows * module.weight.shape[0] + cols)
    return torch.stack([rows[order], cols[order]]), flat[order]


def flat_to_indices(flat: torch.Tensor, cols: int) -> torch.Tensor:
    """Sorted flat positions ``row * cols + col`` -> int64 indices of shape (2, k), row-major."""
    flat = torch.sort(flat.to(torch.int64)).values
    return torch.stack([flat // cols, flat % cols])


def indices_to_flat(indices: torch.Tensor, cols: int) -> torch.Tensor:
    """(2, k) indices -> flat positions ``row * cols + col`` (int64, shape (k,))."""
    return indices[0].to(torch.int64) * cols + indices[1].to(torch.int64)


def make_sparse_layer(
    module: nn.Module,
    indices: torch.Tensor | None = None,
    *,
    kind: str = "sparse",
    values: torch.Tensor | None = None,
    bias: bool = True,
    layer_init: bool = False,
    seed: int | None = None,
    nnz: int | None = None,
    support: str = "random",
    device: torch.device | str | None = None,
) -> nn.Module:
    """A sparse layer with the shape, bias, device and dtype of the dense ``module``.

    The support is ``indices`` ((2, k), in the dense shape), or, with ``indices=None``,
    ``nnz`` positions the new layer draws itself from ``seed`` (``support``: "random" or
    "per_row", see the sparse layers). ``values`` (shape (k,)) default to the dense weight at
    ``indices`` — the pruning-at-init convention that the kept weights are the initial ones.
    ``layer_init=True`` (implied for a drawn support) ignores the dense weight and lets the
    sparse layer initialise its values its own way (sparse fan-in Kaiming for S, zeros for
    the S of DCTpS) from ``seed``. The bias Parameter object is moved over, so an optimizer
    built on the dense model still holds it (``bias=False``: a layer without one).

    ``device``: where the new layer lives (default: the dense weight's). A ``module`` on the
    meta device (shapes only, nothing allocated) needs ``device`` and a self-initialised layer
    (``nnz``, or ``layer_init=True``); its meta bias is drawn afresh on ``device`` like
    nn.Linear/nn.Conv2d's default, U(±1/√fan_in) with the dense fan-in, from ``seed``.
    """
    kind = check_kind(kind)
    lin_cls, conv_cls = _sparse_classes()[kind]
    if isinstance(module, nn.Linear) or is_dense_linear(module):
        cls, args, geometry = lin_cls, linear_features(module), {}
    elif isinstance(module, nn.Conv2d):
        cls = conv_cls
        args = (module.in_channels, module.out_channels, module.kernel_size)
        geometry = dict(
            stride=module.stride, padding=module.padding, dilation=module.dilation,
            groups=module.groups, padding_mode=module.padding_mode,
        )
    else:
        raise TypeError(f"cannot make a sparse layer from {type(module).__name__}")
    w = module.weight
    on_meta = w.device.type == "meta"
    device = w.device if device is None else torch.device(device)
    if device.type == "meta":
        raise ValueError(
            "make_sparse_layer needs a real device for a layer on the meta device, got "
            f"device={device}"
        )
    if on_meta and values is None and indices is not None and not layer_init:
        raise ValueError(
            "a meta-device layer has no dense weight to copy values from: pass values, or "
            "layer_init=True"
        )
    has_bias = bias and module.bias is not None
    common = dict(bias=has_bias, device=device, dtype=w.dtype, seed=seed, support=support,
                  **geometry)
    if indices is None:
        if nnz is None or values is not None:
            raise ValueError("make_sparse_layer needs indices, or nnz without values")
        new = cls(*args, nnz=nnz, **common)
    else:
        if nnz is not None:
            raise ValueError("pass either indices or nnz to make_sparse_layer, not both")
        if values is None and not layer_init:
            values = weight_matrix(module).detach()[indices[0], indices[1]]
        new = cls.from_indices(*args, indices.to(device), _copy(values, device), **common)
    if has_bias:
        _take_bias(module, new, seed, device)
    new.train(module.training)
    return new


def _take_bias(module: nn.Module, new: nn.Module, seed: int | None, device: torch.device) -> None:
    """Give ``new`` the dense ``module``'s bias: the same Parameter where it can (an
    optimizer built on the dense model still holds it), a copy on another device, or for a
    meta bias nn.Linear/nn.Conv2d's default init drawn from ``seed``."""
    b = module.bias
    if b.device.type == "meta":
        new.bias = nn.Parameter(_default_bias(b, dense_shape(module)[1], seed, device),
                                requires_grad=b.requires_grad)
    elif b.device == device:
        new.bias = b
    else:
        new.bias = nn.Parameter(b.detach().to(device), requires_grad=b.requires_grad)


#: a structured layer is not swapped in where its smallest form holds more than this many
#: times its budget of weights (sparsify leaves the layer as it is and reports it)
OVER_BUDGET = 1.5


def permuted_over_budget(module: nn.Module, budget: int) -> str | None:
    """Why ``kind="permuted"`` leaves ``module`` as it is at ``budget`` weights, or None: its
    smallest G(θ) (depth 1 at the default width 2·max(in, out), 2×2 blocks) holds more than
    :data:`OVER_BUDGET` times the budget (a 256 → 10 classifier at budget 256: 1,024 weights
    a factor)."""
    from bornsparse.nn.permuted import default_width

    width = default_width(*linear_features(module), 2)
    smallest = 2 * width
    if smallest <= OVER_BUDGET * budget:
        return None
    return (f"its smallest G(θ) (depth 1, width {width}) holds {smallest:,} weights, "
            f"{smallest / budget:.1f}× its budget of {budget:,}")


def make_structured_layer(
    module: nn.Module,
    kind: str,
    *,
    budget: int,
    seed: int | None = None,
    device: torch.device | str | None = None,
    offset_depth: int | None = None,
    fit: Mapping[str, object] | None = None,
) -> nn.Module:
    """A layer of a :data:`STRUCTURED_KINDS` kind for the dense ``nn.Linear`` ``module``.

    ``budget``: trainable weights to aim for (the bias comes on top, as for the sparse
    kinds). "permuted": a :class:`~bornsparse.nn.PermutedBlockDiagonal` with 2×2 blocks, the
    default width 2·max(in, out) and the depth of its ``budget_depth``; drawn from
    ``seed``, or with ``fit`` (keyword arguments of ``PermutedBlockDiagonal.from_dense``)
    fitted to the dense weight, which must then be real. "permuted_offset": a
    :class:`~bornsparse.nn.PermutedOffsetSparseLinear` with ``budget`` entries in S and an
    offset of ``offset_depth`` factors (None: its default). The bias is taken as in
    :func:`make_sparse_layer`; ``device`` as there (default: the dense weight's, needed
    for a meta ``module``). Device and dtype are the dense layer's, and so is train/eval.
    """
    if kind not in STRUCTURED_KINDS:
        raise ValueError(f"kind must be one of {STRUCTURED_KINDS}, got {kind!r}")
    if not is_dense_linear(module):
        raise TypeError(f"kind={kind!r} replaces nn.Linear (and Conv1D) layers only, got "
                        f"{type(module).__name__}")
    w = module.weight
    device = w.device if device is None else torch.device(device)
    if device.type == "meta":
        raise ValueError(f"make_structured_layer needs a real device, got device={device}")
    if fit is not None and w.device.type == "meta":
        raise ValueError(
            "fit needs the dense weights, but the layer's weight is on the meta device; "
            "build the model on a real device, or pass fit=False"
        )
    has_bias = module.bias is not None
    options = dict(offset_depth=offset_depth) if kind == "permuted_offset" else dict(
        fit=fit, dense_weight=None if fit is None else weight_matrix(module).detach())
    # fitted: bias-free, the bias Parameter is put in below
    new = layer_for(kind, "linear").from_budget(
        *linear_features(module), budget, bias=has_bias and fit is None, seed=seed,
        device=device, dtype=w.dtype, **options)
    if has_bias:
        _take_bias(module, new, seed, device)
    new.train(module.training)
    return new


def _default_bias(
    bias: torch.Tensor, fan_in: int, seed: int | None, device: torch.device
) -> torch.Tensor:
    """nn.Linear/nn.Conv2d's default bias init, U(-1/√fan_in, 1/√fan_in), drawn from ``seed``.

    Drawn on a CPU generator (seeded apart from the layer's own draws) and moved, so a seed
    gives the same bias on every device.
    """
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((int(seed) ^ 0xB1A5) % 2**63)
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    b = torch.empty(bias.shape, dtype=bias.dtype).uniform_(-bound, bound, generator=gen)
    return b.to(device)


def default_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first non-meta parameter or buffer, else the CPU."""
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def has_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device."""
    return any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


def materialize_meta(
    model: nn.Module, device: torch.device | str, *, seed: int | None = None
) -> list[str]:
    """Give every module still holding meta parameters/buffers real, freshly initialised ones.

    Each such module gets ``to_empty(device=..., recurse=False)`` then its own
    ``reset_parameters()`` (BatchNorm: weight 1, bias 0, running stats reset; nn.Linear: its
    default init from the global RNG). Children come before their parent, so a parent's
    reset (which may re-initialise its children, e.g. nn.MultiheadAttention) has the last
    word, as in an ordinary construction. Raises ValueError naming a meta module without
    ``reset_parameters`` (its values could not be recreated honestly). ``seed``: the global
    RNG (which reset_parameters draws from) is seeded with it for these draws and restored
    afterwards; None: drawn from the global RNG as it is. Returns the names.
    """
    device = torch.device(device)
    todo = []
    for name, mod in model.named_modules():
        own = (*mod.parameters(recurse=False), *mod.buffers(recurse=False))
        if any(t.device.type == "meta" for t in own):
            if not callable(getattr(mod, "reset_parameters", None)):
                raise ValueError(
                    f"module {name or '<root>'!r} ({type(mod).__name__}) has meta-device "
                    "parameters or buffers and no reset_parameters() to initialise them; "
                    "build it on a real device"
                )
            todo.append((name, mod))
    if seed is None:
        _reset_all(todo, device)
    else:
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            _reset_all(todo, device)
    return [name for name, _ in todo]


def _reset_all(todo: list[tuple[str, nn.Module]], device: torch.device) -> None:
    for _name, mod in reversed(todo):
        mod.to_empty(device=device, recurse=False)
        mod.reset_parameters()


def _copy(values: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if values is None else values.detach().to(device, copy=True)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (``"a.0.b"``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _places(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """id(submodule) -> every (parent name, attribute) it is reachable at (sharing: several)."""
    places: dict[int, list[tuple[str, str]]] = {}
    # not named_children(): it skips a module held twice by the same parent
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            parent_name, _, attr = name.rpartition(".")
            places.setdefault(id(mod), []).append((parent_name, attr))
    return places


def swap_in_sparse_layers(
    model: nn.Module,
    supports: Mapping[str, torch.Tensor | int],
    *,
    kind: str = "sparse",
    values: Mapping[str, torch.Tensor] | None = None,
    layer_init: bool = False,
    seeds: Mapping[str, int] | None = None,
    support: str = "random",
    device: torch.device | str | None = None,
) -> dict[str, nn.Module]:
    """Replace each dense layer named in ``supports`` by a sparse layer (see make_sparse_layer).

    ``supports``: name -> (2, k) indices, or an int k: the new layer draws k positions itself
    (layout ``support``) and initialises its values from ``seeds[name]``. With indices, the
    values are ``values[name]``, else the dense weight there, else (``layer_init=True``) the
    sparse layer's own initialisation from ``seeds[name]``. A layer reachable under several
    names (weight sharing) is replaced at every place by the one new layer. Layers are
    swapped one at a time, so at most one dense weight is copied at any moment.
    ``device``: where the new layers live (default: each dense weight's); needed for layers
    on the meta device, which are built from their shapes alone (see make_sparse_layer).
    Returns name -> new layer.
    """
    kind = check_kind(kind)

    def build(name: str, old: nn.Module, sup: torch.Tensor | int, seed: int | None) -> nn.Module:
        if isinstance(sup, torch.Tensor):
            v = None if values is None else values.get(name)
            return make_sparse_layer(old, sup, kind=kind, values=v, layer_init=layer_init,
                                     seed=seed, support=support, device=device)
        return make_sparse_layer(old, kind=kind, nnz=sup, seed=seed, support=support,
                                 device=device)

    return _swap_each(model, supports, "supports", seeds, build)


def _swap_each(
    model: nn.Module,
    specs: Mapping[str, object],
    what: str,
    seeds: Mapping[str, int] | None,
    build: Callable[[str, nn.Module, Any, int | None], nn.Module],
) -> dict[str, nn.Module]:
    """Replace each submodule named in ``specs`` (called ``what`` in errors) by
    ``build(name, old, spec, seeds[name])`` at every place it is reachable, one at a time.
    Returns name -> new layer."""
    places = _places(model)
    new_layers = {}
    for name, spec in specs.items():
        old = model.get_submodule(name)
        if id(old) not in places:
            raise ValueError(f"{what} must name submodules of model, got {name!r}")
        new = build(name, old, spec, None if seeds is None else seeds.get(name))
        for parent_name, attr in places[id(old)]:
            setattr(model.get_submodule(parent_name), attr, new)
        new_layers[name] = new
    return new_layers


def swap_in_structured_layers(
    model: nn.Module,
    budgets: Mapping[str, int],
    *,
    kind: str,
    seeds: Mapping[str, int] | None = None,
    device: torch.device | str | None = None,
    offset_depth: int | None = None,
    fit: Mapping[str, object] | None = None,
) -> dict[str, nn.Module]:
    """Replace each ``nn.Linear`` named in ``budgets`` (name -> trainable weights) by a
    :func:`make_structured_layer` layer, at every place it is reachable; one at a time.
    Returns name -> new layer."""
    def build(name: str, old: nn.Module, budget: int, seed: int | None) -> nn.Module:
        return make_structured_layer(old, kind, budget=budget, seed=seed, device=device,
                                     offset_depth=offset_depth, fit=fit)

    return _swap_each(model, budgets, "budgets", seeds, build)


def rebind_optimizer(
    optimizer: torch.optim.Optimizer,
    swaps: dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor | None]],
) -> None:
    """Point ``optimizer`` at new sparse ``values`` instead of the dense weights they replace.

    ``swaps``: dense weight -> (new values Parameter, flat positions of the support or None).
    With positions, per-element state shaped like the dense weight (Adam's moments, SGD's
    momentum) is gathered at the support, so training resumes where it was; scalar state
    (Adam's step) is kept. Without positions the state is dropped.
    """
    for group in optimizer.param_groups:
        group["params"] = [swaps[p][0] if p in swaps else p for p in group["params"]]
    for old, (new, flat) in swaps.items():
        st = optimizer.state.pop(old, None)
        if st is None or flat is None:
            continue
        optimizer.state[new] = {
            key: v.reshape(-1)[flat.to(v.device)].clone()
            if torch.is_tensor(v) and v.shape == old.shape else v
            for key, v in st.items()
        }


class DCTOffset:
    """Adds a DCT-plus-sparse layer's fixed offset ``α·T(x)`` to a dense layer's output.

    Used while scoring or IMP-training the S of DCTpS layers on a dense stand-in: the dense
    ``weight`` plays S and the hook adds the transform exactly as the target layer computes it
    (a layer of the target class with zero values and no bias), so y = α·T(x) + S x + b.
    α stays at its initial value during scoring. ``remove()`` detaches every hook.
    """

    def __init__(self, targets: Sequence[tuple[str, nn.Module]]) -> None:
        self._handles = []
        self.offsets: dict[str, nn.Module] = {}
        for name, mod in targets:
            idx = torch.zeros(2, 1, dtype=torch.int64)
            zero = torch.zeros(1, dtype=mod.weight.dtype, device=mod.weight.device)
            probe = make_sparse_layer(mod, idx, kind="dctps", values=zero, bias=False)
            for p in probe.parameters():
                p.requires_grad_(False)
            self.offsets[name] = probe
            self._handles.append(mod.register_forward_hook(self._hook(probe)))

    @staticmethod
    def _hook(probe: nn.Module):
        def hook(module, args, output):
            return output + probe(args[0])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
