"""Outputs a careless user names: an output that is, holds or lies inside an input (with --force, it used to be
deleted), the folder dcnc runs in, a dangling symlink, a 250-byte name, a folder where a report file goes, a
read-only place, two outputs at one path, and pipeline names that are dcnc's own files. Every command checks its
outputs before any work (toolkit.core.paths.check_outputs): one line, exit 2, nothing written or deleted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hostile_cases import assert_one_line, dcnc, files_under
from zoo import zoo_model

from toolkit.example.data.evalsplit import save_npz
from toolkit.model.checkpoint import save_checkpoint

LONG = "n" * 245  # with a suffix, a 250-byte name: legal, but ".<name>.XXXXXXXX.tmp" beside it would not be


@pytest.fixture
def two_tower_folder(tmp_path) -> Path:
    """A retrieval checkpoint with its (stand-in) evaluation and calibration files, in one folder."""
    folder = tmp_path / "D"
    folder.mkdir()
    model, spec = zoo_model("retrieval")
    rng = np.random.default_rng(0)
    save_npz(folder / "query_calib.npz", {s.name: s.random(8, rng) for s in model.query.input_specs})
    save_checkpoint(model, spec, folder / "model.pt", extra={"calib_data": {"query": "query_calib.npz"}})
    return folder


# --- --force onto inputs ----------------------------------------------------------------------------------------
def test_export_force_onto_the_folder_holding_the_checkpoint_deletes_nothing(two_tower_folder):
    before = files_under(two_tower_folder)
    result = dcnc("export", two_tower_folder / "model.pt", "-o", two_tower_folder, "--force", "--no-validate")
    assert_one_line(result, f"holds the input {two_tower_folder.resolve() / 'model.pt'}")
    assert files_under(two_tower_folder) == before


def test_build_force_onto_its_own_input_folder_deletes_nothing(own_case):
    before = files_under(own_case.root)
    result = dcnc("build", own_case.root, "-o", own_case.root, "--force")
    assert_one_line(result, "is an input of this command")
    assert files_under(own_case.root) == before


OUTPUT_AROUND_INPUT = {
    "build-into-its-input-folder": lambda c, t: ["build", c.root, "-o", c.root / "bundle2"],
    "build-around-its-calibration": lambda c, t: ["build", c.onnx, "-o", c.root, "--precision", "int8", "--calib",
                                                  c.calib, "--force"],
    "verify-report-into-the-bundle": lambda c, t: ["verify", c.checkpoint, c.bundle, "--data", c.eval,
                                                   "--report", c.bundle / "manifest.json"],
    "verify-report-over-the-data": lambda c, t: ["verify", c.checkpoint, c.bundle, "--data", c.eval,
                                                 "--report", c.eval],
    "package-around-the-bundle": lambda c, t: ["package", c.bundle, "--triton", c.root],
    "calibrate-around-the-model": lambda c, t: ["calibrate", c.onnx, "--calib", c.calib, "--out", c.root],
    "bench-around-the-model": lambda c, t: ["bench", c.checkpoint, "--runners", "eager", "--out", c.root],
    "embed-around-its-items": lambda c, t: ["embed", c.bundle, "--data", c.calib, "--tower", "ranker", "--out", c.root,
                                            "--force"],
}


@pytest.mark.parametrize("name", list(OUTPUT_AROUND_INPUT))
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(name, own_case, tmp_path):
    before = files_under(own_case.root)
    result = dcnc(*OUTPUT_AROUND_INPUT[name](own_case, tmp_path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "input" in result.stderr, result.stderr
    assert files_under(own_case.root) == before


def test_run_refuses_an_out_folder_that_holds_its_pipeline(own_case, tmp_path):
    (own_case.root / "pipeline.toml").write_text('[model]\nsource = "model.pt"\n\n[[targets]]\nname = "fp32"\n')
    before = files_under(own_case.root)
    result = dcnc("run", own_case.root / "pipeline.toml", "--out", own_case.root, "--quiet")
    assert_one_line(result, "holds the input")
    assert files_under(own_case.root) == before


# --- the folder dcnc runs in, symlinks, long names ----------------------------------------------------------------
@pytest.mark.parametrize("out", [".", "..", "./"])
def test_force_onto_the_working_folder_or_its_parent_removes_nothing(out, own_case, tmp_path, monkeypatch):
    work = own_case.root / "work"
    work.mkdir()
    shutil.copyfile(own_case.onnx, work / "tower.onnx")
    monkeypatch.chdir(work)
    before = files_under(own_case.root)
    result = dcnc("build", "tower.onnx", "-o", out, "--force")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert files_under(own_case.root) == before
    assert not [p for p in own_case.root.rglob(".*") if p.name.endswith((".old", ".tmp"))]


@pytest.mark.parametrize("command", ["build", "export"])
def test_a_dangling_symlink_as_output_is_refused(command, own_case, tmp_path):
    link = tmp_path / "out.onnx"
    link.symlink_to(tmp_path / "nowhere")
    args = ["build", own_case.onnx, "-o", link] if command == "build" else ["export", own_case.checkpoint, "-o", link]
    result = dcnc(*args, "--no-validate") if command == "export" else dcnc(*args)
    assert_one_line(result, "which does not exist; remove it or give another path")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_an_output_name_over_255_bytes_is_refused(own_case, tmp_path):
    result = dcnc("build", own_case.onnx, "-o", tmp_path / ("b" * 256))
    assert_one_line(result, "the name is 256 bytes long")


def _long(own_case, tmp_path):
    """Per command, its arguments with a 250-byte output name, and the output it writes."""
    long = tmp_path / LONG
    (tmp_path / "in").mkdir()
    shutil.copyfile(own_case.onnx, tmp_path / "in" / f"{LONG}.onnx")
    pipeline = tmp_path / "pipeline.toml"
    shutil.copyfile(own_case.checkpoint, tmp_path / "model.pt")
    shutil.copyfile(own_case.eval, tmp_path / "eval.npz")
    pipeline.write_text('[model]\nsource = "model.pt"\n\n[export]\nvalidate = false\n\n[[targets]]\nname = "fp32"\n'
                        'batch = "1:16:64"\n\n[verify]\ndata = "eval.npz"\nlatency = false\nbranches = false\n')
    return {
        "export": (["export", own_case.checkpoint, "-o", f"{long}.onnx", "--no-validate"], Path(f"{long}.onnx")),
        "build": (["build", own_case.onnx, "-o", long], long / "manifest.json"),
        "calibrate": (["calibrate", own_case.onnx, "--calib", own_case.calib, "--out", long], long / "calibration.json"),
        "verify": (["verify", own_case.checkpoint, own_case.bundle, "--data", own_case.eval, "--no-latency", "--report",
                    f"{long}.json"], Path(f"{long}.json")),
        "run": (["run", pipeline, "--out", long, "--quiet"], long / "summary.json"),
        "bench": (["bench", own_case.checkpoint, "--runners", "eager", "--batch-sizes", "1", "--iterations", "2",
                   "--warmup", "0", "--peak-n", "16", "--quiet", "--out", long, "--json", f"{long}.json"],
                  Path(f"{long}.json")),
        "package": (["package", own_case.bundle, "--triton", long, "--name-prefix", "n" * 240],
                    long / f"{'n' * 240}_ranker" / "config.pbtxt"),
        "train": (["train", "--family", "ranking", "--epochs", "1", "--quiet", "--out", long], long / "ranker.pt"),
        "inspect": (["inspect", tmp_path / "in" / f"{LONG}.onnx"], None),
        "embed": (["embed", own_case.bundle, "--data", own_case.calib, "--tower", "ranker", "--quiet", "--out", long],
                  long / "manifest.json"),
    }


@pytest.mark.parametrize("command", ["export", "build", "calibrate", "verify", "run", "bench", "package", "train",
                                     "inspect", "embed"])
def test_a_250_byte_output_name_works_in_every_command(command, shared_case, tmp_path):
    args, written = _long(shared_case, tmp_path)[command]
    result = dcnc(*args)
    assert result.exit_code in (0, 1), result.output  # 1: a gate of this tiny case, not the name
    assert "Traceback" not in result.stderr, result.stderr
    assert written is None or written.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- outputs checked before any work ------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--report", "--junit", "--markdown", "--html"])
def test_a_report_path_that_is_a_folder_is_refused_before_verify_runs(option, shared_case, tmp_path):
    result = dcnc("verify", shared_case.checkpoint, shared_case.bundle, "--data", shared_case.eval, option, tmp_path)
    assert_one_line(result, f"{option} {tmp_path}: is a folder; give the file to write")
    assert result.stdout == ""  # no table: verify did not run


def test_a_bench_json_path_that_is_a_folder_is_refused_before_bench_runs(shared_case, tmp_path):
    result = dcnc("bench", shared_case.checkpoint, "--out", tmp_path / "cache", "--json", tmp_path)
    assert_one_line(result, f"--json {tmp_path}: is a folder")
    assert not (tmp_path / "cache").exists()


def test_two_reports_at_one_path_are_refused(shared_case, tmp_path):
    report = tmp_path / "r.json"
    result = dcnc("verify", shared_case.checkpoint, shared_case.bundle, "--data", shared_case.eval, "--report", report,
                  "--junit", report)
    assert_one_line(result, "also given as --report")


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only for this process, also for root (which writes through folder permissions): the
    mode bits, and os.access answering as for an ordinary user."""
    folders = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(Path(path).resolve().is_relative_to(f) for f in folders):
            return False
        return real_access(path, mode, *args, **kwargs)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder.resolve())
        return folder

    monkeypatch.setattr(os, "access", access)
    yield make
    for folder in folders:
        folder.chmod(0o755)


