"""What `dcnc export` prints: the exported towers, the passes each went through, and, when validation fails,
the worst comparisons of ONNX Runtime against torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rich.table import Table

    from graphs.export import ExportResult
    from toolkit.evaluate.parity import OutputParity


def worst_table(checks: dict[str, list[OutputParity]], limit: int = 10) -> Table:
    """A rich table of the worst comparisons (failures first, then by error relative to scale)."""
    from rich.table import Table
    from rich.text import Text

    from toolkit.report.terminal import labelled

    rows = sorted(
        ((tower, c) for tower, cs in checks.items() for c in cs),
        key=lambda tc: (tc[1].passed, -np.nan_to_num(tc[1].error_to_scale, nan=np.inf)),
    )[:limit]
    table = Table(title="Worst outputs: ONNX Runtime vs torch", title_justify="left")
    for column in ("tower", "output", "inputs", "max abs", "at", "rel", "err/scale", "cosine", ""):
        table.add_column(column, justify="right" if column not in ("tower", "output", "inputs", "") else "left")
    for tower, c in rows:
        detail = c.reason or (f"({c.mismatched}/{c.size} beyond tolerance)" if c.mismatched else "(cosine)")
        verdict = Text("ok", "green") if c.passed else labelled("FAIL", "red", detail)
        table.add_row(
            tower,
            c.output,
            c.case,
            f"{c.max_abs:.3g}",
            str(list(c.where)) if c.where else "-",
            f"{c.rel_err:.3g}",
            f"{c.error_to_scale:.3g}",
            "n/a" if np.isnan(c.cosine) else f"{c.cosine:.7f}",
            verdict,
        )
    return table


def export_table(results: list[ExportResult], title: str) -> Table:
    """One row per exported tower: its file, size, inputs and outputs, and its worst validation check."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("tower", "file", "size", "inputs", "outputs", "max err (/ scale)", "cosine"):
        table.add_column(column, overflow="fold")
    for result in results:
        checks = result.parity or []
        worst = max(checks, key=lambda c: c.error_to_scale, default=None)
        table.add_row(
            result.tower,
            str(result.path),
            f"{result.size / 1024:.1f} KiB",
            "\n".join(map(str, result.inputs)),
            "\n".join(result.outputs),
            f"{worst.max_abs:.2g} ({worst.error_to_scale:.1e})" if worst else "not validated",
            _lowest_cosine(checks),
        )
    return table


def pass_lines(results: list[ExportResult]) -> list[str]:
    """Per tower, the passes it went through with the node count before and after each."""
    lines = []
    for result in results:
        steps = ", ".join(f"{r.name} {r.nodes_before}->{r.nodes_after}" for r in result.passes) or "none"
        lines.append(f"passes ({result.tower}, nodes): {steps}")
    return lines


def _lowest_cosine(checks: list[OutputParity]) -> str:
    """The lowest row cosine of the checks; n/a where every output has one value per row (no cosine)."""
    cosines = [c.cosine for c in checks if not np.isnan(c.cosine)]
    return f"{min(cosines):.7f}" if cosines else ("n/a" if checks else "-")
