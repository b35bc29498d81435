"""Progress on stderr for loops longer than a second."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepBar:
    """A rich progress bar on stderr over a known number of steps (a no-op when disabled), for work longer than a
    second: benchmarks, corpus embedding, latency sweeps."""

    total: int
    enabled: bool = True
    label: str = ""
    _progress: Any = field(default=None, init=False)
    _task: Any = field(default=None, init=False)
    _started: bool = field(default=False, init=False)

    def __enter__(self) -> StepBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)  # fmt: skip
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def advance(self, description: str) -> None:
        """Mark the previous step done and show the one starting now."""
        if self._progress is not None:
            self._progress.update(self._task, description=description, advance=1 if self._started else 0)
        self._started = True

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.total)
            self._progress.__exit__(*exc)
