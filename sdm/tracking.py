"""Where a run's curves and pictures go: TensorBoard event files under RUN/tensorboard, and MLflow when
MLFLOW_TRACKING_URI is set. Training, and the built-in segmenter's training, log through RunLogger.

A local run's event files are written in place (`tensorboard --logdir RUN` shows them as they grow). An s3:// run's
are written to a local folder and uploaded by `publish`, which the training job calls with each checkpoint, so the
store holds whole files and no step the run has not reached. A resumed run opens its writer with TensorBoard's
purge step (the step after its checkpoint; step 1 for a run that starts afresh): the reader drops what an
earlier attempt logged beyond it, so each curve continues with no step twice and none missing. MLflow has no such purge, so its scalars are sent by
`commit`, which the job calls once the checkpoint they lead up to is saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdm import storage

TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "tracking.json"  # {"mlflow_run_id": ...}: a resumed run continues the same MLflow run
MLFLOW_EXPERIMENT_DEFAULT = "sdm"

Scalars = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)], in step order


class RunLogger:
    """Scalars and images of one run, by step, to TensorBoard and (when configured) MLflow."""

    def __init__(self, run_uri: str, resume_step: int = 0, params: Mapping[str, Any] | None = None,
                 run_name: str | None = None, flush_secs: int = 30):
        from torch.utils.tensorboard import SummaryWriter

        self.run_uri = run_uri
        self._staging = tempfile.mkdtemp(prefix="sdm-tensorboard-") if storage.is_s3(run_uri) else None
        log_dir = self._staging or storage.resolve(storage.join(run_uri, TENSORBOARD_DIR))[1]
        self._writer = SummaryWriter(log_dir, purge_step=resume_step + 1, flush_secs=flush_secs)
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._mlflow = _MlflowRun.open(run_uri, params or {}, run_name) if os.environ.get("MLFLOW_TRACKING_URI") else None

    @property
    def mlflow_run_id(self) -> str | None:
        return self._mlflow.run_id if self._mlflow else None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        for tag, value in finite.items():
            self._writer.add_scalar(tag, value, step)
        if self._mlflow:
            self._pending.append((step, finite))

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """uint8 [H, W, 3]."""
        self._writer.add_image(tag, image, step, dataformats="HWC")

    def publish(self) -> None:
        """The event files as logged so far, flushed (and uploaded, for an s3:// run)."""
        self._writer.flush()
        if self._staging:
            for name in sorted(os.listdir(self._staging)):
                with open(os.path.join(self._staging, name), "rb") as f:
                    storage.write_bytes(storage.join(self.run_uri, TENSORBOARD_DIR, name), f.read())

    def commit(self) -> None:
        """Send the scalars logged since the last commit to MLflow (a no-op without it)."""
        if self._mlflow and self._pending:
            self._mlflow.log(self._pending)
        self._pending = []

    def close(self) -> None:
        self.publish()
        self.commit()
        self._writer.close()
        if self._mlflow:
            self._mlflow.finish()
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)


class _MlflowRun:
    """One MLflow run per SDM run (its id kept in RUN/tracking.json), in MLFLOW_EXPERIMENT_NAME (default 'sdm')."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, run_uri: str, params: Mapping[str, Any], run_name: str | None) -> "_MlflowRun":
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow.store.db.utils"):  # a new store's schema set-up, line by line
            logging.getLogger(name).setLevel(logging.WARNING)
        client = MlflowClient()
        record = storage.join(run_uri, TRACKING_FILE)
        if storage.exists(record):
            run_id = json.loads(storage.read_bytes(record))["mlflow_run_id"]
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT_DEFAULT)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=run_name, tags={"sdm.run_uri": run_uri})
        for key, value in params.items():
            client.log_param(run.info.run_id, key, str(value)[:6000])
        storage.write_bytes(record, json.dumps({"mlflow_run_id": run.info.run_id}).encode())
        return cls(client, run.info.run_id)

    def log(self, pending: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, values in pending for key, value in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def read_event_dir(log_dir: str) -> tuple[Scalars, dict[str, list[tuple[int, bytes]]]]:
    """(scalars, encoded images by tag) of a local folder of event files, as TensorBoard shows them (purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # the purge of a resumed run is expected, not a warning
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    images = {t: [(e.step, e.encoded_image_string) for e in acc.Images(t)] for t in tags["images"]}
    return scalars, images


def read_run_events(run_uri: str) -> tuple[Scalars, dict[str, list[tuple[int, bytes]]]]:
    """read_event_dir of RUN/tensorboard, on any store (an s3:// run's files are fetched to a temporary folder)."""
    uri = storage.join(run_uri, TENSORBOARD_DIR)
    if not storage.is_s3(run_uri):
        return read_event_dir(storage.resolve(uri)[1])
    with tempfile.TemporaryDirectory() as tmp:
        for name in storage.list_files(uri):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(uri, name)))
        return read_event_dir(tmp)
