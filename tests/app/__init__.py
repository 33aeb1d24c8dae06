"""Tests of ``funcam._src.app``, one module per source module."""
