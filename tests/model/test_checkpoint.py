"""Checkpoints reload into the same model without user code, and anything else is refused in one line."""

import pickle

import pytest
import torch

from toolkit.core.errors import DcncError
from toolkit.model.checkpoint import load_checkpoint, save_checkpoint
from toolkit.model.spec import DenseFeature, ModelSpec, SparseFeature, TowerSpec
from toolkit.model.zoo.families import build_model

SPEC = ModelSpec("ranking", {"ranker": TowerSpec(sparse=[SparseFeature("u", 10, 4)], dense=[DenseFeature("d", 3)], deep=[8])})


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(model, SPEC, path, extra={"dataset": "synthetic"})
    return model, path


def test_reloaded_model_gives_identical_outputs(saved):
    model, path = saved
    loaded, spec, extra = load_checkpoint(path)
    ids, dense = torch.tensor([1, 2, 3]), torch.randn(3, 3)
    assert spec == SPEC and extra == {"dataset": "synthetic"}
    assert torch.equal(model(ids, dense)[0], loaded(ids, dense)[0])


def test_checkpoint_with_arbitrary_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "dcnc.checkpoint/1", "spec": SPEC.to_dict(), "hook": pickle.Pickler}, path)
    with pytest.raises(DcncError, match="not a readable dcnc checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_corrupt_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(DcncError, match="not a readable dcnc checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DcncError, match="not a readable dcnc checkpoint"):
        load_checkpoint(cut)


def test_spec_that_does_not_match_state_dict_names_the_tensor(saved, tmp_path):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    payload["spec"]["towers"]["ranker"]["deep"] = [16]
    bad = tmp_path / "mismatch.pt"
    torch.save(payload, bad)
    with pytest.raises(DcncError, match="does not match its spec: interaction.deep.0.weight"):
        load_checkpoint(bad)


def test_torch_file_that_is_not_a_dcnc_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(DcncError, match="not a dcnc checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(DcncError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
