"""Data and checkpoints that are damaged or out of range: a truncated training checkpoint in `dcnc run` and
`dcnc train` (retrained over), embedding ids past their table in calibration data (refused naming the file,
before ONNX Runtime logs its own error), float32 overflow in calibration (said as such, not "empty"), a bad
--eval in `dcnc calibrate` (nothing written), a fixed-shape graph (its manifest claims only its batch), and a
--k as large as the corpus (refused, not capped into a gate that always passes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_cases import assert_one_line, dcnc, dcnc_process

from toolkit.core.errors import DcncError
from toolkit.example.data.evalsplit import save_npz
from toolkit.model.checkpoint import read_checkpoint


# --- truncated checkpoints ----------------------------------------------------------------------------------------
def cut_to_invalid_argument(path: Path) -> None:
    """Cut the checkpoint where torch's zip reader fails with OSError (EINVAL: a cut that leaves 4 to 64 KiB and
    lands past the first records), which dcnc did not expect."""
    data = path.read_bytes()
    for size in range(min(len(data) - 1, 60_000), 1024, -97):
        path.write_bytes(data[:size])
        try:
            torch.load(path, weights_only=True)
        except OSError:
            return
        except Exception:
            continue
    pytest.fail("no truncation of this checkpoint fails with OSError")


def test_a_truncated_checkpoint_is_a_dcnc_error(shared_case, tmp_path):
    shutil.copyfile(shared_case.checkpoint, tmp_path / "model.pt")
    cut_to_invalid_argument(tmp_path / "model.pt")
    with pytest.raises(DcncError, match="not a readable dcnc checkpoint"):
        read_checkpoint(tmp_path / "model.pt")
    assert_one_line(dcnc("export", tmp_path / "model.pt", "-o", tmp_path / "o.onnx"), "not a readable dcnc checkpoint")


EXAMPLE = """[model]
example = "ranker"
epochs = 1

[export]
validate = false

[[targets]]
name = "fp32"
batch = "1:16:64"

[verify]
latency = false
branches = false
"""


def test_run_retrains_over_a_truncated_training_checkpoint(tmp_path):
    (tmp_path / "pipeline.toml").write_text(EXAMPLE)
    first = dcnc("run", tmp_path / "pipeline.toml", "--out", tmp_path / "out", "--quiet", "--json")
    assert first.exit_code in (0, 1), first.output
    cut_to_invalid_argument(tmp_path / "out" / "ranker" / "train" / "ranker.pt")
    again = dcnc("run", tmp_path / "pipeline.toml", "--out", tmp_path / "out", "--quiet", "--json")
    assert again.exit_code in (0, 1), again.output
    assert "Traceback" not in again.stderr
    assert json.loads(again.stdout)["models"][0]["stages"]["train"] == "trained"
    read_checkpoint(tmp_path / "out" / "ranker" / "train" / "ranker.pt")  # whole again


def test_train_writes_over_a_truncated_checkpoint(tmp_path):
    args = ("train", "--family", "ranking", "--epochs", "1", "--quiet", "--out", tmp_path)
    assert dcnc(*args).exit_code == 0
    cut_to_invalid_argument(tmp_path / "ranker.pt")
    result = dcnc(*args)
    assert result.exit_code == 0, result.output
    read_checkpoint(tmp_path / "ranker.pt")


# --- calibration data --------------------------------------------------------------------------------------------
def _calib_with(own_case, tmp_path: Path, name: str, value) -> Path:
    arrays = dict(np.load(own_case.calib))
    array = arrays[name].copy()
    array.flat[3] = value
    save_npz(tmp_path / "calib.npz", {**arrays, name: array})
    return tmp_path / "calib.npz"


@pytest.mark.parametrize("command", ["build", "calibrate"])
def test_ids_past_the_embedding_table_are_refused_naming_the_file_before_onnxruntime_runs(command, shared_case,
                                                                                          tmp_path):
    calib = _calib_with(shared_case, tmp_path, "id_a", 20)  # the table has 20 rows: ids 0..19
    args = {"build": ["build", shared_case.onnx, "-o", tmp_path / "b", "--precision", "int8", "--calib", calib],
            "calibrate": ["calibrate", shared_case.onnx, "--calib", calib, "--out", tmp_path / "c"]}[command]
    result = dcnc_process(*args)
    assert_one_line(result, f"{calib}: 'id_a' holds id 20, outside [0, 20)")
    assert "onnxruntime" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_calibration_values_that_overflow_float32_are_said_so(precision, shared_case, tmp_path):
    calib = _calib_with(shared_case, tmp_path, "dense", 1e30)
    result = dcnc("build", shared_case.onnx, "-o", tmp_path / "b", "--precision", precision, "--calib", calib)
    assert_one_line(result, "is inf or NaN on this data (float32 overflows in the graph, largest |input| 1e+30)")
    assert "empty" not in result.stderr


def test_calibrate_with_a_bad_eval_file_writes_nothing(shared_case, tmp_path):
    arrays = dict(np.load(shared_case.eval))
    save_npz(tmp_path / "eval.npz", {k: v for k, v in arrays.items() if k != "dense"})
    result = dcnc("calibrate", shared_case.onnx, "--calib", shared_case.calib, "--out", tmp_path / "c",
                  "--eval", tmp_path / "eval.npz")
    assert_one_line(result, "eval.npz: missing input 'dense'")
    assert not (tmp_path / "c").exists()


# --- shapes and K -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixed_graph(tmp_path_factory) -> Path:
    """A tower exported from a .pt2 traced at batch 4 without a dynamic batch: its graph takes batch 4 only."""
    folder = tmp_path_factory.mktemp("fixed")
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.ones(4, 3),))
    torch.export.save(program, folder / "fixed.pt2")
    result = dcnc("export", folder / "fixed.pt2", "-o", folder / "fixed.onnx", "--validate-batch", 4)
    assert result.exit_code == 0, result.output
    return folder / "fixed.onnx"


def test_a_fixed_shape_graphs_manifest_claims_only_its_batch(fixed_graph, tmp_path):
    result = dcnc("build", fixed_graph, "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["batch"] == {"min": 4, "opt": 4, "max": 4}
    assert "batch 4:4:4" in result.stdout


def test_a_batch_profile_a_fixed_shape_graph_cannot_run_is_refused(fixed_graph, tmp_path):
    result = dcnc("build", fixed_graph, "-o", tmp_path / "b", "--batch", "1:256:4096")
    assert_one_line(result, "has a fixed batch of 4 (its inputs' first dimension); build it with --batch 4")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("k", ["200", "1,10,500"])
def test_a_k_not_below_the_corpus_is_refused_not_capped(k, verify_case):
    result = dcnc("verify", verify_case / "model.pt", verify_case / "bundle", "--data", verify_case / "eval.npz",
                  "--k", k, "--no-latency")
    assert_one_line(result, "not below the corpus of 200 items")
