"""Inline SVG charts for the HTML report: a line chart (lines, points, shaded bands) and a bar chart, on linear
or log axes, with no plotting dependency.

Each function returns one `<svg>` element as a string, every text in it escaped, or a short `<p>` saying there
was nothing to plot when no value is finite (None, NaN, Inf and, on a log axis, values <= 0 are dropped).
Points and bars carry a `<title>`, which browsers show as a tooltip: the exact numbers without any script.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 30, 46  # plot margins; the legend sits in the right one


@dataclass
class Series:
    """One line through `points` (x, y), drawn in x order; `band` (x, low, high) shades a range around it."""

    name: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    band: list[tuple[float, float, float]] = field(default_factory=list)
    dashed: bool = False


@dataclass
class Bar:
    """One bar over [x0, x1] in x-axis units, `height` tall from zero; `tip` is its hover text."""

    x0: float
    x1: float
    height: float
    color: str = PALETTE[0]
    tip: str = ""


def format_tick(value: float) -> str:
    """Whole numbers below 10^7 in full (4096, not 4.1e3); else 3 significant digits, exponents short (1e-6)."""
    if float(value).is_integer() and abs(value) < 1e7:
        return str(int(value))
    text = f"{value:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    return text


def usable(value: object, log: bool = False) -> bool:
    """A number that can be placed on the axis: finite, and positive on a log axis."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 or not log


class Axis:
    """Maps data values in [low, high] on a linear or log scale to pixels from `start` to `end`."""

    def __init__(self, values: Iterable[float], start: float, end: float, log: bool = False, zero: bool = False,
                 ticks: Sequence[float] | None = None, span: tuple[float, float] | None = None):
        values = [v for v in values if usable(v, log)] or [1.0]
        low, high = min(values), max(values)
        if zero and not log:
            low, high = min(low, 0.0), max(high, 0.0)
        if log:
            low, high = math.log10(low), math.log10(high)
        pad = (high - low) * 0.05 or (0.5 if log else abs(high) * 0.1 or 1.0)
        self.low = low if zero and low == 0 and not log else low - pad
        self.high = high + pad
        if span is not None:  # a fixed domain, e.g. whole category slots
            self.low, self.high = (math.log10(span[0]), math.log10(span[1])) if log else span
        self.start, self.end, self.log = start, end, log
        self.fixed_ticks = [t for t in ticks or () if usable(t, log)]

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.start + (v - self.low) / (self.high - self.low) * (self.end - self.start)

    def ticks(self) -> list[float]:
        if self.fixed_ticks:
            return self.fixed_ticks
        if self.log:
            decades = range(math.ceil(self.low), math.floor(self.high) + 1)
            ticks = [10.0**d for d in decades]
            if len(ticks) < 3:  # less than two decades shown: add 2x and 5x
                ticks = [m * 10.0**d for d in range(math.floor(self.low), math.ceil(self.high) + 1) for m in (1, 2, 5)]
                ticks = [t for t in ticks if self.low <= math.log10(t) <= self.high]
            return ticks if len(ticks) >= 2 else round_ticks(10**self.low, 10**self.high)
        return round_ticks(self.low, self.high)


