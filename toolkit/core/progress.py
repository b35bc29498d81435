"""The one progress bar: rich, on stderr, for loops longer than a second (nothing at all when disabled, or when
stderr is a log or pipe, where a bar cannot redraw and would leave only a blank line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepBar:
    """A progress bar over `total` steps (None: unknown) on stderr, a no-op when disabled: benchmarks, corpus
    embedding, latency sweeps, calibration passes, training epochs.

    Two ways to drive it: `advance(description)` when a step starts (the previous one is then done), or
    `done(**values)` when a step ends. `values` fill the `fields` shown after the bar, e.g.
    fields={"loss": "loss {task.fields[loss]:.4f}"} and done(loss=0.31).
    """

    total: int | None
    enabled: bool = True
    label: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    _progress: Any = field(default=None, init=False)
    _task: Any = field(default=None, init=False)
    _started: bool = field(default=False, init=False)

    def __enter__(self) -> StepBar:
        from rich.console import Console

        console = Console(stderr=True)
        if self.enabled and console.is_terminal:  # TTY_COMPATIBLE=1 forces it
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            # descriptions name user files: shown literally, never read as rich markup
            columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn()]
            columns += [TextColumn(template) for template in self.fields.values()]
            self._progress = Progress(*columns, console=console, transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, **{k: float("nan") for k in self.fields})
        return self

    def advance(self, description: str) -> None:
        """Mark the previous step done and show the one starting now."""
        if self._progress is not None:
            self._progress.update(self._task, description=description, advance=1 if self._started else 0)
        self._started = True

    def describe(self, description: str) -> None:
        """Say what the steps now under way are, without counting one."""
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def done(self, **values: Any) -> None:
        """Count one step as finished, updating the shown fields with `values`."""
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **values)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            if self.total is not None:
                self._progress.update(self._task, completed=self.total)
            self._progress.__exit__(*exc)
