"""``python -m funcam`` runs the ``funcam`` command line."""
import sys

from funcam._src.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
