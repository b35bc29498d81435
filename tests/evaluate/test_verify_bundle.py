"""dcnc verify end to end: a checkpoint, its ONNX export, an fp32 ORT bundle, evaluation data, exit codes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from cli import app
from graphs.export import export_model
from toolkit.commands.build import build_bundle
from toolkit.core.errors import DcncError
from toolkit.core.signature import random_inputs
from toolkit.evaluate.verify import VerifyOptions, verify
from toolkit.model.checkpoint import save_checkpoint
from toolkit.model.loading import load_model
from toolkit.model.spec import (
    CrossSpec,
    DenseFeature,
    ModelSpec,
    SparseFeature,
    TowerSpec,
)
from toolkit.model.zoo.families import build_model

FAST = VerifyOptions(ks=(1, 5), batch_sizes=(1, 16), warmup=1, iterations=3)


def tower_spec(prefix: str) -> TowerSpec:
    return TowerSpec(sparse=[SparseFeature(f"{prefix}_id", 40, 4)], dense=[DenseFeature(f"{prefix}_profile", 5)],
                     cross=CrossSpec(kind="full", layers=2), deep=[16], out_dim=8)


def perturb_weights(folder, scale: float) -> None:
    """Add noise to the largest float initializer of every tower's ONNX, as a broken lowering might."""
    for path in folder.glob("*.onnx"):
        model = onnx.load(str(path))
        largest = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
                      key=lambda i: np.prod(i.dims))
        weights = numpy_helper.to_array(largest)
        noise = scale * np.random.default_rng(0).standard_normal(weights.shape).astype(np.float32)
        largest.CopyFrom(numpy_helper.from_array(weights + noise, largest.name))
        for leftover in folder.glob(f"{path.name}.data"):
            leftover.unlink()
        onnx.save_model(model, str(path))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """model.pt, eval.npz, a faithful bundle and one built from perturbed weights."""
    root = tmp_path_factory.mktemp("verify")
    spec = ModelSpec(family="retrieval", towers={"query": tower_spec("user"), "item": tower_spec("item")}, name="tiny")
    spec.validate()
    torch.manual_seed(0)
    model = build_model(spec).eval()
    save_checkpoint(model, spec, root / "model.pt")
    export_model(load_model(str(root / "model.pt")), root / "onnx", validate=False)
    build_bundle(root / "onnx", root / "bundle", batch=(1, 16, 256))
    shutil.copytree(root / "onnx", root / "onnx_fp32")
    perturb_weights(root / "onnx", scale=0.5)
    build_bundle(root / "onnx", root / "broken", batch=(1, 16, 256))
    queries = random_inputs(model.query.input_specs, 30, seed=1)
    items = random_inputs(model.item.input_specs, 200, seed=2)
    rng = np.random.default_rng(3)
    relevance = np.stack([rng.integers(0, 30, 90), rng.integers(0, 200, 90)], axis=1)
    np.savez(root / "eval.npz", relevance=relevance, **{f"query/{k}": v for k, v in queries.items()},
             **{f"item/{k}": v for k, v in items.items()})
    return root


def test_faithful_fp32_bundle_passes(case):
    report = verify(case / "model.pt", case / "bundle", case / "eval.npz", options=FAST, branches=False)
    assert report.passed, [(g.name, g.value) for g in report.failed_gates]
    assert report.retrieval["agreement"]["5"] == 1.0
    assert report.parity["item/embedding"]["max_abs"] < 1e-5
    assert report.precision == "fp32" and sorted(report.latency["towers"]) == ["item", "query"]


def test_fp16_bundle_is_judged_under_half_emulation_and_timed_as_built(case, tmp_path):
    build_bundle(case / "onnx_fp32", tmp_path / "fp16", precision="fp16", batch=(1, 16, 256))
    report = verify(case / "model.pt", tmp_path / "fp16", case / "eval.npz", options=FAST, branches=False)
    assert report.precision == "fp16" and "half emulation" in report.emulation
    assert report.passed, [(g.name, g.value) for g in report.failed_gates]
    # half rounding shows in the answers (an FP32 computation would match torch to ~1e-7)
    assert 1e-5 < report.parity["query/embedding"]["max_abs"] < 1e-2
    assert report.latency["towers"]["query"]


def test_progress_bar_over_item_chunks_leaves_the_result_unchanged(case):
    chunked = dataclasses.replace(FAST, latency=False, progress=True, item_chunk=64)
    report = verify(case / "model.pt", case / "bundle", case / "eval.npz", options=chunked, branches=False)
    assert report.retrieval["agreement"]["5"] == 1.0 and report.passed


def test_recall_ratio_resolution_is_one_hit_at_one_query(case):
    report = verify(case / "model.pt", case / "bundle", case / "eval.npz",
                    options=dataclasses.replace(FAST, latency=False), branches=False)  # fmt: skip
    judged = len(np.unique(np.load(case / "eval.npz")["relevance"][:, 0]))
    for k, recall in report.retrieval["recall"]["reference"].items():
        expected = 1 / (judged * recall) if recall > 0 else 1.0  # no hits: the ratio cannot resolve anything
        assert report.retrieval["recall_ratio_resolution"][k] == pytest.approx(expected)


