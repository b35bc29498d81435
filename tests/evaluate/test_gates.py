"""Gate thresholds (defaults, gates file, flags), each gate passing and failing, and the latency baseline."""

from __future__ import annotations

import json

import pytest

from toolkit.core.errors import DcncError
from toolkit.evaluate.gates import (
    MAX_LATENCY_TOLERANCE,
    Gate,
    Thresholds,
    baseline_gates,
    evaluate_gates,
    load_baseline,
    resolve_thresholds,
)


def parity_stats(cosine_min=1.0, rel_l2=0.0, max_abs=0.0, nan=0):
    return {"cosine_min": cosine_min, "rel_l2": rel_l2, "max_abs": max_abs, "candidate_nan": nan, "candidate_inf": 0}


def by_name(gates):
    return {g.name: g for g in gates}


def test_each_precision_is_judged_no_tighter_than_the_one_above_it():
    by_precision = [resolve_thresholds(p) for p in ("fp32", "fp16", "bf16", "int8")]
    for stricter, looser in zip(by_precision, by_precision[1:]):
        assert looser.cosine_min <= stricter.cosine_min and looser.rel_l2 >= stricter.rel_l2
        assert looser.agreement <= stricter.agreement and looser.auc_diff >= stricter.auc_diff
    assert by_precision[0].recall_ratio_floor is None  # FP32's recall gate is never relaxed


def test_gates_file_then_flags_override_the_defaults(tmp_path):
    path = tmp_path / "gates.toml"
    path.write_text('precision = "fp16"\n[gates]\nagreement = 0.95\nrecall_ratio = 0.9\n')
    thresholds = resolve_thresholds("fp32", path, {"recall_ratio": 0.99, "cosine_min": None})
    assert thresholds.agreement == 0.95  # from the file
    assert thresholds.recall_ratio == 0.99  # the flag wins over the file
    assert thresholds.cosine_min == 0.99998  # the file's precision picked the fp16 defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[gates\n", "not valid TOML"),
        ("[gates]\ncosine = 0.9\n", "unknown gate 'cosine'"),
        ('[gates]\nagreement = "high"\n', "must be a number"),
        ('precision = "fp8"\n', "precision 'fp8'"),
        ("extra = 1\n", "unknown key 'extra'"),
    ],
)
def test_bad_gates_file_is_refused(tmp_path, text, message):
    path = tmp_path / "gates.toml"
    path.write_text(text)
    with pytest.raises(DcncError, match=message):
        resolve_thresholds("fp32", path)


def test_missing_gates_file_is_refused(tmp_path):
    with pytest.raises(DcncError, match="no such gates file"):
        resolve_thresholds("fp32", tmp_path / "none.toml")


@pytest.mark.parametrize(
    ("stats", "gate", "passed"),
    [
        (parity_stats(cosine_min=0.9999995), "cosine_min", True),
        (parity_stats(cosine_min=0.9998), "cosine_min", False),
        (parity_stats(rel_l2=5e-5), "rel_l2", True),
        (parity_stats(rel_l2=2e-4), "rel_l2", False),
        (parity_stats(max_abs=1e-3), "max_abs", True),
        (parity_stats(max_abs=2e-3), "max_abs", False),
        (parity_stats(cosine_min=float("nan")), "cosine_min", False),
        (parity_stats(cosine_min=0.999998), "cosine_min", False),
        (parity_stats(cosine_min=None), "cosine_min", None),
        (parity_stats(), "nonfinite", True),
        (parity_stats(nan=1), "nonfinite", False),
    ],
)
def test_parity_gates(stats, gate, passed):
    gates = by_name(evaluate_gates(Thresholds(), {"query/embedding": stats}))
    if passed is None:  # an output with one value per row has no cosine: no gate, not a failed one
        assert f"parity.query/embedding.{gate}" not in gates
    else:
        assert gates[f"parity.query/embedding.{gate}"].passed is passed


def retrieval(ratio: float, agreement: float):
    return {"recall_ratio": {"10": ratio}, "agreement": {"10": agreement}}


@pytest.mark.parametrize(
    ("ratio", "agreement", "expected"),
    [(0.9995, 0.995, (True, True)), (0.998, 0.995, (False, True)), (1.0, 0.98, (True, False))],
)
def test_fp16_retrieval_gates(ratio, agreement, expected):
    gates = by_name(evaluate_gates(resolve_thresholds("fp16"), {}, retrieval=retrieval(ratio, agreement)))
    assert (gates["retrieval.recall@10.ratio"].passed, gates["retrieval.agreement@10"].passed) == expected


@pytest.mark.parametrize(
    ("resolution", "threshold", "passed"),
    [(1 / (1995 * 2 * 0.113), 1 - 1 / (1995 * 2 * 0.113), True),  # one hit of a typical (2-item) query
     (1 / (1995 * 6 * 0.113), 0.999, False),  # 6 items a query resolve finer than the gate: no relief
     (1 / (20 * 0.04), 0.995, False)],  # 20 queries at recall 0.04: relief stops at the floor, never below
)
def test_fp16_recall_gate_is_never_finer_than_the_data_resolves_nor_below_its_floor(resolution, threshold, passed):
    data = {**retrieval(0.9985, 0.9995), "recall_ratio_resolution": {"10": resolution}}
    data["recall_ratio"]["10"] = 0.9985 if passed or threshold == 0.999 else 0.99
    gate = by_name(evaluate_gates(resolve_thresholds("fp16"), {}, retrieval=data))["retrieval.recall@10.ratio"]
    assert gate.threshold == pytest.approx(threshold) and gate.passed is passed


