"""The package surface: lazy exports resolve, the CLI answers --help/--version, the demo runs."""

import importlib
import subprocess
import sys

import pytest

import bornsparse
from bornsparse.cli import build_parser, main

SUBPACKAGES = ["ops", "nn", "sparsity", "models", "data"]


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_every_lazy_export_resolves(sub):
    mod = importlib.import_module(f"bornsparse.{sub}")
    for name in mod.__all__:
        obj = getattr(mod, name)  # AttributeError / ImportError if the lazy map is wrong
        assert getattr(obj, "__name__", name).rsplit(".", 1)[-1] == name or not callable(obj)


def test_top_level_exports_resolve():
    for name in bornsparse.__all__:
        getattr(bornsparse, name)  # AttributeError / ImportError if the lazy map is wrong
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bornsparse.nope  # noqa: B018


def test_import_is_light():
    # optional backends and heavy modules load only when a layer needs them
    code = "import bornsparse, sys; print('numba' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]



def test_importing_ops_settles_mkl_vml_dispatch_on_one_thread():
    # ops/runtime/mkl_warmup.py: every VML-routed unary op runs once per float dtype, single
    # element, while ops is imported (observed from a fresh process, through torch's own
    # function-call hook)
    code = """
import torch
from torch.overrides import TorchFunctionMode
seen = set()
class Record(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if args and isinstance(args[0], torch.Tensor) and args[0].numel() == 1:
            seen.add((getattr(func, "__name__", ""), str(args[0].dtype)))
        return out
with Record():
    import bornsparse.ops
    from bornsparse.ops.runtime import mkl_warmup as _mkl_warmup
print(torch.backends.mkl.is_available(), _mkl_warmup.warmed)
missing = [(f, d) for f in _mkl_warmup.VML_FUNCTIONS for d in ("torch.float32", "torch.float64")
           if (f, d) not in seen]
print(missing)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    flags, missing = out.stdout.splitlines()
    mkl, warmed = flags.split()
    assert warmed == mkl
    if mkl == "True":
        assert missing == "[]"

def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert bornsparse.__version__ in capsys.readouterr().out
    help_text = build_parser().format_help()
    assert "demo" in help_text and "reproduce" in help_text


def test_demo_runs_and_writes_table(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--n-half", "6", "--steps", "24", "--only-table"]
    assert main(argv) == 0
    table = (tmp_path / "demo_operators.md").read_text()
    assert "G(θ) permuted block-diag" in table and "low rank" in table and "dense" in table
    assert "| permutation |" in capsys.readouterr().out


def test_demo_rejects_bad_size(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n-half", "0"]) == 2
    assert "--n-half must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo_operators.md").exists()


def test_demo_rejects_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "sub"), "--only-table"]) == 2
    assert "bornsparse demo: error:" in capsys.readouterr().err


def test_no_public_name_is_also_its_submodule():
    # importing a submodule binds it on its package: a lazily exported function of the same
    # name would turn into the module from then on
    import importlib
    import pkgutil

    for pkg_name in ("bornsparse", "bornsparse.ops", "bornsparse.nn", "bornsparse.sparsity",
                     "bornsparse.models", "bornsparse.data", "bornsparse.experiments"):
        pkg = importlib.import_module(pkg_name)
        subs = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
        assert not subs & set(getattr(pkg, "__all__", ())), pkg_name


def test_name_equal_to_its_submodule_stays_the_function():
    from bornsparse.models import sparsify
    from bornsparse.sparsity import prune_at_init

    for _ in range(2):  # the second lookup is the one a submodule binding would shadow
        from bornsparse.models import sparsify as again
        from bornsparse.sparsity import prune_at_init as again2
        assert callable(again) and callable(again2)
    assert callable(sparsify) and callable(prune_at_init)
    assert bornsparse.sparsify is sparsify


def test_no_two_modules_import_each_other():
    # every import statement of the package, at module level or inside a function: the
    # module graph must have no cycle (the layering ops -> nn -> sparsity -> models ->
    # experiments -> cli reads one way)
    import ast
    from pathlib import Path

    import bornsparse

    root = Path(bornsparse.__file__).resolve().parent.parent

    def name(path: Path) -> str:
        parts = list(path.relative_to(root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    mods = {name(p): p for p in (root / "bornsparse").rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges[m] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bornsparse"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges[m].add(sub if sub in mods else node.module)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m] & mods.keys()):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    assert len(mods) > 40
    for m in sorted(mods):
        if m not in state:
            visit(m, [])


def test_ops_is_one_package_per_family():
    """ops/ holds one package per op family plus runtime/, and few loose files (the backend
    switch, the lazy map and re-exports under old import paths)."""
    from pathlib import Path

    import bornsparse.ops

    root = Path(bornsparse.ops.__file__).parent
    loose = sorted(p.name for p in root.glob("*.py"))
    packages = sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists())
    assert len(loose) <= 8, loose
    assert packages == ["discrete_cosine", "penalty", "permuted", "runtime", "sparse"]
