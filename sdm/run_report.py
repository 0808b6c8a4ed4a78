"""RUN/report.md at the end of a training run: its curves as a PNG (RUN/curves.png), the validation sheets over the
steps, the final figures, the settings and where everything is. Everything comes from what the run left on the
store (the TensorBoard events under RUN/tensorboard, RUN/samples), so a resumed run's report covers all of it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sdm import storage
from sdm.metrics.plots import Series, line_panels_png
from sdm.tracking import TENSORBOARD_DIR, TRACKING_FILE, Scalars, read_run_events

REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"
SAMPLES_DIR = "samples"
_SHEET = re.compile(r"step-(\d+)\.png$")

_PANELS = (  # (title, tags); a panel with no data is left out
    ("loss (L_simple + lambda L_vlb) and its MSE", ("train/loss", "train/mse")),
    ("loss by timestep quarter (q0: least noise)", ("train/loss_q0", "train/loss_q1", "train/loss_q2", "train/loss_q3")),
    ("validation: texture ratio (1 = real)", ("val/texture_ratio",)),
    ("validation: spectrum distance (dB)", ("val/spectrum_db",)),
    ("validation: label consistency (mIoU)", ("val/consistency",)),
)


def sample_sheet_uri(run_uri: str, step: int) -> str:
    return storage.join(run_uri, SAMPLES_DIR, f"step-{step}.png")


def sample_sheets(run_uri: str) -> list[tuple[int, str]]:
    """(step, file name) of the run's validation sheets, in step order."""
    names = storage.list_files(storage.join(run_uri, SAMPLES_DIR), ".png")
    return sorted((int(m.group(1)), n) for n in names if (m := _SHEET.match(n)))


def curves_png(scalars: Scalars) -> bytes | None:
    panels = [(title, [Series(t.split("/")[-1], [(float(s), v) for s, v in scalars[t]]) for t in tags if t in scalars])
              for title, tags in _PANELS]
    panels = [p for p in panels if p[1]]
    return line_panels_png(panels, panel_width=380) if panels else None


def _fmt(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "n/a"


def write_run_report(run_uri: str, settings: Mapping[str, Any], checkpoints: list[str], model_uri: str) -> str:
    """Write RUN/report.md (and RUN/curves.png); returns the report's URI."""
    scalars, _ = read_run_events(run_uri)
    curves = curves_png(scalars)
    if curves is not None:
        storage.write_bytes(storage.join(run_uri, CURVES_FILE), curves)
    sheets = sample_sheets(run_uri)
    last = {tag: points[-1] for tag, points in scalars.items() if points}
    lines = [f"# Training report: `{run_uri}`", ""]
    if last:
        lines += ["## Final figures", "", "| figure | step | value |", "| --- | --- | --- |"]
        lines += [f"| {tag} | {step} | {_fmt(value)} |" for tag, (step, value) in sorted(last.items())]
        lines.append("")
    if curves is not None:
        lines += ["## Curves", "", f"![curves]({CURVES_FILE})", ""]
    val_tags = sorted(t for t in scalars if t.startswith("val/"))
    if sheets:
        lines += ["## Validation samples over the steps", "",
                  "Each sheet: one row per validation label map, label | real image | sample (fixed seeds).", ""]
        by_step = {tag: dict(scalars[tag]) for tag in val_tags}
        for step, name in sheets:
            figures = ", ".join(f"{t[4:]} {_fmt(by_step[t][step])}" for t in val_tags if step in by_step[t])
            lines += [f"### step {step}" + (f": {figures}" if figures else ""), "", f"![step {step}]({SAMPLES_DIR}/{name})", ""]
    lines += ["## Settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | `{v}` |" for k, v in settings.items()]
    lines += ["", "## Where everything is", "",
              f"- exported model (EMA weights): `{model_uri}`",
              f"- checkpoints: {', '.join(f'`{c}`' for c in checkpoints) or 'none'}",
              f"- TensorBoard: `tensorboard --logdir {storage.join(run_uri, TENSORBOARD_DIR)}`",
              f"- validation sheets: `{storage.join(run_uri, SAMPLES_DIR)}/step-N.png`"]
    tracking = storage.join(run_uri, TRACKING_FILE)
    if storage.exists(tracking):
        lines.append(f"- MLflow run: `{json.loads(storage.read_bytes(tracking))['mlflow_run_id']}`")
    uri = storage.join(run_uri, REPORT_FILE)
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    return uri
