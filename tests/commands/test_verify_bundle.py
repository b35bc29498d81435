"""dcnc verify end to end: a checkpoint, its ONNX export, an fp32 ORT bundle, evaluation data, exit codes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner
from verify_cases import CLI_FAST

from cli import app
from toolkit.commands.build import build_bundle
from toolkit.commands.verify import verify
from toolkit.core.errors import DcncError
from toolkit.core.onnxio import load_onnx, weight_digests
from toolkit.evaluate.latency import LatencyPolicy
from toolkit.evaluate.verify import VerifyOptions, ratio_resolution
from toolkit.model.checkpoint import save_checkpoint
from toolkit.model.loading import load_model

FAST = VerifyOptions(ks=(1, 5), batch_sizes=(1, 16), warmup=1, iterations=3, policy=LatencyPolicy(budget_s=0))


def test_faithful_fp32_bundle_passes(verify_case):
    report = verify(verify_case / "model.pt", verify_case / "bundle", verify_case / "eval.npz", options=FAST, branches=False)
    assert report.passed, [(g.name, g.value) for g in report.failed_gates]
    assert report.retrieval["agreement"]["5"] == 1.0
    assert report.parity["item/embedding"]["max_abs"] < 1e-5
    assert report.precision == "fp32" and sorted(report.latency["towers"]) == ["item", "query"]


def test_fp16_bundle_is_judged_under_half_emulation_and_timed_as_built(verify_case, tmp_path):
    build_bundle(verify_case / "onnx_fp32", tmp_path / "fp16", precision="fp16", batch=(1, 16, 256))
    report = verify(verify_case / "model.pt", tmp_path / "fp16", verify_case / "eval.npz", options=FAST, branches=False)
    assert report.precision == "fp16" and "half emulation" in report.emulation
    assert report.passed, [(g.name, g.value) for g in report.failed_gates]
    # half rounding shows in the answers (an FP32 computation would match torch to ~1e-7)
    assert 1e-5 < report.parity["query/embedding"]["max_abs"] < 1e-2
    assert report.latency["towers"]["query"]


def test_progress_bar_over_item_chunks_leaves_the_result_unchanged(verify_case):
    chunked = dataclasses.replace(FAST, latency=False, progress=True, item_chunk=64)
    report = verify(verify_case / "model.pt", verify_case / "bundle", verify_case / "eval.npz", options=chunked, branches=False)
    assert report.retrieval["agreement"]["5"] == 1.0 and report.passed


def test_the_weights_gate_checks_every_parameter_the_export_kept_and_passes_a_faithful_bundle(verify_case):
    report = verify(verify_case / "model.pt", verify_case / "bundle", verify_case / "eval.npz",
                    options=dataclasses.replace(FAST, latency=False), branches=False)  # fmt: skip
    loaded = load_model(str(verify_case / "model.pt"))
    for tower in ("query", "item"):
        exported = weight_digests(load_onnx(verify_case / "onnx_fp32" / f"{tower}.onnx"))
        linear = [f"{n}.weight" for n, m in loaded.towers[tower].module.named_modules() if isinstance(m, nn.Linear)]
        assert linear and set(linear) <= set(exported)  # the cross and deep layers' weights are among those checked
        assert report.weights[tower] == {"checked": len(set(exported) & set(loaded.towers[tower].weight_digests())),
                                         "mismatched": []}  # fmt: skip
        (gate,) = [g for g in report.gates if g.name == f"weights.{tower}.mismatched"]
        assert gate.passed and gate.value == 0


def test_a_bundle_built_from_other_weights_fails_the_weights_gate_naming_them(verify_case):
    report = verify(verify_case / "model.pt", verify_case / "broken", verify_case / "eval.npz",
                    options=dataclasses.replace(FAST, latency=False), branches=False)  # fmt: skip
    for tower in ("query", "item"):
        (gate,) = [g for g in report.gates if g.name == f"weights.{tower}.mismatched"]
        assert not gate.passed and gate.value == 1
        assert report.weights[tower]["mismatched"][0] in gate.reason


def test_a_bundle_without_source_weights_is_verified_without_the_weights_gate(verify_case, tmp_path):
    bundle = shutil.copytree(verify_case / "bundle", tmp_path / "old")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["towers"].values():
        del entry["source_weights"]  # a bundle built before dcnc recorded them
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = verify(verify_case / "model.pt", bundle, verify_case / "eval.npz",
                    options=dataclasses.replace(FAST, latency=False), branches=False)  # fmt: skip
    assert report.passed and report.weights == {} and not [g for g in report.gates if g.name.startswith("weights.")]


def test_the_recall_ratio_resolves_two_standard_errors_of_the_paired_per_query_difference():
    reference = np.array([1.0, 0.0, 0.5, 0.0] * 50)
    assert ratio_resolution(reference, reference) == 0.0  # the same answers: every change is resolved
    swapped = reference.copy()
    swapped[[0, 1]] = [0.0, 1.0]  # one hit lost, one gained: chance, and the ratio stays 1
    expected = 2 * np.std(swapped - reference, ddof=1) / np.sqrt(200) / reference.mean()
    assert ratio_resolution(reference, swapped) == pytest.approx(expected)
    lost = reference.copy()
    lost[[0, 4, 8, 12, 16, 20, 24, 28, 32, 36]] = 0.0  # ten queries lose their hit: past two standard errors
    assert 1 - (lost.mean() / reference.mean()) > ratio_resolution(reference, lost)
    assert ratio_resolution(np.zeros(5), np.ones(5)) == 1.0  # no reference hits: nothing can be resolved


def test_bundle_with_perturbed_weights_fails(verify_case):
    report = verify(verify_case / "model.pt", verify_case / "broken", verify_case / "eval.npz", options=FAST, branches=False)
    failed = {g.name for g in report.failed_gates}
    assert "parity.query/embedding.cosine_min" in failed and "retrieval.agreement@5" in failed


def test_branch_timing_of_parallel_towers_is_reported(verify_case):
    report = verify(verify_case / "model.pt", verify_case / "bundle", verify_case / "eval.npz",
                    options=VerifyOptions(ks=(1,), batch_sizes=(16,), warmup=1, iterations=2))
    timing = report.latency["branches"]["query"]
    assert timing["t_cross_ms"] > 0 and timing["t_deep_ms"] > 0 and timing["ratio"] > 0


def test_evaluation_data_defaults_to_the_split_the_checkpoint_names(verify_case, tmp_path):
    import shutil

    from toolkit.model.checkpoint import load_checkpoint

    model, spec, _ = load_checkpoint(verify_case / "model.pt")
    save_checkpoint(model, spec, tmp_path / "named.pt", extra={"eval_data": "eval.npz"})
    shutil.copy(verify_case / "eval.npz", tmp_path / "eval.npz")
    report = verify(tmp_path / "named.pt", verify_case / "bundle", options=VerifyOptions(ks=(1,), latency=False))
    assert report.passed and report.data == str(tmp_path / "eval.npz")


def test_without_data_or_a_named_split_verify_asks_for_data(verify_case):
    with pytest.raises(DcncError, match="pass --data"):
        verify(verify_case / "model.pt", verify_case / "bundle", options=FAST)


def test_a_cpu_bundle_is_not_verified_on_cuda(verify_case):
    with pytest.raises(DcncError, match="built for cpu .* --device cpu"):
        verify(verify_case / "model.pt", verify_case / "bundle", verify_case / "eval.npz", device="cuda", options=FAST)




def test_cli_exit_0_writes_report_junit_and_markdown(verify_case, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(verify_case / "bundle"), "--data",
                                      str(verify_case / "eval.npz"), "--report", str(out / "r.json"), "--junit",
                                      str(out / "j.xml"), "--markdown", str(out / "m.md"), *CLI_FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "r.json").read_text())
    assert report["schema"] == "dcnc.verify/1" and report["passed"] is True
    assert (out / "m.md").read_text().startswith("# dcnc verify: PASSED")
    assert "<testsuites" in (out / "j.xml").read_text()


def test_cli_exit_1_when_a_gate_fails_and_still_writes_the_report(verify_case, tmp_path):
    result = CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(verify_case / "broken"), "--data",
                                      str(verify_case / "eval.npz"), "--report", str(tmp_path / "r.json"), *CLI_FAST])
    assert result.exit_code == 1, result.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_cli_exit_1_on_a_baseline_regression(verify_case, tmp_path):
    baseline = tmp_path / "old.json"
    CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(verify_case / "bundle"), "--data", str(verify_case / "eval.npz"),
                             "--report", str(baseline), *CLI_FAST])
    old = json.loads(baseline.read_text())
    for batches in old["latency"]["towers"].values():
        for entry in batches.values():
            entry["candidate"]["p50_ms"] /= 20  # pretend the candidate used to be 20x faster
    baseline.write_text(json.dumps(old))
    result = CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(verify_case / "bundle"), "--data",
                                      str(verify_case / "eval.npz"), "--baseline", str(baseline), *CLI_FAST])
    assert result.exit_code == 1 and "regression" in result.output


@pytest.mark.parametrize("problem", ["missing", "nan"])
def test_cli_exit_2_on_bad_data_writes_nothing(verify_case, tmp_path, problem):
    data = tmp_path / "eval.npz"
    if problem == "nan":
        arrays = dict(np.load(verify_case / "eval.npz"))
        arrays["item/item_profile"][3, 1] = np.nan
        np.savez(data, **arrays)
    result = CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(verify_case / "bundle"), "--data", str(data),
                                      "--report", str(tmp_path / "r.json"), *CLI_FAST])
    assert result.exit_code == 2
    assert ("no such file" if problem == "missing" else "'item_profile' holds 1 NaN/Inf") in result.output
    assert not (tmp_path / "r.json").exists()


def test_cli_exit_2_on_bad_k(verify_case):
    result = CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(verify_case / "bundle"), "--k", "0,x"])
    assert result.exit_code == 2 and "--k" in result.output


def _factory_package(tmp_path, monkeypatch, name: str) -> str:
    """A package `name` in tmp_path (on sys.path) whose `towers` module is tests/usercode.py; its make_logit."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copyfile(Path(__file__).parents[1] / "usercode.py", package / "towers.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}.towers:make_logit"


