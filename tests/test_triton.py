"""The Triton backend on CPU: its kernels run by Triton's interpreter (TRITON_INTERPRET=1)
against the plain-PyTorch references, opcheck on the custom ops, and the backend switch.
On a GPU the same kernels compile; that is not tested here.

The kernel cases live in ``tests/triton_interpreter_cases.py`` and run in a fresh pytest
process with the flag set: triton wraps its own library functions (``tl.sum``, ...) for the
interpreter only if the flag is set when triton is first imported, and another test module
(torch.compile) may import triton earlier in the same process.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bornsparse.ops import backends

CASES = Path(__file__).with_name("triton_interpreter_cases.py")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install 'bornsparse[gpu]')",
)

# a fresh interpreter in which `import triton` fails, as where it is not installed
NO_TRITON = '''
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import bornsparse
from bornsparse.nn import DCTPlusSparseLinear, PermutedBlockDiagonal, PermutedTanhNetwork
x = torch.randn(3, 6, requires_grad=True)
for cls in (PermutedBlockDiagonal, PermutedTanhNetwork):
    cls(6, 5, width=8, depth=2, seed=0)(x).sum().backward()
DCTPlusSparseLinear(6, 5, nnz=9, seed=0)(x).sum().backward()
try:
    PermutedBlockDiagonal(6, 5, width=8, depth=2, seed=0, backend="triton")(x)
except ImportError as e:
    assert "bornsparse[gpu]" in str(e), e
else:
    raise AssertionError("backend='triton' ran without triton")
assert "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("ok")
'''


def test_package_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", NO_TRITON], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@needs_triton
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         str(CASES)], env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout and "skipped" not in run.stdout


@needs_triton
def test_resolve_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton reads it on every call
    x = torch.randn(2, 3)
    # "auto" keeps numba on CPU tensors even with the interpreter on
    assert backends.resolve_backend("auto", x, "permuted", has_triton=True) == "numba"
    assert backends.resolve_backend("triton", x, "sparse", has_triton=True) == "triton"
    # an op without a Triton kernel of a family that has one runs its reference
    assert backends.resolve_backend("triton", x, "permuted") == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):  # no Triton DCT
        backends.resolve_backend("triton", x, "dct")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors .*TRITON_INT"):
        backends.resolve_backend("triton", x, "sparse", has_triton=True)
    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'bornsparse\[gpu\]'"):
        backends.resolve_backend("triton", x, "sparse", has_triton=True)


class _CudaLike:
    """What resolve_backend reads of a tensor (device, dtype), claiming CUDA: no GPU needed."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device("cuda")
        self.dtype = dtype


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_auto_picks_triton_on_cuda(monkeypatch, dtype):
    x = _CudaLike(dtype)
    for family in ("permuted", "sparse"):  # the families with Triton kernels
        assert backends.resolve_backend("auto", x, family, has_triton=True) == "triton"
        # an op of such a family without a kernel (the penalty) runs its reference
        assert backends.resolve_backend("auto", x, family) == "reference"
    for family in ("dct", "conv"):  # no Triton kernels: the reference on CUDA
        assert backends.resolve_backend("auto", x, family, has_triton=True) == "reference"
    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    assert backends.resolve_backend("auto", x, "permuted", has_triton=True) == "reference"
