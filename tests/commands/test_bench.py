"""dcnc bench: the report's shape and numbers, interleaved timing, MatMul peaks, refusals, and the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import zoo
from typer.testing import CliRunner

from cli import app
from toolkit.backends.timing import wall_timer
from toolkit.commands.bench.benchmark import (
    SCHEMA,
    BenchOptions,
    measure_tower,
    run_bench,
    write_json,
)
from toolkit.commands.bench.peak import ort_matmul_peak, torch_matmul_peak
from toolkit.commands.bench.runners import Prepared
from toolkit.core.errors import DcncError
from toolkit.core.signature import random_inputs
from toolkit.example.data.evalsplit import save_npz
from toolkit.model.checkpoint import save_checkpoint

BATCHES = (1, 8)
PEAK_N = 256  # the peak MatMul's side: small, so the tests stay fast
ORT_RUNNERS = ("eager", "ort-fp32", "ort-fp16", "ort-int8")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny ranking checkpoint with ranker_calib.npz beside it, as `dcnc train` writes them."""
    folder = tmp_path_factory.mktemp("bench_model")
    model, spec = zoo.zoo_model("ranking")
    save_checkpoint(model, spec, folder / "ranker.pt")
    tower = model.towers()["ranker"]
    save_npz(folder / "ranker_calib.npz", random_inputs(list(tower.input_specs), 64, seed=1))
    return folder / "ranker.pt"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_out")


@pytest.fixture(scope="module")
def report(checkpoint, out) -> dict:
    options = BenchOptions(batch_sizes=BATCHES, iterations=3, warmup=1, runners=ORT_RUNNERS, out=str(out), peak_n=PEAK_N)
    return run_bench(str(checkpoint), options, progress=False)


def _timed(report: dict):
    for tower in report["towers"].values():
        for name, entry in tower["runners"].items():
            if entry["status"] == "ok":
                for batch, stats in entry["batches"].items():
                    if "skipped" not in stats:
                        yield name, int(batch), stats


# --- the report ---------------------------------------------------------------------------------------------------
def test_report_names_its_schema_machine_and_versions(report):
    assert report["schema"] == SCHEMA
    assert report["machine"]["cpu_count"] >= 1
    assert report["versions"]["onnxruntime"] and report["versions"]["torch"]


def test_every_runner_and_batch_is_timed_or_skipped_with_a_reason(report):
    runners = report["towers"]["ranker"]["runners"]
    assert list(runners) == list(ORT_RUNNERS)
    for name, entry in runners.items():
        if entry["status"] == "skipped":
            assert entry["reason"], name
            continue
        assert sorted(entry["batches"]) == sorted(str(b) for b in BATCHES), name
        for stats in entry["batches"].values():
            assert "p50_ms" in stats or stats["skipped"], name


def test_ort_bundles_of_every_cpu_precision_are_timed(report):
    runners = report["towers"]["ranker"]["runners"]
    assert {n: runners[n]["status"] for n in ORT_RUNNERS} == dict.fromkeys(ORT_RUNNERS, "ok")
    assert {runners[n]["precision"] for n in ORT_RUNNERS[1:]} == {"fp32", "fp16", "int8"}


def test_speedup_of_eager_over_itself_is_one(report):
    for batch, stats in report["towers"]["ranker"]["runners"]["eager"]["batches"].items():
        assert stats["speedup"] == pytest.approx(1.0), batch


def test_timings_throughput_and_percent_of_peak_are_positive_and_finite(report):
    timed = list(_timed(report))
    assert len(timed) == len(ORT_RUNNERS) * len(BATCHES)
    for name, batch, stats in timed:
        for key in ("p50_ms", "p90_ms", "p99_ms", "throughput", "throughput_p50", "speedup", "gflops", "pct_peak",
                    "pct_peak_fp32"):  # fmt: skip
            assert stats[key] is not None and math.isfinite(stats[key]) and stats[key] > 0, (name, batch, key)
        assert stats["p50_ms"] <= stats["p99_ms"]
        assert stats["iterations"] == 3


