"""`dcnc export`: the selected towers of a loaded model to ONNX (graphs.export), staged (toolkit.core.fileio) so
that a failed export leaves nothing behind, then validated against torch (toolkit.evaluate.validate). When
validation fails the files
are kept for inspection (as trtexec and polygraphy keep theirs) and ParityFailed (exit 1) is raised."""

from __future__ import annotations

from pathlib import Path

from graphs.export import (
    TORCHLIB_OPSET,
    ExportResult,
    PassSelection,
    check_opset,
    export_tower,
    pass_pipeline,
    source_metadata,
)
from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_dir, atomic_files
from toolkit.core.paths import DIR, FILE, check_outputs, output
from toolkit.evaluate.parity import Tolerance
from toolkit.evaluate.validate import (
    DEFAULT_LARGE_BATCH,
    ParityFailed,
    read_real_rows,
    validate_tower,
)
from toolkit.model.loading import LoadedModel


def export_model(
    loaded: LoadedModel,
    out: str | Path,
    opset: int = TORCHLIB_OPSET,
    validate: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    towers: list[str] | None = None,
    force: bool = False,
    validate_batch: int = DEFAULT_LARGE_BATCH,
    passes: PassSelection = None,
) -> list[ExportResult]:
    """Export the selected towers of `loaded` to `out` and validate each against torch.

    out: the `.onnx` path for one tower; a directory holding `<tower>.onnx` per tower for several.
    atol/rtol: toolkit.evaluate.parity.Tolerance (None: the defaults there). validate_batch: the large batch checked
    beside batch 1. passes: graph passes run on each tower before it is saved (see PassSelection; `dcnc export`
    gives "default"); None keeps the exporter's graph. Validation reads the file as saved, after the passes.
    Raises DcncError (nothing written) for bad input or an export failure; ParityFailed (files kept) when an
    output differs from torch beyond the tolerance.
    """
    check_opset(opset)
    passes = pass_pipeline(passes)  # unknown pass names are refused before any work
    if validate_batch < 1:
        raise DcncError(f"--validate-batch must be >= 1, got {validate_batch}")
    tolerance = Tolerance(atol=atol, **({"rtol": rtol} if rtol is not None else {}))
    selected = loaded.select(towers)
    out = Path(out)
    several = len(selected) > 1
    check_output(loaded, out, several, force)
    common = source_metadata(loaded)
    results: list[ExportResult] = []
    with atomic_dir(out, force=force) if several else atomic_files(out) as folder:
        for name, tower in selected.items():
            path = folder / f"{name}.onnx" if several else folder / out.name
            result = export_tower(tower, path, opset, common, passes)
            if validate:
                rows = read_real_rows(loaded.eval_data, tower, validate_batch) if loaded.eval_data else None
                result.parity = validate_tower(tower, path, (1, validate_batch), rows, tolerance)
            results.append(result)
    for result in results:  # the staging folder has taken its final place
        result.path = out / result.path.name if several else out
    if not all(r.passed for r in results):
        raise ParityFailed(checks={r.tower: r.parity or [] for r in results}, kept=[r.path for r in results])
    return results


def check_output(loaded: LoadedModel, out: Path, several: bool, force: bool) -> None:
    """Refuse, before any work, an output of the wrong form for the towers, or one toolkit.core.paths refuses
    (an input among them: the model, its weights, evaluation and calibration files)."""
    if several and out.suffix == ".onnx":
        raise DcncError(f"-o {out}: this model has several towers; give a directory (one <tower>.onnx each)")
    if not several and out.suffix != ".onnx":
        raise DcncError(f"-o {out}: give the .onnx file to write (this export has one tower)")
    inputs = [*loaded.files, loaded.eval_data, *loaded.calibration.values()]
    check_outputs([output(out, "-o", DIR if several else FILE, replace=force)], inputs)
