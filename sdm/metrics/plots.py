"""Bar charts drawn with PIL (matplotlib is not a dependency): the per-class IoU plot and benchmark panels."""

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