def test_achieved_gflops_is_flops_per_sample_times_batch_over_p50(report):
    flops = report["towers"]["ranker"]["flops_per_sample"]
    assert flops > 0
    stats = report["towers"]["ranker"]["runners"]["ort-fp32"]["batches"]["8"]
    assert stats["gflops"] == pytest.approx(flops * 8 / (stats["p50_ms"] / 1e3) / 1e9)


def test_each_runner_is_read_against_its_runtimes_peaks(report):
    runners = report["towers"]["ranker"]["runners"]
    assert runners["eager"]["peak"] == {"fp32": "torch:cpu:fp32", "precision": "torch:cpu:fp32"}
    assert runners["ort-int8"]["peak"] == {"fp32": "ort:cpu:fp32", "precision": "ort:cpu:int8"}
    for key in ("torch:cpu:fp32", "ort:cpu:fp32", "ort:cpu:fp16", "ort:cpu:int8"):
        assert report["peaks"][key]["gflops"] > 0, key


def test_each_peak_is_the_faster_of_its_measurements_before_and_after_the_towers(report):
    for key, peak in report["peaks"].items():
        assert peak["gflops"] == max(peak["gflops_before"], peak["gflops_after"]), key


def test_percent_of_peak_is_achieved_over_peak_gflops(report):
    stats = report["towers"]["ranker"]["runners"]["ort-int8"]["batches"]["8"]
    assert stats["pct_peak"] == pytest.approx(100 * stats["gflops"] / report["peaks"]["ort:cpu:int8"]["gflops"])
    assert stats["pct_peak_fp32"] == pytest.approx(100 * stats["gflops"] / report["peaks"]["ort:cpu:fp32"]["gflops"])


def test_json_is_strict_and_round_trips(report, tmp_path):
    path = tmp_path / "bench.json"
    write_json(report, path)
    loaded = json.loads(path.read_text())  # write_json uses allow_nan=False: no NaN/Infinity tokens
    assert loaded["schema"] == SCHEMA
    assert loaded["towers"]["ranker"]["runners"]["ort-fp32"]["batches"]["1"]["p50_ms"] > 0


def test_bundles_built_on_the_fly_are_reused_from_the_cache(report, checkpoint, out):
    source = Path(report["towers"]["ranker"]["runners"]["ort-int8"]["source"])
    manifest_time = (source / "manifest.json").stat().st_mtime_ns
    options = BenchOptions(batch_sizes=BATCHES, iterations=2, warmup=0, runners=("ort-int8",), out=str(out), peak_n=PEAK_N)
    again = run_bench(str(checkpoint), options, progress=False)
    assert again["towers"]["ranker"]["runners"]["ort-int8"]["source"] == str(source)
    assert (source / "manifest.json").stat().st_mtime_ns == manifest_time


def test_existing_bundle_is_timed_beside_the_runners(report, checkpoint, out, tmp_path):
    # a copy: the one in bench's cache lies inside --out, which bench may rebuild, so it is refused as an input
    bundle = tmp_path / "ranker-ort-fp32"
    shutil.copytree(report["towers"]["ranker"]["runners"]["ort-fp32"]["source"], bundle)
    options = BenchOptions(batch_sizes=BATCHES, iterations=2, warmup=0, runners=("eager",), bundles=(str(bundle),), out=str(out), peak_n=PEAK_N)
    result = run_bench(str(checkpoint), options, progress=False)
    entry = result["towers"]["ranker"]["runners"][f"bundle:{bundle.name}"]
    assert entry["status"] == "ok" and entry["precision"] == "fp32"
    assert entry["batches"]["8"]["speedup"] > 0


