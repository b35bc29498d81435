"""Calibration samples for one graph: loaded from .npz / .npy / a folder of .npz shards, checked against the
graph's inputs, deterministically sub-sampled, and served in batches.

Sources (`load_calibration`):
    FILE.npz        arrays keyed by input name, one row per sample
    FILE.npy        one array, for a graph with exactly one input
    FOLDER/         every *.npz in it (sorted by name), each a shard in the .npz layout, concatenated
(`dataset:NAME`, rows drawn from an example dataset, is resolved by the commands that take it:
toolkit.commands.calibration_data.)

Every array is read with allow_pickle=False, and every file is checked on its own (names, dtypes, shapes,
finite values, id ranges) so an error names the shard that is wrong.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from toolkit.core.errors import DcncError
from toolkit.core.npz import check_feeds, load_npz
from toolkit.core.signature import TensorSpec

DEFAULT_BATCH = 512


class CalibrationData:
    """Checked calibration samples (all inputs, same number of rows), served as batches of feeds.

    It also satisfies onnxruntime's CalibrationDataReader protocol (get_next / rewind / __len__), so the
    same object can feed onnxruntime.quantization.quantize_static.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int = DEFAULT_BATCH, source: str = ""):
        if batch_size < 1:
            raise DcncError(f"calibration batch size must be >= 1, got {batch_size}")
        self.arrays = arrays
        self.batch_size = batch_size
        self.source = source
        self._reader: Iterator[dict[str, np.ndarray]] | None = None

    @classmethod
    def from_feeds(cls, feeds, specs: list[TensorSpec]) -> CalibrationData:
        """Batches of feed dicts, each checked against the graph's inputs, concatenated."""
        batches = list(feeds)
        if not batches:
            raise DcncError("calibration data is empty: no batch of feeds was given")
        sizes = [check_feeds(batch, specs, f"calibration batch {i}") for i, batch in enumerate(batches)]
        arrays = {s.name: np.concatenate([batch[s.name] for batch in batches]) for s in specs}
        return cls(arrays, batch_size=max(sizes))

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """A fresh pass over the samples in order, `batch_size` rows at a time (the last batch may be smaller)."""
        for start in range(0, self.num_samples, self.batch_size):
            yield {name: array[start : start + self.batch_size] for name, array in self.arrays.items()}

    def fingerprint(self) -> str:
        """SHA-256 of the samples (names, dtypes, shapes, bytes): part of the calibration cache key."""
        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            array = np.ascontiguousarray(self.arrays[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    # onnxruntime CalibrationDataReader protocol
    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._reader is None:
            self._reader = self.batches()
        return next(self._reader, None)

    def rewind(self) -> None:
        self._reader = None

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)


def load_calibration(
    source: str | Path,
    specs: list[TensorSpec],
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
) -> CalibrationData:
    """Read, check and (when `samples` is less than what the source holds) sub-sample calibration data.

    specs: the graph's inputs (toolkit.core.onnxio.graph_inputs). samples: keep this many rows, drawn without
    replacement by a generator seeded with `seed`, kept in source order; None keeps all. Raises DcncError
    naming the file (or shard) and the input for any mismatch.
    """
    path = Path(source)
    if path.is_dir():
        arrays = _from_shards(path, specs)
    elif path.suffix == ".npy":
        arrays = _from_npy(path, specs)
    elif path.suffix == ".npz":
        arrays = load_npz(path)
        check_feeds(arrays, specs, str(path))
    elif not path.exists():
        raise DcncError(f"{path}: calibration data not found")
    else:
        raise DcncError(f"{path}: calibration data must be .npz, .npy, a folder of .npz shards or dataset:NAME")
    arrays = subsample(arrays, samples, seed)
    return CalibrationData(arrays, batch_size=batch_size, source=str(source))


def subsample(arrays: dict[str, np.ndarray], samples: int | None, seed: int) -> dict[str, np.ndarray]:
    """`samples` rows drawn without replacement (seeded), in their original order; all rows when None or more."""
    rows = len(next(iter(arrays.values())))
    if samples is None or samples >= rows:
        return arrays
    if samples < 1:
        raise DcncError(f"--calib-samples must be >= 1, got {samples}")
    keep = np.sort(np.random.default_rng(seed).choice(rows, size=samples, replace=False))
    return {name: array[keep] for name, array in arrays.items()}


def hold_out(data: CalibrationData, fraction: float, seed: int = 0) -> tuple[CalibrationData, dict[str, np.ndarray]]:
    """Split calibration rows (seeded) into rows to calibrate on and `fraction` of them held out to judge the
    lowering on; held-out duplicates (the same inputs drawn twice, common when rows are interactions) are
    dropped, so no row is its own neighbour. Raises DcncError when fewer than 2 distinct rows are held out."""
    if not 0.0 < fraction < 1.0:
        raise DcncError(f"held-out fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(data.num_samples)
    cut = int(round(data.num_samples * fraction))
    held, kept = np.sort(order[:cut]), np.sort(order[cut:])
    rows = {name: array[held] for name, array in data.arrays.items()}
    blob = np.concatenate([np.ascontiguousarray(rows[n]).reshape(len(held), -1).view(np.uint8) for n in sorted(rows)],
                          axis=1)  # fmt: skip
    distinct = np.sort(np.unique(blob, axis=0, return_index=True)[1]) if len(held) else np.array([], int)
    if len(distinct) < 2 or len(kept) < 1:
        raise DcncError(f"calibration data: {data.num_samples} rows hold out {len(distinct)} distinct row(s);"
                        " the held-out agreement needs at least 2 (pass more calibration rows)")  # fmt: skip
    fit = CalibrationData({name: array[kept] for name, array in data.arrays.items()}, data.batch_size, data.source)
    return fit, {name: array[distinct] for name, array in rows.items()}


def _from_npy(path: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        names = [s.name for s in specs]
        raise DcncError(f"{path}: a .npy holds one array, but the graph has {len(specs)} inputs {names}; use .npz")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DcncError(f"{path}: holds an object (pickled) array; save a plain numeric array") from None
        raise DcncError(f"{path}: not a readable .npy file ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DcncError(f"{path}: not a readable .npy file ({err})") from None
    if not isinstance(array, np.ndarray):
        raise DcncError(f"{path}: not a .npy array file")
    arrays = {specs[0].name: array}
    check_feeds(arrays, specs, str(path))
    return arrays


def _from_shards(folder: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    shards = sorted(folder.glob("*.npz"))
    if not shards:
        raise DcncError(f"{folder}: no .npz shards in this folder")
    parts: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    for shard in shards:
        arrays = load_npz(shard)
        check_feeds(arrays, specs, str(shard))
        for name, array in arrays.items():
            parts[name].append(array)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}
