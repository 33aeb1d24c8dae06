"""Tests of ``funcam._src.core``, one module per source module."""
