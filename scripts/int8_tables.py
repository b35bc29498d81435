"""Markdown tables of scripts/bench_int8.py's JSON, as docs/int8.md shows them: quality and speed per lever and
model, the default build's search curves, the compute-bound tower's counting, the clipping per Gemm input.

    .venv/bin/python scripts/int8_tables.py runs/int8_quality.json [runs/int8_speed.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def quality(name: str, subject: dict) -> list[str]:
    """One row per variant: held-out agreement per tower, then the eval split's numbers."""
    rows = subject["quality"]
    towers = [t for t in next(iter(rows.values())) if t != "eval"]
    held = [f"{t} {k.replace('agreement@', '@')}" for t in towers for k in rows["base"][t]]
    evaluated = list(rows["base"]["eval"])
    lines = [f"**{name}** (held-out rows: agreement of FP32 and INT8 on calibration rows the lowering never saw)", "",
             "| variant | " + " | ".join(held + evaluated) + " |", "|---" * (1 + len(held) + len(evaluated)) + "|"]
    for variant, entry in rows.items():
        values = [entry[t][k] for t in towers for k in entry[t]] + [entry["eval"][k] for k in evaluated]
        lines.append(f"| {variant} | " + " | ".join(_number(v) for v in values) + " |")
    for variant, reason in subject.get("refused", {}).items():
        lines.append(f"| {variant} | refused: {reason} |")
    return lines + [""]


def speed(name: str, runs: list[dict]) -> list[str]:
    """Per variant and tower@batch: the speedup of each run (one interleaved run each): medians, and fastest /
    fastest in parentheses; with the load averages before and after each run."""
    keys = list(runs[0]["speed"])
    variants = [v for v in runs[0]["speed"][keys[0]] if v != "fp32_ms" and not v.endswith(" fastest")]
    loads = "; ".join(f"run {i + 1}: load {r['load'][0]:.1f} -> {r['load'][1]:.1f}" for i, r in enumerate(runs))
    lines = [f"**{name}** INT8 / FP32 speed ({loads})", "", "| variant | " + " | ".join(keys) + " |", "|---" * (1 + len(keys)) + "|"]
    lines.append("| FP32 ms | " + " | ".join(" / ".join(f"{r['speed'][k]['fp32_ms']:.2f}" for r in runs) for k in keys) + " |")
    for variant in variants:
        cells = [" / ".join(_speedup(r["speed"][k], variant) for r in runs) for k in keys]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines + [""]


def curves(name: str, subject: dict) -> list[str]:
    """The default build's search, per tower: every point with its agreement and speed, the chosen one in bold."""
    lines = []
    for tower, search in subject["searches"].get("default", {}).items():
        lines += [f"**{name}, {tower}**: {search['metric']} >= {search['target']:.4g} on {search['held_out_rows']} held-out"
                  f" rows, speed at batch {search['timing_batch']}", "", "| recipe | layers kept FP32 | agreement | speed |",
                  "|---|---|---|---|"]  # fmt: skip
        for index, point in enumerate(search["points"]):
            agreement = ", ".join(f"{k} {v:.4f}" for k, v in point["agreement"].items())
            cells = [point["recipe"], ", ".join(point["kept"]) or "-", agreement, f"{point['speedup']:.2f}x" if point.get("speedup") else "-"]
            if index == search["chosen_index"]:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def counting(subject: dict) -> list[str]:
    lines = ["| | " + " | ".join(subject["counting"]) + " |", "|---" * (1 + len(subject["counting"])) + "|"]
    for key in ("gflop_per_batch", "fp32_kernels_ms", "fp32_gemm_ms", "gemm_share", "fp32_gflops", "int8_kernels_ms",
                "int8_gemm_ms", "shapes_fp32_ms", "shapes_u8s8_ms", "r_shapes", "peak_fp32_gflops", "peak_u8s8_gops",
                "r_peak", "amdahl_shapes", "amdahl_peak", "kernels_ratio"):  # fmt: skip
        lines.append(f"| {key} | " + " | ".join(_number(c[key]) for c in subject["counting"].values()) + " |")
    return lines + [""]


def clipping(name: str, subject: dict) -> list[str]:
    lines = [f"**{name}**", "", "| Gemm | minmax | entropy | clipped | percentile 99.99 | clipped |", "|---|---|---|---|---|---|"]
    for row, entropy, percentile in zip(*(subject["clipping"][m] for m in ("minmax", "entropy", "percentile"))):
        lines.append(f"| {row['node']} | {_range(row['range'])} | {_range(entropy['range'])} | {entropy['clipped']:.3%}"
                     f" | {_range(percentile['range'])} | {percentile['clipped']:.3%} |")  # fmt: skip
    return lines + [""]


def _speedup(entry: dict, variant: str) -> str:
    """median / median, and fastest / fastest in parentheses where measured."""
    fastest = entry.get(f"{variant} fastest")
    return f"{entry[variant]:.2f}x" + (f" ({fastest:.2f}x)" if fastest else "")


def _range(values) -> str:
    return f"[{values[0]:.3g}, {values[1]:.3g}]"


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+", help="bench_int8 JSON files; speed tables from all that have speed")
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    print(f"Machine: {reports[0]['machine']}\n")
    for name, subject in reports[0]["subjects"].items():
        print("\n".join(quality(name, subject)))
    for name in reports[0]["subjects"]:
        runs = [r["subjects"][name] for r in reports if name in r["subjects"] and "speed" in r["subjects"][name]]
        if runs:
            print("\n".join(speed(name, runs)))
    for report in reports:
        for name, subject in report["subjects"].items():
            if subject.get("searches", {}).get("default"):
                print("\n".join(curves(name, subject)))
            if "counting" in subject:
                print("\n".join(counting(subject)))
            if "clipping" in subject:
                print("\n".join(clipping(name, subject)))


if __name__ == "__main__":
    main()
