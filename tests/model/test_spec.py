"""Spec files: TOML round trips, and every field that cannot describe a model is named in one error."""

import pytest

from toolkit.core.errors import DcncError
from toolkit.model.spec import (
    CrossSpec,
    DenseFeature,
    ModelSpec,
    SparseFeature,
    TowerSpec,
)


def ranking_spec(**tower) -> ModelSpec:
    fields = {"sparse": [SparseFeature("user", 10, 4)], "dense": [DenseFeature("d", 3)], "deep": [8]} | tower
    return ModelSpec("ranking", {"ranker": TowerSpec(**fields)})


def test_spec_survives_a_toml_round_trip(tmp_path):
    spec = ranking_spec(cross=CrossSpec(kind="mixture", experts=2, activation="tanh", diag_scale=0.5))
    spec.save(tmp_path / "m.toml")
    assert ModelSpec.load(tmp_path / "m.toml") == spec


def test_input_width_sums_embedding_and_dense_dims():
    assert ranking_spec().towers["ranker"].input_width == 4 + 3


@pytest.mark.parametrize(
    "text, message",
    [
        ('family = "ranking"', "needs a \\[towers.NAME\\] table"),
        ('family = "other"\n[towers.ranker]\ndense=[{name="d",dim=2}]', "family must be one of"),
        ('family = "ranking"\n[towers.x]\ndense=[{name="d",dim=2}]', "towers \\['ranker'\\]"),
        ('family = "ranking"\n[towers.ranker]\ndense=[{name="d",dim=2}]\nwidth=3', "unknown field"),
        ('family = "ranking"\n[towers.ranker]\ndense=[{name="d",dim=2}]\nstructure="x"', "structure must be"),
        ('family = "ranking"\n[towers.ranker]\ndense=[{name="d",dim=2}]\ncross={kind="x"}', "kind must be"),
        ('family = "ranking"\n[towers.ranker]\ndense=[{name="d",dim=2}]\nout_dim=2', "one logit"),
        ('family = "ranking"\n[towers.ranker]\ndense=[{name="d",dim=2},{name="d",dim=1}]', "unique"),
        ('family = "projection"\ntasks=["a"]\n[towers.engagement]\ndense=[{name="d",dim=2}]', "\\[sequence\\]"),
        ("family = = 1", "not valid TOML"),
    ],
)
def test_invalid_spec_names_the_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(DcncError, match=message) as err:
        ModelSpec.load(path)
    assert str(path) in str(err.value)


def test_missing_spec_file_is_a_user_error(tmp_path):
    with pytest.raises(DcncError, match="absent.toml: no such spec file"):
        ModelSpec.load(tmp_path / "absent.toml")
