"""Charts drawn with PIL (matplotlib is not a dependency): bar panels (the per-class IoU plot, benchmark panels)
and line panels (a training run's curves)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from sdm.imageio import png_bytes

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


@dataclass
class Panel:
    title: str
    labels: list[str]  # one per bar
    values: list[float]  # NaN draws no bar and prints "n/a"
    y_max: float | None = None  # default: the largest value
    colours: list[int] | None = None  # palette index per bar (e.g. the series a bar belongs to)


def bar_panels_png(panels: Sequence[Panel], panel_width: int = 360, height: int = 300) -> bytes:
    """Panels side by side, each a bar chart with its values printed above the bars."""
    font = ImageFont.load_default(size=12)
    img = Image.new("RGB", (panel_width * len(panels), height), "white")
    draw = ImageDraw.Draw(img)
    top, bottom, side = 36, 110, 16
    for p_i, panel in enumerate(panels):
        x0 = p_i * panel_width
        draw.text((x0 + side, 8), panel.title, fill="black", font=font)
        finite = [v for v in panel.values if math.isfinite(v)]
        y_max = panel.y_max or (max(finite) if finite and max(finite) > 0 else 1.0)
        plot_h = height - top - bottom
        draw.line([(x0 + side, height - bottom), (x0 + panel_width - side, height - bottom)], fill="black")
        slot = (panel_width - 2 * side) / max(len(panel.values), 1)
        for i, (label, v) in enumerate(zip(panel.labels, panel.values)):
            left = x0 + side + i * slot + slot * 0.15
            right = left + slot * 0.7
            colour = _COLOURS[(panel.colours[i] if panel.colours else 0) % len(_COLOURS)]
            if math.isfinite(v):
                bar_top = height - bottom - plot_h * max(min(v / y_max, 1.0), 0.0)
                draw.rectangle([left, bar_top, right, height - bottom], fill=colour)
                text = f"{v:.3g}"
            else:
                bar_top, text = height - bottom, "n/a"
            draw.text((left, bar_top - 14), text, fill="black", font=font)
            # Labels are written vertically below the axis so long class names fit.
            lab = Image.new("RGBA", (bottom - 6, 14), (255, 255, 255, 0))
            ImageDraw.Draw(lab).text((0, 0), label[:18], fill="black", font=font)
            lab = lab.rotate(90, expand=True)
            img.paste(lab, (int((left + right) / 2 - 7), height - bottom + 4), lab)
    return png_bytes(img)


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (x, y), in x order


def line_panels_png(panels: Sequence[tuple[str, Sequence[Series]]], panel_width: int = 420, height: int = 300) -> bytes:
    """Panels side by side, each (title, series) drawn as lines over a shared x range, with a legend and the
    axes' end values printed."""
    font = ImageFont.load_default(size=12)
    img = Image.new("RGB", (panel_width * len(panels), height), "white")
    draw = ImageDraw.Draw(img)
    top, bottom, left, right = 36, 40, 56, 16
    for p_i, (title, series) in enumerate(panels):
        x0 = p_i * panel_width
        draw.text((x0 + left, 8), title, fill="black", font=font)
        pts = [p for s in series for p in s.points if math.isfinite(p[1])]
        box = (x0 + left, top, x0 + panel_width - right, height - bottom)
        draw.rectangle(box, outline="black")
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y_lo, y_hi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def at(x: float, y: float) -> tuple[float, float]:
            return (box[0] + (x - x_lo) / (x_hi - x_lo) * (box[2] - box[0]),
                    box[3] - (y - y_lo) / (y_hi - y_lo) * (box[3] - box[1]))

        for i, s in enumerate(series):
            colour = _COLOURS[i % len(_COLOURS)]
            line = [at(x, y) for x, y in s.points if math.isfinite(y)]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            elif line:  # a single point: a dot
                draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
            draw.text((box[2] - 110, box[1] + 4 + 14 * i), s.name[:16], fill=colour, font=font)
        draw.text((x0 + 4, box[1]), f"{y_hi:.3g}", fill="black", font=font)
        draw.text((x0 + 4, box[3] - 12), f"{y_lo:.3g}", fill="black", font=font)
        draw.text((box[0], box[3] + 4), f"{x_lo:g}", fill="black", font=font)
        draw.text((box[2] - 40, box[3] + 4), f"{x_hi:g}", fill="black", font=font)
        draw.text(((box[0] + box[2]) / 2 - 12, box[3] + 18), "step", fill="black", font=font)
    return png_bytes(img)