def test_int8_without_calibration_data_is_skipped_with_the_reason(checkpoint, tmp_path, out):
    alone = tmp_path / checkpoint.name  # the same checkpoint with no ranker_calib.npz beside it
    alone.write_bytes(checkpoint.read_bytes())
    options = BenchOptions(batch_sizes=(1,), iterations=2, warmup=0, runners=("eager", "ort-int8"), out=str(out), peak_n=PEAK_N)
    result = run_bench(str(alone), options, progress=False)
    entry = result["towers"]["ranker"]["runners"]["ort-int8"]
    assert entry["status"] == "skipped" and "calibration" in entry["reason"]
    assert {"tower": "ranker", "runner": "ort-int8", "batch": None, "reason": entry["reason"]} in result["skipped"]
    assert result["towers"]["ranker"]["runners"]["eager"]["status"] == "ok"


@pytest.mark.slow
def test_default_cpu_runners_include_torch_compile(checkpoint, out):
    result = run_bench(str(checkpoint), BenchOptions(batch_sizes=BATCHES, iterations=2, warmup=1, out=str(out), peak_n=PEAK_N), progress=False)
    runners = result["towers"]["ranker"]["runners"]
    assert list(runners) == ["eager", "compile", "ort-fp32", "ort-fp16", "ort-int8"]
    assert runners["compile"]["status"] == "ok", runners["compile"]["reason"]
    assert all(runners["compile"]["batches"][str(b)]["p50_ms"] > 0 for b in BATCHES)


# --- timing order -------------------------------------------------------------------------------------------------
class _Recording(Prepared):
    """A fake runner whose calls log their name, and which refuses batches above `max_batch`."""

    def __init__(self, name: str, log: list, max_batch: int = 1 << 20):
        super().__init__(name, "torch", "fp32")
        self.log, self.max_batch = log, max_batch

    def call(self, batch: int):
        if batch > self.max_batch:
            raise DcncError(f"{self.name}: batch {batch} is outside its profile")
        return lambda: self.log.append((self.name, batch))


def test_runners_of_one_batch_are_timed_interleaved_round_robin():
    log: list = []
    runners = {name: _Recording(name, log) for name in "abc"}
    measure_tower(runners, (1, 8), warmup=0, iterations=3, timer=wall_timer)
    assert [n for n, b in log if b == 1] == list("abc" "bca" "cab")
    assert [b for _, b in log] == [1] * 9 + [8] * 9  # one batch size at a time


def test_a_batch_a_runner_refuses_is_skipped_while_the_others_are_timed():
    log: list = []
    runners = {"small": _Recording("small", log, max_batch=4), "any": _Recording("any", log)}
    result = measure_tower(runners, (1, 8), warmup=1, iterations=2, timer=wall_timer)
    assert "outside its profile" in result["small"]["8"]["skipped"]
    assert result["small"]["1"]["iterations"] == 2 and result["any"]["8"]["iterations"] == 2


# --- peaks --------------------------------------------------------------------------------------------------------
def test_torch_matmul_peak_is_a_positive_gflops():
    peak = torch_matmul_peak("fp32", "cpu", n=256, repeats=3)
    assert peak.gflops > 0 and math.isfinite(peak.gflops)
    assert peak.gflops == pytest.approx(2 * 256**3 / (peak.best_ms / 1e3) / 1e9)
    assert peak.gflops >= peak.gflops_median


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_ort_matmul_peak_is_a_positive_gflops(precision):
    peak = ort_matmul_peak(precision, "ort", n=256, repeats=3)
    assert peak.runtime == "ort" and peak.precision == precision
    assert peak.gflops > 0 and math.isfinite(peak.gflops)


# --- options ------------------------------------------------------------------------------------------------------
def test_aot_joins_the_default_runners_after_compile():
    assert [k.name for k in BenchOptions(aot=True).kinds()][:3] == ["eager", "compile", "aot"]


def test_gpu_runners_are_the_cuda_defaults():
    assert [k.name for k in BenchOptions(device="cuda").kinds()] == [
        "eager", "compile", "ort-cuda-fp32", "ort-cuda-fp16", "tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8",
    ]  # fmt: skip


