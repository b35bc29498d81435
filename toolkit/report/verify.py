"""The verify report and its renderings: JSON (schema dcnc.verify/1), Markdown, JUnit XML, a terminal table.

Files are written atomically. Non-finite numbers (a NaN error statistic, an infinite speedup) are written as
null in JSON, which has no NaN.
"""

from __future__ import annotations

import datetime
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.core import fileio
from toolkit.evaluate.latency import INCONCLUSIVE
from toolkit.evaluate.result import SCHEMA, Report

if TYPE_CHECKING:
    from rich.console import Console

def to_json(report: Report) -> dict[str, Any]:
    body = {
        "schema": SCHEMA,
        "passed": report.passed,
        "reference": report.reference,
        "candidate": report.candidate,
        "precision": report.precision,
        "device": report.device,
        "data": report.data,
        "emulation": report.emulation,
        "reference_math": report.reference_math,
        "quality_absent": report.quality_absent,
        "gates": [g.to_json() for g in report.gates],
        "thresholds": report.thresholds,
        "parity": report.parity,
        "weights": report.weights,
        "latency": report.latency,
        "seconds": report.seconds,
        "machine": report.machine,
        "warnings": report.warnings,
    }
    if report.retrieval is not None:
        body["retrieval"] = report.retrieval
    if report.ranking is not None:
        body["ranking"] = report.ranking
    return fileio.json_safe(body)


def write_json(report: Report, path: str | Path) -> None:
    fileio.write_json(path, to_json(report))


def format_number(value: Any, digits: int = 4) -> str:
    """A report number for people: `digits` significant digits for floats, "n/a" for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_rate(value: Any) -> str:
    """A rate for people: whole units with thousands separators (1,262,000), "n/a" for None and NaN."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{value:,.0f}"


def gate_result(passed: bool, reason: str | None) -> str:
    """"pass", "FAIL", or "FAIL (reason)" when the gate's value could not be judged."""
    return "pass" if passed else f"FAIL ({reason})" if reason else "FAIL"


def speedup_text(entry: dict[str, Any]) -> str:
    """A speedup as reports show it, with its 95% interval's half-width: "1.39x ±4%", or "inconclusive ±60%" when
    that interval was too wide to stand behind a number (toolkit.evaluate.latency)."""
    noise = entry.get("noise")
    if entry.get("speedup") is None or noise is None:
        return "n/a"
    if entry.get("verdict") == INCONCLUSIVE:
        return f"inconclusive ±{100 * noise:.0f}%"
    return f"{entry['speedup']:.2f}x ±{100 * noise:.0f}%"


def _gate_rows(report: Report) -> list[tuple[str, str, str, str]]:
    return [(g.name, format_number(g.value, 6), f"{g.op} {format_number(g.threshold, 6)}",
             gate_result(g.passed, g.reason)) for g in report.gates]


def _parity_rows(report: Report) -> list[tuple[str, ...]]:
    rows = []
    for output, s in report.parity.items():
        q = s["error_quantiles"]
        rows.append((output, format_number(s["max_abs"]), format_number(s["rel_l2"]), format_number(s["cosine_mean"], 8),
                     format_number(s["cosine_min"], 8), format_number(q["p99"]),
                     str(s["candidate_nan"] + s["candidate_inf"])))
    return rows


PARITY_HEADER = ("output", "max abs", "rel L2", "cosine mean", "cosine min", "p99 |err|", "NaN/Inf")
LATENCY_HEADER = ("tower", "batch", "ref p50 ms", "ref p99 ms", "cand p50 ms", "cand p99 ms", "cand samples/s",
                  "speedup (95%)", "rounds")


def _latency_rows(report: Report) -> list[tuple[str, ...]]:
    rows = []
    for tower, batches in (report.latency or {}).get("towers", {}).items():
        for batch, e in batches.items():
            rows.append((tower, batch, format_number(e["reference"]["p50_ms"]), format_number(e["reference"]["p99_ms"]),
                         format_number(e["candidate"]["p50_ms"]), format_number(e["candidate"]["p99_ms"]),
                         format_rate(e["candidate"]["throughput"]), speedup_text(e),
                         str(e.get("rounds", e["candidate"]["iterations"]))))
    return rows


BRANCH_HEADER = ("tower", "batch", "t_cross ms", "t_deep ms", "t_parallel ms", "t_parallel / max")


def _branch_rows(report: Report) -> list[tuple[str, ...]]:
    """Branch subgraph timings (ORT CPU) per tower; a tower that is not parallel shows why it was skipped."""
    rows = []
    for tower, t in ((report.latency or {}).get("branches") or {}).items():
        if "skipped" in t:
            rows.append((tower, "-", "-", "-", "-", f"skipped: {t['skipped']}"))
        else:
            rows.append((tower, str(t["batch"]), format_number(t["t_cross_ms"]), format_number(t["t_deep_ms"]),
                         format_number(t["t_parallel_ms"]), format_number(t["ratio"], 3)))
    return rows


def tradeoff(report: Report) -> str:
    """agreement@K for every K of the report beside each tower's speedup at the largest batch timed: what the
    lowering kept of the reference's answers, and what it bought."""
    agreement = ", ".join(f"agreement@{k} {format_number(v, 4)}" for k, v in report.retrieval["agreement"].items())
    speedups = []
    for tower, batches in report.latency["towers"].items():
        if batches:
            largest = max(batches, key=int)
            speedups.append(f"{tower} {format_number(batches[largest]['speedup'], 3)}x at batch {largest}")
    return f"{agreement}; speedup over the reference: {', '.join(speedups)}"


