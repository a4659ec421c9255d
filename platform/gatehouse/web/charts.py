"""Small inline SVG charts rendered on the server: no chart library, nothing fetched by the browser.

Only numbers and escaped labels go into the markup, so a chart cannot carry script.
"""
import math

from django.utils.html import escape

COLORS = ("#2f5bd3", "#d0622f", "#2f9b5b")


def line_chart(series: dict[str, list[tuple[float, float]]], *, width: int = 320, height: int = 170,
               x_label: str = "", y_label: str = "", log_x: bool = False, log_y: bool = False,
               max_points: int = 400, scatter: tuple[str, ...] = ()) -> str:
    """One polyline per named series (dots for those named in `scatter`); empty string when nothing to draw."""
    def tx(v):
        return math.log10(v) if log_x else v

    def ty(v):
        return math.log10(v) if log_y else v

    clean = {name: [(tx(x), ty(y)) for x, y in points
                    if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
                    and (not log_x or x > 0) and (not log_y or y > 0)]
             for name, points in series.items()}
    clean = {name: _thin(points, max_points) for name, points in clean.items() if points}
    if not clean:
        return ""
    xs = [x for points in clean.values() for x, _ in points]
    ys = [y for points in clean.values() for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 44, 8, 8, 28
    w, h = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * w

    def py(y):
        return top + h - (y - y0) / (y1 - y0) * h

    def label(v, log):
        value = 10 ** v if log else v
        return f"{value:.3g}"

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(y_label)} against '
             f'{escape(x_label)}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" font-size="9">{label(y1, log_y)}</text>',
             f'<text x="{left - 4}" y="{top + h}" text-anchor="end" font-size="9">{label(y0, log_y)}</text>',
             f'<text x="{left}" y="{height - 14}" font-size="9">{label(x0, log_x)}</text>',
             f'<text x="{left + w}" y="{height - 14}" text-anchor="end" font-size="9">{label(x1, log_x)}</text>',
             f'<text x="{left + w / 2:.1f}" y="{height - 3}" text-anchor="middle" font-size="9">{escape(x_label)}'
             f'{" (log)" if log_x else ""}</text>']
    for index, (name, points) in enumerate(clean.items()):
        color = COLORS[index % len(COLORS)]
        if name in scatter:
            parts.extend(f'<circle class="point" data-series="{escape(name)}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" '
                         f'fill="{color}"/>' for x, y in points)
        else:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            parts.append(f'<polyline class="series" data-series="{escape(name)}" fill="none" stroke="{color}" '
                         f'stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{left + w - 2}" y="{top + 10 + 11 * index}" text-anchor="end" font-size="9" '
                     f'fill="{color}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _thin(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    step = len(points) / limit
    return [points[int(i * step)] for i in range(limit)] + [points[-1]]


def power_law_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(a, b) of loss = a · flops^b by least squares in log-log space; None without two distinct positive xs."""
    logs = [(math.log10(x), math.log10(y)) for x, y in points if x and y and x > 0 and y > 0]
    if len({x for x, _ in logs}) < 2:
        return None
    n = len(logs)
    mx, my = sum(x for x, _ in logs) / n, sum(y for _, y in logs) / n
    b = sum((x - mx) * (y - my) for x, y in logs) / sum((x - mx) ** 2 for x, _ in logs)
    return 10 ** (my - b * mx), b


def lineage_svg(nodes: list[tuple[str, str, float]], *, width: int = 320) -> str:
    """Boxes from the oldest ancestor down to this version, each with its cumulative FLOPs: (label, href, flops)."""
    if len(nodes) < 2:
        return ""
    box, gap = 34, 18
    height = len(nodes) * (box + gap) - gap + 4
    parts = [f'<svg class="chart lineage" viewBox="0 0 {width} {height}" role="img" aria-label="lineage" '
             f'xmlns="http://www.w3.org/2000/svg">']
    for index, (label, href, flops) in enumerate(nodes):
        y = 2 + index * (box + gap)
        parts.append(f'<a href="{escape(href)}"><rect x="2" y="{y}" width="{width - 4}" height="{box}" rx="5" '
                     f'fill="#f3f5fb" stroke="#2f5bd3"/><text x="10" y="{y + 14}" font-size="11">{escape(label)}</text>'
                     f'<text x="10" y="{y + 27}" font-size="9" fill="#555">cumulative {flops:.2e} FLOP</text></a>')
        if index:
            parts.append(f'<line x1="{width / 2:.0f}" y1="{y - gap}" x2="{width / 2:.0f}" y2="{y - 3}" stroke="#999" '
                         f'marker-end="url(#arrow)"/>')
    parts.insert(1, '<defs><marker id="arrow" markerWidth="6" markerHeight="6" refX="3" refY="3" orient="auto">'
                    '<path d="M0,0 L6,3 L0,6 z" fill="#999"/></marker></defs>')
    parts.append("</svg>")
    return "".join(parts)
