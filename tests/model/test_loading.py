"""toolkit.model.loading: dcnc checkpoints, package.module:factory import paths and .pt2 programs, and their errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from toolkit.core.errors import DcncError
from toolkit.core.signature import TensorSpec
from toolkit.model.checkpoint import read_checkpoint, save_checkpoint
from toolkit.model.loading import file_sha256, load_model

USER_CODE = Path(__file__).parents[1] / "usercode.py"


@pytest.fixture
def user_package(tmp_path, monkeypatch, request):
    """A package in tmp_path, importable for this test only, named after the test (sys.modules caches by name)."""
    name = f"userpkg_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copyfile(USER_CODE, package / "towers.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.fixture
def two_tower_checkpoint(tmp_path, two_tower_model, two_tower_spec):
    path = tmp_path / "two_tower.pt"
    save_checkpoint(two_tower_model, two_tower_spec, path)
    return path


# ---- dcnc checkpoints


def test_checkpoint_yields_one_tower_per_model_tower_with_its_inputs(two_tower_checkpoint, two_tower_model):
    loaded = load_model(str(two_tower_checkpoint))
    assert loaded.kind == "checkpoint"
    assert list(loaded.towers) == ["query", "item"]
    expected = two_tower_model.towers()["item"]
    assert loaded.towers["item"].input_specs == list(expected.input_specs)
    assert loaded.towers["item"].output_names == ["embedding"]


def test_checkpoint_towers_compute_what_the_saved_model_computes(two_tower_checkpoint, two_tower_model):
    tower = load_model(str(two_tower_checkpoint)).towers["query"]
    feeds = tower.feeds(5)
    with torch.inference_mode():
        want = two_tower_model.towers()["query"](*(torch.from_numpy(feeds[s.name]) for s in tower.input_specs))
    np.testing.assert_array_equal(tower.run(feeds)["embedding"], want.numpy())


def test_checkpoint_source_hash_is_the_file_sha256(two_tower_checkpoint):
    loaded = load_model(str(two_tower_checkpoint))
    assert loaded.source_hash == hashlib.sha256(two_tower_checkpoint.read_bytes()).hexdigest()


def test_checkpoint_eval_data_is_found_beside_it(tmp_path, two_tower_model, two_tower_spec):
    np.savez(tmp_path / "eval.npz", x=np.zeros(2))
    save_checkpoint(two_tower_model, two_tower_spec, tmp_path / "m.pt", extra={"eval_data": "eval.npz"})
    assert load_model(str(tmp_path / "m.pt")).eval_data == tmp_path / "eval.npz"


def test_checkpoint_missing_eval_data_is_a_note_not_an_error(tmp_path, two_tower_model, two_tower_spec):
    save_checkpoint(two_tower_model, two_tower_spec, tmp_path / "m.pt", extra={"eval_data": "gone.npz"})
    loaded = load_model(str(tmp_path / "m.pt"))
    assert loaded.eval_data is None
    assert len(loaded.notes) == 1 and "gone.npz" in loaded.notes[0]


def test_select_refuses_a_tower_the_model_does_not_have(two_tower_checkpoint):
    with pytest.raises(DcncError, match="no tower 'user'"):
        load_model(str(two_tower_checkpoint)).select(["user"])


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(DcncError, match="checkpoint not found"):
        load_model(str(tmp_path / "absent.pt"))


def test_a_path_that_is_neither_file_nor_import_path_is_refused(tmp_path):
    with pytest.raises(DcncError, match="not found"):
        load_model(str(tmp_path / "absent.onnx"))


def test_a_directory_is_refused_as_a_model(tmp_path):
    with pytest.raises(DcncError, match="is a directory"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("corrupt.pt", b"PK\x03\x04 this is not a zip archive", "corrupt.pt: not a readable dcnc checkpoint"),
     ("broken.pt2", b"not a program", "broken.pt2: not a readable torch.export program")],
)
def test_corrupt_checkpoint_or_program_is_refused(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DcncError, match=message):
        load_model(str(tmp_path / name))


def test_checkpoint_whose_spec_does_not_match_its_state_dict_is_refused(two_tower_checkpoint):
    payload = read_checkpoint(two_tower_checkpoint)
    payload["spec"]["towers"]["query"]["deep"] = [32]  # the saved weights are for deep=[16]
    torch.save(payload, two_tower_checkpoint)
    with pytest.raises(DcncError, match="does not match its spec"):
        load_model(str(two_tower_checkpoint))


def test_input_and_weights_options_are_refused_for_files_that_carry_their_own(two_tower_checkpoint):
    with pytest.raises(DcncError, match="--input applies to package.module:factory"):
        load_model(str(two_tower_checkpoint), inputs=["x:float32:B,3"])
    with pytest.raises(DcncError, match="--weights applies to package.module:factory"):
        load_model(str(two_tower_checkpoint), weights="w.pt")


# ---- package.module:factory


def test_factory_tower_takes_declared_inputs_and_names_its_outputs(user_package):
    loaded = load_model(f"{user_package}.towers:make_scorer", ["dense:float32:B,4", "ids:int64:B:10"])
    tower = loaded.towers["model"]
    assert loaded.kind == "factory"
    assert tower.input_specs == [TensorSpec("dense", "float32", ("B", 4)), TensorSpec("ids", "int64", ("B",), 10)]
    assert tower.output_names == ["output_0"]
    assert tower.run(tower.feeds(3))["output_0"].shape == (3, 2)


def test_factory_weights_replace_the_factory_initialisation(user_package, tmp_path):
    ref = f"{user_package}.towers:make_scorer"
    inputs = ["dense:float32:B,4", "ids:int64:B:10"]
    trained = load_model(ref, inputs).towers["model"].module
    with torch.no_grad():
        trained.linear.bias.fill_(5.0)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    tower = load_model(ref, inputs, weights=str(tmp_path / "weights.pt")).towers["model"]
    np.testing.assert_array_equal(tower.module.linear.bias.detach().numpy(), [5.0, 5.0])


def test_factory_source_hash_covers_the_weights(user_package, tmp_path):
    ref = f"{user_package}.towers:make_scorer"
    inputs = ["dense:float32:B,4", "ids:int64:B:10"]
    plain = load_model(ref, inputs)
    torch.save(plain.towers["model"].module.state_dict(), tmp_path / "weights.pt")
    weighted = load_model(ref, inputs, weights=str(tmp_path / "weights.pt"))
    assert plain.source_hash == file_sha256(tmp_path / user_package / "towers.py")
    assert weighted.source_hash != plain.source_hash


def test_factory_that_raises_is_refused_with_its_error(user_package):
    with pytest.raises(DcncError, match="factory make_broken raised RuntimeError: no GPU found"):
        load_model(f"{user_package}.towers:make_broken", ["x:float32:B,4"])


def test_factory_module_that_does_not_import_is_refused(user_package):
    with pytest.raises(DcncError, match="cannot import module 'no_such_package.towers'"):
        load_model("no_such_package.towers:make", ["x:float32:B,4"])


def test_factory_attribute_that_does_not_exist_is_refused(user_package):
    with pytest.raises(DcncError, match="has no attribute 'make_nothing'"):
        load_model(f"{user_package}.towers:make_nothing", ["x:float32:B,4"])


def test_factory_returning_something_else_than_a_module_is_refused(user_package):
    with pytest.raises(DcncError, match="returned int, expected a torch.nn.Module"):
        load_model(f"{user_package}.towers:make_number", ["x:float32:B,4"])


def test_factory_without_inputs_is_asked_for_them(user_package):
    with pytest.raises(DcncError, match="give its inputs with --input NAME:DTYPE:SHAPE"):
        load_model(f"{user_package}.towers:make_scorer")


@pytest.mark.parametrize(
    "text, message",
    [
        ("dense:float32", "expected NAME:DTYPE:SHAPE"),
        ("dense:float33:B,4", "dtype must be one of"),
        ("dense:float32:B,-4", "neither a positive int nor a name"),
        ("dense:float32:B,N", "only the batch dimension may be named"),
        ("dense:float32:B,4:7", "bounds integer ids"),
    ],
    ids=["too-few-fields", "unknown-dtype", "negative-dim", "second-named-dim", "bound-on-floats"],
)
def test_bad_input_syntax_is_refused(user_package, text, message):
    with pytest.raises(DcncError, match=message):
        load_model(f"{user_package}.towers:make_scorer", [text, "ids:int64:B:10"])


def test_inputs_that_do_not_fit_the_forward_are_refused(user_package):
    with pytest.raises(DcncError, match=r"tower model fails on inputs \[dense:float32:B,5"):
        load_model(f"{user_package}.towers:make_scorer", ["dense:float32:B,5", "ids:int64:B:10"])


def test_weights_for_another_model_are_refused(user_package, tmp_path):
    torch.save({"linear.weight": torch.zeros(2, 7)}, tmp_path / "weights.pt")
    with pytest.raises(DcncError, match="weights do not match"):
        load_model(
            f"{user_package}.towers:make_scorer", ["dense:float32:B,4", "ids:int64:B:10"], str(tmp_path / "weights.pt")
        )


# ---- torch.export programs


class SequenceScorer(nn.Module):
    """Dense [B, 4] and a sequence [B, T, 4]: two dynamic dimensions, the batch first."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, dense, sequence):
        return self.linear(dense + sequence.mean(dim=1))


