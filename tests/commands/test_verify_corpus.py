"""dcnc verify --corpus: recall over a 200k-item Parquet corpus, identical on the local and Ray engines and equal to
verify over the same items in memory; bad corpora and options exit 2 in one line."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from toolkit.commands.embed.command import EngineOptions
from toolkit.commands.verify import Corpus, verify
from toolkit.evaluate.verify import VerifyOptions

OPTIONS = VerifyOptions(ks=(1, 10, 100, 1000), latency=False)


def corpus_verify(case, engine: str, items=None):
    corpus = Corpus(items or case / "items", EngineOptions(engine=engine), "id")
    return verify(case / "model.pt", case / "bundle", case / "eval.npz", options=OPTIONS, branches=False, corpus=corpus)


@pytest.fixture(scope="module")
def local_report(corpus_case):
    return corpus_verify(corpus_case, "local")


@pytest.mark.slow
def test_corpus_recall_equals_verify_over_the_same_items_in_memory(corpus_case, local_report, tmp_path):
    items = pq.read_table(corpus_case / "items")
    ids = items.column("id").to_numpy()
    evaluation = dict(np.load(corpus_case / "eval.npz"))
    row_of = dict(zip(ids, range(len(ids))))
    relevance = evaluation["relevance"]
    evaluation["relevance"] = np.stack([relevance[:, 0], [row_of[i] for i in relevance[:, 1]]], axis=1)
    evaluation["item/user_id"] = items.column("user_id").to_numpy()
    evaluation["item/profile"] = items.column("profile").combine_chunks().flatten().to_numpy().reshape(-1, 6)
    np.savez(tmp_path / "whole.npz", **evaluation)
    whole = verify(corpus_case / "model.pt", corpus_case / "bundle", tmp_path / "whole.npz", options=OPTIONS, branches=False)
    assert local_report.passed and local_report.retrieval["items"] == len(ids)
    for figure in ("recall", "agreement", "recall_ratio"):
        assert local_report.retrieval[figure] == whole.retrieval[figure], figure
    assert 0.1 < local_report.retrieval["recall"]["reference"]["100"] < local_report.retrieval["recall"]["reference"]["1000"] < 1
    assert local_report.parity["item/embedding"]["elements"] == whole.parity["item/embedding"]["elements"]


@pytest.mark.slow
def test_ray_engine_gives_identical_recall_and_parity(corpus_case, local_report, ray_session):
    report = corpus_verify(corpus_case, "ray")
    assert report.retrieval["corpus"].endswith("(ray engine)") and report.retrieval["items"] == 200_000
    for figure in ("recall", "agreement", "recall_ratio", "recall_ratio_resolution"):
        assert report.retrieval[figure] == local_report.retrieval[figure], figure
    for stat in ("max_abs", "cosine_min", "elements"):
        assert report.parity["item/embedding"][stat] == local_report.parity["item/embedding"][stat], stat
    assert report.passed


def small_corpus(case, tmp_path, ids=None, nan: bool = False):
    table = pq.read_table(case / "items").slice(0, 500)
    if nan:
        profile = table.column("profile").combine_chunks().flatten().to_numpy().copy()
        profile[3] = np.nan
        table = table.set_column(2, "profile", pa.FixedSizeListArray.from_arrays(pa.array(profile), 6))
    if ids is not None:
        table = table.set_column(0, "id", ids)
    pq.write_table(table, tmp_path / "items.parquet")
    return tmp_path / "items.parquet"


def run_cli(case, *args):
    return CliRunner().invoke(app, ["verify", str(case / "model.pt"), str(case / "bundle"), "--data",
                                    str(case / "eval.npz"), "--no-latency", "--no-branches", "--quiet", *map(str, args)])  # fmt: skip


@pytest.mark.parametrize("problem", ["missing relevant id", "string ids", "NaN"])
def test_bad_corpus_exits_2_in_one_line(corpus_case, tmp_path, problem):
    items = small_corpus(corpus_case, tmp_path, nan=problem == "NaN",
                         ids=pa.array([str(i) for i in range(500)]) if problem == "string ids" else None)  # fmt: skip
    result = run_cli(corpus_case, "--corpus", items, "--report", tmp_path / "r.json")
    message = {"missing relevant id": "which the corpus", "string ids": "needs integer item ids",
               "NaN": "'profile' holds 1 NaN/Inf values"}[problem]  # fmt: skip
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_an_actor_s_error_reaches_the_terminal_as_its_one_line(corpus_case, tmp_path, ray_session):
    items = small_corpus(corpus_case, tmp_path, nan=True)
    result = run_cli(corpus_case, "--corpus", items, "--engine", "ray")
    assert result.exit_code == 2 and "'profile' holds 1 NaN/Inf values" in result.output, result.output
    result = CliRunner().invoke(app, ["embed", str(corpus_case / "bundle"), "--data", str(items), "--out",
                                      str(tmp_path / "out"), "--engine", "ray", "--quiet"])  # fmt: skip
    assert result.exit_code == 2 and "'profile' holds 1 NaN/Inf values" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_engine_options_need_a_corpus(corpus_case):
    result = run_cli(corpus_case, "--engine", "ray")
    assert result.exit_code == 2 and "pass --corpus" in result.output


def test_a_missing_corpus_exits_2(corpus_case, tmp_path):
    result = run_cli(corpus_case, "--corpus", tmp_path / "nothing.parquet")
    assert result.exit_code == 2 and "no such file or folder" in result.output
