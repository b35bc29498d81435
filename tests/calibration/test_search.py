"""The held-out agreement search: it stops at the first point that meets the target, keeps layers FP32 only
when no recipe meets it alone, and refuses a target it cannot reach, naming the best point."""

from __future__ import annotations

import re

import numpy as np
import pytest
from calib_towers import random_feeds, run, tower_graph

from calibration.int8 import LADDER, Int8Lowerer
from calibration.reader import CalibrationData, hold_out
from calibration.search import search_precision
from toolkit.core.errors import DcncError
from toolkit.evaluate.task_metrics import held_out_metric


@pytest.fixture(scope="module")
def tower():
    """A zoo retrieval tower, calibrated on half of 512 random rows and judged on the other half."""
    model = tower_graph("retrieval", "low_rank")
    fit, held_out = hold_out(CalibrationData(random_feeds(model, 512, seed=3)), 0.5)
    return model, Int8Lowerer(model, fit, isa="avx512-vnni"), held_out


def _search(tower, target, **kwargs):
    model, lowerer, held_out = tower
    metric, key = held_out_metric([None, 8])
    return search_precision(lowerer, held_out, metric, key, target, **kwargs)


def test_a_target_the_fastest_recipe_meets_is_met_with_nothing_kept(tower):
    _, _, recipe, kept, _, search = _search(tower, 0.5)
    assert recipe == LADDER[0] and kept == [] and search.chosen == 0 and len(search.points) == 1


def test_the_search_stops_at_the_first_point_that_meets_the_target(tower):
    # the ladder alone misses 0.99 on this tower: layers are kept FP32 until it is met, and no further
    _, _, recipe, kept, _, search = _search(tower, 0.99)
    values = [p.agreement["agreement@100"] for p in search.points]
    assert search.met and search.chosen == len(search.points) - 1
    assert values[-1] >= 0.99 > max(values[:-1])
    assert recipe == LADDER[-1] and search.points[-1].kept and kept
    assert set(search.recovery) >= set(search.points[-1].kept)  # why each kept layer was kept


def test_an_unreachable_target_returns_the_best_point_unmet_and_says_why(tower):
    *_, kept, _, search = _search(tower, 1.0)
    best = search.best()
    assert not search.met and kept and best.agreement["agreement@100"] < 1.0
    assert len(best.kept) < len(search.recovery)  # at most all layers but one kept FP32
    assert re.match(r"held-out agreement@100 reaches at best 0\.\d+ \(float\+smooth, layers kept FP32: .+\), short of"
                    r" the target 1$", search.shortfall())


def test_every_point_is_timed_against_fp32(tower):
    model, _, held_out = tower
    native = Int8Lowerer(model, CalibrationData(random_feeds(model, 256, seed=3)), isa="avx2")  # runs on any x86
    *_, search = _search((model, native, held_out), 0.5, timing_batch=32)
    assert search.timing_batch == 32 and all(p.speedup > 0 for p in search.points) and not search.emulated


def test_a_build_for_another_cpus_kernel_is_judged_unfused_and_not_timed(tower, monkeypatch):
    # 8-bit weights on an AVX2 CPU: its fused kernel would saturate them, the VNNI machine's would not
    model, lowerer, held_out = tower
    monkeypatch.setattr("calibration.isa.detect_int8_isa", lambda: "avx2")
    lines = []
    quantized, *_, search = _search(tower, 0.5, timing_batch=32, say=lines.append)
    assert search.emulated and search.timing_batch is None and all(p.speedup is None for p in search.points)
    assert "built for avx512-vnni" in lines[0]
    metric, _ = held_out_metric([None, 8])
    reference = run(model, held_out)[0]
    assert search.points[search.chosen].agreement == metric(reference, run(quantized, held_out, unfused=True)[0])


def test_held_out_rows_are_distinct_and_not_calibrated_on():
    model = tower_graph("retrieval", "low_rank")
    feeds = random_feeds(model, 100, seed=3)
    doubled = CalibrationData({n: np.concatenate([v, v]) for n, v in feeds.items()})
    fit, held_out = hold_out(doubled, 0.5)
    rows = {tuple(np.concatenate([np.atleast_1d(held_out[n][i]).astype(float) for n in sorted(held_out)]))
            for i in range(len(held_out["user_dense"]))}  # fmt: skip
    assert len(rows) == len(held_out["user_dense"]) and fit.num_samples == 100


def test_too_few_held_out_rows_are_a_user_error():
    model = tower_graph("retrieval", "low_rank")
    with pytest.raises(DcncError, match="needs at least 2"):
        hold_out(CalibrationData(random_feeds(model, 2, seed=3)), 0.5)
