"""`dcnc verify`: load the PyTorch original and a built bundle, run both on the same evaluation data through
toolkit.evaluate.verify, and add the branch timings of parallel towers. FP16/BF16 bundles answer on CPU through
the half emulation (DESIGN.md decision 1) and are timed as built."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.backends.bundle import check_bundle, tower_runner
from toolkit.backends.torch_runner import REFERENCE_MATH, TorchRunner, torch_threads
from toolkit.commands.embed.command import EngineOptions
from toolkit.commands.embed.corpus_pass import corpus_scan
from toolkit.core.errors import DcncError
from toolkit.core.machine import machine_load
from toolkit.core.onnxio import load_onnx
from toolkit.core.paths import check_outputs, output
from toolkit.evaluate.evaldata import load_corpus_eval, load_eval
from toolkit.evaluate.gates import load_baseline, match_weights, resolve_thresholds, weight_gates
from toolkit.evaluate.result import Report
from toolkit.evaluate.verify import VerifyOptions, emulated_runners, verify_runners
from toolkit.model.loading import SignedTower, load_model
from toolkit.report import verify as reports


def _branch_timing(bundle: Path, manifest: Any, batch: int) -> dict[str, Any]:
    """t_cross, t_deep, t_parallel per tower from the bundle's ONNX branch subgraphs, or why they were skipped."""
    from toolkit.evaluate.branch_timing import time_branches

    result = {}
    for tower, entry in manifest.towers.items():
        try:
            result[tower] = time_branches(load_onnx(bundle / entry.onnx), batch=batch)
        except DcncError as err:  # not a parallel tower: nothing to time
            result[tower] = {"skipped": str(err)}
    return result


@dataclass(frozen=True)
class Corpus:
    """`dcnc verify --corpus`: the items come from this corpus (Parquet file or folder, or .npz, as `dcnc embed`
    reads it) instead of the evaluation data's item/*, embedded by both sides with `engine` (local or Ray)."""

    items: str | Path
    engine: EngineOptions
    id_column: str = "id"