def test_factory_reference_is_loaded_with_its_inputs_and_weights(tmp_path, monkeypatch):
    factory = _factory_package(tmp_path, monkeypatch, "verifyfactory")
    torch.manual_seed(4)
    torch.save(nn.Linear(4, 1).state_dict(), tmp_path / "state.pt")
    torch.save({f"linear.{k}": v for k, v in torch.load(tmp_path / "state.pt").items()}, tmp_path / "state.pt")
    inputs = ["--input", "dense:float32:B,4"]
    exported = CliRunner().invoke(app, ["export", factory, *inputs, "--weights", str(tmp_path / "state.pt"),
                                        "-o", str(tmp_path / "logit.onnx")])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    build_bundle(tmp_path / "logit.onnx", tmp_path / "bundle", batch=(1, 16, 256))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", dense=rng.standard_normal((200, 4)).astype(np.float32),
             label=rng.integers(0, 2, 200))  # fmt: skip
    args = ["verify", factory, str(tmp_path / "bundle"), "--data", str(tmp_path / "eval.npz"), *inputs, *CLI_FAST]

    with_weights = CliRunner().invoke(app, [*args, "--weights", str(tmp_path / "state.pt")])
    without_weights = CliRunner().invoke(app, args)  # the factory's own initialisation: another model

    assert with_weights.exit_code == 0, with_weights.output
    assert without_weights.exit_code == 1 and "parity" in without_weights.output


