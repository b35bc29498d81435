"""The verify report: JSON schema, Markdown, JUnit XML, atomic writes."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from toolkit.evaluate.result import Gate
from toolkit.report.verify import (
    Report,
    junit_xml,
    markdown,
    print_summary,
    to_json,
    write_json,
    write_junit,
)


def parity_entry(cosine_min: float = 0.99999):
    return {"max_abs": 1e-6, "rel_l2": 2e-7, "cosine_mean": 1.0, "cosine_min": cosine_min,
            "error_quantiles": {"p50": 1e-7, "p90": 3e-7, "p99": 8e-7, "p99.9": 1e-6}, "elements": 64,
            "reference_nan": 0, "reference_inf": 0, "candidate_nan": 0, "candidate_inf": 0}


def make_report(failing: bool = False) -> Report:
    stats = {"p50_ms": 1.0, "p90_ms": 1.2, "p99_ms": 1.5, "mean_ms": 1.05, "throughput": 60952.0, "iterations": 5}
    return Report(
        reference="model.pt", candidate="bundle", precision="fp16", device="cpu",
        gates=[Gate("parity.query/embedding.cosine_min", 0.98 if failing else 0.9999, 0.999, ">="),
               Gate("retrieval.agreement@10", 1.0, 0.99, ">=")],
        parity={"query/embedding": parity_entry(float("nan"))},
        retrieval={"queries": 4, "items": 10, "relevant_pairs": 4,
                   "recall": {"reference": {"10": 0.5}, "candidate": {"10": 0.5}},
                   "recall_ratio": {"10": 1.0}, "agreement": {"10": 1.0}},
        latency={"device": "cpu", "timer": "wall_clock", "warmup": 1, "iterations": 5, "noise_method": "block ratios",
                 "towers": {"query": {"64": {"reference": stats, "candidate": stats, "speedup": float("inf"), "noise": 0.01}}}},
        data="eval.npz", seconds=1.5, machine={"host": "ci", "processor": "x86_64", "cpu_count": 2},
    )


def test_json_report_has_the_schema_fields_and_null_for_non_finite_numbers():
    body = to_json(make_report())
    assert body["schema"] == "dcnc.verify/1" and body["passed"] is True
    assert body["gates"][0] == {"name": "parity.query/embedding.cosine_min", "value": 0.9999, "threshold": 0.999,
                                "op": ">=", "passed": True, "reason": None}
    assert body["parity"]["query/embedding"]["cosine_min"] is None  # NaN: JSON has none
    assert body["latency"]["towers"]["query"]["64"]["speedup"] is None
    assert body["retrieval"]["recall"]["candidate"]["10"] == 0.5 and "ranking" not in body
    assert body["machine"]["cpu_count"] == 2


def test_a_failed_gate_makes_the_report_fail():
    report = make_report(failing=True)
    assert not report.passed and [g.name for g in report.failed_gates] == ["parity.query/embedding.cosine_min"]
    assert to_json(report)["passed"] is False


def test_json_is_written_atomically_and_is_strict_json(tmp_path):
    path = tmp_path / "out" / "r.json"
    write_json(make_report(), path)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary file left


def test_junit_has_one_testcase_per_gate_and_a_failure_for_each_failed_gate(tmp_path):
    path = tmp_path / "j.xml"
    write_junit(make_report(failing=True), path)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "1", "0")
    (suite,) = root.findall("testsuite")
    for attribute in ("name", "tests", "failures", "errors", "skipped", "time", "timestamp"):
        assert suite.get(attribute) is not None, attribute
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["parity.query/embedding.cosine_min", "retrieval.agreement@10"]
    assert all(c.get("classname") and float(c.get("time")) >= 0 for c in cases)
    failures = [c.find("failure") for c in cases]
    assert failures[1] is None
    assert failures[0].get("type") == "GateFailed" and "0.98" in failures[0].get("message")
    assert {p.get("name") for p in suite.find("properties")} >= {"reference", "candidate", "precision"}


def test_junit_escapes_names_that_are_not_xml_safe():
    report = make_report()
    report.gates.append(Gate('parity.a<b>&"c".max_abs', 2.0, 1.0, "<="))
    root = ET.fromstring(junit_xml(report).split("\n", 1)[1])
    assert root.find("testsuite").findall("testcase")[-1].get("name") == 'parity.a<b>&"c".max_abs'


def test_markdown_states_the_verdict_and_every_gate():
    text = markdown(make_report(failing=True))
    assert text.startswith("# dcnc verify: FAILED (1 of 2 gates)")
    assert "| parity.query/embedding.cosine_min | 0.98 | >= 0.999 | FAIL |" in text
    assert "## Retrieval" in text and "## Latency" in text


def test_terminal_summary_lists_gates_and_the_verdict():
    console = Console(file=io.StringIO(), width=200)
    print_summary(make_report(), console)
    text = console.file.getvalue()
    assert "retrieval.agreement@10" in text and "verify: PASSED" in text


def test_branch_timings_are_tabled_and_a_skipped_tower_says_why():
    report = make_report()
    report.latency["branches"] = {
        "query": {"batch": 64, "t_cross_ms": 0.3, "t_deep_ms": 0.2, "t_parallel_ms": 0.33, "ratio": 1.1},
        "item": {"skipped": "branch timing needs a parallel tower"},
    }
    text = markdown(report)
    assert "| query | 64 | 0.3 | 0.2 | 0.33 | 1.1 |" in text
    assert "skipped: branch timing needs a parallel tower" in text


def test_a_cuda_report_says_the_reference_computed_without_tf32():
    from toolkit.backends.torch_runner import REFERENCE_MATH

    report = make_report()
    report.device, report.reference_math = "cuda", REFERENCE_MATH
    assert to_json(report)["reference_math"] == REFERENCE_MATH
    assert f"> Note: {REFERENCE_MATH}." in markdown(report)
    console = Console(file=io.StringIO(), width=200)
    print_summary(report, console)
    assert "TF32 off" in console.file.getvalue()
