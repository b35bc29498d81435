"""Calibration end to end: data in, ranges out, through the cache (`dcnc calibrate`, and the INT8 build's first step)."""

from __future__ import annotations

from pathlib import Path

from calibration.data import check_feeds
from calibration.cache import (
    CACHE_NAME,
    TRT_TABLE_NAME,
    cache_key,
    graph_hash,
    installed_tensorrt_version,
    load_cache,
    save_cache,
    write_tensorrt_table,
)
from calibration.ranges import DEFAULT_PERCENTILE, NUM_BINS, RangeSet, check_method, collect_ranges
from calibration.reader import CalibrationData, graph_input_specs, load_calibration
from toolkit.errors import DcncError


def calibrated_ranges(
    model,
    feeds,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[RangeSet, str, bool, int]:
    """Ranges of `model`'s activations on `feeds`, from `cache_dir`/calibration.json when its key matches.

    feeds: CalibrationData or an iterable of feed dicts. Returns (ranges, cache key, cache hit, samples).
    """
    check_method(method, percentile)
    data = feeds if isinstance(feeds, CalibrationData) else _materialise(feeds, graph_input_specs(model))
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


def calibrate(
    model_path: str | Path,
    calib: str | Path,
    out_dir: str | Path,
    method: str = "minmax",
    samples: int | None = None,
    seed: int = 0,
    percentile: float = DEFAULT_PERCENTILE,
    trt_table: bool = False,
    trt_version: str | None = None,
    progress: bool = False,
) -> dict:
    """Calibrate the ONNX graph at `model_path` on `calib` and write `out_dir`/calibration.json (and, with
    `trt_table`, `out_dir`/calibration.trt.cache for TensorRT <= 10 implicit INT8).

    calib: .npz, .npy, a folder of .npz shards, or dataset:NAME (see calibration.reader). samples / seed:
    deterministic sub-sampling. trt_version: the TensorRT the table is for (default: the installed one).
    Returns a summary: paths, key, whether the cache was reused, sample and tensor counts.
    """
    from calibration.qdq import _load_model

    check_method(method, percentile)
    if trt_table and trt_version is None:
        trt_version = installed_tensorrt_version()
        if trt_version is None:
            raise DcncError("--trt-table: tensorrt is not installed here, so pass --trt-version (e.g. 10.13.3)")
    model = _load_model(model_path)
    data = load_calibration(calib, graph_input_specs(model), samples=samples, seed=seed)
    ranges, key, hit, count = calibrated_ranges(model, data, method, percentile, out_dir, progress)
    out_dir = Path(out_dir)
    summary = {
        "cache": str(out_dir / CACHE_NAME),
        "key": key,
        "reused": hit,
        "method": method,
        "samples": count,
        "tensors": len(ranges.calibrated),
    }
    if trt_table:
        write_tensorrt_table(out_dir / TRT_TABLE_NAME, ranges, trt_version)
        summary["tensorrt_table"] = str(out_dir / TRT_TABLE_NAME)
    return summary


def _materialise(feeds, specs) -> CalibrationData:
    """Check each feed dict against the graph's inputs and concatenate them into CalibrationData."""
    import numpy as np

    batches = list(feeds)
    if not batches:
        raise DcncError("calibration data is empty: no batch of feeds was given")
    sizes = [check_feeds(batch, specs, f"calibration batch {i}") for i, batch in enumerate(batches)]
    arrays = {s.name: np.concatenate([batch[s.name] for batch in batches]) for s in specs}
    return CalibrationData(arrays, batch_size=max(sizes))