def test_bundle_with_perturbed_weights_fails(case):
    report = verify(case / "model.pt", case / "broken", case / "eval.npz", options=FAST, branches=False)
    failed = {g.name for g in report.failed_gates}
    assert "parity.query/embedding.cosine_min" in failed and "retrieval.agreement@5" in failed


def test_branch_timing_of_parallel_towers_is_reported(case):
    report = verify(case / "model.pt", case / "bundle", case / "eval.npz",
                    options=VerifyOptions(ks=(1,), batch_sizes=(16,), warmup=1, iterations=2))
    timing = report.latency["branches"]["query"]
    assert timing["t_cross_ms"] > 0 and timing["t_deep_ms"] > 0 and timing["ratio"] > 0


def test_evaluation_data_defaults_to_the_split_the_checkpoint_names(case, tmp_path):
    import shutil

    from toolkit.model.checkpoint import load_checkpoint

    model, spec, _ = load_checkpoint(case / "model.pt")
    save_checkpoint(model, spec, tmp_path / "named.pt", extra={"eval_data": "eval.npz"})
    shutil.copy(case / "eval.npz", tmp_path / "eval.npz")
    report = verify(tmp_path / "named.pt", case / "bundle", options=VerifyOptions(ks=(1,), latency=False))
    assert report.passed and report.data == str(tmp_path / "eval.npz")


def test_without_data_or_a_named_split_verify_asks_for_data(case):
    with pytest.raises(DcncError, match="pass --data"):
        verify(case / "model.pt", case / "bundle", options=FAST)


def test_a_cpu_bundle_is_not_verified_on_cuda(case):
    with pytest.raises(DcncError, match="built for cpu .* --device cpu"):
        verify(case / "model.pt", case / "bundle", case / "eval.npz", device="cuda", options=FAST)


CLI_FAST = ["--k", "1,5", "--batch-sizes", "1,16", "--iterations", "3", "--warmup", "1", "--no-branches"]


def test_cli_exit_0_writes_report_junit_and_markdown(case, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["verify", str(case / "model.pt"), str(case / "bundle"), "--data",
                                      str(case / "eval.npz"), "--report", str(out / "r.json"), "--junit",
                                      str(out / "j.xml"), "--markdown", str(out / "m.md"), *CLI_FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "r.json").read_text())
    assert report["schema"] == "dcnc.verify/1" and report["passed"] is True
    assert (out / "m.md").read_text().startswith("# dcnc verify: PASSED")
    assert "<testsuites" in (out / "j.xml").read_text()


def test_cli_exit_1_when_a_gate_fails_and_still_writes_the_report(case, tmp_path):
    result = CliRunner().invoke(app, ["verify", str(case / "model.pt"), str(case / "broken"), "--data",
                                      str(case / "eval.npz"), "--report", str(tmp_path / "r.json"), *CLI_FAST])
    assert result.exit_code == 1, result.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_cli_exit_1_on_a_baseline_regression(case, tmp_path):
    baseline = tmp_path / "old.json"
    CliRunner().invoke(app, ["verify", str(case / "model.pt"), str(case / "bundle"), "--data", str(case / "eval.npz"),
                             "--report", str(baseline), *CLI_FAST])
    old = json.loads(baseline.read_text())
    for batches in old["latency"]["towers"].values():
        for entry in batches.values():
            entry["candidate"]["p50_ms"] /= 20  # pretend the candidate used to be 20x faster
    baseline.write_text(json.dumps(old))
    result = CliRunner().invoke(app, ["verify", str(case / "model.pt"), str(case / "bundle"), "--data",
                                      str(case / "eval.npz"), "--baseline", str(baseline), *CLI_FAST])
    assert result.exit_code == 1 and "regression" in result.output


@pytest.mark.parametrize("problem", ["missing", "nan"])
def test_cli_exit_2_on_bad_data_writes_nothing(case, tmp_path, problem):
    data = tmp_path / "eval.npz"
    if problem == "nan":
        arrays = dict(np.load(case / "eval.npz"))
        arrays["item/item_profile"][3, 1] = np.nan
        np.savez(data, **arrays)
    result = CliRunner().invoke(app, ["verify", str(case / "model.pt"), str(case / "bundle"), "--data", str(data),
                                      "--report", str(tmp_path / "r.json"), *CLI_FAST])
    assert result.exit_code == 2
    assert ("no such file" if problem == "missing" else "'item_profile' holds 1 NaN/Inf") in result.output
    assert not (tmp_path / "r.json").exists()


def test_cli_exit_2_on_bad_k(case):
    result = CliRunner().invoke(app, ["verify", str(case / "model.pt"), str(case / "bundle"), "--k", "0,x"])
    assert result.exit_code == 2 and "--k" in result.output


def test_factory_reference_is_loaded_with_its_inputs_and_weights(tmp_path, monkeypatch):
    package = tmp_path / "verifyfactory"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copyfile(Path(__file__).parents[1] / "usercode.py", package / "towers.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(4)
    torch.save(nn.Linear(4, 1).state_dict(), tmp_path / "state.pt")
    torch.save({f"linear.{k}": v for k, v in torch.load(tmp_path / "state.pt").items()}, tmp_path / "state.pt")
    factory, inputs = "verifyfactory.towers:make_logit", ["--input", "dense:float32:B,4"]
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
