"""The HTML report: well-formed, one chart per plotted quantity, failing gates marked, text escaped, 1..N targets,
partial reports rendered, atomic writes, and `dcnc verify --html`."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner
from verify_cases import CLI_FAST, FAST, EmbeddingTower, LogitTower, ranking_case

from cli import app
from toolkit.core.errors import DcncError
from toolkit.evaluate.evaldata import RetrievalEval
from toolkit.evaluate.gates import Thresholds, resolve_thresholds
from toolkit.evaluate.verify import VerifyOptions, verify_runners
from toolkit.report.html import HISTOGRAM_BARS, render_html, write_html
from toolkit.report.verify import speedup_text, to_json

VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}


class TagBalance(HTMLParser):
    """Records every start tag and any end tag that does not close the innermost open element."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.starts: list[tuple[str, dict[str, str]]] = []
        self.mismatched: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.mismatched.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> TagBalance:
    parser = TagBalance()
    parser.feed(page)
    parser.close()
    assert parser.stack == [] and parser.mismatched == [], (parser.stack, parser.mismatched)
    return parser


def chart_titles(page: str) -> list[str]:
    return [attrs["aria-label"] for tag, attrs in parse(page).starts if tag == "svg"]


def retrieval_data() -> RetrievalEval:
    rng = np.random.default_rng(0)
    queries = {"dense": rng.standard_normal((30, 6)).astype(np.float32)}
    items = {"dense": rng.standard_normal((120, 6)).astype(np.float32)}
    relevance = np.stack([np.arange(30), rng.integers(0, 120, 30)], axis=1)
    return RetrievalEval(queries, items, relevance)


