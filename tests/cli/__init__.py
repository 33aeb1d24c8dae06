"""Tests of ``funcam._src.cli``, one module per source module."""
