"""The command line: shared options and validation (``options``), one module per command, ``main``."""