def verify(
    reference: str | Path,
    bundle: str | Path,
    data: str | Path | None = None,
    device: str = "cpu",
    options: VerifyOptions | None = None,
    gates_file: str | Path | None = None,
    overrides: dict[str, float | None] | None = None,
    baseline: str | Path | None = None,
    branches: bool = True,
    inputs: list[str] | None = None,
    weights: str | Path | None = None,
    require_quality: bool = False,
    corpus: Corpus | None = None,
    outputs: dict[str, str | Path | None] | None = None,
) -> Report:
    """Verify the bundle at `bundle` against the model `reference` (anything `dcnc export` loads; a factory with
    its `inputs` NAME:DTYPE:SHAPE strings and `weights` state_dict, as `dcnc export` takes them).

    data: evaluation .npz (toolkit.evaluate.evaldata formats); default: the evaluation split the reference names, if any.
    device: "cpu" or "cuda" (both sides run and are timed there). gates_file / overrides: thresholds on top of
    the defaults for the bundle's precision. baseline: an earlier report (JSON) to compare latency against.
    branches: also time the cross and deep branch subgraphs of parallel towers (CPU only). require_quality:
    refuse data without relevance pairs or labels (numeric-only verify) as bad input. corpus: a retrieval model's
    items come from a corpus, and `data` gives the queries and relevance naming corpus item ids. outputs: report
    files to write, by kind (REPORT_WRITERS: report, junit, markdown, html; None: not written), checked before any
    work and written when the verdict is in.

    Timing: both sides get the intra-op threads other work leaves free at the start (options.threads to fix
    them), and the bundle's ONNX Runtime sessions do not spin, so neither steals the cores the other is timed on.
    """

    options = options or VerifyOptions()
    if device not in ("cpu", "cuda"):
        raise DcncError(f"--device must be cpu or cuda, got {device!r}")
    outputs = {kind: path for kind, path in (outputs or {}).items() if path is not None}
    unknown = sorted(set(outputs) - set(REPORT_WRITERS))
    if unknown:
        raise ValueError(f"unknown report kinds {unknown}")
    check_outputs([output(path, f"--{kind}", replace=True) for kind, path in outputs.items()],
                  [reference, bundle, data, gates_file, baseline, weights, corpus.items if corpus else None])
    baseline_report = load_baseline(baseline) if baseline is not None else None
    manifest = check_bundle(bundle)
    built_for = manifest.device.get("kind", "cpu")
    if built_for != device:
        raise DcncError(f"{bundle}: built for {built_for} ({manifest.backend} backend); verify it with --device {built_for}")
    thresholds = resolve_thresholds(manifest.precision, gates_file, overrides)
    loaded = load_model(str(reference), inputs, str(weights) if weights is not None else None)
    if data is None:
        data = getattr(loaded, "eval_data", None)
        if data is None:
            raise DcncError(f"{reference}: names no evaluation data; pass --data EVAL.npz")
    towers = loaded.towers
    if len(towers) == 1 and len(manifest.towers) == 1:  # one tower each: the file's stem named the bundle's
        towers = {next(iter(manifest.towers)): next(iter(towers.values()))}
    specs = {t: tw.input_specs for t, tw in towers.items()}
    if corpus is not None:
        scan = corpus_scan(corpus.items, corpus.engine, corpus.id_column, str(reference), inputs,
                           None if weights is None else str(weights), str(bundle), device)  # fmt: skip
        evaluation = load_corpus_eval(data, specs, scan, scan.label)
    else:
        evaluation = load_eval(data, specs, {t: list(tw.output_names) for t, tw in towers.items()}, require_quality)
    weights = {t: match_weights(entry.source_weights, towers[t].weight_digests())
               for t, entry in manifest.towers.items() if entry.source_weights and t in towers}  # fmt: skip
    load = machine_load(options.threads)
    reference_runners = {t: TorchRunner(SignedTower(tw), device, name=f"torch:{t}") for t, tw in towers.items()}
    bundle_runners = {t: tower_runner(bundle, manifest, t, load.threads, spinning=False) for t in manifest.towers}
    emulated = emulated_runners(Path(bundle), manifest, device)
    names = {"reference": str(reference), "candidate": str(bundle), "precision": manifest.precision,
             "data": str(data) if corpus is None else f"{data} (queries), {evaluation.corpus} (items)"}
    if device == "cuda":  # where TF32 could otherwise have been on
        names["reference_math"] = REFERENCE_MATH
    if emulated:
        names["emulation"] = (
            f"{manifest.precision} answers computed under half emulation on CPU (every half tensor rounded as a GPU"
            " rounds it); latency measured on the bundle as built"
        )
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(load.threads))
        for runner in [*reference_runners.values(), *bundle_runners.values(), *(emulated or {}).values()]:
            stack.enter_context(runner)
        report = verify_runners(
            reference_runners, emulated or bundle_runners, {t: list(tw.output_names) for t, tw in towers.items()},
            evaluation, thresholds, options, device, baseline_report, names=names, timed=bundle_runners, load=load,
        )
    if report.latency is not None and branches and device == "cpu":
        report.latency["branches"] = _branch_timing(Path(bundle), manifest, max(options.batch_sizes))
    report.weights = weights
    report.gates += weight_gates(weights)
    report.warnings += _isa_warnings(manifest)
    for kind, path in outputs.items():
        REPORT_WRITERS[kind](report, path, Path(bundle).resolve().name)
    return report


def _isa_warnings(manifest: Any) -> list[str]:
    """One line per INT8 tower built for another CPU level than this one (calibration.isa)."""
    from calibration.isa import isa_mismatch

    warnings = []
    for tower, entry in manifest.towers.items():
        built_for = getattr(entry.lowering, "isa", None)
        reason = isa_mismatch(built_for) if built_for else None
        if reason:
            warnings.append(f"{tower}: {reason}")
    return warnings


def _write_html(report: Report, path: str | Path, target: str) -> None:
    from toolkit.report.html import write_html

    write_html({target: reports.to_json(report)}, path, title=f"dcnc verify: {target}")


REPORT_WRITERS = {  # kind -> writer(report, path, the bundle's name)
    "report": lambda report, path, _: reports.write_json(report, path),
    "junit": lambda report, path, _: reports.write_junit(report, path),
    "markdown": lambda report, path, _: reports.write_markdown(report, path),
    "html": _write_html,
}
