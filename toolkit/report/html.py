"""The HTML report: one self-contained page (inline CSS and SVG, no script, no network) of one or more verify reports.

The page opens with an overview table of every target (verdict, worst cosine, worst recall or AUC ratio, speedup,
failed gates), then one section per target: gates, parity with an error histogram per output, recall@K curves or
AUC / log-loss bars, latency-vs-batch curves per tower, branch timings, and the machine and library versions.
Input is what `toolkit.report.verify.to_json` returns (schema dcnc.verify/1); a section the report lacks is left out and
a missing or non-finite number shows as "n/a", so partial and failed runs still render.
"""

from __future__ import annotations

import datetime
import math
from html import escape
from pathlib import Path
from typing import Any

from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_write_text
from toolkit.evaluate.latency import INCONCLUSIVE
from toolkit.evaluate.result import SCHEMA
from toolkit.report.svgchart import PALETTE, Bar, Series, bar_chart, line_chart, usable
from toolkit.report.verify import format_number, format_rate, gate_result, speedup_text

REFERENCE_COLOR, CANDIDATE_COLOR = PALETTE[0], PALETTE[1]
HISTOGRAM_BARS = 48  # at most this many bars per error histogram: neighbouring log bins are merged

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e4e4e4; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.fail td { background: #fde8e8; color: #a40000; } tr.pass td.verdict { color: #1a7f37; }
.badge { display: inline-block; padding: .05em .6em; border-radius: .8em; color: #fff; font-size: .8em; }
.badge.pass { background: #1a7f37; } .badge.fail { background: #c62828; } .badge.unknown { background: #888; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } .note { color: #666; font-size: .9em; }
.chart-with-note { max-width: 580px; }
svg.chart { background: #fff; border: 1px solid #e4e4e4; }
code { background: #f4f4f4; padding: 0 .25em; }
"""


class Html(str):
    """Markup built here (already escaped): a table cell holding it is not escaped again."""


def _cell(value: Any, numeric: bool) -> str:
    if isinstance(value, Html):
        return f"<td>{value}</td>"
    text = value if isinstance(value, str) else format_number(value)
    return f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"


def _table(header: list[str], rows: list[list[Any]], row_class: list[str] | None = None,
           numeric: tuple[int, int] = (1, 99)) -> str:
    """A table whose cells are escaped (numbers formatted, Html kept); columns numeric[0] to numeric[1] - 1 hold
    numbers and are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        cells = "".join(_cell(v, numeric[0] <= j < numeric[1]) for j, v in enumerate(row))
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _get(mapping: Any, *keys: str) -> Any:
    """mapping[k1][k2]..., or None where any level is missing."""
    for key in keys:
        mapping = _dict(mapping).get(key)
    return mapping


def _badge(passed: Any) -> Html:
    if passed is None:
        return Html('<span class="badge unknown">unknown</span>')
    return Html('<span class="badge pass">PASS</span>' if passed else '<span class="badge fail">FAIL</span>')




def _lowest(values: list[Any]) -> float | None:
    """The minimum, or None (shown as n/a) when there is none or one of them is missing or NaN."""
    return min(values) if values and all(usable(v) for v in values) else None


def _by_k(values: dict[str, Any]) -> list[tuple[int, Any]]:
    return sorted((int(k), v) for k, v in values.items() if str(k).isdigit())


# --- overview -------------------------------------------------------------------------------------------------
def _quality_summary(report: dict[str, Any]) -> str:
    """The worst candidate/reference ratio of what the model exists for: recall@K, or AUC."""
    if report.get("retrieval") is not None:
        ratios = _by_k(_dict(_get(report, "retrieval", "recall_ratio")))
        worst = min(ratios, key=lambda kv: kv[1] if usable(kv[1]) else -math.inf, default=None)
        return f"recall@{worst[0]} {format_number(worst[1], 6)}" if worst else "n/a"
    if report.get("ranking") is not None:
        ratios = [_get(m, "auc", "candidate") / _get(m, "auc", "reference")
                  for m in _dict(_get(report, "ranking", "outputs")).values()
                  if usable(_get(m, "auc", "candidate")) and usable(_get(m, "auc", "reference"))
                  and _get(m, "auc", "reference") != 0]
        return f"AUC {format_number(min(ratios), 6)}" if ratios else "n/a"
    return "-"


def _speedup_summary(report: dict[str, Any]) -> str:
    """The paired speedup at the largest batch measured, per tower (or "inconclusive")."""
    parts = []
    for tower, batches in _dict(_get(report, "latency", "towers")).items():
        sizes = sorted((int(b) for b in _dict(batches) if str(b).isdigit()), reverse=True)
        if sizes:
            parts.append(f"{tower} {speedup_text(_dict(_get(batches, str(sizes[0]))))} @{sizes[0]}")
    return ", ".join(parts) or "-"


def _overview(reports: dict[str, dict[str, Any]]) -> str:
    rows, classes = [], []
    for i, (name, report) in enumerate(reports.items()):
        failed = [str(g.get("name")) for g in report.get("gates") or [] if isinstance(g, dict) and not g.get("passed")]
        cosine = _lowest([_get(s, "cosine_min") for s in _dict(report.get("parity")).values()])
        rows.append([Html(f'<a href="#target-{i}">{escape(name)}</a>'), _badge(report.get("passed")),
                     str(report.get("precision") or "?"), str(report.get("device") or "?"), format_number(cosine, 8),
                     _quality_summary(report), _speedup_summary(report), ", ".join(failed) or "none"])
        classes.append({True: "pass", False: "fail"}.get(report.get("passed"), ""))
    header = ["target", "result", "precision", "device", "cosine min", "recall / AUC ratio (worst)",
              "speedup, 95% (largest batch)", "failed gates"]
    return _table(header, rows, classes, numeric=(4, 7))


def _speedup_charts(reports: dict[str, dict[str, Any]]) -> str:
    """Speedup over the reference against batch size with its 95% band, one chart per tower, one line per target;
    inconclusive figures are left out (a point nobody should believe is not drawn)."""
    towers = sorted({t for r in reports.values() for t in _dict(_get(r, "latency", "towers"))})
    charts = []
    for tower in towers:
        series, left_out = [], set()
        for i, (name, report) in enumerate(reports.items()):
            batches = _dict(_get(report, "latency", "towers", tower))
            judged = [(int(b), _dict(e)) for b, e in batches.items()
                      if str(b).isdigit() and _get(e, "verdict") != INCONCLUSIVE]  # fmt: skip
            left_out |= {f"{name} @{b}" for b, e in batches.items() if _get(e, "verdict") == INCONCLUSIVE}
            points = [(b, _get(e, "speedup")) for b, e in judged]
            band = [(b, *e["ci"]) for b, e in judged if isinstance(e.get("ci"), list) and len(e["ci"]) == 2]
            series.append(Series(name, points, PALETTE[i % len(PALETTE)], band))
        batches = sorted({p[0] for s in series for p in s.points})
        if not batches:
            charts.append(f'<p class="note">{escape(tower)}: no speedup to draw: every figure was inconclusive.</p>')
            continue
        chart = line_chart(series, f"{tower}: speedup over the reference", "batch size", "median of paired ratios",
                           x_log=True, y_log=True, x_ticks=batches)
        note = (f'<p class="note">{escape(tower)}: not drawn, inconclusive: {escape(", ".join(sorted(left_out)))}.</p>'
                if left_out else "")
        charts.append(f'<div class="chart-with-note">{chart}{note}</div>')
    return f'<div class="charts">{"".join(charts)}</div>' if charts else ""


# --- one target -----------------------------------------------------------------------------------------------
def _gates(report: dict[str, Any]) -> str:
    gates = [g for g in report.get("gates") or [] if isinstance(g, dict)]
    if not gates:
        return '<h3>Gates</h3><p class="note">No gates were evaluated.</p>'
    rows = [[str(g.get("name")), g.get("value"), f"{g.get('op', '')} {format_number(g.get('threshold'), 6)}",
             gate_result(bool(g.get("passed")), g.get("reason"))] for g in gates]
    failed = sum(not g.get("passed") for g in gates)
    classes = ["pass" if g.get("passed") else "fail" for g in gates]
    return (f"<h3>Gates: {len(gates) - failed} of {len(gates)} passed</h3>"
            + _table(["gate", "value", "threshold", "result"], rows, classes, numeric=(1, 3)))


def _histogram_chart(output: str, histogram: dict[str, Any]) -> str:
    """|candidate - reference| on a log axis; neighbouring log bins merged to at most HISTOGRAM_BARS bars."""
    edges, counts = histogram.get("edges") or [], histogram.get("counts") or []
    if not histogram or (counts and len(edges) != len(counts) + 1) or not all(usable(c) for c in [*edges, *counts]):
        return f'<p class="note">{escape(output)}: no error histogram in this report.</p>'
    tiny, floor = _get(histogram, "at_or_below", "count"), format_number(_get(histogram, "at_or_below", "value"))
    if not counts:
        return (f'<p class="note">{escape(output)}: all {format_number(tiny)} errors at or below {floor}: '
                "nothing to draw.</p>")
    merge = max(1, math.ceil(len(counts) / HISTOGRAM_BARS))
    bars = []
    for start in range(0, len(counts), merge):
        stop = min(start + merge, len(counts))
        low, high, count = edges[start], edges[stop], sum(counts[start:stop])
        tip = f"({format_number(low, 3)}, {format_number(high, 3)}]: {count}"
        bars.append(Bar(low, high, count, CANDIDATE_COLOR, tip))
    chart = bar_chart(bars, f"{output}: |candidate - reference|", "absolute error (log scale)", "elements", x_log=True)
    note = (f'<p class="note">{format_number(tiny)} elements with error at or below {floor} (exact matches) '
            "are not drawn.</p>") if tiny else ""
    return f"<div>{chart}{note}</div>"


def _parity(report: dict[str, Any]) -> str:
    parity = _dict(report.get("parity"))
    if not parity:
        return ""
    rows, charts = [], []
    for output, stats in parity.items():
        q = _dict(_get(stats, "error_quantiles"))
        nonfinite = sum(v for k, v in _dict(stats).items() if k.startswith("candidate_") and usable(v))
        rows.append([output, _get(stats, "max_abs"), _get(stats, "rel_l2"),
                     format_number(_get(stats, "cosine_mean"), 8), format_number(_get(stats, "cosine_min"), 8),
                     q.get("p50"), q.get("p99"), q.get("p99.9"), nonfinite])
        charts.append(_histogram_chart(output, _dict(_get(stats, "histogram"))))
    header = ["output", "max abs", "rel L2", "cosine mean", "cosine min", "p50 |err|", "p99 |err|", "p99.9 |err|",
              "candidate NaN/Inf"]
    return "<h3>Parity</h3>" + _table(header, rows) + f'<div class="charts">{"".join(charts)}</div>'


def _retrieval(retrieval: dict[str, Any]) -> str:
    reference = _by_k(_dict(_get(retrieval, "recall", "reference")))
    candidate = _dict(_get(retrieval, "recall", "candidate"))
    ratio, agreement = _dict(retrieval.get("recall_ratio")), _dict(retrieval.get("agreement"))
    rows = [[f"@{k}", ref, candidate.get(str(k)), format_number(ratio.get(str(k)), 6),
             format_number(agreement.get(str(k)), 6)] for k, ref in reference]
    ks = [k for k, _ in reference]
    chart = line_chart(
        [Series("reference", reference, REFERENCE_COLOR),
         Series("candidate", [(k, candidate.get(str(k))) for k in ks], CANDIDATE_COLOR, dashed=True)],
        "recall@K", "K", "recall", x_log=True, y_zero=True, x_ticks=ks)
    counts = (f'<p class="note">{format_number(retrieval.get("queries"))} queries, '
              f'{format_number(retrieval.get("items"))} items, '
              f'{format_number(retrieval.get("relevant_pairs"))} relevant pairs.</p>')
    header = ["K", "recall reference", "recall candidate", "ratio", "agreement"]
    return "<h3>Retrieval</h3>" + counts + _table(header, rows) + chart


def _ranking(ranking: dict[str, Any]) -> str:
    outputs = _dict(ranking.get("outputs"))
    rows = [[output, metric, format_number(_get(m, metric, "reference"), 6),
             format_number(_get(m, metric, "candidate"), 6), format_number(_get(m, metric, "diff"), 3)]
            for output, m in outputs.items() for metric in ("auc", "logloss")]
    charts = []
    for metric, label in (("auc", "AUC"), ("logloss", "log loss")):
        bars, ticks = [], {}
        for i, (output, m) in enumerate(outputs.items()):
            for offset, side, color in ((0.12, "reference", REFERENCE_COLOR), (0.52, "candidate", CANDIDATE_COLOR)):
                value = _get(m, metric, side)
                tip = f"{output} {side}: {format_number(value, 6)}"
                bars.append(Bar(i + offset, i + offset + 0.36, value, color, tip))
            ticks[i + 0.5] = output
        charts.append(bar_chart(bars, label, "output", label, x_ticks=ticks, x_span=(0, len(outputs)),
                                legend=[("reference", REFERENCE_COLOR), ("candidate", CANDIDATE_COLOR)]))
    note = f'<p class="note">{format_number(ranking.get("rows"))} labelled rows.</p>'
    table = _table(["output", "metric", "reference", "candidate", "diff"], rows, numeric=(2, 5))
    return "<h3>Ranking</h3>" + note + table + f'<div class="charts">{"".join(charts)}</div>'


def _latency(latency: dict[str, Any]) -> str:
    towers = _dict(latency.get("towers"))
    rows, charts = [], []
    for tower, batches in towers.items():
        entries = sorted((int(b), _dict(e)) for b, e in _dict(batches).items() if str(b).isdigit())
        series = []
        for side, color in (("reference", REFERENCE_COLOR), ("candidate", CANDIDATE_COLOR)):
            p50 = [(b, _get(e, side, "p50_ms")) for b, e in entries]
            band = [(b, _get(e, side, "p50_ms"), _get(e, side, "p90_ms")) for b, e in entries]
            series.append(Series(f"{side} p50", p50, color, band))
        charts.append(line_chart(series, f"{tower}: latency (band to p90)", "batch size", "ms per batch",
                                 x_log=True, y_log=True, x_ticks=[b for b, _ in entries]))
        for batch, e in entries:
            rows.append([tower, batch, _get(e, "reference", "p50_ms"), _get(e, "reference", "p90_ms"),
                         _get(e, "reference", "p99_ms"), _get(e, "candidate", "p50_ms"), _get(e, "candidate", "p90_ms"),
                         _get(e, "candidate", "p99_ms"), format_rate(_get(e, "candidate", "throughput")),
                         speedup_text(e)])
    header = ["tower", "batch", "ref p50 ms", "ref p90 ms", "ref p99 ms", "cand p50 ms", "cand p90 ms", "cand p99 ms",
              "cand samples/s", "speedup (95%)"]
    timer = (f'<p class="note">Timer {escape(str(latency.get("timer", "?")))} on '
             f'{escape(str(latency.get("device", "?")))}, {format_number(latency.get("warmup"))} warm-up and '
             f'{format_number(latency.get("iterations"))} timed rounds per batch size, reference and candidate '
             f'interleaved. Noise: {escape(str(latency.get("noise_method", "n/a")))}</p>')
    return ("<h3>Latency</h3>" + timer + f'<div class="charts">{"".join(charts)}</div>' + _table(header, rows)
            + _branches(_dict(latency.get("branches"))))


def _branches(branches: dict[str, Any]) -> str:
    """t_cross, t_deep, t_parallel of each parallel tower as grouped bars; skipped towers say why."""
    if not branches:
        return ""
    rows, bars, ticks = [], [], {}
    kinds = (("t_cross_ms", "cross alone", PALETTE[2]), ("t_deep_ms", "deep alone", PALETTE[4]),
             ("t_parallel_ms", "both together", PALETTE[3]))
    for i, (tower, t) in enumerate(branches.items()):
        t = _dict(t)
        if "skipped" in t:
            rows.append([tower, "-", "-", "-", "-", f"skipped: {t['skipped']}"])
            continue
        rows.append([tower, t.get("batch"), t.get("t_cross_ms"), t.get("t_deep_ms"), t.get("t_parallel_ms"),
                     format_number(t.get("ratio"), 3)])
        for j, (key, label, color) in enumerate(kinds):
            bars.append(Bar(i + 0.1 + 0.27 * j, i + 0.35 + 0.27 * j, t.get(key), color,
                            f"{tower} {label}: {format_number(t.get(key))} ms"))
        ticks[i + 0.5] = tower
    chart = bar_chart(bars, "cross and deep branches (ORT CPU)", "tower", "ms per batch", x_ticks=ticks,
                      x_span=(0, len(branches)), legend=[(label, color) for _, label, color in kinds]) if bars else ""
    return ("<h3>Branches</h3><p class=\"note\">Each branch subgraph timed alone and both together; "
            "t_parallel / max(t_cross, t_deep) is 1.0 when they run fully concurrently.</p>"
            + _table(["tower", "batch", "t_cross ms", "t_deep ms", "t_parallel ms", "t_parallel / max"], rows) + chart)


def _machine(machine: dict[str, Any]) -> str:
    if not machine:
        return ""
    rows = [[key, str(machine[key])] for key in ("host", "platform", "processor", "cpu_count", "gpu", "python")
            if machine.get(key) is not None]
    rows += [[package, str(version)] for package, version in _dict(machine.get("versions")).items()]
    return "<h3>Machine</h3>" + _table(["", "value"], rows, numeric=(0, 0))


def _target(index: int, name: str, report: dict[str, Any]) -> str:
    seconds = report.get("seconds")
    meta = [("reference", report.get("reference")), ("candidate", report.get("candidate")),
            ("precision", report.get("precision")), ("device", report.get("device")), ("data", report.get("data"))]
    facts = ", ".join(f"{key} <code>{escape(str(value))}</code>" for key, value in meta if value not in (None, ""))
    took = f"; verified in {seconds:.1f} s" if usable(seconds) else ""
    parts = [f'<section id="target-{index}"><h2>{escape(name)} {_badge(report.get("passed"))}</h2>',
             f"<p>{facts}{took}.</p>" if facts else ""]
    for key in ("reference_math", "emulation"):
        if report.get(key):
            parts.append(f'<p class="note">Note: {escape(str(report[key]))}.</p>')
    if report.get("quality_absent"):
        parts.append(f'<p class="note">Quality not measured: {escape(str(report["quality_absent"]))}.</p>')
    parts += [_gates(report), _parity(report)]
    if isinstance(report.get("retrieval"), dict):
        parts.append(_retrieval(report["retrieval"]))
    if isinstance(report.get("ranking"), dict):
        parts.append(_ranking(report["ranking"]))
    if isinstance(report.get("latency"), dict):
        parts.append(_latency(report["latency"]))
    else:
        parts.append('<h3>Latency</h3><p class="note">Not measured in this run.</p>')
    parts += [_machine(_dict(report.get("machine"))), "</section>"]
    return "".join(parts)


def render_html(reports: dict[str, dict[str, Any]], title: str = "dcnc report") -> str:
    """The page for `reports` (target name -> verify report as JSON), in the order given."""
    if not isinstance(reports, dict) or not reports:
        raise DcncError("HTML report: no verify reports to show")
    for name, report in reports.items():
        if not isinstance(report, dict) or report.get("schema") != SCHEMA:
            raise DcncError(f"HTML report: target {name!r} is not a verify report (expected \"schema\": \"{SCHEMA}\")")
    failed = [name for name, report in reports.items() if report.get("passed") is not True]
    verdict = (f"all {len(reports)} target(s) passed" if not failed
               else f"{len(failed)} of {len(reports)} target(s) did not pass: {', '.join(failed)}")
    stamp = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    body = [f"<h1>{escape(title)}</h1>", f"<p>{escape(verdict)}. Generated {stamp}.</p>",
            "<h2>Overview</h2>", _overview(reports)]
    if len(reports) > 1:
        body.append(_speedup_charts(reports))
    body += [_target(i, name, report) for i, (name, report) in enumerate(reports.items())]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body>{"".join(body)}</body></html>\n')


def write_html(reports: dict[str, dict[str, Any]], path: str | Path, title: str = "dcnc report") -> None:
    """Write the page for `reports` (target name -> `toolkit.report.verify.to_json` of its verify report) to `path`,
    atomically; with one entry per build target for `dcnc run`, or {bundle name: report} for `dcnc verify`."""
    atomic_write_text(path, render_html(reports, title))
