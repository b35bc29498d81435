"""Numeric parity of a candidate's outputs against a reference's, and the export-time check of an ONNX file.

`compare_outputs` judges two dicts of output arrays (elementwise |a - b| <= atol + rtol |b|, and cosine per
output) and is shared with later verification; `validate_tower` runs an exported file in ONNX Runtime (CPU)
beside its torch tower on random inputs at batch 1 and a large batch, and on real rows where there are some.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.core.errors import DcncError, GateFailed, first_line

if TYPE_CHECKING:
    from rich.table import Table

    from toolkit.model.loading import LoadedTower

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL_SCALE = 1e-5  # the default atol is this fraction of the output's scale (max |reference|)
DEFAULT_MIN_COSINE = 0.99999
DEFAULT_LARGE_BATCH = 4096


@dataclass(frozen=True)
class Tolerance:
    """Pass when |candidate - reference| <= atol + rtol * |reference| everywhere and cosine >= min_cosine.

    atol None: DEFAULT_ATOL_SCALE x the output's scale, so an error of 1e-5 of the scale passes whatever the
    output's magnitude (a logit of 30 and a unit-norm embedding are judged alike).
    """

    atol: float | None = None
    rtol: float = DEFAULT_RTOL
    min_cosine: float = DEFAULT_MIN_COSINE

    def __post_init__(self) -> None:
        if (self.atol is not None and not self.atol >= 0) or not self.rtol >= 0:
            raise DcncError(f"tolerances must be >= 0 (atol {self.atol}, rtol {self.rtol})")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise DcncError(f"the cosine threshold must lie in [-1, 1], got {self.min_cosine}")


@dataclass
class OutputParity:
    """How one output of the candidate compares with the reference on one set of inputs (`case`)."""

    output: str
    case: str
    passed: bool
    max_abs: float = float("nan")
    where: tuple[int, ...] = ()  # index of the largest absolute error
    rel_err: float = float("nan")  # max_abs / |reference| at `where`
    scale: float = float("nan")  # max |reference|
    cosine: float = float("nan")
    atol: float = float("nan")
    mismatched: int = 0  # elements outside atol + rtol |reference|
    size: int = 0
    reason: str = ""  # why no number could be computed (a missing output, a shape mismatch, a runtime error)

    @property
    def error_to_scale(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


def compare_outputs(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    tolerance: Tolerance = Tolerance(),
    case: str = "",
) -> list[OutputParity]:
    """One OutputParity per reference output, in the reference's order."""
    return [_compare_one(name, ref, candidate.get(name), tolerance, case) for name, ref in reference.items()]