def retrieval_report(noise: float) -> dict:
    """The JSON verify report of numpy towers whose candidate weights are off by `noise`."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 8))
    candidate = weight + noise * rng.standard_normal(weight.shape)
    towers = {"query": ["embedding"], "item": ["embedding"]}
    report = to_json(verify_runners({t: EmbeddingTower(weight) for t in towers},
                                    {t: EmbeddingTower(candidate) for t in towers}, towers, retrieval_data(),
                                    Thresholds(), FAST))
    for batches in report["latency"]["towers"].values():  # stand-ins time noisily: the page is what is tested
        for entry in batches.values():
            entry.update(verdict="conclusive", noise=0.05)
    return report


@pytest.fixture(scope="module")
def faithful():
    return retrieval_report(1e-6)  # fp32-like: passes every gate, errors well above 1e-12


@pytest.fixture(scope="module")
def broken():
    return retrieval_report(0.3)


def test_page_is_well_formed_html_without_scripts_or_external_resources(faithful):
    page = render_html({"ort-fp32": faithful})
    tags = {tag for tag, _ in parse(page).starts}
    assert page.startswith("<!DOCTYPE html>") and "script" not in tags and "link" not in tags
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no CDN, nothing fetched


def test_retrieval_report_has_one_chart_per_output_histogram_recall_curve_and_tower_latency(faithful):
    titles = chart_titles(render_html({"ort-fp32": faithful}))
    assert sorted(titles) == sorted([
        "query/embedding: |candidate - reference|", "item/embedding: |candidate - reference|", "recall@K",
        "query: latency (band to p90)", "item: latency (band to p90)",
    ])


def test_latency_chart_draws_p50_of_both_sides_at_every_batch_with_a_p90_band(faithful):
    page = render_html({"ort-fp32": faithful})
    query_chart = re.search(r'<svg[^>]*aria-label="query: latency[^"]*".*?</svg>', page, re.S).group(0)
    assert query_chart.count("<polyline") == 2 and query_chart.count("<polygon") == 2
    assert query_chart.count("<circle") == 2 * len(FAST.batch_sizes)
    p50 = faithful["latency"]["towers"]["query"]["8"]["candidate"]["p50_ms"]
    assert f"candidate p50: 8, {p50:.3g}" in query_chart  # the point's tooltip holds the measured value


def test_error_histogram_draws_every_counted_error_in_at_most_the_bar_budget(broken):
    page = render_html({"ort-fp16": broken})
    chart = re.search(r'<svg[^>]*aria-label="item/embedding: \|candidate[^"]*".*?</svg>', page, re.S).group(0)
    counts = [int(c) for c in re.findall(r"\]: (\d+)</title></rect>", chart)]
    histogram = broken["parity"]["item/embedding"]["histogram"]
    assert sum(counts) == sum(histogram["counts"]) == broken["parity"]["item/embedding"]["elements"]
    assert 1 < len(counts) <= HISTOGRAM_BARS


def test_exact_matches_are_counted_beside_the_histogram(faithful):
    report = json.loads(json.dumps(faithful))
    report["parity"]["query/embedding"]["histogram"] = {"edges": [], "counts": [],
                                                        "at_or_below": {"value": 1e-12, "count": 240}}
    page = render_html({"ort-fp32": report})
    assert "query/embedding: all 240 errors at or below 1e-12: nothing to draw." in page
    report["parity"]["query/embedding"]["histogram"] = {"edges": [1e-7, 2e-7], "counts": [16],
                                                        "at_or_below": {"value": 1e-12, "count": 240}}
    page = render_html({"ort-fp32": report})
    assert "240 elements with error at or below 1e-12 (exact matches) are not drawn." in page
    assert "(1e-07, 2e-07]: 16</title></rect>" in page


def test_a_failing_gate_is_marked_in_its_row_and_in_the_overview(broken):
    page = render_html({"ort-fp16": broken})
    parser = parse(page)
    assert broken["passed"] is False
    failing = [g["name"] for g in broken["gates"] if not g["passed"]]
    for name in failing:
        row = re.search(rf'<tr class="(\w+)"><td>{re.escape(name)}</td>.*?</tr>', page).group(0)
        assert row.startswith('<tr class="fail">') and "<td>FAIL</td>" in row
    total = len(broken["gates"])
    assert 'class="badge fail"' in page and f"Gates: {total - len(failing)} of {total} passed" in page
    assert sum(1 for tag, attrs in parser.starts if tag == "tr" and attrs.get("class") == "fail") == len(failing) + 1


def test_names_are_shown_as_text_never_as_markup(faithful):
    report = json.loads(json.dumps(faithful))
    report["parity"] = {"<script>alert(1)</script>/embedding": report["parity"]["query/embedding"]}
    report["latency"]["towers"] = {"<script>": report["latency"]["towers"]["query"]}
    report["candidate"] = 'bundles/"x"&<b>'
    page = render_html({"<img src=x onerror=alert(1)>": report}, title="<h1>title</h1>")
    parser = parse(page)
    assert {tag for tag, _ in parser.starts}.isdisjoint({"script", "img", "b"})
    assert [tag for tag, _ in parser.starts].count("h1") == 1
    text = "".join(parser.text)
    assert "<script>alert(1)</script>/embedding" in text and "<img src=x onerror=alert(1)>" in text
    assert "<script>: latency (band to p90)" in text and 'bundles/"x"&<b>' in text


def test_several_targets_get_an_overview_row_a_section_and_a_speedup_chart_per_tower(faithful, broken):
    page = render_html({"ort-fp32": faithful, "ort-fp16": broken})
    overview = page.split("<h2>Overview</h2>", 1)[1].split("<section", 1)[0]
    rows = re.findall(r"<tr class=\"(\w+)\"><td><a href=\"#(target-\d)\">([^<]+)</a>", overview)
    assert rows == [("pass", "target-0", "ort-fp32"), ("fail", "target-1", "ort-fp16")]
    sections = re.findall(r'<section id="(target-\d)"><h2>([^<]+) ', page)
    assert sections == [("target-0", "ort-fp32"), ("target-1", "ort-fp16")]
    titles = chart_titles(page)
    assert titles.count("query: speedup over the reference") == 1 and titles.count("recall@K") == 2
    assert "1 of 2 target(s) did not pass: ort-fp16" in page


def test_an_inconclusive_speedup_is_shown_as_such_and_not_drawn(faithful):
    report = json.loads(json.dumps(faithful))
    for entry in report["latency"]["towers"]["query"].values():
        entry.update(verdict="inconclusive", noise=0.6)
    page = render_html({"ort-fp32": report, "ort-fp16": report})  # the speedup charts compare several targets
    assert "query: speedup over the reference" not in chart_titles(page)
    assert "query: no speedup to draw: every figure was inconclusive." in page and "inconclusive ±60%" in page


def test_a_chart_names_the_inconclusive_points_it_leaves_out(faithful):
    report = json.loads(json.dumps(faithful))
    first = next(iter(report["latency"]["towers"]["query"]))
    report["latency"]["towers"]["query"][first].update(verdict="inconclusive", noise=0.6)
    page = render_html({"ort-fp32": faithful, "ort-fp16": report})
    assert "query: speedup over the reference" in chart_titles(page)
    assert f"query: not drawn, inconclusive: ort-fp16 @{first}." in page


def test_the_overview_shows_worst_cosine_recall_ratio_and_speedup_at_the_largest_batch(broken):
    page = render_html({"ort-fp16": broken})
    cosine = min(s["cosine_min"] for s in broken["parity"].values())
    k, ratio = min(broken["retrieval"]["recall_ratio"].items(), key=lambda kv: kv[1])
    speedup = speedup_text(broken["latency"]["towers"]["query"]["8"])
    row = page.split("<h2>Overview</h2>", 1)[1].split("</tr>", 2)[1]
    assert f"{cosine:.8g}" in row and f"recall@{k} {ratio:.6g}" in row and f"query {speedup} @8" in row


def test_ranking_report_draws_auc_and_logloss_bars_of_both_sides():
    w, data = ranking_case(200)
    report = to_json(verify_runners({"ranker": LogitTower(w)}, {"ranker": LogitTower(w + 0.05)},
                                    {"ranker": ["logit", "probability"]}, data, resolve_thresholds("fp16"),
                                    VerifyOptions(latency=False)))
    page = render_html({"ort-int8": report})
    titles = chart_titles(page)
    assert {"AUC", "log loss", "ranker/logit: |candidate - reference|"} <= set(titles) and "recall@K" not in titles
    auc = re.search(r'aria-label="AUC".*?</svg>', page, re.S).group(0)
    reference = report["ranking"]["outputs"]["logit"]["auc"]["reference"]
    assert auc.count("<rect") == 2 and f"logit reference: {reference:.6g}" in auc
    assert "Not measured in this run." in page


def test_branch_timings_are_drawn_and_a_skipped_tower_says_why(faithful):
    report = json.loads(json.dumps(faithful))
    report["latency"]["branches"] = {
        "query": {"batch": 8, "t_cross_ms": 0.3, "t_deep_ms": 0.2, "t_parallel_ms": 0.33, "ratio": 1.1},
        "item": {"skipped": "branch timing needs a parallel tower"},
    }
    page = render_html({"ort-fp32": report})
    chart = re.search(r'aria-label="cross and deep branches \(ORT CPU\)".*?</svg>', page, re.S).group(0)
    assert chart.count("<rect") == 3 and "query both together: 0.33 ms" in chart
    assert "skipped: branch timing needs a parallel tower" in page


def test_a_report_with_nan_none_and_missing_sections_still_renders(faithful):
    report = {"schema": "dcnc.verify/1", "passed": None, "gates": [{"name": "parity.x.cosine_min", "value": None,
                                                                      "threshold": 0.999, "op": ">=", "passed": False}],
              "parity": {"x": {"max_abs": None, "cosine_min": float("nan"), "error_quantiles": {}}},
              "latency": {"towers": {"x": {"1": {"reference": {"p50_ms": None}, "candidate": {}, "speedup": None}}}}}
    page = render_html({"partial": report, "whole": faithful})
    parse(page)
    assert 'class="badge unknown"' in page and "x: no error histogram in this report." in page
    assert "x: latency (band to p90): no finite values to plot." in page
    assert '<tr><td>x</td>' + '<td class="num">n/a</td>' * 7 + '<td class="num">0</td>' in page  # None, NaN: n/a


@pytest.mark.parametrize("reports, message", [
    ({}, "no verify reports"),
    ({"old": {"schema": "dcnc.verify/0", "passed": True}}, "target 'old' is not a verify report"),
    ({"junk": [1, 2]}, "target 'junk' is not a verify report"),
])
def test_what_is_not_a_verify_report_is_refused_and_nothing_is_written(tmp_path, reports, message):
    with pytest.raises(DcncError, match=message):
        write_html(reports, tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_the_page_is_written_atomically_into_a_new_folder(tmp_path, faithful):
    path = tmp_path / "out" / "report.html"
    write_html({"ort-fp32": faithful}, path, title="nightly")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temporary file left behind
    assert "<title>nightly</title>" in path.read_text()


@pytest.mark.slow
def test_cli_verify_html_writes_the_page_named_after_the_bundle(verify_case, tmp_path):
    page = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(verify_case / "broken"), "--data",
                                      str(verify_case / "eval.npz"), "--html", str(page), *CLI_FAST])
    assert result.exit_code == 1, result.output  # a failed gate still writes the page
    assert f"HTML report: {page}" in result.output
    html = page.read_text()
    assert re.search(r'<section id="target-0"><h2>broken <span class="badge fail">', html)
    assert {"query: latency (band to p90)", "recall@K"} <= set(chart_titles(html))


@pytest.mark.slow
def test_cli_verify_html_where_no_folder_can_be_made_exits_2(verify_case, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = CliRunner().invoke(app, ["verify", str(verify_case / "model.pt"), str(verify_case / "bundle"), "--data",
                                      str(verify_case / "eval.npz"), "--html", str(blocked / "sub" / "r.html"),
                                      "--no-latency", "--k", "1", "--no-branches"])
    assert result.exit_code == 2 and "r.html: cannot be created" in result.output
