"""train_examples / ensure_examples (train only when stale) and the `dcnc train` command."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli import app
from toolkit.core.errors import DcncError
from toolkit.example.train import ensure_examples, train_examples
from toolkit.model.checkpoint import read_checkpoint

QUICK = dict(families=("ranking",), epochs=1, quiet=True)


def test_ensure_examples_trains_when_missing_then_skips_when_current(tmp_path):
    first = ensure_examples(tmp_path, **QUICK)
    checkpoint = tmp_path / "ranker.pt"
    written = checkpoint.stat().st_mtime_ns
    second = ensure_examples(tmp_path, **QUICK)
    assert first["ranking"]["trained"] and not second["ranking"]["trained"]
    assert checkpoint.stat().st_mtime_ns == written
    assert second["ranking"]["metrics"] == first["ranking"]["metrics"]


def test_ensure_examples_retrains_when_the_seed_changes_the_key(tmp_path):
    ensure_examples(tmp_path, seed=0, **QUICK)
    key = read_checkpoint(tmp_path / "ranker.pt")["extra"]["key"]
    again = ensure_examples(tmp_path, seed=1, **QUICK)
    assert again["ranking"]["trained"]
    assert read_checkpoint(tmp_path / "ranker.pt")["extra"]["key"] != key


def test_ensure_examples_retrains_when_the_eval_file_is_gone(tmp_path):
    ensure_examples(tmp_path, **QUICK)
    (tmp_path / "ranker_eval.npz").unlink()
    assert ensure_examples(tmp_path, **QUICK)["ranking"]["trained"]
    assert (tmp_path / "ranker_eval.npz").is_file()


def test_unknown_family_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(DcncError, match="family must be one of"):
        train_examples(tmp_path / "out", families=("clustering",), quiet=True)
    assert not (tmp_path / "out").exists()


def test_cli_train_writes_the_checkpoint_and_prints_the_metrics(tmp_path):
    args = ["train", "--family", "ranking", "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "auc" in result.output and (tmp_path / "ranker.pt").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "criteo"], "dataset must be one of"),
        (["--dataset", "movielens", "--data-dir", "/nonexistent/ml-100k"], "MovieLens folder not found"),
        (["--family", "clustering"], "--family must be one of"),
        (["--epochs", "0"], "epochs must be >= 1"),
    ],
)
def test_cli_train_bad_input_exits_2_with_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "out"), "--quiet", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()
