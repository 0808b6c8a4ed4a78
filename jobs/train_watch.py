"""What a person watching a training run sees, kept by rank 0: every scalar of the step line in TensorBoard (and
MLflow), the validation draws (sdm.validation) every --eval-every steps as RUN/samples/step-N.png and a TensorBoard
image, and a console line per log step, thinned to one per 5% of the run."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from jobs.specs import TrainSpec
from sdm import storage
from sdm.config import SDMConfig
from sdm.metrics.segmenter import load_segmenter
from sdm.run_report import sample_sheet_uri
from sdm.tracking import RunLogger
from sdm.validation import Validation, Validator

LINE_SHARE = 0.05  # a console line per this share of the run's steps


class Watch:
    def __init__(self, spec: TrainSpec, cfg: SDMConfig, resume_step: int, device: torch.device):
        self.spec, self.device = spec, device
        params = {"preset": spec.preset or spec.config, "teacher": spec.teacher, "stage": spec.stage, "steps": spec.steps, "data": spec.data,
                  "overrides": " ".join(spec.overrides), "lr": spec.lr, "drop_rate": spec.drop_rate, "seed": spec.seed,
                  "num_workers": spec.num_workers, "batch_size": spec.batch_size, "grad_accum": spec.grad_accum}
        self.logger = RunLogger(spec.run, resume_step, params, run_name=spec.run.rstrip("/").split("/")[-1])
        segmenter = load_segmenter(spec.segmenter) if spec.segmenter else None
        # Pretraining never sees the null label, so its samples are drawn unguided; the other stages' with the model's scale.
        guidance = 1.0 if spec.stage == "pretrain" else None
        self.validator = Validator(spec.data, cfg, spec.eval_maps, spec.seed, guidance, segmenter)
        self.start, self.validation_seconds, self.draws = time.perf_counter(), 0.0, 0
        self.next_line = resume_step + 1

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.logger.scalars(step, {f"train/{k}": v for k, v in metrics.items() if k not in ("step", "epoch")})

    def wants_line(self, step: int) -> bool:
        """Whether this log step's line is printed: the first one at or past each 5% of the run, and the last."""
        if step < self.next_line and step != self.spec.steps:
            return False
        every = max(1, round(self.spec.steps * LINE_SHARE))
        self.next_line = (step // every + 1) * every
        return True

    def wants_validation(self, step: int) -> bool:
        return step % self.spec.validation_interval == 0 or step == self.spec.steps

    def validate(self, step: int, ema_net: torch.nn.Module, config: SDMConfig | None = None) -> Validation:
        """Draw and score the validation maps; `config` samples as that config does (a distillation round's)."""
        v = self.validator.draw(ema_net, step, self.device, config)
        storage.write_bytes(sample_sheet_uri(self.spec.run, step), v.sheet_png)
        self.logger.image("val/samples", step, v.sheet)
        self.logger.scalars(step, {f"val/{k}": x for k, x in v.figures.items()})
        self.validation_seconds += v.seconds
        self.draws += 1
        figures = ", ".join(f"{k} {x:.3f}" for k, x in v.figures.items())
        print(f"validation at step {step}: {figures} ({v.seconds:.1f}s; validation so far {self.share():.0%} of the "
              f"training time) -> {sample_sheet_uri(self.spec.run, step)}", flush=True)
        return v

    def share(self) -> float:
        """Validation time over the time spent training, in this attempt."""
        training = time.perf_counter() - self.start - self.validation_seconds
        return self.validation_seconds / max(training, 1e-9)

    def publish(self) -> None:
        self.logger.publish()

    def commit(self) -> None:
        self.logger.commit()

    def close(self) -> None:
        self.logger.close()
        print(f"validation: {self.draws} draws of {len(self.validator.labels)} maps in {self.validation_seconds:.0f}s, "
              f"{self.share():.0%} of the training time", flush=True)
