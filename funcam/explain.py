"""Explain images with any funcam method by name (the entry point of the command line and dataset runs).

Public names only; the implementation is in ``funcam._src.app.explain``.
"""
from funcam._src.app.explain import (
    METHOD_NAMES,
    default_method,
    explain,
)

__all__ = [
    "METHOD_NAMES",
    "default_method",
    "explain",
]
