"""`dcnc export` end to end: the three model sources, towers, passes shown, exit codes, and bad input refused
in one line with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import typer
from test_export import listing, props, zoo_checkpoint
from typer.testing import CliRunner

import cli
from graphs.passes.manager import DEFAULT_PASSES, GPU_PASSES, PASSES
from toolkit.model.checkpoint import read_checkpoint

USER_CODE = Path(__file__).parents[1] / "usercode.py"
SCORER_INPUTS = ["--input", "dense:float32:B,4", "--input", "ids:int64:B:10"]


def dcnc_export(*args: object):
    # wide enough that rich's tables keep each cell on one line
    return CliRunner().invoke(cli.app, ["export", *map(str, args)], env={"COLUMNS": "250"})


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture
def user_code(tmp_path, monkeypatch, request) -> str:
    """A package of user models in tmp_path, the working directory (dcnc imports from there, as `python -m`
    does); named after the test, since sys.modules caches packages by name."""
    name = "usercode_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    shutil.copyfile(USER_CODE, tmp_path / name / "towers.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader adds the working directory; undo that after
    return f"{name}.towers"


@pytest.fixture(scope="module")
def two_tower_export(tmp_path_factory):
    """`dcnc export` of a zoo two-tower checkpoint into a directory: (result, checkpoint, directory)."""
    folder = tmp_path_factory.mktemp("two_tower")
    checkpoint = zoo_checkpoint(folder, "retrieval", "full", "parallel")
    result = dcnc_export(checkpoint, "-o", folder / "towers", "--validate-batch", 64)
    return result, checkpoint, folder / "towers"


# ---- the three sources, and towers


def test_two_tower_checkpoint_exports_query_and_item_into_a_directory(two_tower_export):
    result, _, folder = two_tower_export
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["item.onnx", "query.onnx"]
    assert [props(folder / f"{t}.onnx")["dcnc.tower"] for t in ("query", "item")] == ["query", "item"]
    item_inputs = [i.name for i in onnx.load(str(folder / "item.onnx")).graph.input]
    assert item_inputs == ["item_id_a", "item_id_b", "item_dense"]


def test_export_prints_each_towers_node_counts_per_pass(two_tower_export):
    result, _, folder = two_tower_export
    for tower in ("query", "item"):
        records = json.loads(props(folder / f"{tower}.onnx")["dcnc.passes"])
        shown = ", ".join(f"{r['name']} {r['nodes_before']}->{r['nodes_after']}" for r in records)
        assert f"passes ({tower}, nodes): {shown}" in result.stdout
    assert [r["name"] for r in records] == list(DEFAULT_PASSES)


def test_tower_option_exports_only_that_tower(two_tower_export, tmp_path):
    _, checkpoint, _ = two_tower_export
    result = dcnc_export(checkpoint, "-o", tmp_path / "item.onnx", "--tower", "item", "--validate-batch", 7)
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == ["item.onnx"]
    assert props(tmp_path / "item.onnx")["dcnc.tower"] == "item"


def test_factory_with_inputs_and_weights_exports_the_weighted_model(user_code, tmp_path):
    sys.path.insert(0, str(tmp_path))
    module = __import__(user_code, fromlist=["make_scorer"])
    model = module.make_scorer()
    with torch.no_grad():
        model.linear.bias.fill_(5.0)  # "trained": differs from what the factory builds
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    sys.path.remove(str(tmp_path))  # the CLI must find the package from the working directory alone

    result = dcnc_export(f"{user_code}:make_scorer", *SCORER_INPUTS, "--weights", "weights.pt", "-o", "scorer.onnx")
    assert result.exit_code == 0, result.output
    feeds = {"dense": np.ones((3, 4), np.float32), "ids": np.array([1, 2, 3])}
    with torch.inference_mode():
        want = model.eval()(torch.from_numpy(feeds["dense"]), torch.from_numpy(feeds["ids"])).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "scorer.onnx", feeds)[0], want, rtol=1e-5, atol=1e-5)
    assert props(tmp_path / "scorer.onnx")["dcnc.source"] == f"{user_code}:make_scorer"


class SequenceScorer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, dense, sequence):
        return self.linear(dense + sequence.mean(dim=1))


def test_program_with_a_dynamic_batch_exports_an_onnx_that_runs_at_two_batch_sizes(tmp_path):
    torch.manual_seed(0)
    batch, steps = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("steps", min=2, max=64)
    module = SequenceScorer().eval()
    program = torch.export.export(
        module, (torch.randn(3, 4), torch.randn(3, 5, 4)), dynamic_shapes=({0: batch}, {0: batch, 1: steps})
    )
    torch.export.save(program, tmp_path / "scorer.pt2")

    result = dcnc_export(tmp_path / "scorer.pt2", "-o", tmp_path / "scorer.onnx", "--validate-batch", 64)
    assert result.exit_code == 0, result.output
    for rows, length in ((2, 5), (9, 11)):
        dense, sequence = np.ones((rows, 4), np.float32), np.full((rows, length, 4), 0.5, np.float32)
        with torch.inference_mode():
            want = module(torch.from_numpy(dense), torch.from_numpy(sequence)).numpy()
        [got] = run_onnx(tmp_path / "scorer.onnx", {"dense": dense, "sequence": sequence})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- validation failure: exit 1, the worst outputs, files kept


def test_onnx_that_differs_from_torch_exits_1_with_the_worst_outputs_and_keeps_the_file(user_code, tmp_path):
    result = dcnc_export(f"{user_code}:make_drifting", *SCORER_INPUTS, "-o", "out/drift.onnx", "--validate-batch", 7)
    assert result.exit_code == 1
    assert "Worst outputs: ONNX Runtime vs torch" in result.stdout
    assert result.stdout.count("FAIL") == 2  # output_0 at batch 1 and at batch 7
    assert result.stderr.startswith("FAILED: ONNX output differs from torch in 2 check(s)")
    assert "kept for inspection" in result.stderr and "Traceback" not in result.output
    assert (tmp_path / "out" / "drift.onnx").is_file()


def test_no_validate_exports_without_comparing(user_code, tmp_path):
    result = dcnc_export(f"{user_code}:make_drifting", *SCORER_INPUTS, "-o", "drift.onnx", "--no-validate")
    assert result.exit_code == 0, result.output
    assert "not validated" in result.stdout and (tmp_path / "drift.onnx").is_file()


# ---- bad input: exit 2, one line, nothing written


def _corrupt(folder: Path) -> list[object]:
    (folder / "corrupt.pt").write_bytes(b"\x80\x02 not a checkpoint")
    return [folder / "corrupt.pt"]


def _mismatched(folder: Path) -> list[object]:
    path = zoo_checkpoint(folder, "ranking")
    payload = read_checkpoint(path)
    payload["spec"]["towers"]["ranker"]["deep"] = [16, 6]  # the weights are for [8, 6]
    torch.save(payload, path)
    return [path]


def _ranker(folder: Path) -> list[object]:
    return [zoo_checkpoint(folder, "ranking")]


def _existing(folder: Path) -> list[object]:
    (folder / "out" / "ranker.onnx").write_bytes(b"keep me")
    return [zoo_checkpoint(folder, "ranking")]


def _below_a_file(folder: Path) -> list[object]:
    (folder / "out" / "plain").write_text("")
    return [zoo_checkpoint(folder, "ranking"), "-o", folder / "out" / "plain" / "ranker.onnx"]


def _read_only(folder: Path) -> list[object]:
    (folder / "out").chmod(0o500)
    return [zoo_checkpoint(folder, "ranking"), "-o", folder / "out" / "sub" / "ranker.onnx"]


BAD_INPUTS = {
    "missing-model-file": (lambda f: [f / "absent.pt"], "absent.pt: checkpoint not found"),
    "corrupt-checkpoint": (_corrupt, "corrupt.pt: not a readable dcnc checkpoint"),
    "spec-not-matching-state-dict": (_mismatched, "state_dict does not match its spec"),
    "factory-raises": (lambda f: ["{code}:make_broken", *SCORER_INPUTS], "raised RuntimeError: no GPU found"),
    "factory-does-not-import": (lambda f: ["no_such_pkg.towers:make", *SCORER_INPUTS], "cannot import module"),
    "bad-input-syntax": (lambda f: ["{code}:make_scorer", "--input", "dense:float32"], "expected NAME:DTYPE:SHAPE"),
    "op-the-exporter-cannot-handle": (lambda f: ["{code}:make_running_max", *SCORER_INPUTS], "aten.cummax"),
    "output-below-a-file": (_below_a_file, "is not a folder"),
    "existing-output-without-force": (_existing, "already exists (pass --force to replace it)"),
    "unsupported-opset": (lambda f: [*_ranker(f), "--opset", 17], "--opset 17: torch"),
    "unknown-pass": (lambda f: [*_ranker(f), "--passes", "cleanup,fusion"], "unknown pass 'fusion'"),
    "negative-tolerance": (lambda f: [*_ranker(f), "--atol", -1], "tolerances must be >= 0"),
    "unknown-tower": (lambda f: [*_ranker(f), "--tower", "query"], "no tower 'query'"),
    "read-only-output-folder": (_read_only, "is not writable"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_in_one_line_and_writes_nothing(case, user_code, tmp_path):
    if case == "read-only-output-folder" and os.geteuid() == 0:
        pytest.skip("root writes through folder permissions")
    make_args, message = BAD_INPUTS[case]
    (tmp_path / "out").mkdir()
    args = [str(a).format(code=user_code) for a in make_args(tmp_path)]
    if "-o" not in args:
        args += ["-o", tmp_path / "out" / "ranker.onnx"]
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    try:
        result = dcnc_export(*args)
    finally:
        (tmp_path / "out").chmod(0o700)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in before)


# ---- --help


def test_help_documents_every_option_and_the_default_passes():
    result = CliRunner().invoke(cli.app, ["export", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    command = typer.main.get_command(cli.app).commands["export"]
    options = [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]
    named = {"-o", "--opset", "--input", "--weights", "--tower", "--no-validate", "--atol", "--rtol", "--passes"}
    assert named <= set(options)
    assert [o for o in options if o not in result.stdout] == []
    text = " ".join(result.stdout.replace("│", " ").split())
    assert f"default = {', '.join(DEFAULT_PASSES)}" in text
    assert "gpu = default + fuse_entry" in text and list(GPU_PASSES) == [*DEFAULT_PASSES, "fuse_entry"]
    assert set(PASSES) <= set(GPU_PASSES)  # so the help names every pass