# --- the command line ---------------------------------------------------------------------------------------------
def _cli(*args: str):
    return CliRunner().invoke(app, ["bench", *args, "--peak-n", str(PEAK_N)])


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], result.output


def test_cli_writes_json_and_prints_nothing_when_quiet(checkpoint, out, tmp_path):
    path = tmp_path / "bench.json"
    result = _cli(str(checkpoint), "--runners", "eager,ort-fp32", "--batch-sizes", "1,8", "--iterations", "2",
                  "--warmup", "0", "--out", str(out), "--json", str(path), "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.strip() == ""
    data = json.loads(path.read_text())
    assert set(data["towers"]["ranker"]["runners"]) == {"eager", "ort-fp32"}


def test_cli_prints_a_table_per_tower(checkpoint, out):
    result = _cli(str(checkpoint), "--runners", "eager,ort-fp32", "--batch-sizes", "1", "--iterations", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "ranker:" in result.output and "% peak" in result.output and "ort-fp32" in result.output


def test_cli_refuses_an_unknown_runner(checkpoint):
    _one_line_error(_cli(str(checkpoint), "--runners", "eager,onnx-turbo"), "onnx-turbo", "known:")


def test_cli_refuses_a_runner_of_the_other_device(checkpoint):
    _one_line_error(_cli(str(checkpoint), "--runners", "tensorrt-fp16"), "tensorrt-fp16", "--device cpu")


@pytest.mark.parametrize("sizes", ["1,x", "0,8", ","])
def test_cli_refuses_a_bad_batch_list(checkpoint, sizes):
    _one_line_error(_cli(str(checkpoint), "--batch-sizes", sizes), "--batch-sizes")


def test_cli_refuses_a_missing_model(tmp_path):
    _one_line_error(_cli(str(tmp_path / "absent.pt"), "--runners", "eager"), "absent.pt")


def test_cli_refuses_missing_calibration_data(checkpoint, tmp_path):
    _one_line_error(_cli(str(checkpoint), "--calib", str(tmp_path / "absent.npz")), "--calib")


def test_cli_refuses_a_bundle_that_fails_its_checks(report, tmp_path):
    import shutil

    bundle = tmp_path / "tampered"
    shutil.copytree(report["towers"]["ranker"]["runners"]["ort-fp32"]["source"], bundle)
    with open(bundle / "ranker.onnx", "ab") as handle:
        handle.write(b"\0")
    _one_line_error(_cli(report["model"], "--runners", "eager", "--bundle", str(bundle)), "tampered", "hash")


def test_cli_refuses_a_bundle_without_the_models_towers(report, tmp_path):
    from toolkit.commands.build import build_bundle

    other = tmp_path / "other.onnx"  # the same graph as a tower named "other"
    other.write_bytes(Path(report["towers"]["ranker"]["onnx"]).read_bytes())
    build_bundle(other, tmp_path / "other_bundle")
    _one_line_error(_cli(report["model"], "--runners", "eager", "--bundle", str(tmp_path / "other_bundle")), "other", "ranker")


def test_cli_refuses_an_unknown_tower(checkpoint):
    _one_line_error(_cli(str(checkpoint), "--runners", "eager", "--tower", "query"), "query")


@pytest.mark.parametrize("option", [("--iterations", "0"), ("--warmup", "-1"), ("--threads", "0")])
def test_cli_refuses_counts_out_of_range(checkpoint, option):
    _one_line_error(_cli(str(checkpoint), "--runners", "eager", *option), option[0])


def test_cli_refuses_cuda_without_a_gpu(checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    _one_line_error(_cli(str(checkpoint), "--device", "cuda", "--runners", "eager"), "cuda")


def test_cli_help_lists_the_options():
    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for option in ("--runners", "--aot", "--bundle", "--calib", "--batch-sizes", "--iterations", "--warmup",
                   "--threads", "--device", "--peak-n", "--json", "--quiet"):  # fmt: skip
        assert option in result.output, option

