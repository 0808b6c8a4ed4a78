"""What each job is asked to do, as typed objects: the CLIs build them, the quick start builds them in code, and
the Ray workers receive them instead of untyped argument dicts. Local URIs are made absolute on construction,
because Ray Train runs its workers in their own trial directories."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sdm import storage
from sdm.distill import DEFAULT_GUIDANCE_RANGE
from sdm.inference import sampling_overrides
from sdm.runner import DEFAULT_MICRO_BATCH

Spec = TypeVar("Spec")


def _absolute(spec: Any, *names: str) -> None:
    for name in names:
        if getattr(spec, name):
            object.__setattr__(spec, name, storage.absolute(getattr(spec, name)))


def from_namespace(cls: type[Spec], args: argparse.Namespace) -> Spec:
    """A spec from parsed arguments whose destinations are its field names; `sampling` from the flags of
    sdm.inference.add_sampling_args."""
    names = {f.name for f in dataclasses.fields(cls)}
    extra = {"sampling": sampling_overrides(args)} if "sampling" in names else {}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


@dataclass(frozen=True)
class TrainSpec:
    """A training run: pretraining, or fine-tuning with label dropout from `init_from`."""

    data: str
    run: str
    steps: int  # optimizer steps in total for this run
    preset: str | None = None
    config: str | None = None  # a YAML/JSON config URI, instead of a preset
    overrides: tuple[str, ...] = ()  # section.key=value
    stage: str = "pretrain"  # or finetune, distill-guidance, distill-steps
    init_from: str | None = None
    teacher: str | None = None  # distillation: the teacher model (run, exported model, converted checkpoint)
    guidance_range: tuple[float, float] = DEFAULT_GUIDANCE_RANGE  # distillation: the guidance scales trained over
    target_steps: int = 8  # distill-steps: the student's sampling steps
    from_steps: int = 32  # distill-steps: the teacher's steps the first round halves
    teacher_eta: float = 1.0  # distill-steps: the DDIM eta of the teacher's steps the student learns
    batch_size: int | None = None  # per worker; default: the config's
    grad_accum: int = 1
    lr: float | None = None
    drop_rate: float | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    precision: str = "auto"
    channels_last: bool = True  # model weights and input batches in torch.channels_last
    activation_checkpointing: bool = False
    checkpoint_every: int = 500
    keep: int = 3
    log_every: int = 20
    max_failures: int = 3
    max_bad_steps: int = 5
    shuffle_buffer: int = 256
    audit_keys: bool = False
    eval_every: int | None = None  # validation draws every this many steps; default: eval_every_default(steps)
    eval_maps: int = 6  # validation label maps drawn (one network batch)
    segmenter: str | None = None  # scores the validation samples' label consistency (sdm.metrics.segmenter)
    seed: int = 0
    fresh: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "guidance_range", tuple(self.guidance_range))
        _absolute(self, "data", "run", "init_from", "teacher")
        if self.segmenter and storage.exists(self.segmenter):  # else module:callable
            _absolute(self, "segmenter")

    @property
    def distilling(self) -> bool:
        return self.stage.startswith("distill-")

    @property
    def validation_interval(self) -> int:
        """--eval-every, or by default 4 draws over the run (at most 5000 steps apart)."""
        return self.eval_every if self.eval_every is not None else min(-(-self.steps // 4), 5000)


@dataclass(frozen=True)
class GenerateSpec:
    """A bulk generation: label maps in, a generated dataset out."""

    model: str
    labels: str
    out: str
    instances: str | None = None
    split: str | None = None
    format: str = "shards"
    samples_per_label: int = 1
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams overrides; the rest: the model's defaults
    seed: int = 0
    batch_size: int = 16
    micro_batch: int = DEFAULT_MICRO_BATCH
    precision: str = "auto"
    fast_path: bool = True  # channels_last and bf16-held weights (sdm.inference)
    compile: bool = False  # torch.compile, compiled as each sampling actor starts
    shard_rows: int = 256
    max_aspect_change: float = 0.05
    segmenter: str = "builtin"  # or "none", a built-in segmenter directory, a TorchScript file, module:callable
    segmenter_data: str | None = None  # the built-in segmenter's training data; default: labels, when a dataset
    segmenter_steps: int = 300
    cache_dir: str | None = None
    min_consistency: float | None = None
    max_retries: int = 0
    layouts_per_map: int = 0
    num_gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    concurrency: int | tuple[int, int] = 1
    address: str | None = None

    def __post_init__(self) -> None:
        _absolute(self, "model", "labels", "instances", "out", "segmenter_data", "cache_dir")  # the actors read and write them
        if self.segmenter not in ("builtin", "none") and storage.exists(self.segmenter):  # else module:callable
            _absolute(self, "segmenter")
