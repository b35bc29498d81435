"""The GPU check's scripts (scripts/gpu/): the probe opens a real session and refuses a CPU fallback, with torch
imported before onnxruntime; the results tables survive steps that measured nothing; the carried wheels are
pinned. (check.sh --dry-run runs them all end to end; docs/gpu.md says how long it takes.)"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_fakes import FakeCudaSession, fake_onnxruntime

from toolkit.core.errors import DcncError
from toolkit.core.machine import library_versions

GPU = Path(__file__).resolve().parents[2] / "scripts" / "gpu"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(two_tower_model, two_tower_spec, tmp_path_factory):
    from toolkit.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("probe") / "two_tower.pt"
    save_checkpoint(two_tower_model, two_tower_spec, path)
    return path


def test_probe_imports_torch_before_onnxruntime():
    # torch loads the CUDA / cuDNN libraries of its nvidia wheels, which onnxruntime's CUDA provider then finds
    trace = subprocess.run([sys.executable, "-X", "importtime", str(GPU / "probe.py"), "--help"],
                           capture_output=True, text=True, check=True).stderr  # fmt: skip
    top_level = [m.group(1) for m in re.finditer(r"\| (\w+)$", trace, re.MULTILINE)]
    assert top_level.index("torch") < top_level.index("onnxruntime")


def test_probe_refuses_a_session_that_fell_back_to_the_cpu(checkpoint, towers_dir, monkeypatch):
    # get_available_providers() lists CUDA here, as it does for any onnxruntime-gpu: only the session tells
    ort = fake_onnxruntime(monkeypatch)
    ort.InferenceSession = lambda *args, **kwargs: FakeCudaSession(fallback=True)
    with pytest.raises(DcncError, match="fell back to"):
        script("probe").tf32_parity(checkpoint, towers_dir / "query.onnx", "query", 8, "ort-cuda")


def test_probe_dry_run_compares_both_tf32_settings_with_torch(checkpoint, towers_dir, tmp_path):
    probe = script("probe").main([str(checkpoint), str(towers_dir / "query.onnx"), "--batch", "32", "--dry-run",
                                  "--json", str(tmp_path / "probe.json")])  # fmt: skip
    assert probe["session_providers"][0] == "CPUExecutionProvider"
    assert probe["onnxruntime"]["version"] == __import__("onnxruntime").__version__
    for setting in ("off", "on"):
        assert probe["tf32"][setting]["embedding"]["rel_l2"] < probe["rel_l2_gate"]
    assert json.loads((tmp_path / "probe.json").read_text())["tower"] == "query"


def test_reported_library_versions_are_the_running_modules_not_the_package_metadata(monkeypatch):
    # onnxruntime-gpu installed beside the CPU package: the metadata of "onnxruntime" names the CPU one
    import importlib.metadata
    import types

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.30.0")
    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(__version__="1.31.1"))
    assert library_versions()["onnxruntime"] == "1.31.1"


def test_results_tables_survive_skipped_peaks_and_steps_that_measured_nothing(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "steps.tsv").write_text("install\t0\t12\t\nprobe\t1\t3\t\nbench\t124\t150\ttimed out after 150 s\n"
                                    "branches\t\t0\tno time left of the 420 s budget\n")  # fmt: skip
    skipped = {"skipped": "matmul peak: torch fp16 on cpu is not a precision dcnc benchmarks"}
    bench = {"towers": {"query": {"flops_per_sample": 59474, "runners": {
        "eager": {"status": "ok", "batches": {"64": {"p50_ms": 0.41, "pct_peak": 1.5}}},
        "ort-cuda-fp16": {"status": "skipped", "reason": "needs onnxruntime-gpu"}}}},
        "peaks": {"torch:cpu:fp32": {"gflops": 2100.0}, "torch:cpu:fp16": skipped}}  # fmt: skip
    (work / "bench.json").write_text(json.dumps(bench))
    (work / "branches.json").write_text(json.dumps({"device": "cpu", "towers": {"query": {"skipped": "not parallel"}},
                                                    "peaks": {"fp32": {"gflops": 90.0}, "bf16": skipped}}))  # fmt: skip
    script("results").main(work, out)
    text = (out / "results.md").read_text()
    assert "torch:cpu:fp32 2100 GFLOP/s, torch:cpu:fp16 not measured (matmul peak: torch fp16 on cpu" in text
    assert "| bench | exit 124 (timed out after 150 s) | 150 |" in text
    assert "| branches | skipped: no time left of the 420 s budget | 0 |" in text
    assert "## Probe: a real session, TF32 off and on\n\nnot measured" in text
    assert json.loads((out / "check.json").read_text())["steps"][1] == {"step": "probe", "rc": 1, "seconds": 3.0,
                                                                        "note": ""}  # fmt: skip


def test_every_wheel_the_check_carries_is_pinned_with_its_parts():
    check = (GPU / "check.sh").read_text()
    pinned = dict(line.split()[::-1] for line in (GPU / "wheels.sha256").read_text().splitlines()
                  if line and not line.startswith("#"))  # fmt: skip
    wheel = re.search(r"^ORT_GPU_WHEEL=(\S+)", check, re.MULTILINE).group(1)
    assert wheel in pinned and [f"{wheel}.part{i}" in pinned for i in range(4)] == [True] * 4
    for requirement in re.search(r"^SMALL_WHEELS=\(([^)]*)\)", check, re.MULTILINE).group(1).split():
        name, version = requirement.split("==")
        assert any(w.startswith(f"{name.replace('-', '_')}-{version}-") for w in pinned), requirement


def test_check_help_names_its_four_uses():
    text = subprocess.run(["bash", str(GPU / "check.sh"), "--help"], capture_output=True, text=True, check=True).stdout
    assert all(use in text for use in ("check.sh prepare", "check.sh stash", "check.sh --dry-run", "$OUT"))
