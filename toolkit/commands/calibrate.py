"""`dcnc calibrate`: a tower graph's INT8 ranges into a keyed cache, optionally TensorRT's calibration table and a
sensitivity curve (which units to keep FP32 for a target ratio of the task metric)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.cache import (
    CACHE_NAME,
    TRT_TABLE_NAME,
    calibrated_ranges,
    installed_tensorrt_version,
    write_tensorrt_table,
)
from calibration.qdq import check_target
from calibration.ranges import DEFAULT_PERCENTILE, check_method
from calibration.sensitivity import SensitivityReport, sensitivity
from toolkit.commands.calibration_data import calibration_data, source_files
from toolkit.core.errors import DcncError
from toolkit.core.npz import check_feeds, load_npz
from toolkit.core.onnxio import graph_inputs, load_onnx
from toolkit.core.paths import FOLDER, check_outputs, output
from toolkit.evaluate.task_metrics import agreement_metric, auc_metric, cosine_metric

SENSITIVITY_NAME = "sensitivity.json"


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
    eval_data: str | Path | None = None,
) -> dict:
    """Calibrate the ONNX graph at `model_path` on `calib` and write `out_dir`/calibration.json (and, with
    `trt_table`, `out_dir`/calibration.trt.cache for TensorRT <= 10 implicit INT8).

    calib: .npz, .npy, a folder, or dataset:NAME (toolkit.commands.calibration_data). samples / seed:
    deterministic sub-sampling. trt_version: the TensorRT the table is for (default: the installed one).
    eval_data: the sensitivity analysis's data (analyse_sensitivity) that follows, checked here before anything
    is written. Returns a summary: paths, key, whether the cache was reused, sample and tensor counts.
    """
    check_method(method, percentile)
    check_outputs([output(out_dir, "--out", FOLDER)], [model_path, *source_files(calib), eval_data])
    if trt_table and trt_version is None:
        trt_version = installed_tensorrt_version()
        if trt_version is None:
            raise DcncError("--trt-table: tensorrt is not installed here, so pass --trt-version (e.g. 10.13.3)")
    model = load_onnx(model_path)
    if eval_data is not None:
        sensitivity_data(eval_data, graph_inputs(model))
    data = calibration_data(calib, Path(model_path).stem, graph_inputs(model), samples, seed)
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


def sensitivity_data(eval_data: str | Path, specs) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The tower inputs of a sensitivity analysis's .npz (checked against `specs`) and its labels, if any."""
    arrays = load_npz(eval_data)
    labels = arrays.pop("label", None)
    check_feeds(arrays, specs, str(eval_data))
    rows = len(next(iter(arrays.values())))
    if labels is not None and len(np.ravel(labels)) != rows:
        raise DcncError(f"{eval_data}: 'label' has {len(np.ravel(labels))} rows, the inputs have {rows}")
    return arrays, labels


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
) -> SensitivityReport:
    """Calibrate (through the cache), then run sensitivity analysis on `eval_data` and write
    `out_dir`/sensitivity.json (curve, recovery per unit, keep_fp32). Returns the SensitivityReport.

    eval_data: an .npz of the tower's inputs, plus an optional `label` (0/1 per row) to judge by AUC. Without
    labels, a tower whose first output is a matrix (an embedding) is judged by agreement@k of its rows'
    top-k neighbours among themselves, any other by mean cosine.
    """
    check_method(method, percentile)
    check_target(target)
    model = load_onnx(model_path)
    specs = graph_inputs(model)
    data = calibration_data(calib, Path(model_path).stem, specs, samples, seed)
    ranges, _, _, _ = calibrated_ranges(model, data, method, percentile, out_dir)
    arrays, labels = sensitivity_data(eval_data, specs)
    first_output = model.graph.output[0].type.tensor_type.shape
    if labels is not None:
        metric, name = auc_metric(np.asarray(labels).ravel()), "auc"
    elif len(first_output.dim) == 2:
        metric, name = agreement_metric(k), f"agreement@{k}"
    else:
        metric, name = cosine_metric, "cosine"
    report = sensitivity(model, ranges, arrays, metric, name, target, granularity, min_metric_ratio, progress=progress)
    report.save(Path(out_dir) / SENSITIVITY_NAME)
    return report