def round_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` evenly spaced multiples of 1, 2 or 5 x 10^k within [low, high]."""
    raw = (high - low) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = magnitude * next(m for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _frame(title: str, x: Axis, y: Axis, x_label: str, y_label: str, x_names: dict[float, str] | None) -> list[str]:
    """Title, grid, axes, tick labels and axis labels of a plot area."""
    parts = [f'<text x="{LEFT}" y="18" font-size="13" font-weight="600">{escape(title)}</text>']
    for tick in y.ticks():
        py = y(tick)
        parts.append(f'<line x1="{LEFT}" y1="{py:.1f}" x2="{WIDTH - RIGHT}" y2="{py:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{escape(format_tick(tick))}</text>')
    for tick in x.ticks():
        px = x(tick)
        label = (x_names or {}).get(tick, format_tick(tick))
        parts.append(f'<line x1="{px:.1f}" y1="{HEIGHT - BOTTOM}" x2="{px:.1f}" y2="{HEIGHT - BOTTOM + 4}" '
                     'stroke="#888"/>')
        parts.append(f'<text x="{px:.1f}" y="{HEIGHT - BOTTOM + 17}" text-anchor="middle">{escape(label)}</text>')
    parts += [
        f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" stroke="#888"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" stroke="#888"/>',
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - 8}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2:.0f}) rotate(-90)" text-anchor="middle">'
        f"{escape(y_label)}</text>",
    ]
    return parts


def _legend(entries: Sequence[tuple[str, str, bool]]) -> list[str]:
    """(name, colour, dashed) swatches stacked in the right margin."""
    parts = []
    for i, (name, color, dashed) in enumerate(entries):
        y = TOP + 6 + 18 * i
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        parts.append(f'<line x1="{WIDTH - RIGHT + 12}" y1="{y}" x2="{WIDTH - RIGHT + 32}" y2="{y}" stroke="{color}" '
                     f'stroke-width="3"{dash}/>')
        parts.append(f'<text x="{WIDTH - RIGHT + 38}" y="{y + 4}">{escape(name)}</text>')
    return parts


def _svg(title: str, parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" font-family="sans-serif" '
            f'font-size="11" fill="#333">' + "".join(parts) + "</svg>")


def _nothing(title: str) -> str:
    return f'<p class="note">{escape(title)}: no finite values to plot.</p>'


def line_chart(series: Sequence[Series], title: str, x_label: str, y_label: str, x_log: bool = False,
               y_log: bool = False, y_zero: bool = False, x_ticks: Sequence[float] | None = None) -> str:
    """Lines with point markers and optional shaded bands. y_zero: the y axis starts at 0 (linear only).
    x_ticks: tick positions (e.g. the batch sizes measured); default: evenly spaced round numbers or decades."""
    drawn = [(s, sorted((x, y) for x, y in s.points if usable(x, x_log) and usable(y, y_log)),
              sorted(b for b in s.band if all(usable(v, log) for v, log in zip(b, (x_log, y_log, y_log)))))
             for s in series]
    if not any(points for _, points, _ in drawn):
        return _nothing(title)
    xs = [p[0] for _, points, band in drawn for p in [*points, *band]]
    ys = [v for _, points, band in drawn for v in [*(p[1] for p in points), *(b[i] for b in band for i in (1, 2))]]
    x = Axis(xs, LEFT, WIDTH - RIGHT, x_log, ticks=x_ticks)
    y = Axis(ys, HEIGHT - BOTTOM, TOP, y_log, zero=y_zero)
    parts = _frame(title, x, y, x_label, y_label, None)
    for s, points, band in drawn:
        if band:
            outline = [(x(b[0]), y(b[2])) for b in band] + [(x(b[0]), y(b[1])) for b in reversed(band)]
            coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in outline)
            parts.append(f'<polygon points="{coords}" fill="{s.color}" fill-opacity="0.15" stroke="none"/>')
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        coords = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="2"{dash}/>')
        for px, py in points:
            parts.append(f'<circle cx="{x(px):.1f}" cy="{y(py):.1f}" r="3" fill="{s.color}"><title>'
                         f"{escape(s.name)}: {escape(format_tick(px))}, {escape(format_tick(py))}</title></circle>")
    parts += _legend([(s.name, s.color, s.dashed) for s, points, _ in drawn if points])
    return _svg(title, parts)


def bar_chart(bars: Sequence[Bar], title: str, x_label: str, y_label: str, x_log: bool = False,
              x_ticks: dict[float, str] | None = None, legend: Sequence[tuple[str, str]] = (),
              x_span: tuple[float, float] | None = None) -> str:
    """Bars from zero on a linear y axis: a histogram (x0, x1 the bin edges, x_log for log-spaced bins) or
    categories (x_ticks names the position of each group, x_span the whole x range, e.g. (0, groups)).
    legend: (name, colour) pairs."""
    bars = [b for b in bars if usable(b.x0, x_log) and usable(b.x1, x_log) and usable(b.height)]
    if not bars:
        return _nothing(title)
    x = Axis([v for b in bars for v in (b.x0, b.x1)], LEFT, WIDTH - RIGHT, x_log, ticks=list(x_ticks or ()),
             span=x_span)
    y = Axis([b.height for b in bars], HEIGHT - BOTTOM, TOP, zero=True)
    parts = _frame(title, x, y, x_label, y_label, x_ticks)
    for b in bars:
        left, right, top, base = x(b.x0), x(b.x1), y(b.height), y(0.0)
        tip = f"<title>{escape(b.tip)}</title>" if b.tip else ""
        parts.append(f'<rect x="{left:.1f}" y="{min(top, base):.1f}" width="{max(right - left, 0.5):.1f}" '
                     f'height="{abs(base - top):.1f}" fill="{b.color}">{tip}</rect>')
    parts += _legend([(name, color, False) for name, color in legend])
    return _svg(title, parts)