@pytest.mark.parametrize("command", ["run", "train", "build", "calibrate"])
def test_a_read_only_output_folder_is_refused_before_any_work(command, read_only, shared_case, tmp_path):
    folder = read_only(tmp_path / "ro")
    args = {
        "run": ["run", "--out", folder / "out", "--quiet"],
        "train": ["train", "--out", folder, "--quiet", "--epochs", "1"],
        "build": ["build", shared_case.onnx, "-o", folder / "bundle"],
        "calibrate": ["calibrate", shared_case.onnx, "--calib", shared_case.calib, "--out", folder],
    }[command]
    result = dcnc(*args)
    assert_one_line(result, "is not writable")
    assert list(folder.iterdir()) == []


# --- pipeline names and paths -------------------------------------------------------------------------------------
PIPELINE = """[model]
source = "model.pt"
{model}

[[targets]]
name = "{target}"
"""

COLLISIONS = {
    "model-summary.json": ('name = "summary.json"', "fp32", "model.name: 'summary.json' is a file dcnc run writes"),
    "model-report.html": ('name = "report.html"', "fp32", "model.name: 'report.html' is a file dcnc run writes"),
    "target-export": ("", "export", "targets[0].name: 'export' is a file dcnc run writes"),
    "target-train": ("", "train", "targets[0].name: 'train' is a file dcnc run writes"),
    "target-export-stamp": ("", "export.stamp.json", "targets[0].name: 'export.stamp.json' is a file"),
}


@pytest.mark.parametrize("name", list(COLLISIONS))
def test_pipeline_names_that_are_dcncs_own_files_are_refused(name, own_case, tmp_path):
    model, target, message = COLLISIONS[name]
    (own_case.root / "pipeline.toml").write_text(PIPELINE.format(model=model, target=target))
    result = dcnc("run", own_case.root / "pipeline.toml", "--out", tmp_path / "out")
    assert_one_line(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("source", "../outside/model.pt"), ("source", "{abs}/model.pt"),
                                        ("calib", "../outside/ranker_calib.npz")])
def test_pipeline_paths_outside_its_folder_are_refused(key, value, own_case, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(own_case.root, outside)
    value = value.format(abs=outside)
    text = PIPELINE.format(model="", target="fp32").replace('source = "model.pt"', f'{key} = "{value}"')
    if key != "source":
        text = text.replace("[model]\n", '[model]\nsource = "model.pt"\n')
    (own_case.root / "pipeline.toml").write_text(text)
    result = dcnc("run", own_case.root / "pipeline.toml", "--out", tmp_path / "out")
    assert_one_line(result, f"model.{key}: names")
    assert not (tmp_path / "out").exists()
