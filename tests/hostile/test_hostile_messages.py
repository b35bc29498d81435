"""What reaches the terminal when something is wrong: the user's text printed literally (a path holding rich markup
such as `[/x]` or `[bold]`), dcnc's one line and never a traceback or a library's log before it (torch, onnx,
onnxruntime), exit 2 for every bad input of every command, and exit 3 with the log file named for dcnc's own bugs.
"""

from __future__ import annotations

import json
import shutil
import tempfile

import numpy as np
import pytest
from hostile_cases import assert_one_line, dcnc, dcnc_process

import graphs.inspect
from toolkit.example.data.evalsplit import save_npz

# --- literal text -------------------------------------------------------------------------------------------------
MARKUP = ["nonexist[/x].onnx", "[model].onnx", "[[models]].onnx", "[gates].onnx", "a[bold]b[/bold].onnx",
          "[red]x[/red].onnx"]


@pytest.mark.parametrize("name", MARKUP)
@pytest.mark.parametrize("command", ["inspect", "build", "calibrate"])
def test_a_path_holding_markup_is_printed_as_it_is(command, name, tmp_path):
    missing = tmp_path / name
    args = {"inspect": ["inspect", missing], "build": ["build", missing, "-o", tmp_path / "out"],
            "calibrate": ["calibrate", missing, "--calib", "dataset:synthetic", "--out", tmp_path / "out"]}[command]
    result = dcnc(*args)
    assert_one_line(result, str(missing))


def test_markup_in_a_bundle_folder_name_is_printed_as_it_is(shared_case, tmp_path):
    bundle = tmp_path / "[bold]bundle[/bold]"
    shutil.copytree(shared_case.bundle, bundle)
    (bundle / "ranker.onnx").write_bytes(b"changed")
    result = dcnc("verify", shared_case.checkpoint, bundle, "--data", shared_case.eval)
    assert_one_line(result, f"{bundle}: ranker.onnx does not match the hash in its manifest")


def test_markup_in_a_progress_line_is_printed_as_it_is(shared_case, tmp_path):
    folder = tmp_path / "[gates]"
    folder.mkdir()
    shutil.copyfile(shared_case.checkpoint, folder / "model.pt")
    shutil.copyfile(shared_case.eval, folder / "eval.npz")
    (folder / "pipeline.toml").write_text(
        '[model]\nsource = "model.pt"\n\n[export]\nvalidate = false\n\n[[targets]]\nname = "fp32"\n'
        'batch = "1:16:64"\n\n[verify]\ndata = "eval.npz"\nlatency = false\nbranches = false\n'
    )
    result = dcnc("run", folder / "pipeline.toml", "--out", tmp_path / "[/out]")
    assert result.exit_code in (0, 1), result.output
    assert f"{tmp_path / '[/out]'}" in result.stdout + result.stderr
    assert f"({folder / 'model.pt'})" in result.stdout


