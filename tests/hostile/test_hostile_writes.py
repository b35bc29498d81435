"""Writes that fail or race: a full disk (a failing writer injected at toolkit.core.fileio.write_all, the one
place output bytes reach the disk), two builds of one bundle at once, and the temporary files a `kill -9` leaves.
A failed write is one line and exit 2 and leaves nothing; the second of two concurrent builds fails instead of
silently replacing the first; the next run of the same output removes what a killed one left."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_cases import ROOT, assert_one_line, dcnc, files_under

from toolkit.core import fileio


@pytest.fixture
def full_disk(monkeypatch):
    """Every output write fails as on a full filesystem."""

    def no_space(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fileio, "write_all", no_space)


def _pipeline(own_case) -> Path:
    (own_case.root / "pipeline.toml").write_text(
        '[model]\nsource = "model.pt"\n\n[export]\nvalidate = false\n\n[[targets]]\nname = "fp32"\nbatch = "1:16:64"\n'
        '\n[verify]\ndata = "eval.npz"\nlatency = false\nbranches = false\n'
    )
    return own_case.root / "pipeline.toml"


WRITERS = {
    "export": lambda c, out: ["export", c.checkpoint, "-o", out / "ranker.onnx", "--no-validate"],
    "build": lambda c, out: ["build", c.onnx, "-o", out / "bundle"],
    "calibrate": lambda c, out: ["calibrate", c.onnx, "--calib", c.calib, "--out", out / "calib"],
    "verify-report": lambda c, out: ["verify", c.checkpoint, c.bundle, "--data", c.eval, "--no-latency",
                                     "--report", out / "report.json"],
    "run": lambda c, out: ["run", _pipeline(c), "--out", out / "run", "--quiet"],
    "train": lambda c, out: ["train", "--family", "ranking", "--epochs", "1", "--quiet", "--out", out / "train"],
    "embed": lambda c, out: ["embed", c.bundle, "--data", c.calib, "--tower", "ranker", "--quiet", "--out", out / "e"],
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_full_disk_is_one_line_and_leaves_nothing(command, own_case, tmp_path, full_disk):
    out = tmp_path / "out"
    out.mkdir()
    before = files_under(own_case.root)
    result = dcnc(*WRITERS[command](own_case, out))
    assert_one_line(result, "No space left on device")
    assert files_under(out) == {} and list(out.iterdir()) == []
    assert {k: v for k, v in files_under(own_case.root).items() if k != "pipeline.toml"} == before


def test_a_full_disk_names_the_users_output_not_a_temporary_file(own_case, tmp_path, full_disk):
    result = dcnc("build", own_case.onnx, "-o", tmp_path / "bundle")
    assert_one_line(result, f"{tmp_path / 'bundle' / 'ranker.onnx'}: not written (No space left on device)")
    assert ".tmp" not in result.stderr


# --- two writers, and a killed one ----------------------------------------------------------------------------
def _dcnc_process(*args: object, cwd: Path) -> subprocess.Popen:
    code = "import sys, cli; sys.argv[0] = 'dcnc'; sys.exit(cli.app())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-P", "-c", code, *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _started_writing(args: tuple, folder: Path, attempts: int = 5) -> subprocess.Popen:
    """Start `dcnc ARGS` and SIGSTOP it as soon as a temporary sibling appears in `folder` (it is writing)."""
    for _ in range(attempts):
        process = _dcnc_process(*args, cwd=folder)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".") and p.name.endswith(".tmp") for p in folder.iterdir()):
                process.send_signal(signal.SIGSTOP)
                return process
            time.sleep(0.005)
        process.kill()
        process.wait()
        for made in folder.iterdir():  # finished before it could be caught writing: try again
            shutil.rmtree(made) if made.is_dir() else made.unlink()
    pytest.fail("the command never left a temporary file to catch it writing")


def test_a_second_build_to_an_output_being_written_fails_instead_of_replacing_it(shared_case, tmp_path):
    """The first build is stopped while it writes; the second, started then, must not build over it."""
    args = ("build", shared_case.onnx, "-o", tmp_path / "bundle", "--precision", "int8", "--calib", shared_case.calib)
    first = _started_writing(args, tmp_path)
    try:
        second = dcnc(*args)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line(second, "another dcnc process is writing it")
    assert first.wait(timeout=600) == 0, first.stderr.read()
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_two_builds_started_together_leave_one_bundle_and_fail_the_other(shared_case, tmp_path):
    args = ("build", shared_case.onnx, "-o", tmp_path / "bundle", "--precision", "int8", "--calib", shared_case.calib)
    first, second = _dcnc_process(*args, cwd=tmp_path), _dcnc_process(*args, cwd=tmp_path)
    outcomes = sorted((p.wait(timeout=600), p.stderr.read()) for p in (first, second))
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    failed = outcomes[1][1]
    assert "Traceback" not in failed and len(failed.strip().splitlines()) == 1, failed
    assert dcnc("verify", shared_case.checkpoint, tmp_path / "bundle", "--data", shared_case.eval, "--no-latency",
                "--no-branches").exit_code in (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _killed_while_writing(args: tuple, folder: Path, attempts: int = 5) -> list[Path]:
    """Start `dcnc ARGS` and SIGKILL it as soon as a temporary sibling appears in `folder`; what it left."""
    for _ in range(attempts):
        process = _dcnc_process(*args, cwd=folder)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            left = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
            if left:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return left
            time.sleep(0.005)
        process.kill()
        process.wait()
        for made in folder.iterdir():  # finished before it could be killed: try again
            shutil.rmtree(made) if made.is_dir() else made.unlink()
    pytest.fail("the command never left a temporary file to kill it over")


@pytest.mark.parametrize("command", ["build", "export"])
def test_what_a_killed_writer_left_is_removed_by_the_next_run_of_the_same_output(command, shared_case, tmp_path):
    if command == "build":
        args = ("build", shared_case.onnx, "-o", tmp_path / "out", "--precision", "int8", "--calib", shared_case.calib)
    else:
        args = ("export", shared_case.checkpoint, "-o", tmp_path / "out.onnx", "--validate-batch", 64)
    left = _killed_while_writing(args, tmp_path)
    assert all(p.exists() for p in left)
    result = dcnc(*args)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in left)
    assert [p.name for p in tmp_path.iterdir()] == [Path(str(args[3])).name]
