"""Inline SVG charts: axis mapping and ticks, what is dropped, escaping, one mark per point and per bar."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from toolkit.report.svgchart import (
    Axis,
    Bar,
    Series,
    bar_chart,
    format_tick,
    line_chart,
    round_ticks,
)

SVG = "{http://www.w3.org/2000/svg}"


def test_a_log_axis_maps_decades_to_equal_distances_and_ticks_them():
    axis = Axis([1e-9, 1e-3], 0, 600, log=True)
    assert axis(1e-6) - axis(1e-9) == pytest.approx(axis(1e-3) - axis(1e-6))
    assert axis.ticks() == [10.0**d for d in range(-9, -2)]


def test_a_log_axis_within_one_decade_ticks_round_numbers():
    ticks = Axis([0.009, 0.016], 0, 600, log=True).ticks()
    assert len(ticks) >= 2 and all(re.fullmatch(r"0\.0\d+", format_tick(t)) for t in ticks)
    assert all(0.009 * 0.9 <= t <= 0.016 * 1.1 for t in ticks)


def test_round_ticks_are_1_2_5_multiples_inside_the_range():
    assert round_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert round_ticks(3.0, 47.0) == pytest.approx([10.0, 20.0, 30.0, 40.0])


def test_an_axis_from_zero_is_not_padded_below_zero():
    axis = Axis([3.0, 10.0], 300, 0, zero=True)
    assert axis(0.0) == 300 and axis.ticks()[0] == 0.0


def test_format_tick_writes_short_exponents():
    values = (1e-6, 2.5e-12, 0.015, 512.0, 4096, 15000.0, 3e7, 0.5)
    assert [format_tick(v) for v in values] == ["1e-6", "2.5e-12", "0.015", "512", "4096", "15000", "3e7", "0.5"]


def test_line_chart_draws_each_finite_point_and_drops_the_rest():
    series = [Series("p50", [(1, 2.0), (8, float("nan")), (64, None), (512, 9.0), (0, 1.0)], band=[(1, 1.5, 2.5)])]
    root = ET.fromstring(line_chart(series, "latency", "batch", "ms", x_log=True, y_log=True))
    assert len(root.findall(f"{SVG}circle")) == 2  # NaN, None and x = 0 on a log axis are dropped
    assert len(root.findall(f"{SVG}polygon")) == 1 and root.get("aria-label") == "latency"


def test_charts_with_nothing_finite_say_so_instead_of_drawing():
    assert "no finite values" in line_chart([Series("s", [(1, math.inf)])], "t", "x", "y")
    assert "no finite values" in bar_chart([Bar(1, 2, float("nan"))], "t", "x", "y")


def test_bar_chart_draws_one_rect_per_bar_with_its_escaped_tip():
    bars = [Bar(1e-6, 2e-6, 4, tip="<b>four</b>"), Bar(2e-6, 4e-6, 1)]
    text = bar_chart(bars, 'errors of "<script>"', "error", "count", x_log=True)
    root = ET.fromstring(text)  # well-formed XML: everything escaped
    rects = root.findall(f"{SVG}rect")
    assert len(rects) == 2 and rects[0].find(f"{SVG}title").text == "<b>four</b>"
    assert float(rects[0].get("height")) == pytest.approx(4 * float(rects[1].get("height")), abs=0.3)
    assert "<script>" not in text and root.get("aria-label") == 'errors of "<script>"'


def test_category_bars_fill_their_slot_of_the_given_span():
    root = ET.fromstring(bar_chart([Bar(0.1, 0.9, 1.0)], "auc", "output", "AUC", x_ticks={0.5: "logit"}, x_span=(0, 1)))
    (rect,) = root.findall(f"{SVG}rect")
    plot_width = 640 - 64 - 150
    assert float(rect.get("width")) == pytest.approx(0.8 * plot_width, abs=0.1)
    assert "logit" in [t.text for t in root.iter(f"{SVG}text")]
