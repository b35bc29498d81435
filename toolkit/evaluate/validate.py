"""The export-time check of an ONNX file: `validate_tower` runs it in ONNX Runtime (CPU) beside its torch tower on
random inputs at batch 1 and a large batch, and on real rows where there are some, and judges every output
with the comparator (toolkit.evaluate.parity.compare_outputs)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.core.errors import DcncError, GateFailed, first_line
from toolkit.evaluate.parity import OutputParity, Tolerance, compare_outputs

if TYPE_CHECKING:
    from toolkit.model.loading import LoadedTower

DEFAULT_LARGE_BATCH = 4096


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
