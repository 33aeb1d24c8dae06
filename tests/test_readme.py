"""The README's method list is the method table: every entry has its row, and no row names a method that is gone."""
from __future__ import annotations

import pathlib
import re

from funcam._src.core import methods

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_lists_every_method_of_the_table():
    text = README.read_text()
    section = text[text.index("### All methods"):]
    section = section[:section.index("\n### ", 1)]
    rows = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    table = list(methods.TABLE)
    assert rows[:len(table)] == table, (set(table) - set(rows), set(rows) - set(table))
