"""dcnc run: a tiny ranker through export, two ORT targets and verify; stage skipping by hash; exit codes;
strict pipeline files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from toolkit.commands.run.pipeline import load_pipeline
from toolkit.commands.run.stages import run_pipeline
from toolkit.core.errors import DcncError
from toolkit.core.signature import random_inputs
from toolkit.model.checkpoint import save_checkpoint
from toolkit.model.spec import (
    CrossSpec,
    DenseFeature,
    ModelSpec,
    SparseFeature,
    TowerSpec,
)
from toolkit.model.zoo.families import build_model

PIPELINE = """
[model]
source = "ranker.pt"

[export]
validate_batch = 64

[[targets]]
name = "fp32"
precision = "fp32"
batch = "1:16:64"

[[targets]]
name = "int8"
precision = "int8"
batch = "1:16:64"
# an untrained tiny tower quantizes coarsely: these tests are about the pipeline, not about int8's accuracy
gates = { cosine_min = 0.9, rel_l2 = 0.5, auc_diff = 0.02, logloss_diff = 0.05 }

[verify]
batch_sizes = [1, 16]
iterations = 3
warmup = 1
branches = false
"""


def save_tiny_ranker(folder: Path, seed: int = 0) -> Path:
    """ranker.pt (naming eval.npz and calib.npz, as the example trainer's checkpoints do) and its data files;
    labels follow the model's own logit plus noise, so AUC is well above chance."""
    spec = ModelSpec(family="ranking", name="tiny-ranker", towers={"ranker": TowerSpec(
        sparse=[SparseFeature("user_id", 40, 4)], dense=[DenseFeature("profile", 5)],
        cross=CrossSpec(kind="full", layers=2), deep=[16], out_dim=1)})
    spec.validate()
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    tower = model.towers()["ranker"]
    rows = random_inputs(tower.input_specs, 300, seed=1)
    with torch.no_grad():
        logit = tower(*[torch.from_numpy(rows[s.name]) for s in tower.input_specs])[0].numpy().ravel()
    noisy = logit + 0.5 * logit.std() * np.random.default_rng(2).standard_normal(len(logit))
    np.savez(folder / "eval.npz", label=(noisy > np.median(noisy)).astype(np.float32), **rows)
    np.savez(folder / "calib.npz", **random_inputs(tower.input_specs, 128, seed=3))
    extra = {"eval_data": "eval.npz", "calib_data": {"ranker": "calib.npz"}}
    save_checkpoint(model, spec, folder / "ranker.pt", extra=extra)
    return folder / "ranker.pt"


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """A case folder (checkpoint, data, pipeline.toml) and its first run into case/out."""
    case = tmp_path_factory.mktemp("pipeline")
    save_tiny_ranker(case)
    (case / "pipeline.toml").write_text(PIPELINE)
    summary = run_pipeline(load_pipeline(case / "pipeline.toml"), case / "out")
    return case, summary


@pytest.fixture
def case(cold, tmp_path):
    """A private copy of the cold run's case folder, stamps and all, for a test that changes something."""
    copy = tmp_path / "case"
    shutil.copytree(cold[0], copy)
    return copy


def rerun(case: Path, **kwargs) -> dict:
    return run_pipeline(load_pipeline(case / "pipeline.toml"), case / "out", **kwargs)


def stages(summary: dict) -> dict[str, dict[str, str]]:
    return {t["target"]: t["stages"] for t in summary["targets"]}


def test_cold_run_builds_and_verifies_every_target_and_writes_the_summary(cold):
    case, summary = cold
    assert summary["passed"] and summary["schema"] == "dcnc.run/1"
    assert summary["models"][0]["stages"] == {"train": "none", "export": "built"}
    assert stages(summary) == {"fp32": {"build": "built", "verify": "verified"},
                               "int8": {"build": "built", "verify": "verified"}}
    fp32 = summary["targets"][0]
    assert fp32["parity"]["cosine_min"] is None  # a ranker's outputs have one value per row: no cosine
    assert fp32["parity"]["max_abs"] < 1e-5 and abs(fp32["quality"]["value"]) < 1e-6  # AUC diff
    assert fp32["latency"]["ranker"]["batch"] == 16 and fp32["latency"]["ranker"]["speedup"] > 0
    for target in ("fp32", "int8"):
        for name in ("report.json", "report.md", "junit.xml"):
            assert (case / "out" / "ranker" / target / name).is_file()
        manifest = json.loads((case / "out" / "ranker" / target / "bundle" / "manifest.json").read_text())
        assert manifest["precision"] == target
    assert json.loads((case / "out" / "summary.json").read_text())["targets"] == summary["targets"]
    html = (case / "out" / "report.html").read_text()
    assert summary["html_report"] == str(case / "out" / "report.html") and "ranker/int8" in html


def test_second_run_skips_every_stage_as_current(case):
    summary = rerun(case)
    assert summary["models"][0]["stages"]["export"] == "current"
    assert stages(summary) == {t: {"build": "current", "verify": "current"} for t in ("fp32", "int8")}
    assert summary["passed"]


def test_changing_one_targets_batch_rebuilds_only_that_target(case):
    toml = case / "pipeline.toml"
    toml.write_text(toml.read_text().replace('name = "int8"\nprecision = "int8"\nbatch = "1:16:64"',
                                             'name = "int8"\nprecision = "int8"\nbatch = "1:32:64"'))
    summary = rerun(case)
    assert summary["models"][0]["stages"]["export"] == "current"
    assert stages(summary) == {"fp32": {"build": "current", "verify": "current"},
                               "int8": {"build": "built", "verify": "verified"}}
    manifest = json.loads((case / "out" / "ranker" / "int8" / "bundle" / "manifest.json").read_text())
    assert manifest["batch"]["opt"] == 32


def test_changing_a_targets_gates_only_re_verifies_it(case):
    toml = case / "pipeline.toml"
    toml.write_text(toml.read_text().replace("auc_diff = 0.02", "auc_diff = 0.03"))
    assert stages(rerun(case)) == {"fp32": {"build": "current", "verify": "current"},
                                   "int8": {"build": "current", "verify": "verified"}}


def test_a_changed_checkpoint_redoes_export_build_and_verify(case):
    save_tiny_ranker(case, seed=1)  # new weights, new data
    summary = rerun(case)
    assert summary["models"][0]["stages"]["export"] == "built"
    assert stages(summary) == {t: {"build": "built", "verify": "verified"} for t in ("fp32", "int8")}


def test_a_tampered_bundle_is_rebuilt(case):
    (case / "out" / "ranker" / "fp32" / "bundle" / "ranker.onnx").write_bytes(b"not onnx")
    assert stages(rerun(case))["fp32"] == {"build": "built", "verify": "verified"}


def test_force_redoes_every_stage(case):
    summary = rerun(case, force=True)
    assert summary["models"][0]["stages"]["export"] == "built"
    assert all(s == {"build": "built", "verify": "verified"} for s in stages(summary).values())


def test_a_failing_gate_exits_1_with_every_target_reported(case):
    toml = case / "pipeline.toml"
    toml.write_text(toml.read_text().replace('name = "fp32"\nprecision = "fp32"',
                                             'name = "fp32"\nprecision = "fp32"\ngates = { min_speedup = 1000.0 }'))
    result = CliRunner().invoke(app, ["run", str(toml), "--out", str(case / "out"), "--quiet", "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    verdicts = {t["target"]: t["passed"] for t in summary["targets"]}
    assert verdicts == {"fp32": False, "int8": True} and not summary["passed"]
    assert all(g.startswith("latency.") for g in summary["targets"][0]["failed_gates"])
    assert "1 of 2 target(s): ranker/fp32" in result.stderr


def test_json_output_is_the_summary(case):
    result = CliRunner().invoke(app, ["run", str(case / "pipeline.toml"), "--out", str(case / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["schema"] == "dcnc.run/1" and [t["target"] for t in summary["targets"]] == ["fp32", "int8"]
    assert "ranker/int8 verify: current" in result.stderr  # progress goes to stderr


def test_the_table_names_every_target_and_the_verdict(case):
    result = CliRunner().invoke(app, ["run", str(case / "pipeline.toml"), "--out", str(case / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "ranker/fp32" in result.stdout and "ranker/int8" in result.stdout and "PASSED" in result.stdout
    assert result.stderr == ""  # --quiet: no progress


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("[verify]", "[verify]\nitertions = 3"), "verify.itertions: unknown key"),
    (lambda t: t.replace('precision = "int8"', 'precision = "int8"\nbackend = "onnx"'),
     "targets[1].backend: 'onnx' is not one of ort, ort-cuda, tensorrt"),
    (lambda t: t.replace('[model]\nsource = "ranker.pt"', ""), "model: give the model to run"),
])
def test_a_bad_pipeline_file_exits_2_naming_the_key_and_writes_nothing(case, edit, message):
    toml = case / "pipeline.toml"
    toml.write_text(edit(toml.read_text()))
    result = CliRunner().invoke(app, ["run", str(toml), "--out", str(case / "new")])
    assert result.exit_code == 2
    assert f"{toml}: {message}" in result.stderr
    assert not (case / "new").exists()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace('source = "ranker.pt"', 'source = "absent.pt"'), "model.source: "),
    (lambda t: t.replace('batch = "1:16:64"', 'batch = "64:16:1"', 1), "targets[0].batch: '64:16:1': needs 1 <= MIN"),
    (lambda t: t.replace('name = "int8"', 'name = "fp32"'), "targets: target name 'fp32' appears twice"),
    (lambda t: t.replace('precision = "fp32"', 'precision = "fp32"\ncalib = "calib.npz"'),
     "targets[0]: --calib is used by --precision fp16, bf16 and int8, not fp32"),
    (lambda t: t.replace("auc_diff = 0.02", "auc = 0.02"), "targets[1].gates: unknown gate 'auc'"),
    (lambda t: t.replace("iterations = 3", "iterations = 0"), "verify.iterations: expected an integer >= 1"),
    (lambda t: t.replace("validate_batch = 64", 'passes = ["fold", "fuse_everything"]'), "export.passes: unknown pass"),
    (lambda t: t.replace('source = "ranker.pt"', 'source = "ranker.pt"\nexample = "ranker"'), "give exactly one of"),
    (lambda t: t + "\n[[models]]\nexample = \"ranker\"\n", "give the model to run: one [model] table or"),
    (lambda t: t.replace("[verify]", "[verify\n"), "not valid TOML"),
])
def test_pipeline_file_errors_name_the_file_and_the_key(case, edit, message):
    toml = case / "pipeline.toml"
    toml.write_text(edit(toml.read_text()))
    with pytest.raises(DcncError, match="^" + str(toml).replace(".", r"\.")) as raised:
        load_pipeline(toml)
    assert message in str(raised.value)


def save_tiny_two_tower(folder: Path) -> Path:
    """two_tower.pt naming its eval split and one calibration file per tower, as the example trainer writes."""
    def tower(prefix: str) -> TowerSpec:
        return TowerSpec(sparse=[SparseFeature(f"{prefix}_id", 30, 4)], dense=[DenseFeature(f"{prefix}_profile", 3)],
                         cross=CrossSpec(kind="full", layers=1), deep=[8], out_dim=4)

    spec = ModelSpec(family="retrieval", name="tiny-two-tower", towers={"query": tower("user"), "item": tower("item")})
    spec.validate()
    torch.manual_seed(0)
    model = build_model(spec).eval()
    towers = model.towers()
    queries, items = (random_inputs(towers[t].input_specs, 40, seed=i) for i, t in enumerate(("query", "item")))
    relevance = np.stack([np.arange(40), np.random.default_rng(0).integers(0, 40, 40)], axis=1)
    np.savez(folder / "eval.npz", relevance=relevance, **{f"query/{k}": v for k, v in queries.items()},
             **{f"item/{k}": v for k, v in items.items()})
    for name in ("query", "item"):
        np.savez(folder / f"{name}_calib.npz", **random_inputs(towers[name].input_specs, 64, seed=5))
    save_checkpoint(model, spec, folder / "two_tower.pt", extra={
        "eval_data": "eval.npz", "calib_data": {"query": "query_calib.npz", "item": "item_calib.npz"}})
    return folder / "two_tower.pt"


@pytest.mark.slow  # two dynamo exports: 5 s on a busy 2-core machine
def test_a_two_tower_model_is_exported_per_tower_and_calibrated_from_each_towers_file(tmp_path):
    save_tiny_two_tower(tmp_path)
    (tmp_path / "pipeline.toml").write_text("""
        [model]
        source = "two_tower.pt"
        [export]
        validate_batch = 16
        [[targets]]
        name = "int8"
        precision = "int8"
        batch = "1:8:64"
        gates = { cosine_min = 0.5, rel_l2 = 1.0, recall_ratio = 0.0, agreement = 0.0 }
        [verify]
        ks = [5]
        batch_sizes = [8]
        iterations = 2
        warmup = 0
        branches = false
    """)
    summary = run_pipeline(load_pipeline(tmp_path / "pipeline.toml"), tmp_path / "out")
    assert summary["passed"], summary["targets"][0]["failed_gates"]
    model = tmp_path / "out" / "two_tower"
    assert sorted(p.name for p in (model / "export").glob("*.onnx")) == ["item.onnx", "query.onnx"]
    manifest = json.loads((model / "int8" / "bundle" / "manifest.json").read_text())
    assert sorted(manifest["towers"]) == ["item", "query"] and manifest["precision"] == "int8"
    calibrated_from = {tower: Path(entry["path"]).name for tower, entry in manifest["inputs"]["calib"].items()}
    assert calibrated_from == {"item": "item_calib.npz", "query": "query_calib.npz"}
    assert sorted(summary["targets"][0]["latency"]) == ["item", "query"]


def test_a_missing_pipeline_file_is_named(tmp_path):
    with pytest.raises(DcncError, match="absent.toml: no such pipeline file"):
        load_pipeline(tmp_path / "absent.toml")


def test_int8_without_calibration_data_exits_2_before_exporting(case):
    (case / "ranker.pt").unlink()
    shutil.rmtree(case / "out")
    save_tiny_ranker(case)
    checkpoint = torch.load(case / "ranker.pt", weights_only=True)
    checkpoint["extra"].pop("calib_data")
    torch.save(checkpoint, case / "ranker.pt")
    result = CliRunner().invoke(app, ["run", str(case / "pipeline.toml"), "--out", str(case / "out")])
    assert result.exit_code == 2 and "target int8: int8 needs calibration data" in result.stderr
    assert not (case / "out" / "ranker" / "export").exists()


def test_a_model_without_evaluation_data_needs_verify_data(case):
    checkpoint = torch.load(case / "ranker.pt", weights_only=True)
    checkpoint["extra"].pop("eval_data")
    torch.save(checkpoint, case / "ranker.pt")
    result = CliRunner().invoke(app, ["run", str(case / "pipeline.toml"), "--out", str(case / "new")])
    assert result.exit_code == 2 and "names no evaluation data; set verify.data" in result.stderr
    (case / "pipeline.toml").write_text(PIPELINE.replace("[verify]", '[verify]\ndata = "eval.npz"'))
    assert load_pipeline(case / "pipeline.toml").models[0].verify.data == case / "eval.npz"  # relative to the file


def test_the_built_in_example_runs_both_example_models_on_three_ort_targets():
    pipeline = load_pipeline()
    assert [m.example for m in pipeline.models] == ["two_tower", "ranker"]
    for model in pipeline.models:
        assert [(t.backend, t.precision) for t in model.targets] == [("ort", "fp32"), ("ort", "fp16"), ("ort", "int8")]
        assert max(model.verify.batch_sizes) == 512 and model.verify.iterations <= 50


def test_the_table_shows_a_target_whose_export_failed_and_numbers_json_could_not_hold(cold):
    from rich.console import Console

    from toolkit.report.runsummary import print_summary

    summary = json.loads(json.dumps(cold[1]))
    summary["targets"][0]["latency"]["ranker"]["speedup"] = None  # an infinite speedup, as to_json writes it
    summary["targets"][1].update(passed=False, error="export validation failed: ONNX output differs from torch")
    console = Console(record=True, width=200)
    print_summary(summary, console)
    text = console.export_text()
    assert "n/a" in text and "not built" in text and "FAILED 1 of 2 target(s)" in text


def test_run_help_describes_the_pipeline_and_exit_codes():
    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "built-in example" in result.stdout and "--force" in result.stdout and "Exit codes" in result.stdout
