"""The evaluation's outputs: results.json (every number with its settings), report.md (the tables),
contact_sheet.png (label | real | samples) and per_class_iou.png."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from sdm import storage
from sdm.data.inspect import colourise
from sdm.metrics.plots import Panel, bar_panels_png
from sdm.imageio import png_bytes

SheetRow = tuple["np.ndarray | None", "np.ndarray | None", np.ndarray]  # label map, real image, samples [K, H, W, 3]


def contact_sheet_png(rows: list[SheetRow], palette: list[list[int]] | None, min_cell: int = 128) -> bytes:
    """One row per label map: the label map in its palette | the real image | its samples (blank where absent)."""
    h, w = rows[0][2].shape[1:3]
    k = max(len(r[2]) for r in rows)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    blank = np.full((h, w, 3), 255, np.uint8)
    lines = []
    for label, real, samples in rows:
        tiles = [colourise(label, palette) if label is not None and palette else blank, real if real is not None else blank]
        tiles += list(samples) + [blank] * (k - len(samples))
        lines.append(np.concatenate(tiles, axis=1))
    sheet = np.concatenate(lines, axis=0)
    return png_bytes(Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST))


def per_class_iou_png(per_class: list[dict]) -> bytes:
    """Bars of per-class IoU, generated (blue) beside real images (orange) where measured."""
    labels, values, colours = [], [], []
    for row in per_class:
        for which, colour in (("generated", 0), ("real", 1)):
            if row[which] is not None or which == "generated":
                labels.append(f"{row['class']} ({which[:3]})")
                values.append(float("nan") if row[which] is None else row[which])
                colours.append(colour)
    width = max(360, 40 * len(values) + 32)
    return bar_panels_png([Panel("per-class IoU: generated (blue), real images (orange)", labels, values, 1.0, colours)], width, 320)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def markdown(results: dict, files: dict[str, str]) -> str:
    m = results["metrics"]
    lines = [
        "# Evaluation report", "",
        f"- real: `{results['real']['uri']}` (split {results['real']['split'] or 'all'})",
        f"- generated: `{results['generated']['uri']}`",
        f"- evaluation size: {results['settings']['size'][0]}x{results['settings']['size'][1]}", "",
        "| metric | value | notes |", "| --- | --- | --- |",
    ]
    for key, metric in m.items():
        if key == "miou":
            lines.append(f"| mIoU, generated images | {_fmt(metric['generated'])} | segmenter: {metric['segmenter']} |")
            lines.append(f"| mIoU, real images | {_fmt(metric['real'])} | the segmenter's own accuracy on real data |")
        elif key == "spectrum":
            lines.append(f"| {metric['name']} | {_fmt(metric['spectrum_db'])} | 0 = the real images' spectrum; grain raises it, so does blur |")
            lines.append(f"| high-frequency power, generated / real | {_fmt(metric['high_frequency_ratio'])} | > 1 grain, < 1 blur |")
            lines.append(f"| texture, generated / real | {_fmt(metric['texture_generated'])} / {_fmt(metric['texture_real'])} "
                         f"| mean abs. difference of neighbouring pixels (levels); ratio {_fmt(metric['texture_ratio'])} |")
        elif key == "diversity":
            lines.append(f"| {metric['name']} (diversity) | {_fmt(metric['value'])} | {metric['label_maps']} label maps, {metric['pairs']} pairs |")
        else:
            lines.append(f"| {metric['name']} | {_fmt(metric['value'])} | {metric['real_images']} real vs {metric['generated_images']} generated images |")
    if "miou" in m:
        lines += ["", "## Per-class IoU", "", "| class | generated | real |", "| --- | --- | --- |"]
        lines += [f"| {r['class']} | {_fmt(r['generated'])} | {_fmt(r['real'])} |" for r in m["miou"]["per_class"]]
        lines += ["", f"![per-class IoU]({files['per_class_iou'].rsplit('/', 1)[-1]})"]
    lines += ["", "## Samples (label | real | samples)", "", f"![contact sheet]({files['contact_sheet'].rsplit('/', 1)[-1]})", "",
              f"All numbers and settings: `{files['json'].rsplit('/', 1)[-1]}`.", ""]
    return "\n".join(lines)


def write_report(out: str, results: dict, sheet_rows: list[SheetRow], palette: list[list[int]] | None) -> dict[str, str]:
    """Write every output under `out`; the JSON last, so a report directory with results.json is complete."""
    files = {name: storage.join(out, f) for name, f in (("json", "results.json"), ("report", "report.md"),
                                                        ("contact_sheet", "contact_sheet.png"), ("per_class_iou", "per_class_iou.png"))}
    if "miou" not in results["metrics"]:
        del files["per_class_iou"]
    else:
        storage.write_bytes(files["per_class_iou"], per_class_iou_png(results["metrics"]["miou"]["per_class"]))
    storage.write_bytes(files["contact_sheet"], contact_sheet_png(sheet_rows, palette))
    storage.write_bytes(files["report"], markdown(results, files).encode())
    storage.write_bytes(files["json"], json.dumps({**results, "files": files}, indent=1, default=float).encode())
    return files
