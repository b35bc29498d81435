"""dcnc embed: both engines on a 200k-item Parquet corpus, the keyed no-op rerun, a killed run, and bad inputs
(exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus_cases import ITEMS, items_table, write_items
from typer.testing import CliRunner

from cli import app
from toolkit.backends.torch_runner import TorchRunner
from toolkit.commands.embed.command import EngineOptions, embed
from toolkit.core.fileio import atomic_dir, sibling_prefix
from toolkit.model.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def read_sorted(out: Path) -> pa.Table:
    return pq.read_table(out / "shards").sort_by("id")


def embeddings(table: pa.Table) -> np.ndarray:
    return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)


def leftovers(out: Path) -> list[str]:
    """The output and any staging folder of it (not the lock file a killed run leaves: the next run reuses it)."""
    prefix = sibling_prefix(out)
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name == out.name or (p.name.startswith(prefix) and not p.name.endswith(".lock")))


def run_cli(*args: str):
    return CliRunner().invoke(app, ["embed", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def local_out(corpus_case, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "local"
    embed(corpus_case / "bundle", corpus_case / "items", out, shard_rows=80_000)
    return out


@pytest.mark.slow
def test_local_engine_embeds_every_item_under_its_own_id(corpus_case, local_out):
    manifest = json.loads((local_out / "manifest.json").read_text())
    assert manifest["schema"] == "dcnc.embed/1" and manifest["rows"] == ITEMS and manifest["tower"] == "item"
    assert [s["rows"] for s in manifest["shards"]] == [80_000, 80_000, 40_000]
    assert manifest["engine"]["name"] == "local" and manifest["engine"]["batch_size"] == 4096
    assert manifest["items_per_s"] > 0 and manifest["bundle"]["precision"] == "fp32"
    table = pq.read_table(local_out / "shards")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    # each row's embedding is the PyTorch tower's on that id's features (rows picked across files and batches)
    items = pq.read_table(corpus_case / "items")
    picked = np.random.default_rng(0).choice(ITEMS, 300, replace=False)
    by_id = dict(zip(table.column("id").to_numpy(), range(table.num_rows)))
    model, _, _ = load_checkpoint(corpus_case / "model.pt")
    feeds = {"user_id": items.column("user_id").to_numpy()[picked],
             "profile": items.column("profile").combine_chunks().flatten().to_numpy().reshape(-1, 6)[picked]}
    with TorchRunner(model.item) as torch_runner:
        expected = torch_runner.infer(feeds)["embedding"]
    rows = [by_id[i] for i in items.column("id").to_numpy()[picked]]
    np.testing.assert_allclose(embeddings(table.take(rows)), expected, atol=1e-5)


@pytest.mark.slow
def test_ray_engine_gives_identical_embeddings(corpus_case, local_out, ray_session, tmp_path):
    out = tmp_path / "ray"
    manifest, current = embed(corpus_case / "bundle", corpus_case / "items", out,
                              options=EngineOptions(engine="ray"), shard_rows=80_000)  # fmt: skip
    assert not current and manifest["rows"] == ITEMS and manifest["engine"]["name"] == "ray"
    assert manifest["engine"]["concurrency"] == 1  # 2 CPUs: one actor, one CPU for reading and writing
    assert read_sorted(out).equals(read_sorted(local_out))


@pytest.mark.slow
def test_rerun_with_the_same_inputs_is_a_no_op(corpus_case, local_out):
    before = {p: p.stat().st_mtime_ns for p in local_out.rglob("*")}
    result = run_cli(corpus_case / "bundle", "--data", corpus_case / "items", "--out", local_out, "--shard-rows", 80_000)
    assert result.exit_code == 0 and "current" in result.output
    assert {p: p.stat().st_mtime_ns for p in local_out.rglob("*")} == before


def test_other_inputs_replace_an_output_only_with_force(corpus_case, tmp_path):
    rng = np.random.default_rng(5)
    items = write_items(tmp_path / "few", {"user_id": rng.integers(0, 50, 100),
                                            "profile": rng.standard_normal((100, 6)).astype(np.float32)}, np.arange(100))  # fmt: skip
    out = tmp_path / "out"
    embed(corpus_case / "bundle", items, out)
    result = run_cli(corpus_case / "bundle", "--data", items, "--out", out, "--batch-size", 64)
    assert result.exit_code == 2 and "not made from these inputs (pass --force" in result.output
    result = run_cli(corpus_case / "bundle", "--data", items, "--out", out, "--batch-size", 64, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["engine"]["batch_size"] == 64
    assert leftovers(out) == ["out"]


def test_npz_items_take_row_numbers_as_ids(corpus_case, tmp_path):
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "items.npz", user_id=rng.integers(0, 50, 30), profile=rng.standard_normal((30, 6)).astype(np.float32))
    manifest, _ = embed(corpus_case / "bundle", tmp_path / "items.npz", tmp_path / "out", options=EngineOptions(batch_size=16))
    assert manifest["rows"] == 30
    assert read_sorted(tmp_path / "out").column("id").to_pylist() == list(range(30))


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_and_a_rerun_completes(corpus_case, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "cli", "embed", str(corpus_case / "bundle"), "--data", str(corpus_case / "items"),
               "--out", str(out), "--batch-size", "64", "--shard-rows", "2000", "--quiet"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f"{sibling_prefix(out)}*/shards/part-00001.parquet")):  # mid-run: shards written
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and len(leftovers(out)) == 1  # only the dead run's hidden staging folder
    result = run_cli(corpus_case / "bundle", "--data", corpus_case / "items", "--out", out, "--shard-rows", 100_000)
    assert result.exit_code == 0, result.output
    assert leftovers(out) == [out.name]  # the staging folder of the killed run is gone
    assert not list(tmp_path.glob(f"{sibling_prefix(out)}*"))  # and the lock file it left
    assert json.loads((out / "manifest.json").read_text())["rows"] == ITEMS


def test_a_second_run_while_one_writes_the_output_fails_and_keeps_its_staging(corpus_case, tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, force=True) as staging:  # a run that is writing `out` holds its lock
        (staging / "shards").mkdir()
        result = run_cli(corpus_case / "bundle", "--data", small_items(tmp_path), "--out", out)
        assert result.exit_code == 2 and "another dcnc process is writing it" in result.output, result.output
        assert (staging / "shards").is_dir()


def small_items(tmp_path: Path, rows: int = 200, **change) -> Path:
    """A Parquet folder of `rows` good items, with columns replaced by `change` (None drops one)."""
    rng = np.random.default_rng(8)
    table = items_table({"user_id": rng.integers(0, 50, rows), "profile": rng.standard_normal((rows, 6)).astype(np.float32)},
                        np.arange(rows))  # fmt: skip
    for name, column in change.items():
        index = table.schema.get_field_index(name)
        table = table.remove_column(index) if column is None else table.set_column(index, name, column)
    (tmp_path / "items").mkdir()
    pq.write_table(table, tmp_path / "items" / "part.parquet", row_group_size=64)
    return tmp_path / "items"


def late_nan() -> pa.Array:
    profile = np.random.default_rng(9).standard_normal((200, 6)).astype(np.float32)
    profile[170, 2] = np.nan  # in the third batch of 64: found after the first rows were staged
    return pa.FixedSizeListArray.from_arrays(pa.array(profile.ravel()), 6)


BAD_ITEMS = {
    "missing column": ({"profile": None}, "no column 'profile' for the tower's input profile:float32"),
    "no id column": ({"id": None}, "no id column 'id'"),
    "wrong dtype": ({"profile": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(1200)), 6)},
                    "column 'profile' is fixed_size_list<double>[6]; the tower's input"),
    "wrong width": ({"profile": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(1000, np.float32)), 5)},
                    "is fixed_size_list<float>[5]; the tower's input profile:float32:batch,6 needs fixed_size_list<float>[6]"),
    "variable-length lists": ({"profile": pa.array([[0.0] * 6] * 200, pa.list_(pa.float32()))}, "is list<float>"),
    "NaN": ({"profile": late_nan()}, "(the batch of ids 128..191): 'profile' holds 1 NaN/Inf values"),
    "id past its table": ({"user_id": pa.array(np.full(200, 50))}, "'user_id' holds id 50, outside [0, 50)"),
    "nulls": ({"user_id": pa.array([None] + [1] * 199, pa.int64())}, "'user_id' holds 1 nulls"),
}


@pytest.mark.parametrize("problem", BAD_ITEMS)
def test_bad_items_exit_2_in_one_line_and_write_nothing(corpus_case, tmp_path, problem):
    change, message = BAD_ITEMS[problem]
    items = small_items(tmp_path, **change)
    result = run_cli(corpus_case / "bundle", "--data", items, "--out", tmp_path / "out", "--batch-size", 64)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert leftovers(tmp_path / "out") == []


def test_empty_corpus_and_unwritable_out_exit_2(corpus_case, tmp_path):
    (tmp_path / "empty").mkdir()
    empty = small_items(tmp_path / "empty", rows=0)
    result = run_cli(corpus_case / "bundle", "--data", empty, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no rows (the corpus is empty)" in result.output
    (tmp_path / "a-file").write_text("")
    result = run_cli(corpus_case / "bundle", "--data", small_items(tmp_path), "--out", tmp_path / "a-file" / "out")
    assert result.exit_code == 2 and "a-file is not a folder" in result.output
    assert leftovers(tmp_path / "out") == []


def test_bad_options_exit_2(corpus_case, tmp_path):
    items = small_items(tmp_path)
    for options, message in (
        (["--tower", "user"], "no tower 'user'"),
        (["--batch-size", "8192"], "built for batches 1..4096"),
        (["--engine", "spark"], "--engine 'spark'"),
        (["--concurrency", "2"], "for --engine ray"),
        (["--id-column", "embedding"], "also the name of a tower output"),
    ):
        result = run_cli(corpus_case / "bundle", "--data", items, "--out", tmp_path / "out", *options)
        assert result.exit_code == 2 and message in result.output, (options, result.output)
    assert leftovers(tmp_path / "out") == []


def test_without_ray_the_ray_engine_exits_2_with_the_install_hint(corpus_case, tmp_path, monkeypatch):
    for module in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as where it is absent
    result = run_cli(corpus_case / "bundle", "--data", small_items(tmp_path), "--out", tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 2 and "pip install 'dcnc[ray]'" in result.output
    assert leftovers(tmp_path / "out") == []


def test_help_teaches_the_formats_and_engines():
    result = CliRunner().invoke(app, ["embed", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("fixed-size list", "manifest.json", "--engine ray --address auto", "docs/scale.md", "[default: local]"):
        assert text in " ".join(result.output.split()), text
