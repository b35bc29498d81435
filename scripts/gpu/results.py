"""The Markdown tables of docs/gpu.md from what scripts/gpu/run.sh left in OUT (run on the GPU machine, where
the verify reports the run summaries point to still exist).

    python3 scripts/gpu/results.py OUT > OUT/results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def verify_rows(summary: dict) -> list[str]:
    rows = ["| model/target | gates | cosine min | max abs | quality | batch | p50 ms (torch) | p50 ms (bundle) | speedup |",
            "|---|---|---|---|---|---|---|---|---|"]
    for target in summary["targets"]:
        name = f"{target['model']}/{target['target']}"
        if target.get("error"):
            rows.append(f"| {name} | error: {target['error']} |  |  |  |  |  |  |  |")
            continue
        quality = target["quality"] or {}
        head = (f"| {name} | {'PASS' if target['passed'] else 'FAIL'} {target['gates']['passed']}/{target['gates']['total']}"
                f" | {_f(target['parity']['cosine_min'], 8)} | {_f(target['parity']['max_abs'])}"
                f" | {quality.get('metric', '')}{'@' + str(quality['k']) if quality.get('k') else ''} {_f(quality.get('value'), 5)}")
        report = _load(Path(target["paths"]["report"])) or {}
        for tower, batches in ((report.get("latency") or {}).get("towers") or {}).items():
            for batch, entry in batches.items():
                ref, cand = entry.get("reference", {}), entry.get("candidate", {})
                rows.append(f"{head} | {tower} b{batch} | {_f(ref.get('p50_ms'))} | {_f(cand.get('p50_ms'))}"
                            f" | {_f(entry.get('speedup'))} |")
                head = "| | | | |"
    return rows


def bench_rows(bench: dict) -> list[str]:
    rows = []
    for tower, body in bench["towers"].items():
        sizes = sorted({int(b) for r in body["runners"].values() for b in (r.get("batches") or {})})
        rows += [f"\n**{tower}** ({body['flops_per_sample']} FLOPs/sample), p50 ms / % of peak:\n",
                 "| runner | " + " | ".join(map(str, sizes)) + " |", "|---" * (len(sizes) + 1) + "|"]
        for runner, result in body["runners"].items():
            if result.get("status") != "ok":
                rows.append(f"| {runner} | skipped: {result.get('reason')} |" + " |" * (len(sizes) - 1))
                continue
            cells = []
            for size in sizes:
                entry = result["batches"].get(str(size), {})
                cells.append("-" if "p50_ms" not in entry else f"{entry['p50_ms']:.3f} / {entry.get('pct_peak') or 0:.1f}%")
            rows.append(f"| {runner} | " + " | ".join(cells) + " |")
    return rows


def main(out: Path) -> None:
    lines = [f"GPU: {(out / 'gpu.txt').read_text().strip() if (out / 'gpu.txt').is_file() else 'n/a'}",
             f"\nonnxruntime: {(out / 'ort.txt').read_text().strip() if (out / 'ort.txt').is_file() else 'n/a'}\n"]
    for name in ("run_summary.json", "run_tensorrt.json"):
        summary = _load(out / name)
        if summary:
            lines += [f"\n### dcnc run ({name})\n", *verify_rows(summary)]
    bench = _load(out / "bench_two_tower.json")
    if bench:
        lines += ["\n### dcnc bench --device cuda (two-tower)", *bench_rows(bench)]
        lines += ["\nMatMul peaks: " + ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s" for k, v in bench["peaks"].items())]
    branches = _load(out / "branches.json")
    if branches:
        lines += ["\n### Cross/deep concurrency (torch CUDA, two streams)\n",
                  "| tower | batch | t_cross ms | t_deep ms | t_parallel ms | ratio |", "|---|---|---|---|---|---|"]
        for tower, t in branches["towers"].items():
            if "skipped" not in t:
                lines.append(f"| {tower} | {t['batch']} | {t['t_cross_ms']:.4f} | {t['t_deep_ms']:.4f}"
                             f" | {t['t_parallel_ms']:.4f} | {t['ratio']:.2f} |")
        lines += ["\nMatMul peaks (torch, n=8192): "
                  + ", ".join(f"{k} {v['gflops'] / 1000:.0f} TFLOP/s" for k, v in branches["peaks"].items())]
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
