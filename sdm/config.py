"""Plain dataclass configs with named presets, serialisable to JSON/YAML.

A config is stored next to every checkpoint, so a checkpoint alone says how to rebuild its model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import yaml

from sdm.errors import ConfigError, InvalidInputError

Conditioning = Literal["spade", "concat"]
Schedule = Literal["linear", "cosine"]


@dataclass
class ModelConfig:
    """The denoising U-Net. Knows nothing of noise schedules."""

    num_classes: int
    instance_edges: bool = False
    image_size: tuple[int, int] = (256, 256)  # (height, width)
    model_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # feature-map sizes (short side)
    num_head_channels: int = 64
    num_heads: int = 4  # used only when num_head_channels == -1
    dropout: float = 0.0
    learn_sigma: bool = True
    resblock_updown: bool = True
    conditioning: Conditioning = "spade"
    spade_hidden: int = 128
    norm_groups: int = 32
    use_checkpoint: bool = False

    @property
    def label_channels(self) -> int:
        """Channels of the label input: one-hot classes plus the instance-edge channel."""
        return self.num_classes + int(self.instance_edges)

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    @property
    def downsample_factor(self) -> int:
        """Image sides must be divisible by this."""
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if self.conditioning not in ("spade", "concat"):
            raise ConfigError(f"model.conditioning must be 'spade' or 'concat', got {self.conditioning!r}")
        h, w = self.image_size
        f = self.downsample_factor
        if h % f or w % f:
            raise ConfigError(f"model.image_size {h}x{w} is not divisible by the down-sampling factor {f}")
        widths = {self.model_channels * m for m in self.channel_mult}
        bad = sorted(c for c in widths if c % self.norm_groups)
        if bad:
            raise ConfigError(f"channel widths {bad} are not divisible by model.norm_groups={self.norm_groups}")
        if self.num_head_channels != -1:
            bad = sorted(c for c in widths if c % self.num_head_channels)
            if bad:
                raise ConfigError(
                    f"channel widths {bad} are not divisible by model.num_head_channels={self.num_head_channels}"
                )


@dataclass
class DiffusionConfig:
    """The forward process and the training loss."""

    num_timesteps: int = 1000  # T, the diffusion process's length (not the sampling steps)
    schedule: Schedule = "linear"
    lambda_vlb: float = 0.001

    def validate(self) -> None:
        if self.num_timesteps < 1:
            raise ConfigError(f"diffusion.num_timesteps must be >= 1, got {self.num_timesteps}")
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"diffusion.schedule must be 'linear' or 'cosine', got {self.schedule!r}")


@dataclass
class DataConfig:
    """How raw label ids of a dataset become model classes, and the training augmentations.

    channel = raw_id - label_offset, where negative values wrap to num_classes + value (ADE20K stores
    "other" as 0 and the original code feeds it as the last class); a raw `unlabeled_id` maps to
    `unlabeled_class` (COCO-Stuff's 255 -> 182).
    """

    dataset: str = "toy"
    label_offset: int = 0
    unlabeled_id: int | None = None
    unlabeled_class: int | None = None
    edges_from_labels: bool = False  # no instance maps: edges of the label map stand in (CelebAMask-HQ)
    random_flip: bool = True
    random_crop: bool = False


@dataclass
class SamplingConfig:
    """Defaults for generation; every call may override them.

    DDIM with eta = 1 is ancestral sampling with the posterior variance on respaced steps: its fresh noise keeps
    the grain that deterministic samplers (eta = 0, DPM-Solver++) build up from the model's misses at low noise
    out of the images. Chosen with bench/sampler_quality.py (docs/evaluation.md).
    """

    guidance_scale: float = 1.5
    sampler: str = "ddim"
    num_inference_steps: int = 50
    eta: float = 1.0

    def validate(self, num_timesteps: int) -> None:
        from sdm.runner import SamplingParams  # sdm.runner builds on this module

        try:
            SamplingParams.resolve(self, num_timesteps)
        except InvalidInputError as e:
            raise ConfigError(f"sampling: {e}") from None


@dataclass
class TrainConfig:
    """Optimisation settings shared by the local loop and the Ray Train job."""

    lr: float = 1e-4
    finetune_lr: float = 2e-5
    drop_rate: float = 0.2
    batch_size: int = 4
    ema_decay: float = 0.9999
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class SDMConfig:
    """Everything needed to rebuild a model and use it."""

    name: str
    model: ModelConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "SDMConfig":
        self.model.validate()
        self.diffusion.validate()
        self.sampling.validate(self.diffusion.num_timesteps)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SDMConfig":
        d = _renamed(d)
        try:
            return cls(
                name=str(d["name"]),
                model=_build(ModelConfig, d["model"]),
                diffusion=_build(DiffusionConfig, d.get("diffusion", {})),
                data=_build(DataConfig, d.get("data", {})),
                sampling=_build(SamplingConfig, d.get("sampling", {})),
                train=_build(TrainConfig, d.get("train", {})),
            ).validate()
        except KeyError as e:
            raise ConfigError(f"config is missing the key {e.args[0]!r}") from None

    @classmethod
    def from_json(cls, text: str) -> "SDMConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None

    @classmethod
    def from_yaml(cls, text: str) -> "SDMConfig":
        """YAML is a superset of JSON, so this reads both."""
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config is not valid YAML/JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("config must be a mapping")
        if "preset" in d:  # a preset plus overrides
            base = get_preset(d.pop("preset")).to_dict()
            d = _deep_merge(base, d)
        return cls.from_dict(d)

    def with_overrides(self, overrides: list[str]) -> "SDMConfig":
        """Apply `section.key=value` overrides (value parsed as YAML), e.g. `model.model_channels=64`."""
        d = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
            path, raw = item.split("=", 1)
            path = _LEGACY_PATHS.get(path.strip(), path.strip())
            keys = path.split(".")
            node = d
            for k in keys[:-1]:
                if not isinstance(node.get(k), dict):
                    raise ConfigError(f"override {item!r}: no config section {k!r}")
                node = node[k]
            if keys[-1] not in node:
                raise ConfigError(f"override {item!r}: unknown key {path!r}")
            node[keys[-1]] = _parse_value(raw)
        return SDMConfig.from_dict(d)


# Keys stored by earlier versions: both were called `steps`, a name that also meant optimizer steps.
_LEGACY_PATHS = {"diffusion.steps": "diffusion.num_timesteps", "sampling.steps": "sampling.num_inference_steps"}


def _renamed(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict with legacy keys under their current names (a stored config keeps loading)."""
    out = dict(d)
    for old, new in _LEGACY_PATHS.items():
        section, key = old.split(".")
        _, new_key = new.split(".")
        if isinstance(out.get(section), dict) and key in out[section] and new_key not in out[section]:
            sec = dict(out[section])
            sec[new_key] = sec.pop(key)
            out[section] = sec
    return out


def _parse_value(raw: str) -> Any:
    """JSON first (it reads 2e-3 as a number, YAML 1.1 as a string), then YAML for bare words."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return yaml.safe_load(raw)


def _build(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {unknown}")
    kwargs = {}
    for k, v in d.items():
        if isinstance(v, list):  # JSON has no tuples
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _paper_model(**kw: Any) -> ModelConfig:
    """The released models' network: 256 channels, (1,1,2,2,4,4), attention at 32/16/8 with 64-wide heads."""
    return ModelConfig(**kw)


def _small_model(num_classes: int, size: int) -> ModelConfig:
    """The network that 2 CPU cores train in minutes: 32 channels, (1, 2, 2), one block per level, attention at the
    lowest resolution (a quarter of the image side), with instance edges."""
    return ModelConfig(num_classes=num_classes, instance_edges=True, image_size=(size, size), model_channels=32,
                       channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(size // 4,),
                       num_head_channels=32, spade_hidden=32, norm_groups=8)


_PRESETS: dict[str, SDMConfig] = {
    "ade20k": SDMConfig(
        name="ade20k",
        model=_paper_model(num_classes=151),
        data=DataConfig(dataset="ade20k", label_offset=1, random_crop=True),
        sampling=SamplingConfig(guidance_scale=1.5),
    ),
    "cityscapes": SDMConfig(
        name="cityscapes",
        model=_paper_model(num_classes=35, instance_edges=True, image_size=(256, 512)),
        data=DataConfig(dataset="cityscapes"),
        sampling=SamplingConfig(guidance_scale=2.0),
    ),
    "celebamask_hq": SDMConfig(
        name="celebamask_hq",
        model=_paper_model(num_classes=19, instance_edges=True),
        data=DataConfig(dataset="celebamask_hq", edges_from_labels=True),
        sampling=SamplingConfig(guidance_scale=1.5),
    ),
    "coco_stuff": SDMConfig(
        name="coco_stuff",
        model=_paper_model(num_classes=183, instance_edges=True),
        data=DataConfig(dataset="coco_stuff", unlabeled_id=255, unlabeled_class=182, random_crop=True),
        sampling=SamplingConfig(guidance_scale=1.5),
    ),
    # Small enough to train for a few minutes on 2 CPU cores; matches the toy dataset (`sdm data toy`).
    "tiny": SDMConfig(
        name="tiny",
        model=_small_model(num_classes=6, size=32),
        diffusion=DiffusionConfig(num_timesteps=1000, schedule="linear"),
        data=DataConfig(dataset="toy"),
        sampling=SamplingConfig(guidance_scale=1.5, sampler="ddim", eta=1.0, num_inference_steps=25),
        train=TrainConfig(lr=1e-3, finetune_lr=3e-4, batch_size=16, ema_decay=0.995),
    ),
    # The benchmark world (`sdm data scenes`, 48x48, 18 classes): the tiny network at 48x48, trained in
    # minutes on 2 CPU cores (bench/world_benchmark.py).
    "scenes": SDMConfig(
        name="scenes",
        model=_small_model(num_classes=18, size=48),
        diffusion=DiffusionConfig(num_timesteps=1000, schedule="linear"),
        data=DataConfig(dataset="scenes"),
        sampling=SamplingConfig(guidance_scale=1.5, sampler="ddim", eta=1.0, num_inference_steps=25),
        train=TrainConfig(lr=1e-3, finetune_lr=3e-4, batch_size=16, ema_decay=0.995),
    ),
}


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> SDMConfig:
    """A fresh copy of a named preset."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return SDMConfig.from_dict(_PRESETS[name].to_dict())
