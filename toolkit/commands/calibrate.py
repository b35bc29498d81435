"""Calibration end to end: data in, ranges out through the cache, and optionally the sensitivity analysis on top
(`dcnc calibrate`; the INT8 build's first step)."""

from __future__ import annotations

import json
from pathlib import Path

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
from calibration.ranges import (
    DEFAULT_PERCENTILE,
    NUM_BINS,
    RangeSet,
    check_method,
    collect_ranges,
)
from calibration.reader import CalibrationData, graph_input_specs, load_calibration
from toolkit.core.errors import DcncError
from toolkit.core.npz import check_feeds, load_npz

SENSITIVITY_NAME = "sensitivity.json"
INT8_METADATA_KEY = "dcnc.int8"


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


def analyse_sensitivity(
    model_path: str | Path,
    calib: str | Path,
    eval_data: str | Path,
    out_dir: str | Path,
    method: str = "minmax",
    target: str = "cpu",
    granularity: str = "layer",
    min_metric_ratio: float = 0.999,
    samples: int | None = None,
    seed: int = 0,
    percentile: float = DEFAULT_PERCENTILE,
    k: int = 100,
    progress=None,
):
    """Calibrate (through the cache), then run sensitivity analysis on `eval_data` and write
    `out_dir`/sensitivity.json (curve, recovery per unit, keep_fp32). Returns the SensitivityReport.

    eval_data: an .npz of the tower's inputs, plus an optional `label` (0/1 per row) to judge by AUC. Without
    labels, a tower whose first output is a matrix (an embedding) is judged by agreement@k of its rows'
    top-k neighbours among themselves, any other by mean cosine.
    """
    import numpy as np

    from calibration.qdq import _load_model, check_target
    from calibration.sensitivity import (
        agreement_metric,
        auc_metric,
        cosine_metric,
        sensitivity,
    )

    check_method(method, percentile)
    check_target(target)
    model = _load_model(model_path)
    specs = graph_input_specs(model)
    data = load_calibration(calib, specs, samples=samples, seed=seed)
    ranges, _, _, _ = calibrated_ranges(model, data, method, percentile, out_dir)
    arrays = load_npz(eval_data)
    labels = arrays.pop("label", None)
    check_feeds(arrays, specs, str(eval_data))
    output = model.graph.output[0].type.tensor_type.shape
    if labels is not None:
        metric, name = auc_metric(np.asarray(labels).ravel()), "auc"
    elif len(output.dim) == 2:
        metric, name = agreement_metric(k), f"agreement@{k}"
    else:
        metric, name = cosine_metric, "cosine"
    report = sensitivity(model, ranges, arrays, metric, name, target, granularity, min_metric_ratio, progress=progress)
    report.save(Path(out_dir) / SENSITIVITY_NAME)
    return report


def calibration_for_graph(calib: str | Path, specs) -> str | Path:
    """The calibration source for one tower of a multi-tower build: a file is used as is; in a folder, the one
    .npz whose keys are exactly the graph's inputs (e.g. query_calib.npz beside item_calib.npz), else the folder
    itself as shards. `dataset:NAME` passes through."""
    path = Path(calib)
    if str(calib).startswith("dataset:") or not path.is_dir():
        return calib
    names = {s.name for s in specs}
    matching = [f for f in sorted(path.glob("*.npz")) if set(load_npz(f)) == names]
    if len(matching) == 1 and len(list(path.glob("*.npz"))) > 1:
        return matching[0]
    return path


def lower_int8(model, calib: str | Path, target: str = "cpu", method: str = "minmax", samples: int | None = None,
               seed: int = 0, keep_fp32=()):  # fmt: skip
    """The INT8 lowering of `dcnc build`: calibrate `model` on its data in `calib` and return the Q/DQ graph
    with the record of what was quantized (also kept in the graph's metadata, key dcnc.int8)."""
    from calibration.qdq import quantize_int8

    specs = graph_input_specs(model)
    data = load_calibration(calibration_for_graph(calib, specs), specs, samples=samples, seed=seed)
    quantized, record = quantize_int8(model, data, method=method, target=target, keep_fp32=keep_fp32)
    entry = quantized.metadata_props.add()
    entry.key, entry.value = INT8_METADATA_KEY, json.dumps(record.to_dict(), sort_keys=True)
    return quantized, record.to_dict()
