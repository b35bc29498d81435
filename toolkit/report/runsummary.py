"""The summary of `dcnc run`: each target's headline numbers taken from its verify report, and the one table
that shows them all (parity, recall or AUC, latency and speedup, gates, what each stage did, where the reports are)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from toolkit.report.verify import speedup_text

if TYPE_CHECKING:
    from rich.console import Console


def target_summary(model: str, target: Any, report: dict[str, Any], stages: dict[str, str],
                   paths: dict[str, str]) -> dict[str, Any]:
    """The numbers the run summary shows for one target (a pipeline Target: its name, backend and precision),
    from its verify report (toolkit.report.verify.to_json)."""
    parity = report.get("parity") or {}
    cosines = [p["cosine_min"] for p in parity.values() if p.get("cosine_min") is not None]
    errors = [p["max_abs"] for p in parity.values() if p.get("max_abs") is not None]
    failed = [g["name"] for g in report["gates"] if not g["passed"]]
    return {
        "model": model, "target": target.name, "backend": target.backend, "precision": target.precision,
        "passed": bool(report["passed"]),
        "parity": {"cosine_min": min(cosines, default=None), "max_abs": max(errors, default=None)},
        "quality": _quality(report),
        "latency": _largest_batch_latency(report.get("latency")),
        "gates": {"passed": len(report["gates"]) - len(failed), "total": len(report["gates"])},
        "failed_gates": failed,
        "stages": stages,
        "paths": paths,
    }


def _quality(report: dict[str, Any]) -> dict[str, Any] | None:
    """Retrieval: the lowest recall@K ratio (candidate / reference) and its K. Ranking: the largest |AUC
    difference| over the labelled outputs, with its sign."""
    if report.get("retrieval"):
        ratios = {k: v for k, v in report["retrieval"]["recall_ratio"].items() if v is not None}
        if not ratios:
            return None
        k = min(ratios, key=lambda key: ratios[key])
        return {"metric": "recall_ratio", "k": int(k), "value": ratios[k]}
    if report.get("ranking"):
        outputs = report["ranking"]["outputs"]
        diffs = {name: o["auc"]["diff"] for name, o in outputs.items() if o["auc"]["diff"] is not None}
        if not diffs:
            return None
        name = max(diffs, key=lambda key: abs(diffs[key]))
        return {"metric": "auc_diff", "output": name, "value": diffs[name]}
    return None


def _largest_batch_latency(latency: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per tower: candidate and reference p50 (ms) at the largest batch measured, and the speedup."""
    if not latency or not latency.get("towers"):
        return None
    towers = {}
    for tower, batches in latency["towers"].items():
        if not batches:
            continue
        batch = max(batches, key=int)
        entry = batches[batch]
        towers[tower] = {"batch": int(batch), "p50_ms": entry["candidate"]["p50_ms"],
                         "reference_p50_ms": entry["reference"]["p50_ms"], "speedup": entry["speedup"],
                         "noise": entry.get("noise"), "verdict": entry.get("verdict")}
    return towers or None


def _number(value: float | None, digits: int = 4, form: str = "g") -> str:
    """A number for the table; None (NaN or infinity in the report's JSON) reads "n/a"."""
    return "n/a" if value is None else f"{value:.{digits}{form}}"


def _quality_text(quality: dict[str, Any] | None) -> str:
    if quality is None:
        return "n/a"
    if quality["metric"] == "recall_ratio":
        return f"recall@{quality['k']} x{quality['value']:.4f}"
    return f"ΔAUC {quality['value']:+.1e}"


def _latency_text(latency: dict[str, Any] | None, cell: Callable[[dict[str, Any]], str]) -> str:
    """One line per tower (named when there are several)."""
    if latency is None:
        return "n/a"
    several = len(latency) > 1
    return "\n".join(f"{tower} " * several + cell(entry) for tower, entry in latency.items())


def _stages_text(stages: dict[str, str]) -> str:
    """"built" (bundle built and verified), "verified" (only verify ran), "current" (both skipped)."""
    if stages.get("build") == "built":
        return "built"
    return "verified" if stages.get("verify") == "verified" else stages.get("verify", "current")


def summary_table(summary: dict[str, Any]):
    """One row per target: parity (lowest cosine, largest |error|), recall@K ratio or AUC difference, candidate
    p50 at the largest batch measured and the speedup over torch (per tower), gates, what the stages did."""
    from rich.table import Table

    table = Table(title=f"dcnc run: {summary['pipeline']['path']} -> {summary['out']}", title_justify="left")
    for column in ("model/target", "cosine min", "max |err|", "quality", "p50 ms", "speedup", "gates", "stages"):
        table.add_column(column, justify="left" if column in ("model/target", "stages") else "right")
    for entry in summary["targets"]:
        name = f"{entry['model']}/{entry['target']}"
        if entry.get("error"):
            table.add_row(name, *["-"] * 5, "FAIL", "not built", style="red")
            continue
        verdict = "PASS" if entry["passed"] else "FAIL"
        table.add_row(
            name, _number(entry["parity"]["cosine_min"], 7), _number(entry["parity"]["max_abs"], 2),
            _quality_text(entry["quality"]),
            _latency_text(entry["latency"], lambda e: f"{_number(e['p50_ms'], 3, 'f')} @{e['batch']}"),
            _latency_text(entry["latency"], speedup_text),
            f"{verdict} {entry['gates']['passed']}/{entry['gates']['total']}", _stages_text(entry["stages"]),
            style=None if entry["passed"] else "red",
        )
    return table


STAGE_PHRASES = {("train", "trained"): "trained", ("train", "current"): "training current",
                 ("export", "built"): "exported", ("export", "current"): "export current"}


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The table, each model's train/export outcome, failed gates, the HTML report and the verdict (give it a
    console that prints strings literally: toolkit.report.terminal.literal_console)."""
    from rich.text import Text

    from toolkit.report.terminal import labelled

    console.print(summary_table(summary))
    for model in summary["models"]:
        stages = ", ".join(STAGE_PHRASES.get((stage, outcome), f"{stage} {outcome}")
                           for stage, outcome in model["stages"].items() if outcome != "none")
        console.print(Text(f"{model['name']}: {stages} ({model['source']})"))
    console.print(Text(f"reports: {summary['out']}/<model>/<target>/report.md, report.json, junit.xml"))
    for entry in summary["targets"]:
        if entry.get("error"):
            console.print(labelled(f"{entry['model']}/{entry['target']}:", "red", entry["error"]))
        if entry["failed_gates"]:
            gates = ", ".join(entry["failed_gates"])
            console.print(labelled(f"{entry['model']}/{entry['target']} failed:", "red", gates))
    if summary.get("html_report"):
        console.print(Text(f"report: {summary['html_report']}"))
    console.print(Text(f"summary: {summary['out']}/summary.json"))
    failed = sum(not t["passed"] for t in summary["targets"])
    total = len(summary["targets"])
    verdict = ("PASSED", "green") if not failed else ("FAILED", "red")
    detail = f" {failed} of {total} target(s)" if failed else ""
    console.print(Text.assemble("dcnc run: ", verdict, f"{detail} in {summary['seconds']:.1f} s"))
