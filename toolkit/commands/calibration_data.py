"""Calibration data as the commands take it, resolved in one place: which source belongs to which tower, and the
samples read from it.

A source (`--calib`, a pipeline's `calib`, or what a checkpoint names) is one of:

    FILE.npz / FILE.npy   used as is, for every tower it is given to
    FOLDER/               per tower: <tower>_calib.npz when present; else, among several .npz, the one whose keys
                          are exactly the tower's inputs; else the folder's .npz files as shards
    dataset:NAME          rows drawn from an example dataset (synthetic | movielens), by input name
    {tower: path}         one source per tower (a checkpoint's calib_data, as LoadedModel.calibration holds it)
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from calibration.reader import CalibrationData, load_calibration, subsample
from toolkit.core.errors import DcncError
from toolkit.core.fileio import sha256_tree
from toolkit.core.npz import check_feeds, load_npz
from toolkit.core.signature import TensorSpec

DATASET_PREFIX = "dataset:"
Source = Union[str, Path, dict]


def source_files(source: Source | None) -> list[Path]:
    """The files and folders a source reads (none for dataset:NAME)."""
    paths = source.values() if isinstance(source, dict) else [source]
    return [Path(p) for p in paths if p is not None and not str(p).startswith(DATASET_PREFIX)]


def check_source(source: Source | None) -> None:
    """Refuse, before any work, a source that names a missing file or folder."""
    for path in source_files(source):
        if not path.exists():
            raise DcncError(f"--calib {path}: not found")


def tower_source(source: Source | None, tower: str, specs: list[TensorSpec]) -> str | Path | None:
    """The source of one tower's calibration rows (see the module docstring); None when `source` has none for it."""
    if source is None:
        return None
    if isinstance(source, dict):
        return source.get(tower)
    path = Path(source)
    if str(source).startswith(DATASET_PREFIX) or not path.is_dir():
        return source
    if (path / f"{tower}_calib.npz").is_file():
        return path / f"{tower}_calib.npz"
    files = sorted(path.glob("*.npz"))
    names = {s.name for s in specs}
    matching = [f for f in files if set(load_npz(f)) == names]
    return matching[0] if len(matching) == 1 and len(files) > 1 else path


def calibration_data(
    source: Source, tower: str, specs: list[TensorSpec], samples: int | None = None, seed: int = 0
) -> CalibrationData:
    """The checked calibration rows of `tower` (a graph with inputs `specs`), `samples` of them drawn with `seed`."""
    chosen = tower_source(source, tower, specs)
    if chosen is None:
        raise DcncError(f"no calibration data for tower {tower} (the source names other towers only)")
    if str(chosen).startswith(DATASET_PREFIX):
        return _from_dataset(str(chosen), specs, samples, seed)
    return load_calibration(chosen, specs, samples=samples, seed=seed)


def source_hash(source: Source | None) -> str | dict | None:
    """The content of a source, not where it lies (a cache key survives a moved folder): its sha256, per tower
    for a mapping; a dataset source is its name (generated deterministically from it)."""
    if source is None:
        return None
    if isinstance(source, dict):
        return {tower: source_hash(path) for tower, path in sorted(source.items())}
    if str(source).startswith(DATASET_PREFIX):
        return str(source)
    return sha256_tree(Path(source))


def source_identity(source: Source | None) -> dict | None:
    """What a bundle records of its calibration source: the path(s) and their content hashes."""
    if source is None:
        return None
    if isinstance(source, dict):
        return {tower: source_identity(path) for tower, path in sorted(source.items())}
    is_dataset = str(source).startswith(DATASET_PREFIX)
    return {"path": str(source), "sha256": None if is_dataset else source_hash(source)}


def _from_dataset(source: str, specs: list[TensorSpec], samples: int | None, seed: int) -> CalibrationData:
    """Interactions drawn from an example dataset, as the graph's inputs (input names are feature names)."""
    from toolkit.example.data import load_dataset
    from toolkit.example.data.evalsplit import calibration_sample

    name = source[len(DATASET_PREFIX) :]
    data = load_dataset(name, seed=seed)
    events = np.arange(len(data.user))
    rows = samples if samples is not None else len(events)
    arrays = calibration_sample(data, events, [s.name for s in specs], rows=rows, seed=seed)
    check_feeds(arrays, specs, source)  # the dataset's dtypes are the toolkit's: check them like a file
    return CalibrationData(subsample(arrays, samples, seed), source=source)
