"""Printing to the terminal literally: consoles that never read text as rich markup (a path holding `[/x]` or
`[bold]` is printed as it is), and dcnc's styled labels in front of such text."""

from __future__ import annotations

from typing import Any


def literal_console(**options: Any):
    """A rich Console whose strings (messages, table cells, titles) are shown exactly as given."""
    from rich.console import Console

    return Console(markup=False, highlight=False, **options)


def labelled(label: str, style: str, text: str = ""):
    """`label` in `style`, then `text` as it is: e.g. labelled("error:", "red", message)."""
    from rich.text import Text

    return Text.assemble((label, style), " " if text else "", text)