def test_a_factory_model_verifies_on_its_inputs_alone_numeric_parity_and_latency(tmp_path, monkeypatch):
    factory = _factory_package(tmp_path, monkeypatch, "numericfactory")
    torch.save({f"linear.{k}": v for k, v in nn.Linear(4, 1).state_dict().items()}, tmp_path / "state.pt")
    inputs = ["--input", "dense:float32:B,4", "--weights", str(tmp_path / "state.pt")]
    assert CliRunner().invoke(app, ["export", factory, *inputs, "-o", str(tmp_path / "logit.onnx")]).exit_code == 0
    build_bundle(tmp_path / "logit.onnx", tmp_path / "bundle", batch=(1, 16, 256))
    np.savez(tmp_path / "inputs.npz", dense=np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32))
    args = ["verify", factory, str(tmp_path / "bundle"), "--data", str(tmp_path / "inputs.npz"), *inputs, *CLI_FAST,
            "--report", str(tmp_path / "report.json")]  # fmt: skip

    result = CliRunner().invoke(app, args)
    required = CliRunner().invoke(app, [*args, "--require-quality"])

    report = json.loads((tmp_path / "report.json").read_text())
    assert result.exit_code == 0, result.output
    assert report["passed"] and "ranking" not in report and "retrieval" not in report
    assert "no 'label'" in report["quality_absent"] and report["latency"]["towers"]["logit"]
    assert any(g["name"].startswith("parity.logit/") for g in report["gates"])
    assert required.exit_code == 2 and "--require-quality" in required.output


def test_int8_bundle_built_for_another_cpu_level_is_verified_with_a_warning_and_its_trade_off(verify_case, tmp_path):
    from calibration.isa import INT8_ISAS, detect_int8_isa
    from toolkit.core.signature import random_inputs
    from toolkit.model.loading import load_model

    other = next(isa for isa in INT8_ISAS if isa != detect_int8_isa())
    loaded = load_model(str(verify_case / "model.pt"))
    calib = tmp_path / "calib"
    calib.mkdir()
    for tower, module in loaded.towers.items():
        np.savez(calib / f"{tower}_calib.npz", **random_inputs(module.input_specs, 128, seed=4))
    build_bundle(verify_case / "onnx_fp32", tmp_path / "int8", precision="int8", calib=calib, batch=(1, 16, 256),
                 int8_isa=other, min_agreement=0)  # fmt: skip
    result = CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(tmp_path / "int8"), "--data",
                                      str(verify_case / "eval.npz"), "--report", str(tmp_path / "r.json"), *CLI_FAST])  # fmt: skip
    assert f"warning: query: built for {other}" in result.output
    assert "trade-off: agreement@1 " in result.output and "agreement@5 " in result.output and "x at batch 16" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["warnings"]
