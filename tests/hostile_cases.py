"""Helpers of the hostile-input battery (tests/hostile; its fixtures shared_case and own_case are in conftest.py):
a small ranking model taken through every stage (checkpoint, evaluation and calibration data, exported ONNX, fp32
bundle), and dcnc run as a user runs it (in-process, or as its own process where what reaches file descriptor 2
matters: C++ logging, torch's own log handlers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner
from zoo import zoo_model

import cli
from toolkit.commands.build import build_bundle
from toolkit.commands.export import export_model
from toolkit.core.signature import random_inputs
from toolkit.example.data.evalsplit import save_npz
from toolkit.model.checkpoint import save_checkpoint
from toolkit.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


class Case:
    """A ranking model through every stage, in `root`: model.pt (naming eval.npz beside it), eval.npz,
    ranker_calib.npz, ranker.onnx and bundle/ (ort fp32, batch 1:16:64)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.checkpoint, self.eval, self.calib = root / "model.pt", root / "eval.npz", root / "ranker_calib.npz"
        self.onnx, self.bundle = root / "ranker.onnx", root / "bundle"

    def copy(self, to: Path) -> Case:
        shutil.copytree(self.root, to, symlinks=True)
        return Case(to)


def make_case(root: Path) -> Case:
    model, spec = zoo_model("ranking")
    root.mkdir(parents=True, exist_ok=True)
    tower = model.towers()["ranker"]
    feeds = random_inputs(list(tower.input_specs), 64, seed=0)
    save_npz(root / "ranker_calib.npz", feeds)
    labels = (np.arange(64) % 2).astype(np.float32)
    save_npz(root / "eval.npz", {**random_inputs(list(tower.input_specs), 64, seed=1), "label": labels})
    save_checkpoint(model, spec, root / "model.pt", extra={"eval_data": "eval.npz"})
    export_model(load_model(str(root / "model.pt")), root / "ranker.onnx", validate=False)
    build_bundle(root / "ranker.onnx", root / "bundle", batch=(1, 16, 64))
    return Case(root)


def dcnc(*args: object, env: dict | None = None):
    """`dcnc ARGS` in-process; the typer Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "250", **(env or {})})


def dcnc_process(*args: object, cwd: Path | None = None, env: dict | None = None, prelude: str = ""
                 ) -> subprocess.CompletedProcess:
    """`dcnc ARGS` as its own process (text output), as the console script runs: the working folder is not put
    on sys.path by Python (-P), only by what dcnc itself does. `prelude`: Python run first (to inject a fault)."""
    code = prelude + "import sys, cli; sys.argv[0] = 'dcnc'; sys.exit(cli.app())"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250", **(env or {})}
    return subprocess.run([sys.executable, "-P", "-c", code, *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def assert_one_line(result, fragment: str = "", code: int = 2) -> None:
    """Exit `code` with one line on stderr that holds `fragment` and no traceback (result: typer or subprocess)."""
    stderr = result.stderr
    exit_code = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert exit_code == code, f"exit {exit_code}, stderr: {stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert fragment in stderr, stderr


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes: what a failed command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
