"""The GPU check's results (scripts/gpu/check.sh): the Markdown tables of docs/gpu.md, and the JSON kept beside
them, from what the check's steps left in its work folder.

    python3 scripts/gpu/results.py WORK OUT    # writes OUT/results.md, OUT/check.json, OUT/verify.json

WORK holds steps.tsv (step, exit code, seconds, note), machine.txt, probe.json, pytest.txt, verify/<target>.json
(dcnc verify reports), bench.json (dcnc bench) and branches.json (scripts/gpu/branches.py); a step that did not
run leaves its file out, and its table says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(path: Path) -> Any:
    """A JSON file's content, or None when the step that writes it did not (or wrote nothing)."""
    try:
        return json.loads(path.read_text()) if path.stat().st_size else None
    except (OSError, ValueError):
        return None


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def steps(work: Path) -> list[dict]:
    """steps.tsv as records: name, rc (None when the step was skipped), seconds, note."""
    records = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        records.append({"step": name, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                        "seconds": float(seconds or 0), "note": note})  # fmt: skip
    return records


def step_rows(records: list[dict]) -> list[str]:
    def result(r: dict) -> str:
        if r["rc"] is None:
            return f"skipped: {r['note']}"
        if r["note"]:
            return f"exit {r['rc']} ({r['note']})"
        return "ok" if r["rc"] == 0 else f"exit {r['rc']}"

    return table(["step", "result", "seconds"], [[r["step"], result(r), f"{r['seconds']:.0f}"] for r in records])


def probe_rows(probe: dict) -> list[str]:
    ort = probe["onnxruntime"]
    lines = [(f"onnxruntime {ort['version']} ({ort['file']}), session providers {probe.get('session_providers')};"
              f" {probe['tower']} tower at batch {probe['batch']} against torch in full FP32:"), ""]
    rows = []
    for setting in ("off", "on"):
        for output, stats in probe["tf32"].get(setting, {}).items():
            verdict = "within" if stats["rel_l2"] <= probe["rel_l2_gate"] else "OVER"
            rows.append([f"TF32 {setting}", output, fmt(stats["rel_l2"]), f"{verdict} {probe['rel_l2_gate']:g}",
                         fmt(stats["cosine_min"], 8), fmt(stats["max_abs"])])
    return lines + table(["setting", "output", "rel L2", "fp32 gate", "cosine min", "max abs"], rows)


def quality(report: dict) -> str:
    if report.get("retrieval"):
        ratio = report["retrieval"]["recall_ratio"]
        k = "10" if "10" in ratio else next(iter(ratio))
        return f"recall@{k} x{ratio[k]:.4f}, agreement {report['retrieval']['agreement'][k]:.3f}"
    outputs = (report.get("ranking") or {}).get("outputs", {})
    return ", ".join(f"{name} dAUC {entry['auc']['diff']:+.1e}" for name, entry in outputs.items())


def speedup(entry: dict) -> str:
    """The paired speedup with its 95% interval, or what is known of it when too wide to stand behind."""
    text = fmt(entry.get("speedup"))
    if entry.get("ci"):
        text += f" [{fmt(entry['ci'][0])}, {fmt(entry['ci'][1])}]"
    return text if entry.get("verdict", "conclusive") == "conclusive" else f"{text} {entry['verdict']}"


def verify_rows(reports: dict[str, dict]) -> list[str]:
    rows = []
    for name, report in reports.items():
        parity = report["parity"].values()
        passed = sum(g["passed"] for g in report["gates"])
        gates = f"{'PASS' if report['passed'] else 'FAIL'} {passed}/{len(report['gates'])}"
        head = [name, gates, fmt(min(p["cosine_min"] for p in parity), 8), fmt(max(p["rel_l2"] for p in parity)),
                quality(report)]
        for tower, batches in ((report.get("latency") or {}).get("towers") or {}).items():
            for batch, entry in batches.items():
                rows.append([*head, f"{tower} {batch}", fmt(entry["reference"]["p50_ms"]),
                             fmt(entry["candidate"]["p50_ms"]), speedup(entry)])
                head = [""] * 5
        if head[0]:
            rows.append([*head, "", "", "", ""])
    header = ["target", "gates", "cosine min", "rel L2", "quality", "tower batch", "p50 ms torch", "p50 ms bundle",
              "speedup [95% interval]"]
    return table(header, rows)