def _quality_rows(report: Report) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    if report.retrieval is not None:
        r = report.retrieval
        rows = [(f"@{k}", format_number(r["recall"]["reference"][k]), format_number(r["recall"]["candidate"][k]),
                 format_number(r["recall_ratio"][k], 6), format_number(r["agreement"][k], 6))
                for k in r["recall_ratio"]]
        return ("K", "recall ref", "recall cand", "ratio", "agreement"), rows
    if report.ranking is not None:
        rows = [(output, metric, format_number(m[metric]["reference"], 6), format_number(m[metric]["candidate"], 6),
                 format_number(m[metric]["diff"], 3))
                for output, m in report.ranking["outputs"].items() for metric in ("auc", "logloss")]
        return ("output", "metric", "reference", "candidate", "diff"), rows
    return (), []


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: Report) -> str:
    """A summary for a pull request comment or a CI job page."""
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failed_gates)} of {len(report.gates)} gates)"
    parts = [
        f"# dcnc verify: {verdict}",
        f"Reference `{report.reference}`, candidate `{report.candidate}` ({report.precision}, {report.device}), "
        f"data `{report.data}`, {report.seconds:.1f} s on {report.machine.get('host', '?')} "
        f"({report.machine.get('processor', '?')}, {report.machine.get('cpu_count', '?')} cores).",
        *(f"> Note: {note}." for note in (report.reference_math, report.emulation) if note),
        *([f"> Quality not measured: {report.quality_absent}."] if report.quality_absent else []),
        "## Gates",
        _md_table(("gate", "value", "threshold", "result"), _gate_rows(report)),
        "## Parity",
        _md_table(PARITY_HEADER, _parity_rows(report)),
    ]
    header, rows = _quality_rows(report)
    if rows:
        parts += ["## Retrieval" if report.retrieval is not None else "## Ranking", _md_table(header, rows)]
    if report.latency:
        parts += ["## Latency", f"Timer: {report.latency['timer']}. Noise: {report.latency['noise_method']}",
                  _md_table(LATENCY_HEADER, _latency_rows(report))]
        if _branch_rows(report):
            parts += ["Cross and deep branches timed alone and together (1.0 = fully concurrent):",
                      _md_table(BRANCH_HEADER, _branch_rows(report))]
    return "\n\n".join(parts) + "\n"


def junit_xml(report: Report) -> str:
    """JUnit XML (the testsuites/testsuite/testcase/failure shape Jenkins, GitLab and GitHub reporters read):
    one testcase per gate, classname the gate's section."""
    failures = len(report.failed_gates)
    stamp = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    common = {"tests": str(len(report.gates)), "failures": str(failures), "errors": "0",
              "time": f"{report.seconds:.3f}"}
    suites = ET.Element("testsuites", {"name": "dcnc verify", **common})
    suite = ET.SubElement(suites, "testsuite",
                          {"name": f"dcnc.verify.{report.precision}", **common, "skipped": "0", "timestamp": stamp,
                           "hostname": str(report.machine.get("host", "localhost"))})
    properties = ET.SubElement(suite, "properties")
    for name in ("reference", "candidate", "precision", "device", "data"):
        ET.SubElement(properties, "property", {"name": name, "value": str(getattr(report, name))})
    for gate in report.gates:
        case = ET.SubElement(suite, "testcase", {"classname": f"dcnc.verify.{gate.name.split('.')[0]}",
                                                 "name": gate.name, "time": "0"})
        if not gate.passed:
            message = (f"{gate.name} = {format_number(gate.value, 8)}, "
                       f"required {gate.op} {format_number(gate.threshold, 8)}"
                       + (f" ({gate.reason})" if gate.reason else ""))
            failure = ET.SubElement(case, "failure", {"message": message, "type": "GateFailed"})
            failure.text = message
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_markdown(report: Report, path: str | Path) -> None:
    fileio.atomic_write_text(path, markdown(report))


def write_junit(report: Report, path: str | Path) -> None:
    fileio.atomic_write_text(path, junit_xml(report))


def print_summary(report: Report, console: Console) -> None:
    """Gates, parity, retrieval or ranking and latency as rich tables, failed gates in red."""
    from rich.table import Table
    from rich.text import Text

    from toolkit.report.terminal import labelled

    def table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
        t = Table(title=title, title_justify="left")
        for column in header:
            t.add_column(column, justify="left" if column in ("gate", "output", "tower", "metric") else "right")
        for row in rows:
            t.add_row(*row, style="red" if row[-1].startswith("FAIL") else None)
        return t

    console.print(table("Gates", ("gate", "value", "threshold", "result"), _gate_rows(report)))
    console.print(table("Parity", PARITY_HEADER, _parity_rows(report)))
    header, rows = _quality_rows(report)
    if rows:
        console.print(table("Retrieval" if report.retrieval is not None else "Ranking", header, rows))
    if report.latency:
        console.print(table(f"Latency ({report.latency['timer']})", LATENCY_HEADER, _latency_rows(report)))
        if _branch_rows(report):
            console.print(table("Branches (ORT CPU)", BRANCH_HEADER, _branch_rows(report)))
    if report.retrieval is not None and report.latency:
        console.print(f"trade-off: {tradeoff(report)}", highlight=False)
    for note in (report.reference_math, report.emulation):
        if note:
            console.print(labelled("note:", "yellow", note))
    if report.quality_absent:
        console.print(labelled("quality not measured:", "yellow", report.quality_absent))
    for warning in report.warnings:
        console.print(labelled("warning:", "yellow", warning))
    if report.passed:
        console.print(Text.assemble("verify: ", ("PASSED", "green")))
    else:
        console.print(Text.assemble("verify: ", ("FAILED", "red"), f" {len(report.failed_gates)} gate(s)"))
