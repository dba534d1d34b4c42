"""The ``bornsparse`` command line.

Every subcommand lives in an experiments module exposing ``add_arguments(parser)`` and
``main(args) -> int``; the ``reproduce`` commands get both from one skeleton
(``experiments/command.py``: shared flags, validation, sweep, report), so a flag means the
same in each. The modules import their heavy dependencies inside functions, when a
subcommand runs (building the parser loads torch only for the structured command's list of
methods).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from bornsparse import __version__

# (subcommand path, module, one-line help)
_COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("demo",), "bornsparse.experiments.demo",
     "the quick tour: a small operator table, then quick reproductions of the permuted "
     "block-diagonal paper (§5), the DCTpS slides and the structured-layer comparison, "
     "tables printed and figures written"),
    (("reproduce", "operators"), "bornsparse.experiments.operators",
     "operator-learning experiments of the permuted block-diagonal paper (§5, Figures 1-4)"),
    (("reproduce", "dctps"), "bornsparse.experiments.dctps",
     "the DCTpS slides' comparison: Δ accuracy of DCT-plus-sparse and sparse-training methods "
     "against dense at densities 1e-2, 1e-3, 1e-4"),
    (("reproduce", "structured"), "bornsparse.experiments.structured",
     "structured hidden layers in trained MLPs (dense, low rank, Monarch, the permuted "
     "block-diagonal paper's G(θ) and h_θ, sparse, DCTpS, permuted offset) at equal "
     "parameters, on MNIST-1D and digits"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bornsparse",
        description="Neural networks that are born sparse: reproductions and tools.",
    )
    parser.add_argument("--version", action="version", version=f"bornsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_ in _COMMANDS:
        mod = importlib.import_module(module)
        if len(path) == 1:
            p = sub.add_parser(path[0], help=help_, description=help_)
        else:
            if path[0] not in groups:
                g = sub.add_parser(path[0], help="reproduce an experiment of the papers",
                                   description="reproduce an experiment of the permuted "
                                   "block-diagonal paper (operators), the DCTpS slides "
                                   "(dctps), or structured layers in trained MLPs "
                                   "(structured)")
                groups[path[0]] = g.add_subparsers(dest="experiment", metavar="EXPERIMENT")
                groups[path[0]].required = True
            p = groups[path[0]].add_parser(path[1], help=help_, description=help_)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_main", None) is None:
        parser.print_help()
        return 0
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