@pytest.fixture
def program_file(tmp_path):
    torch.manual_seed(0)
    batch, steps = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("steps", min=2, max=64)
    program = torch.export.export(
        SequenceScorer().eval(),
        (torch.randn(3, 4), torch.randn(3, 5, 4)),
        dynamic_shapes=({0: batch}, {0: batch, 1: steps}),
    )
    path = tmp_path / "scorer.pt2"
    torch.export.save(program, path)
    return path


def test_program_keeps_its_batch_and_other_dynamic_dims(program_file):
    tower = load_model(str(program_file)).towers["scorer"]
    assert [s.shape[0] for s in tower.input_specs] == ["B", "B"]
    steps = tower.input_specs[1].shape[1]
    assert isinstance(steps, str) and steps != "B"
    assert tower.batch_range == (1, 1024)


def test_program_tower_runs_at_any_batch_in_its_range(program_file):
    tower = load_model(str(program_file)).towers["scorer"]
    assert tower.run(tower.feeds(1))["output_0"].shape == (1, 2)
    assert tower.run(tower.feeds(9))["output_0"].shape == (9, 2)


def test_program_without_a_dynamic_batch_is_loaded_with_a_note(tmp_path):
    program = torch.export.export(SequenceScorer().eval(), (torch.randn(3, 4), torch.randn(3, 5, 4)))
    torch.export.save(program, tmp_path / "static.pt2")
    loaded = load_model(str(tmp_path / "static.pt2"))
    assert loaded.towers["static"].input_specs[1].shape == (3, 5, 4)
    assert len(loaded.notes) == 1 and "without a dynamic batch dimension" in loaded.notes[0]
