"""Model files that carry code: a `.pt2` whose pickles, constants or compiled kernels would run on load, a `.pt`
checkpoint or --weights file with a pickle payload, and a file in the working folder posing as an installed
module. Every one is refused with one line and exit 2, and the payload never runs (it would create a file)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from hostile_cases import assert_one_line, dcnc, dcnc_process

from toolkit.model.loading import load_model


class Payload:
    """Unpickling it runs code: it writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",)


@pytest.fixture(scope="session")
def program(shared_case, tmp_path_factory) -> Path:
    """The shared case's ranker as a torch.export program with a dynamic batch, saved by torch.export.save."""
    tower = load_model(str(shared_case.checkpoint)).towers["ranker"]
    args = tuple(torch.from_numpy(v) for v in tower.feeds(4).values())
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(tower.module, args, dynamic_shapes=(tuple({0: batch} for _ in args),))
    path = tmp_path_factory.mktemp("program") / "ranker.pt2"
    torch.export.save(exported, path)
    return path


def rewrite_archive(source: Path, target: Path, edit) -> Path:
    """Copy the zip `source` to `target`, `edit(name, data)` giving each entry's new bytes (None: dropped);
    `edit("+", None)` may return {name: bytes} of entries to add."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        root = old.namelist()[0].split("/")[0]
        for item in old.infolist():
            data = edit(item.filename.split("/", 1)[1], old.read(item.filename))
            if data is not None:
                new.writestr(item, data)
        for name, data in (edit("+", None) or {}).items():
            new.writestr(f"{root}/{name}", data)
    return target


def torch_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def payload_in_sample_inputs(program: Path, target: Path, marker: Path) -> Path:
    """torch.export.load retries sample inputs that fail the weights-only load with weights_only=False."""
    payload = torch_pickle(((Payload(marker),), {}))
    return rewrite_archive(program, target, lambda n, d: payload if n == "data/sample_inputs/model.pt" else d)


def payload_in_a_weight(program: Path, target: Path, marker: Path) -> Path:
    """A weight marked use_pickle is read with torch.load(weights_only=False)."""
    config_name = "data/weights/model_weights_config.json"

    def edit(name, data):
        if name == config_name:
            config = json.loads(data)
            entry = next(iter(config["config"].values()))
            entry["use_pickle"] = True
            entry["path_name"] = "weight_payload"
            return json.dumps(config).encode()
        if name == "+":
            return {"data/weights/weight_payload": torch_pickle(Payload(marker))}
        return data

    return rewrite_archive(program, target, edit)


def payload_in_a_constant(program: Path, target: Path, marker: Path) -> Path:
    """An "opaque object" constant is read with plain pickle.loads."""
    config_name = "data/constants/model_constants_config.json"

    def edit(name, data):
        if name == config_name:
            meta = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
            return json.dumps({"config": {"payload": meta}}).encode()
        if name == "+":
            return {"data/constants/opaque_obj_0": pickle.dumps(Payload(marker))}
        return data

    return rewrite_archive(program, target, edit)


def compiled_code(program: Path, target: Path, marker: Path) -> Path:
    """AOTInductor kernels in the archive are shared libraries torch would load."""
    kernel = {"data/aotinductor/model/model.so": b"\x7fELF"}
    return rewrite_archive(program, target, lambda name, data: kernel if name == "+" else data)


VARIANTS = {
    "sample-inputs": (payload_in_sample_inputs, "pickled objects other than tensors"),
    "pickled-weight": (payload_in_a_weight, "pickled objects other than tensors"),
    "opaque-constant": (payload_in_a_constant, "constant 'payload' is a pickled object"),
    "compiled-code": (compiled_code, "it holds compiled code (data/aotinductor/"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_refuses_a_program_that_carries_code_and_runs_none_of_it(variant, program, tmp_path):
    make, message = VARIANTS[variant]
    marker = tmp_path / "ran"
    evil = make(program, tmp_path / "evil.pt2", marker)
    result = dcnc("export", evil, "-o", tmp_path / "out.onnx")
    assert not marker.exists()
    assert_one_line(result, message)
    assert "nothing in a model file may run" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def _verify(own_case, evil, tmp_path):
    return ["verify", evil, own_case.bundle, "--data", own_case.eval, "--no-latency"]


def _bench(own_case, evil, tmp_path):
    return ["bench", evil, "--runners", "eager", "--batch-sizes", "1", "--iterations", "1", "--warmup", "0",
            "--out", tmp_path / "bench"]


def _run(own_case, evil, tmp_path):
    shutil.copyfile(own_case.eval, tmp_path / "eval.npz")
    (tmp_path / "pipeline.toml").write_text(
        f'[model]\nsource = "{evil.name}"\n\n[[targets]]\nname = "fp32"\n\n'
        '[verify]\ndata = "eval.npz"\nlatency = false\n'
    )
    return ["run", tmp_path / "pipeline.toml", "--out", tmp_path / "out", "--quiet"]


@pytest.mark.parametrize("command", [_verify, _bench, _run], ids=["verify", "bench", "run"])
def test_every_command_that_loads_programs_refuses_the_payload(command, shared_case, program, tmp_path):
    marker = tmp_path / "ran"
    evil = payload_in_sample_inputs(program, tmp_path / "evil.pt2", marker)
    result = dcnc(*command(shared_case, evil, tmp_path))
    assert not marker.exists()
    assert_one_line(result, "refusing it: it holds pickled objects other than tensors")


def test_a_program_without_payload_still_exports(program, tmp_path):
    result = dcnc("export", program, "-o", tmp_path / "ranker.onnx", "--validate-batch", 16)
    assert result.exit_code == 0, result.output


def test_a_checkpoint_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": "dcnc.checkpoint/1", "spec": Payload(marker)}, tmp_path / "model.pt")
    result = dcnc("export", tmp_path / "model.pt", "-o", tmp_path / "out.onnx")
    assert not marker.exists()
    assert_one_line(result, "not a readable dcnc checkpoint")


def test_a_weights_file_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    package = tmp_path / "hostile_weights_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Linear(3, 2)\n"
    )
    torch.save({"weight": Payload(marker)}, tmp_path / "weights.pt")
    result = dcnc_process("export", "hostile_weights_pkg:make", "--input", "x:float32:B,3", "--weights",
                          tmp_path / "weights.pt", "-o", tmp_path / "out.onnx", cwd=tmp_path)
    assert not marker.exists()
    assert_one_line(result, "weights.pt: not a readable state_dict")


def test_a_file_in_the_working_folder_cannot_stand_in_for_an_installed_module(tmp_path):
    """A factory reference imports the user's package from the working folder, but that folder comes after the
    installed packages: polygraphy.py beside the user's code is not the polygraphy the factory imports."""
    marker = tmp_path / "ran"
    (tmp_path / "polygraphy.py").write_text(f"open({str(marker)!r}, 'w').write('shadowed')\n")
    package = tmp_path / "hostile_factory_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import polygraphy\nimport torch\n\ndef make():\n    return torch.nn.Linear(3, 2)\n"
    )
    result = dcnc_process("export", "hostile_factory_pkg:make", "--input", "x:float32:B,3", "-o",
                          tmp_path / "out.onnx", "--validate-batch", 8, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