def peak_text(peaks: dict) -> str:
    """Measured MatMul peaks; a peak the bench could not measure shows its reason instead of a number."""
    return ", ".join(
        f"{key} {value['gflops']:.0f} GFLOP/s" if "gflops" in value else f"{key} not measured ({value.get('skipped')})"
        for key, value in peaks.items()
    )


def bench_rows(bench: dict) -> list[str]:
    lines = []
    for tower, body in bench["towers"].items():
        sizes = sorted({int(b) for r in body["runners"].values() for b in (r.get("batches") or {})})
        flops = fmt(body.get("flops_per_sample"))
        lines += ["", f"**{tower}** ({flops} FLOPs/sample), p50 ms (% of the MatMul peak):", ""]
        rows = []
        for runner, result in body["runners"].items():
            if result.get("status") != "ok":
                rows.append([runner, f"skipped: {result.get('reason')}", *[""] * (len(sizes) - 1)])
                continue
            cells = []
            for size in sizes:
                entry = result["batches"].get(str(size), {})
                pct = f" ({entry['pct_peak']:.1f}%)" if entry.get("pct_peak") is not None else ""
                cells.append(f"{entry['p50_ms']:.4f}{pct}" if "p50_ms" in entry else "-")
            rows.append([runner, *cells])
        lines += table(["runner", *map(str, sizes)], rows)
    return [*lines, "", f"MatMul peaks: {peak_text(bench.get('peaks', {})) or 'none'}"]


def branch_rows(branches: dict) -> list[str]:
    rows = []
    for tower, t in branches["towers"].items():
        if "skipped" in t:
            rows.append([tower, f"skipped: {t['skipped']}", "", "", "", ""])
        else:
            rows.append([tower, str(t["batch"]), f"{t['t_cross_ms']:.4f}", f"{t['t_deep_ms']:.4f}",
                         f"{t['t_parallel_ms']:.4f}", f"{t['ratio']:.2f}"])
    return [*table(["tower", "batch", "t_cross ms", "t_deep ms", "t_parallel ms", "parallel / max"], rows), "",
            f"MatMul peaks ({branches.get('device', 'cuda')}): {peak_text(branches.get('peaks', {})) or 'none'}"]


def main(work: Path, out: Path) -> None:
    records = steps(work)
    machine = (work / "machine.txt").read_text().strip() if (work / "machine.txt").is_file() else "n/a"
    probe, bench, branches = load(work / "probe.json"), load(work / "bench.json"), load(work / "branches.json")
    reports = {p.stem: r for p in sorted((work / "verify").glob("*.json")) if (r := load(p))}
    pytest_tail = (work / "pytest.txt").read_text().strip().splitlines() if (work / "pytest.txt").is_file() else []

    lines = ["## Machine", "", machine, "", "## Steps", "", *step_rows(records)]
    sections = [
        ("Probe: a real session, TF32 off and on", probe, probe_rows),
        ("dcnc build + verify", reports or None, verify_rows),
        ("dcnc bench", bench, bench_rows),
        ("Cross/deep concurrency (torch; two CUDA streams on a GPU)", branches, branch_rows),
    ]
    for title, data, render in sections:
        lines += ["", f"## {title}", ""] + (render(data) if data else ["not measured (see the steps above)"])
    lines += ["", "## pytest -m \"gpu or tensorrt\"", "", f"`{pytest_tail[-1] if pytest_tail else 'not run'}`"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    check = {"machine": machine, "steps": records, "probe": probe, "branches": branches, "pytest": pytest_tail[-40:]}
    (out / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    (out / "verify.json").write_text(json.dumps(reports, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