def test_fp32_recall_gate_is_never_relaxed():
    data = {**retrieval(0.9985, 1.0), "recall_ratio_resolution": {"10": 0.5}}
    gate = by_name(evaluate_gates(resolve_thresholds("fp32"), {}, retrieval=data))["retrieval.recall@10.ratio"]
    assert gate.threshold == 0.999 and not gate.passed


@pytest.mark.parametrize(("auc_diff", "passed"), [(-5e-4, True), (-2e-3, False), (2e-3, False)])
def test_auc_gate_bounds_the_difference_either_way(auc_diff, passed):
    ranking = {"outputs": {"logit": {"auc": {"diff": auc_diff}, "logloss": {"diff": 0.0}}}}
    gates = by_name(evaluate_gates(resolve_thresholds("fp16"), {}, ranking=ranking))
    assert gates["ranking.logit.auc_diff"].passed is passed
    assert gates["ranking.logit.logloss_diff"].passed


def test_min_speedup_gate_is_off_by_default_and_checks_when_set():
    latency = {"towers": {"ranker": {"64": {"speedup": 1.5}}}}
    assert not [g for g in evaluate_gates(Thresholds(), {}, latency=latency) if "speedup" in g.name]
    gates = by_name(evaluate_gates(Thresholds(min_speedup=2.0), {}, latency=latency))
    assert not gates["latency.ranker.b64.speedup"].passed


def latency_entry(reference_ms: float, candidate_ms: float, noise: float = 0.0):
    return {"reference": {"p50_ms": reference_ms}, "candidate": {"p50_ms": candidate_ms}, "speedup": reference_ms / candidate_ms,
            "noise": noise}


def report_with(entry):
    return {"schema": "dcnc.verify/1", "latency": {"towers": {"ranker": {"64": entry}}}}


def test_baseline_regression_beyond_noise_fails():
    baseline = report_with(latency_entry(10.0, 2.0))
    now = report_with(latency_entry(10.0, 2.6, noise=0.05))["latency"]  # candidate 30 % slower, noise 5 %
    (gate,) = baseline_gates(now, baseline, floor=0.02)
    assert gate.value == pytest.approx(0.3) and gate.threshold == 0.05 and not gate.passed


def test_baseline_difference_within_noise_passes():
    baseline = report_with(latency_entry(10.0, 2.0))
    now = report_with(latency_entry(10.0, 2.06, noise=0.05))["latency"]  # 3 % slower, noise 5 %
    (gate,) = baseline_gates(now, baseline, floor=0.02)
    assert gate.passed


def test_a_20_percent_regression_fails_on_a_quiet_run():
    baseline = report_with(latency_entry(10.0, 2.0))
    now = report_with(latency_entry(10.0, 2.5, noise=0.04))["latency"]  # speedup 5x -> 4x
    (gate,) = baseline_gates(now, baseline, floor=0.02)
    assert gate.value == pytest.approx(0.25) and not gate.passed and gate.reason is None


def test_the_baselines_own_noise_counts_with_this_runs():
    baseline = report_with(latency_entry(10.0, 2.0, noise=0.06))
    now = report_with(latency_entry(10.0, 2.2, noise=0.09))["latency"]  # 10 % slower: inside +-6 % and +-9 % together
    (gate,) = baseline_gates(now, baseline, floor=0.02)
    assert gate.threshold == pytest.approx(0.108, abs=1e-3) and gate.passed


def test_a_noisy_run_never_tolerates_more_than_25_percent_and_says_it_cannot_judge():
    baseline = report_with(latency_entry(10.0, 2.0))
    now = report_with(latency_entry(10.0, 2.1, noise=0.89))["latency"]  # the noise once measured under load
    (gate,) = baseline_gates(now, baseline, floor=0.02)
    assert gate.threshold == MAX_LATENCY_TOLERANCE == 0.25
    assert not gate.passed and gate.reason.startswith("inconclusive")


def test_an_inconclusive_latency_fails_its_speedup_gate_with_the_load_named():
    entry = {**latency_entry(10.0, 2.0, noise=0.6), "verdict": "inconclusive"}
    latency = {"towers": {"ranker": {"64": entry}}, "load": {"busy": 1.4, "cores": 2}}
    (gate,) = evaluate_gates(Thresholds(min_speedup=1.0), {}, latency=latency)
    assert not gate.passed and gate.value == 5.0
    assert gate.reason == "inconclusive: the speedup's 95% interval is ±60% with 1.4 of 2 cores busy"


def test_baseline_comparison_cancels_a_machine_wide_slowdown():
    baseline = report_with(latency_entry(10.0, 2.0))
    now = report_with(latency_entry(15.0, 3.0, noise=0.01))["latency"]  # everything 50 % slower: a busy machine
    (gate,) = baseline_gates(now, baseline, floor=0.02)
    assert gate.value == pytest.approx(0.0) and gate.passed


def test_baseline_without_common_batches_is_refused():
    baseline = {"schema": "dcnc.verify/1", "latency": {"towers": {"ranker": {"1": latency_entry(1.0, 1.0)}}}}
    with pytest.raises(DcncError, match="no tower and batch size in common"):
        baseline_gates(report_with(latency_entry(1.0, 1.0))["latency"], baseline, floor=0.02)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such baseline"), ("{", "not valid JSON"), ('{"schema": "other"}', "not a verify report"),
     ('{"schema": "dcnc.verify/1", "latency": null}', "no latency section")],
)
def test_bad_baseline_file_is_refused(tmp_path, content, message):
    path = tmp_path / "old.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DcncError, match=message):
        load_baseline(path)


def test_baseline_file_round_trips(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report_with(latency_entry(1.0, 0.5))))
    assert load_baseline(path)["latency"]["towers"]["ranker"]["64"]["speedup"] == 2.0


def test_a_nan_value_fails_its_gate():
    assert not Gate("x", float("nan"), 1.0, "<=").passed
