"""The Triton backend on CPU: its kernels run by Triton's interpreter (TRITON_INTERPRET=1)
against the plain-PyTorch references, opcheck on the custom ops, and the backend switch.
On a GPU the same kernels compile; that is not tested here.

The kernel cases live in ``tests/triton_interpreter_cases.py`` and run in a fresh pytest
process with the flag set: triton wraps its own library functions (``tl.sum``, ...) for the
interpreter only if the flag is set when triton is first imported, and another test module
(torch.compile) may import triton earlier in the same process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'bornsparse[gpu]')")

from bornsparse.ops import backends  # noqa: E402

CASES = Path(__file__).with_name("triton_interpreter_cases.py")


def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         str(CASES)], env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout and "skipped" not in run.stdout


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
