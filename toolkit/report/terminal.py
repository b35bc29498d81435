"""Printing to the terminal literally: consoles that never read text as rich markup (a path holding `[/x]` or
`[bold]` is printed as it is), and dcnc's styled labels in front of such text."""

from __future__ import annotations

import os
import sys
from typing import Any

LOG_WIDTH = 160  # a CI log or a pipe has no width; rich's 80 would cut output names and speedups to "…"


def literal_console(**options: Any):
    """A rich Console whose strings (messages, table cells, titles) are shown exactly as given; LOG_WIDTH wide
    when it writes to a file or pipe (COLUMNS still decides when set)."""
    from rich.console import Console

    stream = options.get("file") or (sys.stderr if options.get("stderr") else sys.stdout)
    if "width" not in options and "COLUMNS" not in os.environ and not stream.isatty():
        options["width"] = LOG_WIDTH
    return Console(markup=False, highlight=False, **options)


def labelled(label: str, style: str, text: str = ""):
    """`label` in `style`, then `text` as it is: e.g. labelled("error:", "red", message)."""
    from rich.text import Text

    return Text.assemble((label, style), " " if text else "", text)
