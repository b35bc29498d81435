"""Bundles that point outside themselves or lie about their files: traversal and absolute paths in the manifest and
in the external-data locations of their ONNX, symlinks out of the bundle, weights the manifest does not hash, and
manifests that do not fit the schema. verify, package and bench refuse each in one line (exit 2); package never
copies a file from outside the bundle into a Triton repository."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx
import pytest
from hostile_cases import assert_one_line, dcnc
from onnx.external_data_helper import uses_external_data


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rehash(bundle: Path, rel: str) -> None:
    """Record `rel`'s current content in the manifest, as a forger would."""
    data = (bundle / rel).read_bytes()

    def edit(manifest):
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "portable": True}

    edit_manifest(bundle, edit)


def point_weights_at(bundle: Path, location: str, data_file: Path) -> None:
    """Rewrite the bundle's ranker.onnx so its initializers live in an external file named `location`, whose
    bytes are written to `data_file` (where that location really leads), and re-hash the ONNX."""
    onnx_path = bundle / "ranker.onnx"
    model = onnx.load(str(onnx_path))
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.data", size_threshold=0)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    os.replace(bundle / "weights.data", data_file)
    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    onnx_path.write_bytes(model.SerializeToString())
    rehash(bundle, "ranker.onnx")


def _verify(own_case, tmp_path):
    return ["verify", own_case.checkpoint, own_case.bundle, "--data", own_case.eval, "--no-latency", "--no-branches"]


def _package(own_case, tmp_path):
    return ["package", own_case.bundle, "--triton", tmp_path / "models"]


def _bench(own_case, tmp_path):
    return ["bench", own_case.checkpoint, "--bundle", own_case.bundle, "--runners", "eager", "--batch-sizes", "1",
            "--iterations", "1", "--warmup", "0", "--out", tmp_path / "bench"]


COMMANDS = {"verify": _verify, "package": _package, "bench": _bench}


# --- paths that leave the bundle --------------------------------------------------------------------------------
def test_package_does_not_copy_a_host_file_an_onnx_names_by_absolute_path(own_case, tmp_path):
    secret = tmp_path / "host" / "secret.data"
    point_weights_at(own_case.bundle, str(secret), secret)
    result = dcnc(*_package(own_case, tmp_path))
    assert_one_line(result, f"names the absolute path '{secret}'")
    assert not (tmp_path / "models").exists()


EXTERNAL = {  # where the ONNX says its weights are, where they really are, what the refusal says
    "climbing-out": ("../outside.data", lambda c: c.root / "outside.data",
                     "names '../outside.data', which resolves outside"),
    # load_manifest promises every file a bundle uses is hashed: an ONNX's external data is such a file
    "not-hashed": ("weights.data", lambda c: c.bundle / "weights.data",
                   "reads its weights from weights.data, which the manifest does not hash"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", list(EXTERNAL))
def test_external_data_outside_the_bundle_or_its_manifest_is_refused(name, command, own_case, tmp_path):
    location, real, message = EXTERNAL[name]
    point_weights_at(own_case.bundle, location, real(own_case))
    result = dcnc(*COMMANDS[command](own_case, tmp_path))
    assert_one_line(result, message)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("rel", ["../model.pt", "/etc/hostname", "sub/../../model.pt", ""])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_manifest_path_outside_the_bundle_is_refused(command, rel, own_case, tmp_path):
    def edit(manifest):
        entry = manifest["files"]["ranker.onnx"]
        manifest["files"][rel] = entry
        manifest["towers"]["ranker"]["onnx"] = rel

    edit_manifest(own_case.bundle, edit)
    result = dcnc(*COMMANDS[command](own_case, tmp_path))
    assert_one_line(result, "manifest.json: names")
    assert not (tmp_path / "models").exists()


def test_a_bundle_file_that_is_a_symlink_out_of_the_bundle_is_refused(own_case, tmp_path):
    outside = tmp_path / "outside.onnx"
    os.replace(own_case.bundle / "ranker.onnx", outside)
    (own_case.bundle / "ranker.onnx").symlink_to(outside)
    result = dcnc(*_package(own_case, tmp_path))
    assert_one_line(result, "names 'ranker.onnx', which resolves outside")
    assert not (tmp_path / "models").exists()


# --- manifests that do not fit the schema -----------------------------------------------------------------------
MALFORMED = {
    "towers-as-a-list": (lambda m: m.update(towers=["ranker"]), "towers: expected a table of towers by name, got list"),
    "towers-as-a-string": (lambda m: m.update(towers="ranker"), "towers: expected a table of towers by name, got str"),
    "no-towers": (lambda m: m.update(towers={}), "towers: expected a table of towers by name, got an empty one"),
    "files-as-a-list": (lambda m: m.update(files=["ranker.onnx"]), "files: expected a table of files"),
    "missing-sha256": (lambda m: m["files"]["ranker.onnx"].pop("sha256"), "files.ranker.onnx.sha256: expected 64 hex"),
    "string-batch": (lambda m: m.update(batch="1:16:64"), "batch: expected a table of min, opt, max, got str"),
    "string-batch-size": (lambda m: m["batch"].update(max="64"), "batch: min, opt and max must be integers"),
    "null-versions": (lambda m: m.update(versions=None), "versions: expected a table, got null"),
    "null-options": (lambda m: m.update(options=None), "options: expected a table, got null"),
    "tower-as-a-string": (lambda m: m["towers"].update(ranker="ranker.onnx"), "towers.ranker: expected a table"),
    "tower-inputs-not-a-list": (lambda m: m["towers"]["ranker"].update(inputs="id_a"), "towers.ranker.inputs:"),
    "tower-without-onnx": (lambda m: m["towers"]["ranker"].pop("onnx"), "towers.ranker.onnx: missing"),
    "bytes-negative": (lambda m: m["files"]["ranker.onnx"].update(bytes=-1), "files.ranker.onnx.bytes"),
    "ort-options-unknown": (lambda m: m["options"]["ort"].update(cores=3), "options.ort"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case_name", list(MALFORMED))
def test_a_malformed_manifest_is_refused_with_one_line_per_problem(case_name, command, own_case, tmp_path):
    edit, problem = MALFORMED[case_name]
    edit_manifest(own_case.bundle, edit)
    result = dcnc(*COMMANDS[command](own_case, tmp_path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "manifest" in lines[0], result.stderr
    assert any(problem in line for line in lines), result.stderr
    assert len(lines) == 1 or all(line.startswith("  ") for line in lines[1:]), result.stderr


def test_every_problem_of_a_manifest_gets_its_own_line(own_case, tmp_path):
    edit_manifest(own_case.bundle, lambda m: m.update(towers=[], batch="x", versions=None))
    result = dcnc(*_package(own_case, tmp_path))
    lines = result.stderr.strip().splitlines()
    assert "malformed manifest (3 problems)" in lines[0], result.stderr
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["batch", "towers", "versions"]
