"""Terminal output: literal text, and tables as wide as a CI log can show."""

from __future__ import annotations

import io

from rich.table import Table

from toolkit.report.terminal import LOG_WIDTH, literal_console
from toolkit.report.verify import format_rate


def test_a_table_written_to_a_log_keeps_its_output_names_and_speedups_whole(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    log = io.StringIO()
    table = Table("output", *(f"statistic {i}" for i in range(8)), "speedup (95%)")
    table.add_row("query/embedding", *("0.001234" for _ in range(8)), "inconclusive ±21%")
    literal_console(file=log).print(table)
    assert "query/embedding" in log.getvalue() and "inconclusive ±21%" in log.getvalue()
    assert literal_console(file=io.StringIO()).width == LOG_WIDTH


def test_columns_decides_the_width_when_set(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert literal_console(file=io.StringIO()).width == 100


def test_rates_are_whole_numbers_with_separators():
    assert format_rate(304790.4) == "304,790" and format_rate(float("nan")) == "n/a" and format_rate(None) == "n/a"
