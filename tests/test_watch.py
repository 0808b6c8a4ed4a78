"""Watching a run, without Ray: the TensorBoard and MLflow logger across a resumed attempt, the validation draw,
the run report, the segmenter training's events, and the console progress of a stage."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdm.config import get_preset
from sdm.data.toy import write_toy_dataset
from sdm.metrics.segmenter import train_segmenter
from sdm.progress import StageProgress
from sdm.run_report import REPORT_FILE, write_run_report
from sdm.tracking import TENSORBOARD_DIR, RunLogger, read_run_events
from sdm.unet import SDMUNet
from sdm.validation import Validator


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("toy") / "data")
    write_toy_dataset(uri, n=24, size=32, seed=0)
    return uri


def test_a_resumed_attempt_continues_each_curve_with_no_step_twice_and_none_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = str(tmp_path / "run")
    first = RunLogger(run)
    for step in range(1, 15):
        first.scalars(step, {"train/loss": float(step)})
        if step == 10:  # the checkpoint: curves published, then MLflow's scalars sent
            first.publish()
            first.commit()
    first.publish()  # the attempt dies at step 14, its checkpoint at 10: steps 11-14 are logged, never committed
    second = RunLogger(run, resume_step=10)
    for step in range(11, 21):
        second.scalars(step, {"train/loss": 100.0 + step, "train/lr": float("nan")})  # NaN is left out
    second.image("val/samples", 20, np.full((4, 6, 3), 7, np.uint8))
    second.close()

    scalars, images = read_run_events(run)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 21))
    assert dict(scalars["train/loss"])[12] == 112.0  # the second attempt's value, not the first's
    assert "train/lr" not in scalars
    assert [s for s, _ in images["val/samples"]] == [20]
    assert np.array(Image.open(io.BytesIO(images["val/samples"][0][1]))).shape == (4, 6, 3)

    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(second.mlflow_run_id, "train/loss")
    assert second.mlflow_run_id == first.mlflow_run_id  # one MLflow run, continued
    assert sorted((m.step, m.value) for m in history) == scalars["train/loss"]


def test_the_validation_sheet_is_the_same_bytes_for_the_same_weights_and_seed(toy):
    cfg = get_preset("tiny").with_overrides(["sampling.num_inference_steps=4"])
    torch.manual_seed(0)
    net = SDMUNet(cfg.model)
    draw = Validator(toy, cfg, num_maps=2, seed=3, guidance_scale=1.0).draw
    a, b = draw(net, step=5), draw(net, step=5)
    other = Validator(toy, cfg, num_maps=2, seed=4, guidance_scale=1.0).draw(net, step=5)
    assert a.sheet_png == b.sheet_png and a.sheet_png != other.sheet_png
    # two rows (one per map) of label | real | sample, each cell scaled to 128 pixels
    assert a.sheet.shape == (2 * 128, 3 * 128, 3)
    # an untrained network draws noise: far more texture than the real images, and a spectrum far from theirs
    assert a.figures["texture_ratio"] > 3 and a.figures["spectrum_db"] > 3
    assert set(a.figures) == {"texture_ratio", "spectrum_db", "high_frequency_ratio"}


def test_the_report_holds_the_final_figures_the_sheets_and_where_things_are(tmp_path):
    run = str(tmp_path / "run")
    logger = RunLogger(run)
    for step in (5, 10):
        logger.scalars(step, {"train/loss": 1.0 / step, "val/texture_ratio": 1.5})
    logger.close()
    (tmp_path / "run" / "samples").mkdir()
    for step in (10, 5):
        (tmp_path / "run" / "samples" / f"step-{step}.png").write_bytes(b"png")
    uri = write_run_report(run, {"steps": 10}, [f"{run}/checkpoint_00000010"], f"{run}/model")
    text = open(uri).read()
    assert uri.endswith(REPORT_FILE)
    assert "| train/loss | 10 | 0.1000 |" in text and "![curves](curves.png)" in text
    assert text.index("samples/step-5.png") < text.index("samples/step-10.png")
    assert "### step 10: texture_ratio 1.5000" in text
    assert f"tensorboard --logdir {run}/{TENSORBOARD_DIR}" in text and "| steps | `10` |" in text
    assert Image.open(tmp_path / "run" / "curves.png").size[0] > 0


def test_the_segmenter_training_logs_its_loss_to_tensorboard(toy, tmp_path):
    out = str(tmp_path / "seg")
    train_segmenter(toy, out, steps=20, batch_size=4, log=lambda msg: None)  # the lead's call, unchanged
    scalars, _ = read_run_events(out)
    assert [s for s, _ in scalars["segmenter/loss"]] == [10, 20]
    assert all(v > 0 for _, v in scalars["segmenter/lr"])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stage_progress_writes_whole_lines_off_a_terminal_and_a_bar_on_one():
    log = io.StringIO()
    progress = StageProgress("label.png", stream=log)
    for k in range(1, 26):
        progress(k, 25)
    progress.close()
    lines = log.getvalue().splitlines()
    assert log.getvalue().endswith("\n") and "\r" not in log.getvalue()
    assert lines == ["label.png: 1/25 steps (4%)", "label.png: 7/25 steps (28%)", "label.png: 13/25 steps (52%)",
                     "label.png: 19/25 steps (76%)", "label.png: 25/25 steps (100%)"]
    term = _Terminal()
    bar = StageProgress("label.png", stream=term)
    for k in range(1, 26):
        bar(k, 25)
    bar.close()
    assert "\r" in term.getvalue() and "25/25" in term.getvalue()  # tqdm's bar, redrawn in place
