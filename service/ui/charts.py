"""Charts as inline SVG: lines (linear or log y), a heat-map and horizontal bars.

Every text that reaches the SVG (series names, axis labels) goes through :func:`html.escape`;
numbers are formatted here. Points with a ``None`` or non-finite y, or (log scale) a y ≤ 0,
are left out of a line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

#: Colours of successive series (colour-blind friendly: Okabe and Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
#: Lines with more points than this are drawn without markers (and their tooltips).
MAX_MARKERS = 64
_W, _H = 720, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 160, 16, 40


def number(value: float) -> str:
    """A short rendering of a number for axes and tooltips."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float | None]]]],
    *,
    x_label: str,
    y_label: str,
    log_y: bool = False,
    css_class: str = "chart",
) -> str:
    """An SVG line chart: one polyline (with hoverable markers) per named series.

    Args:
        series: ``(name, [(x, y), ...])`` per line.
        x_label: Label of the x axis.
        y_label: Label of the y axis.
        log_y: Log-scale y (non-positive values are left out).
        css_class: Class of the ``<svg>`` element.
    """
    lines = [(name, [(x, y) for x, y in pts if _drawable(y, log_y)]) for name, pts in series]
    points = [p for _, pts in lines for p in pts]
    head = (
        f'<svg class="{escape(css_class)}" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="{escape(y_label)} against {escape(x_label)}">'
    )
    if not points:
        return head + f'<text x="{_W // 2}" y="{_H // 2}" class="empty">no data</text></svg>'
    xs = [p[0] for p in points]
    ys = [_scale_y(p[1], log_y) for p in points]  # type: ignore[arg-type]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * (_W - _LEFT - _RIGHT)

    def py(y: float) -> float:
        return _H - _BOTTOM - (y - y0) / (y1 - y0) * (_H - _TOP - _BOTTOM)

    parts = [head, _axes(x0, x1, y0, y1, px, py, x_label, y_label, log_y)]
    for i, (name, pts) in enumerate(lines):
        colour = PALETTE[i % len(PALETTE)]
        coords = [(px(x), py(_scale_y(y, log_y))) for x, y in pts]  # type: ignore[arg-type]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in coords)
        parts.append(
            f'<g class="series" data-name="{escape(name)}"><polyline points="{path}" '
            f'fill="none" stroke="{colour}" stroke-width="2"/>'
        )
        marked = zip(coords, pts, strict=True) if len(pts) <= MAX_MARKERS else []
        for (a, b), (x, y) in marked:
            tip = f"{name}: x={number(x)} y={number(y)}"  # type: ignore[arg-type]
            parts.append(
                f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}">'
                f"<title>{escape(tip)}</title></circle>"
            )
        legend_y = _TOP + 14 + 16 * i
        parts.append(
            f'<rect x="{_W - _RIGHT + 10}" y="{legend_y - 9}" width="10" height="10" '
            f'fill="{colour}"/><text x="{_W - _RIGHT + 24}" y="{legend_y}" class="legend">'
            f"{escape(_short(name))}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _drawable(y: float | None, log_y: bool) -> bool:
    return y is not None and math.isfinite(y) and (y > 0 or not log_y)


def _scale_y(y: float, log_y: bool) -> float:
    return math.log10(y) if log_y else y


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _axes(
    x0: float,
    x1: float,
    y0: float,
    y1: float,
    px: object,
    py: object,
    x_label: str,
    y_label: str,
    log_y: bool,
) -> str:
    assert callable(px) and callable(py)
    bottom, right = _H - _BOTTOM, _W - _RIGHT
    parts = [
        f'<line x1="{_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" class="axis"/>',
    ]
    for x in _ticks(x0, x1):
        parts.append(
            f'<text x="{px(x):.1f}" y="{bottom + 16}" class="tick" text-anchor="middle">'
            f"{number(x)}</text>"
        )
    for y in _ticks(y0, y1):
        shown = number(10**y) if log_y else number(y)
        parts.append(
            f'<text x="{_LEFT - 6}" y="{py(y) + 4:.1f}" class="tick" text-anchor="end">'
            f'{shown}</text><line x1="{_LEFT}" y1="{py(y):.1f}" x2="{right}" y2="{py(y):.1f}" '
            'class="grid"/>'
        )
    scale = " (log)" if log_y else ""
    parts.append(
        f'<text x="{(_LEFT + right) / 2}" y="{_H - 6}" class="label" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text x="14" y="{(_TOP + bottom) / 2}" class="label" text-anchor="middle" '
        f'transform="rotate(-90 14 {(_TOP + bottom) / 2})">{escape(y_label + scale)}</text>'
    )
    return "".join(parts)


def heatmap(cells: Sequence[Sequence[float | None]], *, title: str, size: int = 360) -> str:
    """An SVG heat-map of a matrix (blue negative, white zero, red positive; symmetric scale),
    each cell with its value as a tooltip."""
    n = len(cells)
    head = f'<svg class="heatmap" viewBox="0 0 {size + 90} {size}" role="img" '
    head += f'aria-label="{escape(title)}">'
    values = [abs(v) for row in cells for v in row if v is not None and math.isfinite(v)]
    if not n or not values:
        return head + '<text x="20" y="20" class="empty">no data</text></svg>'
    top = max(values) or 1.0
    side = size / n
    parts = [head]
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            colour = _diverging(v, top)
            parts.append(
                f'<rect class="cell" x="{j * side:.2f}" y="{i * side:.2f}" '
                f'width="{side + 0.05:.2f}" height="{side + 0.05:.2f}" fill="{colour}">'
                f"<title>[{i}, {j}] = {number(v) if v is not None else 'n/a'}</title></rect>"
            )
    for k, label in enumerate((number(top), "0", number(-top))):
        y = 12 + k * (size - 24) / 2
        fill = _diverging(top * (1 - k), top)
        parts.append(
            f'<rect x="{size + 10}" y="{y - 10:.1f}" width="12" height="12" fill="{fill}" '
            f'stroke="#888"/><text x="{size + 26}" y="{y:.1f}" class="tick">{label}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _diverging(value: float | None, top: float) -> str:
    if value is None or not math.isfinite(value):
        return "#cccccc"
    t = max(-1.0, min(1.0, value / top))
    fade = int(255 * (1 - abs(t)))
    return f"rgb(255,{fade},{fade})" if t >= 0 else f"rgb({fade},{fade},255)"


def bar_chart(bars: Sequence[tuple[str, float]], *, unit: str = "") -> str:
    """Horizontal SVG bars, one per ``(label, value)``, longest for the largest value."""
    height = 24 * len(bars) + 10
    parts = [f'<svg class="bars" viewBox="0 0 {_W} {height}" role="img" aria-label="bars">']
    top = max((abs(v) for _, v in bars), default=0.0) or 1.0
    for i, (label, value) in enumerate(bars):
        width = abs(value) / top * (_W - 300)
        y = 5 + 24 * i
        parts.append(
            f'<text x="190" y="{y + 14}" class="tick" text-anchor="end">'
            f"{escape(_short(label, 28))}</text>"
            f'<rect class="bar" x="200" y="{y}" width="{width:.1f}" height="18" '
            f'fill="{PALETTE[0]}"><title>{escape(label)}: {number(value)}{escape(unit)}</title>'
            f'</rect><text x="{205 + width:.1f}" y="{y + 14}" class="tick">'
            f"{number(value)}{escape(unit)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
