"""The ``funcam`` command line: ``funcam explain``, ``funcam demo``, ``funcam explain-dir``
(``python -m funcam.cli``)."""
import sys

from funcam._src.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
