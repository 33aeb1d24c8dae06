"""The ``funcam`` command line: ``funcam explain IMAGE...``, ``funcam demo``, ``funcam explain-dir DIR``,
``funcam evaluate IMAGE_OR_DIR...``.

Exit codes: 0 everything written; 1 some inputs could not be read (each named on stderr as it is met; every
other input still got all its files); 2 nothing more could be done: a usage error (bad option, unknown
model/layer/method, a method that does not fit the model, class out of range, unavailable device, a
checkpoint that cannot be used, weights that cannot be fetched, an --out that cannot be written, a full disk,
another run holding --out) or no readable input. Every anticipated failure is one ``funcam: error: ...`` line,
never a traceback; an unanticipated exception (a bug) still shows its traceback.

Each command checks what it can before it loads a model or writes a file: the options, the input files (from
their headers), --out, the device, the model name, the source of the weights and the checkpoint's contents.
With the model loaded, and still nothing written, one blank image checks the method, the layer and the
classes against the model (``funcam._src.app.explain.validate``).

The layout: ``options`` holds what the commands share (the parser, the options, their checks, ``UsageError``);
each command module (``explain``: explain and demo; ``dataset``: explain-dir) adds its subcommands with
``add_parser(sub)``, each bound to the function that runs it; this module only builds the parser and turns a
``UsageError`` into the one error line. Commands import ``options``, this module imports the commands, and
nothing imports this module but the entry points (``funcam.cli``, ``python -m funcam``).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from funcam._src.base import __version__
from funcam._src.cli import dataset, evaluate, explain
from funcam._src.cli.options import Parser, UsageError

__all__ = ["main", "build_parser"]

COMMANDS = (explain, dataset, evaluate)  # in the order ``funcam --help`` lists them


def build_parser() -> Parser:
    parser = Parser(prog="funcam", description="Class activation maps for image classifiers, built on torch.func.")
    parser.add_argument("--version", action="version", version=f"funcam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 some inputs failed, 2 nothing more could be done)."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same problem: say it once
            print(f"funcam: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("funcam: interrupted", file=sys.stderr)
        return 130
