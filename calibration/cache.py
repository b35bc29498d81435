"""Calibration caches: ranges stored as JSON under a key made from the graph, the data and the method, plus
the same ranges written as a TensorRT calibration table for implicit-INT8 users of TensorRT <= 10.

The JSON cache is reused only when its key equals the key of the current graph, data and method; any other
key, an unreadable file or another schema means the ranges are recomputed and the cache rewritten.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from calibration.ranges import (
    DEFAULT_PERCENTILE,
    NUM_BINS,
    RangeSet,
    check_method,
    collect_ranges,
)
from calibration.reader import CalibrationData
from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_write_text, write_json
from toolkit.core.onnxio import graph_inputs

SCHEMA = "dcnc.calibration/1"
CACHE_NAME = "calibration.json"
TRT_TABLE_NAME = "calibration.trt.cache"
INT8_MAX = 127


def graph_hash(model) -> str:
    """SHA-256 of the serialized graph (deterministic for one onnx version: fields are written in order)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def cache_key(graph: str, data: str, method: str, percentile: float | None, num_bins: int = NUM_BINS) -> tuple[str, dict]:
    """The key of a calibration (a hex digest) and what it was made from (stored beside it, for humans)."""
    made_from = {
        "graph": graph,
        "data": data,
        "method": method,
        "percentile": percentile if method == "percentile" else None,
        "num_bins": num_bins if method != "minmax" else None,
    }
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:32]
    return key, made_from


def load_cache(path: str | Path, key: str) -> RangeSet | None:
    """The ranges stored at `path` if its key is `key`; None when absent, stale, unreadable or another schema."""
    path = Path(path)
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(stored, dict) or stored.get("schema") != SCHEMA or stored.get("key") != key:
        return None
    try:
        return RangeSet.from_dict(stored["ranges"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def save_cache(path: str | Path, key: str, made_from: dict, ranges: RangeSet) -> None:
    """Write the ranges with their key, atomically."""
    document = {"schema": SCHEMA, "key": key, "made_from": made_from, "ranges": ranges.to_dict()}
    write_json(path, document)


def calibrated_ranges(
    model,
    feeds,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[RangeSet, str, bool, int]:
    """Ranges of `model`'s activations on `feeds`, from `cache_dir`/calibration.json when its key matches (and
    written there when it does not; no cache when `cache_dir` is None).

    feeds: CalibrationData or an iterable of feed dicts. Returns (ranges, cache key, cache hit, samples).
    """
    check_method(method, percentile)
    data = feeds if isinstance(feeds, CalibrationData) else CalibrationData.from_feeds(feeds, graph_inputs(model))
    key, made_from = cache_key(graph_hash(model), data.fingerprint(), method, percentile)
    cache = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    if cache is not None:
        cached = load_cache(cache, key)
        if cached is not None:
            return cached, key, True, data.num_samples
    ranges = collect_ranges(model, data.batches, method, percentile, NUM_BINS, progress, num_batches=len(data))
    if cache is not None:
        save_cache(cache, key, made_from, ranges)
    return ranges, key, False, data.num_samples


def tensorrt_version_code(version: str) -> int:
    """TensorRT's NV_TENSORRT_VERSION for "MAJOR.MINOR.PATCH": M*1000+m*100+p before 10, M*10000+m*100+p from 10."""
    try:
        major, minor, patch = (int(part) for part in (version.split(".") + ["0", "0"])[:3])
    except ValueError:
        raise DcncError(f"--trt-version {version!r}: expected MAJOR.MINOR.PATCH, e.g. 10.13.3") from None
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def tensorrt_table(ranges: RangeSet, version: str) -> str:
    """TensorRT calibration-table text: a `TRT-<version>-<algorithm>` header, then `tensor: scale` per tensor,
    the scale (amax / 127) written as the hex of its big-endian float32 bits, as TensorRT's calibrators do."""
    algorithm = "MinMaxCalibration" if ranges.method == "minmax" else "EntropyCalibration2"
    lines = [f"TRT-{tensorrt_version_code(version)}-{algorithm}"]
    for name in sorted(ranges.calibrated):
        low, high = ranges.calibrated[name]
        scale = max(abs(low), abs(high)) / INT8_MAX
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def read_tensorrt_table(text: str) -> dict[str, float]:
    """Scales by tensor name from a TensorRT calibration table (the inverse of `tensorrt_table`)."""
    scales = {}
    for line in text.splitlines()[1:]:
        name, _, value = line.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return scales


def write_tensorrt_table(path: str | Path, ranges: RangeSet, version: str) -> None:
    atomic_write_text(path, tensorrt_table(ranges, version))


def installed_tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__