# --- library logging and internal errors --------------------------------------------------------------------------
@pytest.fixture
def truncated_program(tmp_path):
    """A .pt2 cut short: torch.export.load logs a 20-line traceback as a warning before it fails."""
    import torch

    program = torch.export.export(torch.nn.Linear(3, 2), (torch.ones(2, 3),))
    torch.export.save(program, tmp_path / "full.pt2")
    data = (tmp_path / "full.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.pt2"


def test_library_logging_does_not_reach_the_terminal_before_dcncs_line(truncated_program, tmp_path):
    result = dcnc_process("export", truncated_program, "-o", tmp_path / "out.onnx")
    assert_one_line(result, "cut.pt2: not a readable torch.export program")


def test_verbose_shows_the_library_logging(truncated_program, tmp_path):
    result = dcnc_process("--verbose", "export", truncated_program, "-o", tmp_path / "out.onnx")
    assert result.returncode == 2
    assert "Ran into the following error when deserializing" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_log_keeps_the_library_logging_in_a_file(truncated_program, tmp_path):
    result = dcnc_process("--log", tmp_path / "dcnc.log", "export", truncated_program, "-o", tmp_path / "out.onnx")
    assert_one_line(result, "not a readable torch.export program")
    assert "Ran into the following error when deserializing" in (tmp_path / "dcnc.log").read_text()


def test_onnxruntime_errors_do_not_print_before_dcncs_line(shared_case, tmp_path):
    """A graph that ONNX Runtime refuses at load time: its C++ logger writes to file descriptor 2 directly."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], np.ones(4, np.float32))
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "bad.onnx")
    result = dcnc_process("build", tmp_path / "bad.onnx", "-o", tmp_path / "bundle")
    assert_one_line(result, f"{tmp_path / 'bundle' / 'bad.onnx'}: onnxruntime cannot load it")
    assert ".tmp" not in result.stderr  # the user's path, not the staging folder's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def _boom(*args, **kwargs):
    raise RuntimeError("an injected bug\nwith a second line")


def test_an_internal_error_exits_3_with_one_line_naming_the_log(shared_case, tmp_path, monkeypatch):
    monkeypatch.setattr(graphs.inspect, "inspect_model", _boom)
    result = dcnc("--log", tmp_path / "dcnc.log", "inspect", shared_case.onnx)
    assert_one_line(result, f"RuntimeError: an injected bug (traceback in {tmp_path / 'dcnc.log'})", code=3)
    log = (tmp_path / "dcnc.log").read_text()
    assert "Traceback (most recent call last)" in log and "an injected bug" in log


def test_without_log_an_internal_error_writes_a_new_log_under_the_temp_folder(shared_case, tmp_path, monkeypatch):
    monkeypatch.setattr(graphs.inspect, "inspect_model", _boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = dcnc("inspect", shared_case.onnx)
    assert_one_line(result, f"(traceback in {tmp_path / 'dcnc-logs'}/dcnc-", code=3)
    (log,) = (tmp_path / "dcnc-logs").iterdir()
    assert "RuntimeError: an injected bug" in log.read_text()


def test_an_internal_error_in_its_own_process_prints_one_line_and_exits_3(shared_case, tmp_path):
    prelude = ("import graphs.inspect\ndef boom(*a, **k):\n    raise KeyError('injected')\n"
               "graphs.inspect.inspect_model = boom\n")
    result = dcnc_process("--log", tmp_path / "dcnc.log", "inspect", shared_case.onnx, prelude=prelude)
    assert_one_line(result, "internal error: KeyError: 'injected'", code=3)
    assert "in boom\nKeyError: 'injected'" in (tmp_path / "dcnc.log").read_text()


# --- every bad input of every command: exit 2, one line ----------------------------------------------------------
def _files(own_case, tmp):
    """Bad files to hand to commands: garbage, empty, a folder, wrong-typed arrays."""
    (tmp / "garbage.onnx").write_bytes(b"garbage")
    (tmp / "garbage.pt").write_bytes(b"garbage")
    (tmp / "garbage.pt2").write_bytes(b"garbage")
    (tmp / "empty.npz").write_bytes(b"")
    (tmp / "garbage.toml").write_text("[model\n")
    (tmp / "unknown.toml").write_text('[model]\nsource = "x.pt"\nflavour = 1\n')
    (tmp / "gates.toml").write_text("[gates]\ncosine_min = 'high'\n")
    (tmp / "baseline.json").write_text(json.dumps({"schema": "something else"}))
    arrays = dict(np.load(own_case.eval))
    save_npz(tmp / "nan.npz", {**arrays, "dense": np.full_like(arrays["dense"], np.nan)})
    save_npz(tmp / "ids.npz", {**arrays, "id_a": np.full_like(arrays["id_a"], 10_000)})
    save_npz(tmp / "float_ids.npz", {**arrays, "id_a": arrays["id_a"].astype(np.float32)})
    save_npz(tmp / "missing.npz", {k: v for k, v in arrays.items() if k != "id_b"})
    calib = {k: v for k, v in arrays.items() if k != "label"}
    save_npz(tmp / "calib_ids.npz", {**calib, "id_b": np.full_like(calib["id_b"], -1)})


BAD_INPUTS = {
    "export-missing-file": (["export", "{tmp}/absent.pt", "-o", "{tmp}/o.onnx"], "absent.pt"),
    "export-garbage-checkpoint": (["export", "{tmp}/garbage.pt", "-o", "{tmp}/o.onnx"], "not a readable dcnc"),
    "export-garbage-program": (["export", "{tmp}/garbage.pt2", "-o", "{tmp}/o.onnx"], "not a readable torch.export"),
    "export-bad-opset": (["export", "{case}/model.pt", "-o", "{tmp}/o.onnx", "--opset", "7"], "--opset 7"),
    "export-unknown-tower": (["export", "{case}/model.pt", "-o", "{tmp}/o.onnx", "--tower", "nope"], "no tower 'nope'"),
    "export-factory-missing": (["export", "no_such_pkg_x.mod:make", "-o", "{tmp}/o.onnx"], "cannot import module"),
    "inspect-garbage": (["inspect", "{tmp}/garbage.onnx"], "not a readable ONNX model"),
    "inspect-folder": (["inspect", "{tmp}"], "ONNX file not found"),
    "build-garbage": (["build", "{tmp}/garbage.onnx", "-o", "{tmp}/b"], "garbage.onnx"),
    "build-bad-precision": (["build", "{case}/ranker.onnx", "-o", "{tmp}/b", "--precision", "int4"], "--precision"),
    "build-int8-without-calib": (["build", "{case}/ranker.onnx", "-o", "{tmp}/b", "--precision", "int8"], "calib"),
    "build-bad-batch": (["build", "{case}/ranker.onnx", "-o", "{tmp}/b", "--batch", "8:4:2"], "--batch"),
    "build-calib-nan": (["build", "{case}/ranker.onnx", "-o", "{tmp}/b", "--precision", "int8", "--calib",
                         "{tmp}/nan.npz"], "nan.npz"),
    "build-calib-negative-ids": (["build", "{case}/ranker.onnx", "-o", "{tmp}/b", "--precision", "int8", "--calib",
                                  "{tmp}/calib_ids.npz"], "negative id"),
    "build-calib-empty-file": (["build", "{case}/ranker.onnx", "-o", "{tmp}/b", "--precision", "int8", "--calib",
                                "{tmp}/empty.npz"], "empty.npz"),
    "build-unknown-backend": (["build", "{case}/ranker.onnx", "-o", "{tmp}/b", "--backend", "tpu"], "--backend"),
    "calibrate-missing-model": (["calibrate", "{tmp}/absent.onnx", "--calib", "{case}/ranker_calib.npz", "--out",
                                 "{tmp}/c"], "absent.onnx"),
    "calibrate-bad-method": (["calibrate", "{case}/ranker.onnx", "--calib", "{case}/ranker_calib.npz", "--out",
                              "{tmp}/c", "--calib-method", "median"], "--calib-method"),
    "calibrate-float-ids": (["calibrate", "{case}/ranker.onnx", "--calib", "{tmp}/float_ids.npz", "--out", "{tmp}/c"],
                            "float_ids.npz"),
    "verify-missing-bundle": (["verify", "{case}/model.pt", "{tmp}/absent"], "bundle not found"),
    "verify-nan-data": (["verify", "{case}/model.pt", "{case}/bundle", "--data", "{tmp}/nan.npz"], "NaN"),
    "verify-ids-out-of-range": (["verify", "{case}/model.pt", "{case}/bundle", "--data", "{tmp}/ids.npz"], "ids.npz"),
    "verify-missing-input": (["verify", "{case}/model.pt", "{case}/bundle", "--data", "{tmp}/missing.npz"], "id_b"),
    "verify-bad-gates": (["verify", "{case}/model.pt", "{case}/bundle", "--gates", "{tmp}/gates.toml"], "gates.toml"),
    "verify-bad-baseline": (["verify", "{case}/model.pt", "{case}/bundle", "--baseline", "{tmp}/baseline.json"],
                            "baseline.json"),
    "verify-bad-k": (["verify", "{case}/model.pt", "{case}/bundle", "--k", "0"], "--k"),
    "verify-bad-device": (["verify", "{case}/model.pt", "{case}/bundle", "--device", "tpu"], "--device"),
    "run-missing-pipeline": (["run", "{tmp}/absent.toml", "--out", "{tmp}/r"], "absent.toml"),
    "run-garbage-pipeline": (["run", "{tmp}/garbage.toml", "--out", "{tmp}/r"], "not valid TOML"),
    "run-unknown-key": (["run", "{tmp}/unknown.toml", "--out", "{tmp}/r"], "unknown.toml"),
    "bench-garbage-model": (["bench", "{tmp}/garbage.pt", "--out", "{tmp}/bench"], "garbage.pt"),
    "bench-unknown-runner": (["bench", "{case}/model.pt", "--runners", "warp", "--out", "{tmp}/bench"], "warp"),
    "package-missing-bundle": (["package", "{tmp}/absent", "--triton", "{tmp}/m"], "absent"),
    "package-bad-instances": (["package", "{case}/bundle", "--triton", "{tmp}/m", "--instances", "0"], "--instances"),
    "train-bad-family": (["train", "--family", "chess", "--out", "{tmp}/t"], "--family"),
    "train-bad-dataset": (["train", "--dataset", "imagenet", "--out", "{tmp}/t"], "imagenet"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_every_bad_input_is_one_line_exit_2_and_no_traceback(name, shared_case, tmp_path):
    _files(shared_case, tmp_path)
    args, fragment = BAD_INPUTS[name]
    result = dcnc(*[a.format(tmp=tmp_path, case=shared_case.root) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert_one_line(result, fragment)
