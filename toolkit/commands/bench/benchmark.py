"""`dcnc bench`: one model's towers timed across runtimes over a batch sweep, read as speedups and as % of peak.

Per tower, every runner (toolkit.commands.bench.runners: torch eager, torch.compile, AOTInductor, ORT FP32/FP16/INT8
bundles, ORT CUDA and TensorRT on a GPU, bundles given with --bundle) is made ready first; then each batch size
is timed with all runners interleaved round-robin (toolkit.backends.timing.time_interleaved: one call of each per round,
the order rotating), so drift in machine load hits all of them equally. Each result is read against torch eager
(speedup of p50) and, through the tower's FLOPs per sample (graphs.inspect), against the measured peak of one
large MatMul in the runner's runtime, in FP32 and in the runner's precision (toolkit.commands.bench.peak).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.backends.bundle import tower_runner
from toolkit.backends.timing import Timer, time_interleaved, timer_for
from toolkit.backends.torch_runner import torch_threads
from toolkit.commands.bench.runners import (
    DEFAULT_RUNNERS,
    RUNNER_KINDS,
    BundlePrepared,
    Prepared,
    RunnerKind,
    TowerFeeds,
    Workspace,
    bundle_kind,
    prepare,
)
from toolkit.commands.calibration_data import check_source, source_files
from toolkit.core.errors import DcncError
from toolkit.core.paths import FOLDER, check_outputs, output
from toolkit.core.progress import StepBar
from toolkit.evaluate.latency import (
    CONCLUSIVE,
    INCONCLUSIVE,
    LatencyPolicy,
    paired_speedup,
    summarize,
)
from toolkit.report.verify import speedup_text

SCHEMA = "dcnc.bench/1"
DEFAULT_BATCH_SIZES = (1, 64, 256, 4096)
REFERENCE = "eager"  # speedups are this runner's p50 over each runner's p50


@dataclass
class BenchOptions:
    """What `dcnc bench` runs.

    Args:
        batch_sizes: the sweep (default 1, 64, 256, 4096).
        iterations / warmup: timed and untimed interleaved rounds per batch size (default 100 / 10).
        threads: intra-op threads of torch and ORT (default: the cores this process may use).
        device: "cpu" or "cuda" (torch on the device, ORT CUDA and TensorRT bundles, CUDA-event timing).
        runners: names from bench_runners.RUNNER_KINDS (default: DEFAULT_RUNNERS for the device).
        aot: add the AOTInductor runner (compiles a C++ package per tower: tens of seconds on a small CPU).
        towers: the towers to time (default all). calib: INT8 calibration data (default: the checkpoint's).
        bundles: existing bundle directories to time beside the runners.
        out: folder for the cache of exported graphs, bundles and AOT packages.
        json: write the report (schema dcnc.bench/1) there when done (None: not written).
        peak_n: side of the square MatMul whose peak is measured (default toolkit.commands.bench.peak.DEFAULT_N per device).
    """

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    iterations: int = 100
    warmup: int = 10
    threads: int | None = None
    device: str = "cpu"
    runners: tuple[str, ...] | None = None
    aot: bool = False
    towers: tuple[str, ...] = ()
    calib: str | None = None
    bundles: tuple[str, ...] = ()
    out: str = "runs/bench"
    peak_n: int | None = None
    json: str | None = None

    def check(self) -> None:
        """Refuse bad options in one line each, before anything is loaded or built."""
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise DcncError(f"--batch-sizes {self.batch_sizes}: expected positive integers")
        if self.iterations < 1 or self.warmup < 0:
            raise DcncError(f"--iterations must be >= 1 and --warmup >= 0, got {self.iterations} and {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise DcncError(f"--threads {self.threads}: must be at least 1")
        if self.device not in DEFAULT_RUNNERS:
            raise DcncError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.peak_n is not None and self.peak_n < 16:
            raise DcncError(f"peak_n {self.peak_n}: a MatMul peak needs a matrix of at least 16 x 16")
        check_source(self.calib)

    def kinds(self) -> list[RunnerKind]:
        """The runners to time, in order, refusing unknown names and runners for another device."""
        names = list(self.runners or DEFAULT_RUNNERS[self.device])
        if self.aot and "aot" not in names:
            names.insert(names.index("compile") + 1 if "compile" in names else len(names), "aot")
        kinds = []
        for name in dict.fromkeys(names):
            if name not in RUNNER_KINDS:
                raise DcncError(f"--runners: unknown runner {name!r}; known: {', '.join(RUNNER_KINDS)}")
            kind = RUNNER_KINDS[name]
            if self.device not in kind.devices:
                raise DcncError(f"--runners: {name} runs on {kind.devices[0]}, not --device {self.device}")
            kinds.append(kind)
        return kinds


def parse_runners(text: str | None) -> tuple[str, ...] | None:
    """`eager,compile,ort-fp32` -> names (None for the device's defaults); names are checked by BenchOptions."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise DcncError(f"--runners {text!r}: expected runner names separated by commas, e.g. eager,ort-fp32")
    return names


# --- timing ---------------------------------------------------------------------------------------------------
def measure_tower(
    prepared: dict[str, Prepared],
    batch_sizes: tuple[int, ...],
    warmup: int,
    iterations: int,
    timer: Timer,
    advance: Callable[[str], None] = lambda description: None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per runner, per batch size (a string key): summarize()'s statistics and, when the reference runner ran in
    the same rounds, the paired speedup over it with its interval and verdict (toolkit.evaluate.latency); or
    {"skipped": reason} when the runner refuses the batch. All runners of one batch size are timed together,
    interleaved."""
    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in prepared}
    for batch in batch_sizes:
        advance(f"timing batch {batch}")
        calls = {}
        for name, runner in prepared.items():
            try:
                calls[name] = runner.call(batch)
            except DcncError as err:
                results[name][str(batch)] = {"skipped": str(err)}
        if calls:
            samples = time_interleaved(calls, warmup, iterations, timer)
            for name, times in samples.items():
                results[name][str(batch)] = summarize(times, batch)
                if REFERENCE in samples:
                    estimate = paired_speedup(samples[REFERENCE], times)
                    verdict = CONCLUSIVE if estimate["noise"] <= LatencyPolicy().tolerance else INCONCLUSIVE
                    results[name][str(batch)].update(estimate, verdict=verdict)
    return results


# --- the benchmark ----------------------------------------------------------------------------------------------
def run_bench(model: str, options: BenchOptions | None = None, progress: bool = True) -> dict[str, Any]:
    """Benchmark MODEL (anything toolkit.model.loading.load_model takes) and return the dcnc.bench/1 report as a dict.

    The report: schema, model, device, timer, reference ("eager"), options, runners (names in order), machine,
    versions, seconds, load_average_before / _after (1, 5, 15 min); `peaks` {"runtime:device:precision": Peak
    fields + gflops_before / gflops_after, or {skipped}};
    `towers` {tower: {onnx, flops_per_sample, flops_by_branch, parameters, runners: {name: {status ("ok" or
    "skipped"), reason, runtime, precision, setup_s, source, peak {fp32, precision keys}, batches {"B":
    p50_ms, p90_ms, p99_ms, mean_ms, throughput (batch / mean), throughput_p50, iterations, speedup, gflops,
    pct_peak, pct_peak_fp32 — or {skipped: reason}}}}}}; `skipped` [{tower, runner, batch or null, reason}].
    """

    from toolkit.backends.bundle import check_bundle
    from toolkit.core.machine import machine_info, machine_load
    from toolkit.model.loading import load_model

    options = options or BenchOptions()
    options.check()
    check_outputs([output(options.out, "--out", FOLDER), output(options.json, "--json", replace=True)],
                  [model, *options.bundles, *source_files(options.calib)])
    kinds = options.kinds()
    bundles = [(Path(b), check_bundle(b)) for b in options.bundles]
    for bundle, manifest in bundles:
        if options.device not in bundle_kind(manifest).devices:
            raise DcncError(f"--bundle {bundle}: a {manifest.backend} bundle does not run with --device {options.device}")
    timer = timer_for(options.device)
    loaded = load_model(model)
    towers = loaded.select(list(options.towers))
    for bundle, manifest in bundles:
        if not set(manifest.towers) & set(towers):
            raise DcncError(f"--bundle {bundle}: none of its towers {sorted(manifest.towers)} is among {list(towers)}")
    batch_sizes = tuple(sorted(set(options.batch_sizes)))
    load = machine_load(options.threads)
    threads = load.threads
    workspace = Workspace(loaded, options.out, options.device, batch_sizes, threads, options.calib)
    steps = len(towers) * (len(kinds) + len(bundles) + 1 + len(batch_sizes)) + 2
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": loaded.source,
        "device": options.device,
        "timer": "cuda_events" if options.device == "cuda" else "wall_clock",
        "reference": REFERENCE,
        "options": {**asdict(options), "batch_sizes": list(batch_sizes), "threads": threads},
        "load": load.to_dict(),
        "runners": [k.name for k in kinds] + [f"bundle:{b.name}" for b, _ in bundles],
        "towers": {},
        "peaks": {},
        "skipped": [],
    }
    start = time.perf_counter()
    report["load_average_before"] = _load_average()
    with torch_threads(threads):
        with StepBar(steps, enabled=progress, label="bench") as bar:
            # the peaks before and after the towers: a machine shared with other jobs rarely gives its best
            # throughput at one moment, and a peak measured while it was busy would inflate every % of peak
            needed = _needed_peaks(kinds + [bundle_kind(m) for _, m in bundles], options.device)
            bar.advance("measuring MatMul peaks")
            before = _measure_peaks(needed, options.device, threads, options.peak_n)
            for name, tower in towers.items():
                report["towers"][name] = _bench_tower(name, tower, kinds, bundles, workspace, options, batch_sizes, timer, bar)
            bar.advance("measuring MatMul peaks again")
            report["peaks"] = _best_peaks(before, _measure_peaks(needed, options.device, threads, options.peak_n))
    _read_against(report)
    report["seconds"] = time.perf_counter() - start
    report["load_average_after"] = _load_average()
    report["machine"] = machine_info(options.device)
    report["versions"] = {"dcnc": __version__, **report["machine"]["versions"]}
    if options.json:
        write_json(report, options.json)
    return report


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: how busy a shared machine was around the numbers."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not Unix
        return None


def _bench_tower(name, tower, kinds, bundles, workspace, options, batch_sizes, timer, bar) -> dict[str, Any]:
    """Prepare every runner for one tower, count its FLOPs, and time it over the sweep."""
    feeds = TowerFeeds(tower)
    entries: dict[str, dict[str, Any]] = {}
    prepared: dict[str, Prepared] = {}
    for kind in kinds:
        bar.advance(f"{name}: preparing {kind.name}")
        entries[kind.name] = _entry(kind)
        try:
            prepared[kind.name] = prepare(kind, name, workspace, feeds, batch_sizes)
        except DcncError as err:
            entries[kind.name].update(status="skipped", reason=str(err))
    for bundle, manifest in bundles:
        label = f"bundle:{bundle.name}"
        bar.advance(f"{name}: opening {label}")
        if name not in manifest.towers:
            continue
        kind = bundle_kind(manifest)
        entries[label] = _entry(kind)
        try:
            runner = tower_runner(bundle, manifest, name, workspace.threads, spinning=False)
            prepared[label] = BundlePrepared(label, kind, runner, feeds, options.device, source=str(bundle))
        except DcncError as err:
            entries[label].update(status="skipped", reason=str(err))
    bar.advance(f"{name}: counting FLOPs")
    info = _flops(workspace, name)
    try:
        measured = measure_tower(prepared, batch_sizes, options.warmup, options.iterations, timer,
                                 lambda text: bar.advance(f"{name}: {text}"))  # fmt: skip
    finally:
        for runner in prepared.values():
            runner.close()
    for label, runner in prepared.items():
        entries[label].update(status="ok", setup_s=runner.setup_s, source=runner.source, batches=measured[label])
    return {**info, "runners": entries}


def _entry(kind: RunnerKind) -> dict[str, Any]:
    return {"status": "skipped", "runtime": kind.runtime, "precision": kind.precision, "reason": None}


def _flops(workspace: Workspace, tower: str) -> dict[str, Any]:
    """FLOPs per sample and parameters of the tower's exported graph (graphs.inspect), or why they are unknown."""
    from graphs.inspect import inspect_model

    try:
        path = workspace.onnx(tower)
        info = inspect_model(path)
    except DcncError as err:
        return {"onnx": None, "flops_per_sample": None, "parameters": None, "flops_note": str(err)}
    flops = info["flops_per_sample"]
    return {
        "onnx": str(path),
        "flops_per_sample": flops["total"],
        "flops_by_branch": {k: v for k, v in flops.items() if k not in ("total", "partial")},
        "parameters": info["parameters"]["total"],
        "flops_note": "shapes partly unknown: a lower bound" if flops["partial"] else None,
    }


def _peak_keys(runtime: str, precision: str, device: str) -> dict[str, str]:
    """The peaks a runner is read against: its runtime's FP32 and its own precision."""
    from toolkit.commands.bench.peak import peak_key

    return {"fp32": peak_key(runtime, device, "fp32"), "precision": peak_key(runtime, device, precision)}


def _needed_peaks(kinds: list[RunnerKind], device: str) -> dict[str, tuple[str, str]]:
    """Peak key -> (runtime, precision) for every peak one of `kinds` is read against."""
    needed = {}
    for kind in kinds:
        keys = _peak_keys(kind.runtime, kind.precision, device)
        needed[keys["fp32"]] = (kind.runtime, "fp32")
        needed[keys["precision"]] = (kind.runtime, kind.precision)
    return needed


def _measure_peaks(needed: dict[str, tuple[str, str]], device: str, threads: int, n: int | None) -> dict[str, Any]:
    """Each peak as Peak.to_dict(), or {"skipped": reason} where the runtime cannot run that MatMul here."""
    from toolkit.commands.bench.peak import measure_peak

    peaks = {}
    for key, (runtime, precision) in needed.items():
        try:
            peaks[key] = measure_peak(runtime, device, precision, threads, n).to_dict()
        except DcncError as err:
            peaks[key] = {"skipped": str(err)}
    return peaks


def _best_peaks(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The faster of the two measurements of each peak, with both kept (gflops_before / gflops_after)."""
    peaks = {}
    for key, first in before.items():
        second = after[key]
        if "skipped" in first:
            peaks[key] = first
            continue
        best = dict(max(first, second, key=lambda p: p["gflops"]))
        peaks[key] = {**best, "gflops_before": first["gflops"], "gflops_after": second["gflops"]}
    return peaks


def _read_against(report: dict[str, Any]) -> None:
    """Add to every timed batch its throughput at the median (batch / p50; summarize's `throughput` is batch /
    mean, which one stall from another job on the machine can halve), speedup over the reference, achieved
    GFLOP/s and % of each peak; list every skipped runner and batch with its reason."""
    peaks = report["peaks"]
    for tower_name, tower in report["towers"].items():
        flops = tower["flops_per_sample"]
        for runner_name, entry in tower["runners"].items():
            if entry["status"] != "ok":
                report["skipped"].append({"tower": tower_name, "runner": runner_name, "batch": None, "reason": entry["reason"]})
                continue
            entry["peak"] = _peak_keys(entry["runtime"], entry["precision"], report["device"])
            for batch, stats in entry["batches"].items():
                if "skipped" in stats:
                    report["skipped"].append({"tower": tower_name, "runner": runner_name, "batch": int(batch), "reason": stats["skipped"]})
                    continue
                stats["throughput_p50"] = int(batch) / (stats["p50_ms"] / 1e3) if stats["p50_ms"] > 0 else None
                gflops = flops * int(batch) / (stats["p50_ms"] / 1e3) / 1e9 if flops and stats["p50_ms"] > 0 else None
                stats["gflops"] = gflops
                for label, key in (("pct_peak", "precision"), ("pct_peak_fp32", "fp32")):
                    peak = peaks.get(entry["peak"][key], {}).get("gflops")
                    stats[label] = 100 * gflops / peak if gflops and peak else None


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write the report atomically; NaN and infinities become null."""
    from toolkit.core.fileio import write_json

    write_json(path, report)


# --- output -------------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bench_tables(report: dict[str, Any]) -> list:
    """One rich Table per tower: per runner and batch size, p50 and, at p50, throughput, speedup over eager, achieved
    GFLOP/s and % of the runner's MatMul peak (its own precision; the JSON also holds % of the FP32 peak).
    Skipped runners and batches show as "skipped"; their reasons, and the peaks, are in the caption."""
    from rich.table import Table

    peaks = "; ".join(
        f"{k} {v['gflops']:.0f}" if "gflops" in v else f"{k} not measured ({v['skipped']})" for k, v in report["peaks"].items()
    )
    before, after = report.get("load_average_before"), report.get("load_average_after")
    load = f"load average {before[0]} before, {after[0]} after" if before and after else ""
    if report.get("load", {}).get("busy") is not None:
        load += f"; {report['load']['busy']:.1f} of {report['load']['cores']} cores busy at the start"
    tables = []
    for tower_name, tower in report["towers"].items():
        flops = f"{tower['flops_per_sample']:,} FLOPs/sample" if tower["flops_per_sample"] else "FLOPs unknown"
        reasons = [f"{s['runner']}{'' if s['batch'] is None else ' at batch ' + str(s['batch'])}: {s['reason']}"
                   for s in report["skipped"] if s["tower"] == tower_name]  # fmt: skip
        table = Table(
            title=f"{tower_name}: {report['model']} on {report['device']}, {report['options']['threads']} threads, {flops}",
            title_justify="left", caption_justify="left",
            caption="\n".join([f"MatMul peaks, GFLOP/s (GOP/s for int8): {peaks or 'none'}"] + [load] * bool(load)
                               + [f"skipped {r}" for r in reasons]),
        )  # fmt: skip
        for column in ("runner", "batch", "p50 ms", "samples/s", f"x {REFERENCE}", "GFLOP/s", "% peak"):  # at p50
            if column == "runner":  # names of --bundle runners can be long: they wrap, the numbers do not
                table.add_column(column, overflow="fold", min_width=13, ratio=1)
            elif column == f"x {REFERENCE}":  # "inconclusive ±98%" may wrap onto a second line
                table.add_column(column, justify="right", min_width=7)
            else:
                table.add_column(column, justify="right", no_wrap=True)
        for runner_name, entry in tower["runners"].items():
            table.add_section()
            if entry["status"] != "ok":
                table.add_row(runner_name, "", "skipped", *[""] * 4, style="yellow")
                continue
            for batch, stats in entry["batches"].items():
                if "skipped" in stats:
                    table.add_row(runner_name, batch, "skipped", *[""] * 4, style="yellow")
                    continue
                table.add_row(
                    runner_name, batch, f"{stats['p50_ms']:.3f}", f"{stats['throughput_p50']:,.0f}",
                    speedup_text(stats), _fmt(stats["gflops"], ".2f"), _fmt(stats["pct_peak"], ".1f"),
                )  # fmt: skip
        tables.append(table)
    return tables
