"""`dcnc export`: the selected towers of a loaded model to ONNX (graphs.export), staged so that a failed export
leaves nothing behind, then validated against torch (toolkit.evaluate.validate). When validation fails the files
are kept for inspection (as trtexec and polygraphy keep theirs) and ParityFailed (exit 1) is raised."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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
from toolkit.core.fileio import atomic_dir
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
    check_output(out, several, force)
    common = source_metadata(loaded)
    results: list[ExportResult] = []
    with staged(out, several, force) as folder:
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


def check_output(out: Path, several: bool, force: bool) -> None:
    """Refuse, before any work, an output that exists (without force), has the wrong form, or cannot be written."""
    if several and out.suffix == ".onnx":
        raise DcncError(f"-o {out}: this model has several towers; give a directory (one <tower>.onnx each)")
    if not several and out.suffix != ".onnx":
        raise DcncError(f"-o {out}: give the .onnx file to write (this export has one tower)")
    if out.exists() or out.is_symlink():
        if not force:
            raise DcncError(f"{out}: already exists (pass --force to replace it)")
        if not several and out.is_dir():
            raise DcncError(f"{out}: is a directory; give the .onnx file to write")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DcncError(f"{out}: cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DcncError(f"{out}: cannot be written: {ancestor} is not writable")


@contextlib.contextmanager
def staged(out: Path, several: bool, force: bool) -> Iterator[Path]:
    """A folder to write into; on success its content takes the place of `out` (a directory, or one file and
    its external data), on failure it is removed with everything in it, and so are the folders made for `out`."""
    created = missing_folders(out.parent)
    try:
        if several:
            with atomic_dir(out, force=force) as folder:
                yield folder
            return
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        except OSError as err:
            raise DcncError(f"{out}: cannot be written ({err.strerror})") from None
        try:
            yield folder
            for item in sorted(folder.iterdir(), key=lambda p: p.name == out.name):  # data file first, model last
                os.replace(item, out.parent / item.name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except BaseException:
        for made in reversed(created):  # innermost first; one that is not empty is someone else's now
            try:
                made.rmdir()
            except OSError:
                break
        raise


def missing_folders(folder: Path) -> list[Path]:
    """The folders above a path that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]
