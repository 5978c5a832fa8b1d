"""The ``sparsedit`` command line.

Each sub-command lives in its own module under :mod:`sparsedit.cli` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed
arguments; it returns an exit code or ``None``). User errors (:class:`SparseditError`) print one
line and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from sparsedit.cli.common import Parser, run_command

# Sub-command modules, in the order `sparsedit --help` lists them.
COMMANDS = (
    "demo", "compare", "train", "sparsify", "sample", "sample-fid", "flops", "bench", "analyze", "convert",
    "extract-latents", "encode-prompts", "eval",
)


def build_parser() -> Parser:
    parser = Parser(
        prog="sparsedit",
        description="SparseDiT: convert, fine-tune, sample and measure token-sparse Diffusion Transformers.",
    )
    from sparsedit._version import __version__

    parser.add_argument("--version", action="version", version=f"sparsedit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"sparsedit.cli.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # refused by the sub-command's parser, so that the error names it: `sparsedit sample: error: ...`
        parser.subparser(args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args)

