"""verify_runners on small numpy runners: retrieval and ranking metrics, gates, latency, baseline, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from verify_cases import FAST, EmbeddingTower, LogitTower, ranking_case

from toolkit.core.errors import DcncError
from toolkit.evaluate.evaldata import RetrievalEval
from toolkit.evaluate.gates import Thresholds, resolve_thresholds
from toolkit.evaluate.metrics import auc, logloss
from toolkit.evaluate.verify import VerifyOptions, run_batched, verify_runners


@pytest.fixture(scope="module")
def retrieval_case():
    """40 queries, 300 items; each query's relevant items are its 3 best under the true weights."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 8))
    queries = {"dense": rng.standard_normal((40, 6)).astype(np.float32)}
    items = {"dense": rng.standard_normal((300, 6)).astype(np.float32)}
    tower = EmbeddingTower(weight)
    scores = tower.infer(queries)["embedding"] @ tower.infer(items)["embedding"].T
    best = np.argsort(-scores, axis=1)[:, :3]
    relevance = np.stack([np.repeat(np.arange(40), 3), best.ravel()], axis=1)
    return weight, RetrievalEval(queries, items, relevance)


def run_retrieval(weight, candidate_weight, data, thresholds=None, options=FAST, **kwargs):
    reference = {"query": EmbeddingTower(weight), "item": EmbeddingTower(weight)}
    candidate = {"query": EmbeddingTower(candidate_weight), "item": EmbeddingTower(candidate_weight)}
    outputs = {"query": ["embedding"], "item": ["embedding"]}
    return verify_runners(reference, candidate, outputs, data, thresholds or Thresholds(), options, **kwargs)


def test_identical_candidate_passes_every_gate_with_hand_checked_recall(retrieval_case):
    weight, data = retrieval_case
    report = run_retrieval(weight, weight.copy(), data)
    assert report.passed, [g.name for g in report.failed_gates]
    recall = report.retrieval["recall"]
    assert recall["reference"]["1"] == pytest.approx(1 / 3)  # the best item is one of three relevant
    assert recall["reference"]["3"] == pytest.approx(1.0) and recall["candidate"] == recall["reference"]
    assert report.retrieval["agreement"]["10"] == 1.0
    assert report.parity["query/embedding"]["max_abs"] == 0.0 and report.parity["item/embedding"]["elements"] == 300 * 8


def test_perturbed_candidate_fails_parity_and_agreement(retrieval_case):
    weight, data = retrieval_case
    noisy = weight + 0.3 * np.random.default_rng(1).standard_normal(weight.shape)
    report = run_retrieval(weight, noisy, data)
    failed = {g.name for g in report.failed_gates}
    assert {"parity.item/embedding.cosine_min", "retrieval.agreement@10"} <= failed
    assert report.retrieval["agreement"]["10"] < 0.99


def test_item_chunk_size_does_not_change_the_answer(retrieval_case):
    weight, data = retrieval_case
    noisy = weight + 0.1 * np.random.default_rng(2).standard_normal(weight.shape)
    small = run_retrieval(weight, noisy, data, options=VerifyOptions(ks=(1, 3, 10), item_chunk=7, latency=False))
    large = run_retrieval(weight, noisy, data, options=VerifyOptions(ks=(1, 3, 10), item_chunk=1000, latency=False))
    assert small.retrieval == large.retrieval


def test_latency_is_measured_per_tower_and_batch_inside_the_batch_profile(retrieval_case):
    weight, data = retrieval_case
    reference = {"query": EmbeddingTower(weight), "item": EmbeddingTower(weight)}
    candidate = {t: EmbeddingTower(weight, batch_range=(4, 64)) for t in ("query", "item")}
    options = VerifyOptions(ks=(1,), batch_sizes=(1, 8, 16), warmup=2, iterations=5, eval_batch=64)
    report = verify_runners(reference, candidate, {"query": ["embedding"], "item": ["embedding"]}, data, Thresholds(), options)
    assert sorted(report.latency["towers"]) == ["item", "query"]
    assert list(report.latency["towers"]["query"]) == ["8", "16"]  # batch 1 is below the profile's minimum
    entry = report.latency["towers"]["query"]["8"]
    assert entry["reference"]["iterations"] == entry["rounds"] >= 5 and entry["speedup"] > 0 and entry["noise"] >= 0
    assert report.latency["timer"] == "wall_clock"


def test_a_latency_regression_against_the_baseline_fails(retrieval_case):
    weight, data = retrieval_case
    report = run_retrieval(weight, weight, data)
    faster = {"schema": "dcnc.verify/1", "latency": {"towers": {
        t: {b: {**e, "speedup": e["speedup"] * 10} for b, e in batches.items()}
        for t, batches in report.latency["towers"].items()}}}
    again = run_retrieval(weight, weight, data, baseline=faster)
    regressions = [g for g in again.gates if g.name.endswith(".regression")]
    assert regressions and not any(g.passed for g in regressions)  # 10x slower than the baseline's candidate


def test_ranking_reports_auc_and_logloss_of_both_sides(tmp_path):
    w, data = ranking_case()
    candidate_w = w + 0.05
    report = verify_runners({"ranker": LogitTower(w)}, {"ranker": LogitTower(candidate_w)},
                            {"ranker": ["logit", "probability"]}, data, resolve_thresholds("fp16"),
                            VerifyOptions(latency=False))
    logit = report.ranking["outputs"]["logit"]
    dense, labels = data.feeds["dense"], data.labels["logit"]
    assert logit["auc"]["reference"] == pytest.approx(auc(labels, dense @ w), abs=1e-6)
    assert logit["logloss"]["candidate"] == pytest.approx(logloss(labels, dense @ candidate_w), abs=1e-5)
    assert logit["auc"]["diff"] == pytest.approx(logit["auc"]["candidate"] - logit["auc"]["reference"])
    assert sorted(report.parity) == ["ranker/logit", "ranker/probability"]


def test_a_candidate_with_reversed_scores_fails_the_auc_gate():
    w, data = ranking_case()
    report = verify_runners({"ranker": LogitTower(w)}, {"ranker": LogitTower(-w)},
                            {"ranker": ["logit", "probability"]}, data, resolve_thresholds("int8"),
                            VerifyOptions(latency=False))
    assert not {g.name: g for g in report.gates}["ranking.logit.auc_diff"].passed


def test_towers_must_match(retrieval_case):
    weight, data = retrieval_case
    with pytest.raises(DcncError, match="towers"):
        verify_runners({"query": EmbeddingTower(weight)}, {"item": EmbeddingTower(weight)}, {"query": ["embedding"]},
                       data, Thresholds(), FAST)


def test_a_candidate_missing_an_output_is_refused():
    w, data = ranking_case()

    class Renamed(LogitTower):
        def infer(self, feed):
            return {"score": super().infer(feed)["logit"]}

    with pytest.raises(DcncError, match="candidate tower 'ranker' returns \\['score'\\]"):
        verify_runners({"ranker": LogitTower(w)}, {"ranker": Renamed(w)}, {"ranker": ["logit"]}, data,
                       Thresholds(), VerifyOptions(latency=False))


def test_run_batched_pads_a_short_last_block_to_the_minimum_batch():
    tower = EmbeddingTower(np.eye(2), batch_range=(4, 8))
    feeds = {"dense": np.arange(20, dtype=np.float32).reshape(10, 2) + 1}
    outputs = list(run_batched(tower, feeds, 8, tower.batch_range))
    assert tower.calls == [8, 4]  # the last 2 rows padded to 4
    assert [len(o["embedding"]) for o in outputs] == [8, 2]
