"""Reading input arrays from .npz files and checking them against a tower's input signature.

Calibration data and evaluation data go through the same checks: every input present, the declared dtype,
the declared shape with one batch size shared by all inputs, ids inside [0, high), floats finite.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from toolkit.core.errors import DcncError
from toolkit.core.signature import TensorSpec


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, keyed by name (never unpickles objects: a pickled array is an error)."""
    path = Path(path)
    if not path.is_file():
        raise DcncError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DcncError(f"{path}: not a readable .npz file (not a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DcncError(f"{path}: holds object (pickled) arrays; save plain numeric arrays") from None
        raise DcncError(f"{path}: not a readable .npz file ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DcncError(f"{path}: not a readable .npz file ({err})") from None


def check_array(array: np.ndarray, spec: TensorSpec, where: str) -> None:
    """Check one array's dtype, rank, fixed dimensions, id range and finiteness against `spec`."""
    if array.dtype != np.dtype(spec.dtype):
        raise DcncError(f"{where}: {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
    if array.ndim != len(spec.shape):
        raise DcncError(
            f"{where}: {spec.name!r} has shape {list(array.shape)}, expected {len(spec.shape)} dims {list(spec.shape)}"
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
        if isinstance(want, int) and got != want:
            raise DcncError(f"{where}: {spec.name!r} has shape {list(array.shape)}, expected {want} at axis {axis}")
    if array.size == 0:
        raise DcncError(f"{where}: {spec.name!r} is empty")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise DcncError(f"{where}: {spec.name!r} holds {bad} NaN/Inf values")
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0:
            raise DcncError(f"{where}: {spec.name!r} holds negative id {low}")
        if spec.high is not None and high >= spec.high:
            raise DcncError(f"{where}: {spec.name!r} holds id {high}, outside [0, {spec.high})")


def check_feeds(feeds: dict[str, np.ndarray], specs: list[TensorSpec], where: str) -> int:
    """Check `feeds` against `specs` (names, dtypes, shapes, ids, finite values); return the shared batch size.

    `where` names the source in error messages (a file path, or "path: query"). Keys not in `specs` are errors:
    a misspelt input name would otherwise be silently replaced by nothing.
    """
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise DcncError(f"{where}: missing input {missing[0]!r} (expected {names})")
    extra = sorted(set(feeds) - set(names))
    if extra:
        raise DcncError(f"{where}: unexpected key {extra[0]!r} (expected {names})")
    batch: int | None = None
    for spec in specs:
        array = feeds[spec.name]
        check_array(array, spec, where)
        if spec.shape and isinstance(spec.shape[0], str):
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise DcncError(
                    f"{where}: {spec.name!r} has {array.shape[0]} rows, other inputs have {batch}"
                )
    if batch is None:
        raise DcncError(f"{where}: no input has a batch dimension")
    return batch
