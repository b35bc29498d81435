"""`dcnc verify`'s latency on a machine another process is loading: the speedup stays within 25% of a quiet run,
or the report says it is inconclusive; it never prints a figure a stall made up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from toolkit.commands.verify import verify
from toolkit.evaluate.latency import INCONCLUSIVE, LatencyPolicy
from toolkit.evaluate.verify import VerifyOptions

OPTIONS = VerifyOptions(ks=(1,), batch_sizes=(1, 64), warmup=5, iterations=60, policy=LatencyPolicy(budget_s=5.0))
BURN = "import time\nend = time.time() + 600\nwhile time.time() < end: pass\n"  # one core, busy until killed


def speedups(verify_case) -> dict[tuple[str, str], dict]:
    report = verify(verify_case / "model.pt", verify_case / "bundle", verify_case / "eval.npz", options=OPTIONS,
                    branches=False)  # fmt: skip
    return {(tower, batch): entry for tower, batches in report.latency["towers"].items() for batch, entry in batches.items()}


@pytest.mark.slow
def test_a_one_core_background_load_moves_the_speedup_less_than_25_percent_or_is_called_inconclusive(verify_case):
    quiet = speedups(verify_case)
    burner = subprocess.Popen([sys.executable, "-c", BURN])
    try:
        loaded = speedups(verify_case)
    finally:
        burner.kill()
        burner.wait()
    judged = 0
    for key, entry in loaded.items():
        if INCONCLUSIVE in (entry["verdict"], quiet[key]["verdict"]):
            continue
        judged += 1
        ratio = entry["speedup"] / quiet[key]["speedup"]
        assert 0.75 <= ratio <= 1.25, (key, quiet[key]["speedup"], entry["speedup"], entry["noise"])
    assert all(e["verdict"] in ("conclusive", INCONCLUSIVE) for e in loaded.values()) and len(loaded) == 4
    print(f"{judged} of {len(loaded)} speedups conclusive in both runs")
