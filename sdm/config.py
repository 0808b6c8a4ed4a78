"""Plain dataclass configs with named presets, serialisable to JSON/YAML, and the sampling parameters
(`SamplingParams`, with the sampler names and limits).

A config is stored next to every checkpoint, so a checkpoint alone says how to rebuild its model. It carries its
`format_version`; `upgrade_config` reads every older format, and each field is checked against its type. The
config layer imports nothing of the library but its errors, so a config can be read without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from sdm.errors import ConfigError, InvalidInputError

Conditioning = Literal["spade", "concat"]
Schedule = Literal["linear", "cosine"]
SamplerName = Literal["ddpm", "ddim", "dpm++", "dpm++sde"]  # sdm.samplers keys its registry by these
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)

MAX_GUIDANCE = 100.0  # far beyond any useful scale; larger values only overflow into noise
MAX_CACHE_INTERVAL = 10  # deep features older than this many steps describe another noise level


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
    guidance_input: bool = False  # a guidance-distilled student: the guidance scale is an input (sdm.unet)

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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_guidance(g: Any) -> None:
    """A classifier-free guidance scale: SamplingParams' own, and each row's where rows carry their own."""
    if not _is_number(g) or not 0 <= g <= MAX_GUIDANCE:
        raise InvalidInputError(f"guidance_scale must be a number in [0, {MAX_GUIDANCE:g}], got {g!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample, every field filled and valid: a model's defaults (`SDMConfig.sampling`), and what a call
    resolves from them (`SDMConfig.resolve_sampling`). Valid on construction (InvalidInputError names the field),
    except the steps' upper bound, the model's number of diffusion steps, which the config checks.

    DDIM with eta = 1 is ancestral sampling with the posterior variance on respaced steps: its fresh noise keeps
    the grain that deterministic samplers (eta = 0, DPM-Solver++) build up from the model's misses at low noise
    out of the images. Chosen with bench/sampler_quality.py (docs/evaluation.md).
    """

    guidance_scale: float = 1.5
    sampler: SamplerName = "ddim"
    num_inference_steps: int = 50
    eta: float = 1.0  # DDIM's; the other samplers ignore it
    cache_interval: int = 1  # k > 1: the deep features are recomputed every k-th step only (sdm.unet.FeatureCache)

    def __post_init__(self) -> None:
        check_guidance(self.guidance_scale)
        if self.sampler not in SAMPLER_NAMES:
            raise InvalidInputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        n = self.num_inference_steps
        if not _is_int(n) or n < 1:
            raise InvalidInputError(f"sampling steps must be an integer >= 1, got {n!r}")
        if not _is_number(self.eta) or not 0 <= self.eta <= 1:
            raise InvalidInputError(f"eta must be a number in [0, 1], got {self.eta!r}")
        k = self.cache_interval
        if not _is_int(k) or not 1 <= k <= MAX_CACHE_INTERVAL:
            raise InvalidInputError(
                f"cache_interval must be an integer in [1, {MAX_CACHE_INTERVAL}] (1: no feature cache), got {k!r}")

    def resolve(self, **overrides: Any) -> "SamplingParams":
        """A validated copy with the overrides that are not None applied."""
        unknown = sorted(set(overrides) - set(SAMPLING_FIELDS))
        if unknown:
            raise InvalidInputError(f"unknown sampling parameters {unknown}; known: {', '.join(SAMPLING_FIELDS)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def check_steps(self, num_timesteps: int) -> "SamplingParams":
        """Itself, when a process of `num_timesteps` diffusion steps can be sampled in its steps."""
        n = self.num_inference_steps
        if n > num_timesteps:
            raise InvalidInputError(f"sampling steps must be an integer in [1, {num_timesteps}], got {n!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))

DistillMethod = Literal["", "guidance", "progressive"]


@dataclass
class StudentConfig:
    """What a distilled model is, and where it came from; empty (method "") for a model trained from data.

    A guidance student (model.guidance_input) runs classifier-free guidance in one network pass, for scales in
    `guidance_range`; a step student also samples in exactly the `timesteps` it was distilled on (the network's
    timesteps, ascending), with DDIM. sdm.distill builds these configs."""

    method: DistillMethod = ""
    teacher: str = ""  # the teacher's model id (sdm.checkpoint.model_id)
    teacher_uri: str = ""
    guidance_range: tuple[float, float] = (0.0, MAX_GUIDANCE)  # the scales the student was trained over
    timesteps: tuple[int, ...] = ()  # a step student's sampling timesteps; () samples any
    from_steps: int = 0  # progressive: the teacher's steps its first round halved
    eta: float = 0.0  # progressive: the DDIM eta of the teacher's steps it learned (0: deterministic), its default
    optimizer_steps: int = 0  # of this distillation
    lr: float = 0.0

    @property
    def is_student(self) -> bool:
        return self.method != ""

    def validate(self, num_timesteps: int) -> None:
        lo, hi = self.guidance_range
        if not 0 <= lo <= hi <= MAX_GUIDANCE:
            raise ConfigError(f"student.guidance_range must satisfy 0 <= low <= high <= {MAX_GUIDANCE:g}, got {self.guidance_range}")
        if not 0 <= self.eta <= 1:
            raise ConfigError(f"student.eta must lie in [0, 1], got {self.eta}")
        ts = list(self.timesteps)
        if ts and (ts != sorted(set(ts)) or ts[0] < 0 or ts[-1] >= num_timesteps):
            raise ConfigError(f"student.timesteps must ascend without repeats within [0, {num_timesteps}), got {ts}")

    def check_request(self, params: SamplingParams) -> SamplingParams:
        """`params`, when this student can sample them; InvalidInputError naming the field it cannot."""
        lo, hi = self.guidance_range
        if not lo <= params.guidance_scale <= hi:
            raise InvalidInputError(f"guidance_scale must lie in [{lo:g}, {hi:g}] for this student, which was distilled "
                                    f"over those scales; got {params.guidance_scale!r}")
        if self.timesteps:
            n = len(self.timesteps)
            if params.num_inference_steps != n:
                raise InvalidInputError(f"num_inference_steps must be {n} for this student, which was distilled to "
                                        f"{n} steps; got {params.num_inference_steps!r}")
            if params.sampler != "ddim":
                raise InvalidInputError(f"sampler must be 'ddim' for this student, which was distilled on DDIM steps; "
                                        f"got {params.sampler!r}")
            if params.cache_interval != 1:
                raise InvalidInputError(f"cache_interval must be 1 for this student: each of its {n} steps needs the "
                                        f"whole network; got {params.cache_interval!r}")
        return params


def renamed(new_value: Any, old_value: Any, old: str, new: str) -> Any:
    """A parameter given by its name or, for one release, by its deprecated old name (with a DeprecationWarning,
    pointing at the caller's caller: the user of the door that took it)."""
    if old_value is None:
        return new_value
    warnings.warn(f"{old!r} is deprecated and will be removed; use {new!r}", DeprecationWarning, stacklevel=3)
    if new_value is not None and new_value != old_value:
        raise InvalidInputError(f"{new} and its deprecated name {old} disagree ({new_value!r} and {old_value!r}); give {new}")
    return old_value


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
    sampling: SamplingParams = field(default_factory=SamplingParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def validate(self) -> "SDMConfig":
        self.model.validate()
        self.diffusion.validate()
        self.student.validate(self.diffusion.num_timesteps)
        try:
            self.student.check_request(self.sampling.check_steps(self.diffusion.num_timesteps))
        except InvalidInputError as e:
            raise ConfigError(f"sampling: {e}") from None
        return self

    def resolve_sampling(self, **overrides: Any) -> SamplingParams:
        """The model's sampling defaults with a call's overrides (None: the default) applied, validated against
        this model, a student's limits included (InvalidInputError names the first bad parameter)."""
        return self.student.check_request(self.sampling.resolve(**overrides).check_steps(self.diffusion.num_timesteps))

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def identity_json(self) -> str:
        """What a model's id hashes (sdm.checkpoint.model_id): the config as format 1 stored it, so that a model
        keeps its id across format versions; a field added since counts once it differs from its default."""
        d = dataclasses.asdict(self)
        for (section, key), default in _ADDED_SINCE_FORMAT_1.items():
            if d[section][key] == default:
                del d[section][key]
        if self.student == StudentConfig():
            del d["student"]
        return json.dumps(d, indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SDMConfig":
        """A stored config of any format version (upgraded first), each field checked against its type."""
        d = upgrade_config(d)
        try:
            if not isinstance(d["name"], str):
                raise ConfigError(f"name must be a string, got {d['name']!r}")
            return cls(
                name=d["name"],
                model=_build(ModelConfig, d["model"], "model"),
                diffusion=_build(DiffusionConfig, d.get("diffusion", {}), "diffusion"),
                data=_build(DataConfig, d.get("data", {}), "data"),
                sampling=_build(SamplingParams, d.get("sampling", {}), "sampling"),
                train=_build(TrainConfig, d.get("train", {}), "train"),
                student=_build(StudentConfig, d.get("student", {}), "student"),
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
        if "preset" in d:  # a preset plus overrides, which may be written in an older format
            base = get_preset(d.pop("preset")).to_dict()
            d = _deep_merge(base, upgrade_config(d))
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


def _config_v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (no format_version) may call the diffusion length and the sampling steps `steps`."""
    out = dict(d)
    for old, new in _LEGACY_PATHS.items():
        section, key = old.split(".")
        _, new_key = new.split(".")
        if isinstance(out.get(section), dict) and key in out[section] and new_key not in out[section]:
            sec = dict(out[section])
            sec[new_key] = sec.pop(key)
            out[section] = sec
    return out


def upgrade(d: dict[str, Any], upgrades: list[Callable[[dict[str, Any]], dict[str, Any]]], what: str) -> dict[str, Any]:
    """A stored dict in the newest format: `upgrades[v - 1]` turns version v into v + 1; no format_version is
    version 1. A version newer than this library knows is refused, as reading it would guess."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(d).__name__}")
    newest = len(upgrades) + 1
    version = d.get("format_version", 1)
    if not _is_int(version) or not 1 <= version <= newest:
        raise ConfigError(f"{what} has format_version {version!r}; this version of sdm reads formats 1 to {newest}")
    for step in upgrades[version - 1:]:
        d = step(d)
    return {**d, "format_version": newest}


def upgrade_config(d: dict[str, Any]) -> dict[str, Any]:
    """A stored config dict (SDMConfig.to_dict of any version) in the current format."""
    return upgrade(d, _CONFIG_UPGRADES, "config")


def _config_v2_to_v3(d: dict[str, Any]) -> dict[str, Any]:
    """Version 3 added the student section and model.guidance_input, whose defaults describe every older model."""
    return d


_CONFIG_UPGRADES = [_config_v1_to_v2, _config_v2_to_v3]
_ADDED_SINCE_FORMAT_1 = {("sampling", "cache_interval"): 1, ("model", "guidance_input"): False}  # (section, key): default
FORMAT_VERSION = len(_CONFIG_UPGRADES) + 1  # of a stored config (SDMConfig.to_dict)


def _parse_value(raw: str) -> Any:
    """JSON first (it reads 2e-3 as a number, YAML 1.1 as a string), then YAML for bare words."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return yaml.safe_load(raw)


_KINDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


def _check_type(value: Any, hint: Any, name: str) -> Any:
    """`value` as the annotation `hint` takes it (JSON lists as tuples), or ConfigError naming `name`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _check_type(value, hint, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    ok = {int: _is_int, float: lambda v: _is_int(v) or isinstance(v, float), bool: lambda v: isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[hint](value)
    if not ok:
        raise ConfigError(f"{name} must be {_KINDS[hint]}, got {value!r}")
    return value


def _build(cls: type, d: Any, section: str) -> Any:
    """A config section from its dict, each value checked against its field's annotation."""
    if not isinstance(d, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {d!r}")
    hints = get_type_hints(cls)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise ConfigError(f"unknown {section} keys: {unknown}")
    kwargs = {k: _check_type(v, hints[k], f"{section}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{section}: {e}") from None
    except InvalidInputError as e:
        raise ConfigError(f"{section}: {e}") from None


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
        sampling=SamplingParams(guidance_scale=1.5),
    ),
    "cityscapes": SDMConfig(
        name="cityscapes",
        model=_paper_model(num_classes=35, instance_edges=True, image_size=(256, 512)),
        data=DataConfig(dataset="cityscapes"),
        sampling=SamplingParams(guidance_scale=2.0),
    ),
    "celebamask_hq": SDMConfig(
        name="celebamask_hq",
        model=_paper_model(num_classes=19, instance_edges=True),
        data=DataConfig(dataset="celebamask_hq", edges_from_labels=True),
        sampling=SamplingParams(guidance_scale=1.5),
    ),
    "coco_stuff": SDMConfig(
        name="coco_stuff",
        model=_paper_model(num_classes=183, instance_edges=True),
        data=DataConfig(dataset="coco_stuff", unlabeled_id=255, unlabeled_class=182, random_crop=True),
        sampling=SamplingParams(guidance_scale=1.5),
    ),
    # Small enough to train for a few minutes on 2 CPU cores; matches the toy dataset (`sdm data toy`).
    "tiny": SDMConfig(
        name="tiny",
        model=_small_model(num_classes=6, size=32),
        diffusion=DiffusionConfig(num_timesteps=1000, schedule="linear"),
        data=DataConfig(dataset="toy"),
        sampling=SamplingParams(guidance_scale=1.5, sampler="ddim", eta=1.0, num_inference_steps=25),
        train=TrainConfig(lr=1e-3, finetune_lr=3e-4, batch_size=16, ema_decay=0.995),
    ),
    # The benchmark world (`sdm data scenes`, 48x48, 18 classes): the tiny network at 48x48, trained in
    # minutes on 2 CPU cores (bench/world_benchmark.py).
    "scenes": SDMConfig(
        name="scenes",
        model=_small_model(num_classes=18, size=48),
        diffusion=DiffusionConfig(num_timesteps=1000, schedule="linear"),
        data=DataConfig(dataset="scenes"),
        sampling=SamplingParams(guidance_scale=1.5, sampler="ddim", eta=1.0, num_inference_steps=25),
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