def _compare_one(name: str, ref: np.ndarray, cand: np.ndarray | None, tol: Tolerance, case: str) -> OutputParity:
    if cand is None:
        return OutputParity(name, case, False, reason="missing from the candidate's outputs")
    ref, cand = np.asarray(ref), np.asarray(cand)
    if ref.shape != cand.shape:
        return OutputParity(name, case, False, reason=f"shape {list(cand.shape)}, expected {list(ref.shape)}")
    r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    finite = np.isfinite(r)
    scale = float(np.abs(r[finite]).max()) if finite.any() else 0.0
    scale = scale if scale > 0 else 1.0
    atol = tol.atol if tol.atol is not None else DEFAULT_ATOL_SCALE * scale
    # NaN/Inf in the same place on both sides count as equal; anywhere else as an infinite error
    same_nonfinite = (r == c) | (np.isnan(r) & np.isnan(c))
    err = np.where(same_nonfinite, 0.0, np.abs(c - r))
    err = np.where(np.isnan(err), np.inf, err)
    mismatched = int(np.count_nonzero(err > atol + tol.rtol * np.abs(np.where(finite, r, 0.0))))
    at = int(np.argmax(err)) if err.size else 0
    max_abs = float(err[at]) if err.size else 0.0
    rel = max_abs / abs(r[at]) if err.size and r[at] != 0 else (0.0 if max_abs == 0 else float("inf"))
    cos = _cosine(r, c)
    return OutputParity(
        output=name,
        case=case,
        passed=mismatched == 0 and cos >= tol.min_cosine,
        max_abs=max_abs,
        where=tuple(int(i) for i in np.unravel_index(at, ref.shape)) if ref.ndim and err.size else (),
        rel_err=float(rel),
        scale=scale,
        cosine=cos,
        atol=float(atol),
        mismatched=mismatched,
        size=int(r.size),
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened outputs; 1.0 when both are all zeros, -1 when either is not finite."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return -1.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


@dataclass(eq=False)  # eq would make the exception unhashable
class ParityFailed(GateFailed):
    """Some output missed its tolerance; `checks` holds every comparison, per tower, for the report."""

    checks: dict[str, list[OutputParity]] = field(default_factory=dict)
    kept: list[Path] = field(default_factory=list)  # files written anyway, for inspection

    def __str__(self) -> str:
        failed = [(tower, c) for tower, cs in self.checks.items() for c in cs if not c.passed]
        tower, worst = max(failed, key=lambda tc: tc[1].error_to_scale, default=("?", None))
        detail = (
            f"; worst: tower {tower} output {worst.output!r} on {worst.case}"
            f" (max abs err {worst.max_abs:.3g}, cosine {worst.cosine:.7f}{', ' + worst.reason if worst.reason else ''})"
            if worst
            else ""
        )
        kept = f"; the exported file(s) are kept for inspection: {', '.join(map(str, self.kept))}" if self.kept else ""
        return f"ONNX output differs from torch in {len(failed)} check(s){detail}{kept}"


def worst_table(checks: dict[str, list[OutputParity]], limit: int = 10) -> Table:
    """A rich table of the worst comparisons (failures first, then by error relative to scale)."""
    from rich.table import Table

    rows = sorted(
        ((tower, c) for tower, cs in checks.items() for c in cs),
        key=lambda tc: (tc[1].passed, -np.nan_to_num(tc[1].error_to_scale, nan=np.inf)),
    )[:limit]
    table = Table(title="Worst outputs: ONNX Runtime vs torch", title_justify="left")
    for column in ("tower", "output", "inputs", "max abs", "at", "rel", "err/scale", "cosine", ""):
        table.add_column(column, justify="right" if column not in ("tower", "output", "inputs", "") else "left")
    for tower, c in rows:
        verdict = "[green]ok[/green]" if c.passed else f"[red]FAIL[/red] {c.reason}".rstrip()
        if not c.passed and not c.reason:
            verdict += f" ({c.mismatched}/{c.size} beyond tolerance)" if c.mismatched else " (cosine)"
        table.add_row(
            tower,
            c.output,
            c.case,
            f"{c.max_abs:.3g}",
            str(list(c.where)) if c.where else "-",
            f"{c.rel_err:.3g}",
            f"{c.error_to_scale:.3g}",
            f"{c.cosine:.7f}",
            verdict,
        )
    return table


def validate_tower(
    tower: LoadedTower,
    onnx_path: str | Path,
    batches: tuple[int, ...] = (1, DEFAULT_LARGE_BATCH),
    real_rows: dict[str, np.ndarray] | None = None,
    tolerance: Tolerance = Tolerance(),
    seed: int = 0,
) -> list[OutputParity]:
    """Run the ONNX file in ONNX Runtime (CPU) and the torch tower on the same inputs; compare every output.

    Random inputs at each batch in `batches` (clamped to the batch range a `.pt2` program accepts), and
    `real_rows` (feeds keyed by input name) when given. An ONNX Runtime error is a failed check, not a crash.
    """
    from toolkit.backends.ort.loader import ort_session

    try:
        session = ort_session(onnx_path)
    except DcncError as err:
        return [OutputParity(n, "loading", False, reason=str(err)[:300]) for n in tower.output_names]
    cases: dict[str, dict[str, np.ndarray]] = {}
    if tower.has_batch:
        low, high = tower.batch_range
        for batch in dict.fromkeys(min(max(b, low), high or b) for b in batches):
            cases[f"random, batch {batch}"] = tower.feeds(batch, seed=seed + batch)
    else:
        cases["random, fixed shapes"] = tower.feeds(1, seed=seed)
    if real_rows:
        cases[f"real rows ({len(next(iter(real_rows.values())))})"] = real_rows
    checks: list[OutputParity] = []
    for case, feeds in cases.items():
        try:
            reference = tower.run(feeds)
        except DcncError:
            raise
        except Exception as err:
            raise DcncError(f"tower {tower.name}: torch fails on {case}: {first_line(err)[:300]}") from None
        try:
            names = [o.name for o in session.get_outputs()]
            candidate = dict(zip(names, session.run(names, feeds)))
        except Exception as err:
            checks += [OutputParity(n, case, False, reason=f"onnxruntime failed: {first_line(err)[:300]}") for n in reference]
            continue
        checks += compare_outputs(reference, candidate, tolerance, case)
    return checks


def read_real_rows(path: str | Path, tower: LoadedTower, limit: int) -> dict[str, np.ndarray] | None:
    """The first `limit` rows of a tower's inputs from an evaluation .npz (keys `<tower>/<input>` or `<input>`).

    None when the file holds no complete set of this tower's inputs (it may describe other towers only).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            chosen = {}
            for spec in tower.input_specs:
                key = next((k for k in (f"{tower.name}/{spec.name}", spec.name) if k in keys), None)
                if key is None:
                    return None
                chosen[spec.name] = (key, archive[key][:limit])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DcncError(f"{path}: not a readable .npz evaluation file ({first_line(err)[:300]})") from None
    feeds = {}
    rows = {len(array) for _, array in chosen.values()}
    if len(rows) != 1 or 0 in rows:
        raise DcncError(f"{path}: the inputs of tower {tower.name} have different or zero row counts ({sorted(rows)})")
    for spec in tower.input_specs:
        key, array = chosen[spec.name]
        if np.dtype(spec.dtype).kind != array.dtype.kind:
            raise DcncError(f"{path}: {key!r} has dtype {array.dtype}, tower {tower.name} expects {spec.dtype}")
        feeds[spec.name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    return feeds
