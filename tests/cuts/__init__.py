"""Tests of ``funcam._src.cuts``, one module per source module."""
