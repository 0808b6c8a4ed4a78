"""The config layer on its own: SamplingParams valid on construction, stored formats upgraded by one function per
format, every field checked against its type, and sdm.config importable without torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from sdm.config import (
    FORMAT_VERSION,
    MAX_CACHE_INTERVAL,
    SAMPLER_NAMES,
    SamplingParams,
    SDMConfig,
    get_preset,
    upgrade_config,
)
from sdm.errors import ConfigError, InvalidInputError
from sdm.generated_dataset import SETTINGS_FORMAT, GenerationSettings, upgrade_settings

NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
from sdm.config import SDMConfig, get_preset
cfg = get_preset("ade20k")
again = SDMConfig.from_dict(cfg.to_dict())
tiny = SDMConfig.from_yaml("preset: tiny\\nsampling: {num_inference_steps: 10}")
print(again == cfg, again.model.num_classes, tiny.resolve_sampling(guidance_scale=2.0))
try:
    import torch
except ImportError:
    print("no torch")
"""


def test_the_config_layer_reads_and_validates_configs_without_torch():
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "True 151 SamplingParams(guidance_scale=2.0, sampler='ddim', num_inference_steps=10, eta=1.0, cache_interval=1)",
        "no torch",
    ]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("guidance_scale", -0.5, r"guidance_scale must be a number in \[0, 100\], got -0.5"),
        ("guidance_scale", float("inf"), "guidance_scale must be a number"),
        ("guidance_scale", "2", "guidance_scale must be a number in \\[0, 100\\], got '2'"),
        ("sampler", "euler", "unknown sampler 'euler'; choose one of ddpm, ddim, dpm\\+\\+, dpm\\+\\+sde"),
        ("num_inference_steps", 0, "sampling steps must be an integer >= 1, got 0"),
        ("num_inference_steps", 2.0, "sampling steps must be an integer >= 1, got 2.0"),
        ("num_inference_steps", True, "sampling steps must be an integer >= 1, got True"),
        ("eta", 1.5, r"eta must be a number in \[0, 1\], got 1.5"),
        ("cache_interval", MAX_CACHE_INTERVAL + 1, r"cache_interval must be an integer in \[1, 10\]"),
    ],
)
def test_sampling_params_refuse_a_bad_field_on_construction(field, value, message):
    with pytest.raises(InvalidInputError, match=message):
        SamplingParams(**{field: value})
    with pytest.raises(InvalidInputError, match=message):  # and every copy made from valid params
        SamplingParams().resolve(**{field: value})


def test_sampling_params_are_frozen_and_resolve_applies_only_given_overrides():
    base = SamplingParams(guidance_scale=2.0, num_inference_steps=25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.eta = 0.0  # type: ignore[misc]
    assert base.resolve(guidance_scale=None, num_inference_steps=10, sampler="dpm++") == SamplingParams(
        guidance_scale=2.0, num_inference_steps=10, sampler="dpm++")
    assert base.resolve() is not base and base.resolve() == base
    with pytest.raises(InvalidInputError, match=r"unknown sampling parameters \['steps'\]"):
        base.resolve(steps=10)


def test_the_steps_bound_is_the_models_number_of_diffusion_steps():
    cfg = get_preset("tiny").with_overrides(["diffusion.num_timesteps=40"])
    assert cfg.resolve_sampling(num_inference_steps=40).num_inference_steps == 40
    with pytest.raises(InvalidInputError, match=r"sampling steps must be an integer in \[1, 40\], got 41"):
        cfg.resolve_sampling(num_inference_steps=41)
    with pytest.raises(ConfigError, match=r"sampling: sampling steps must be an integer in \[1, 40\], got 50"):
        get_preset("tiny").with_overrides(["diffusion.num_timesteps=40", "sampling.num_inference_steps=50"])


def test_the_sampler_names_are_the_sampler_registrys_keys():
    from sdm.samplers import SAMPLERS

    assert SAMPLERS == SAMPLER_NAMES == ("ddpm", "ddim", "dpm++", "dpm++sde")


# A config as stored before format versions (format 1): both step counts called `steps`, no cache_interval.
V1_TINY = {
    "name": "tiny",
    "model": {"num_classes": 6, "instance_edges": True, "image_size": [32, 32], "model_channels": 32, "channel_mult": [1, 2, 2],
              "num_res_blocks": 1, "attention_resolutions": [8], "num_head_channels": 32, "spade_hidden": 32, "norm_groups": 8},
    "diffusion": {"steps": 1000, "schedule": "linear", "lambda_vlb": 0.001},
    "data": {"dataset": "toy"},
    "sampling": {"guidance_scale": 1.5, "sampler": "ddim", "steps": 25, "eta": 1.0},
    "train": {"lr": 1e-3, "finetune_lr": 3e-4, "batch_size": 16, "ema_decay": 0.995},
}


def test_a_stored_config_of_format_1_is_upgraded_and_stored_again_with_its_version():
    upgraded = upgrade_config(V1_TINY)
    assert upgraded["format_version"] == FORMAT_VERSION == 3
    assert upgraded["diffusion"]["num_timesteps"] == 1000 and "steps" not in upgraded["diffusion"]
    assert upgraded["sampling"] == {"guidance_scale": 1.5, "sampler": "ddim", "num_inference_steps": 25, "eta": 1.0}
    assert V1_TINY["sampling"]["steps"] == 25  # the caller's dict is left as it was
    cfg = SDMConfig.from_dict(V1_TINY)
    assert cfg == get_preset("tiny")
    stored = json.loads(cfg.to_json())
    assert stored["format_version"] == 3 and stored["sampling"]["cache_interval"] == 1
    assert stored["student"]["method"] == "" and stored["model"]["guidance_input"] is False  # not a student
    assert SDMConfig.from_json(cfg.to_json()) == cfg


def test_a_config_from_a_newer_format_is_refused():
    for version in (FORMAT_VERSION + 1, 0, "2"):
        with pytest.raises(ConfigError, match=rf"config has format_version {version!r}; this version of sdm reads formats 1 to 3"):
            SDMConfig.from_dict({**get_preset("tiny").to_dict(), "format_version": version})


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("model", "num_classes", "six", "model.num_classes must be an integer, got 'six'"),
        ("model", "num_classes", True, "model.num_classes must be an integer, got True"),
        ("model", "num_classes", 6.0, "model.num_classes must be an integer, got 6.0"),
        ("model", "instance_edges", "yes", "model.instance_edges must be a boolean, got 'yes'"),
        ("model", "image_size", [32], r"model.image_size must be a list of 2 values, got \[32\]"),
        ("model", "channel_mult", [1, "2"], r"model.channel_mult\[1\] must be an integer, got '2'"),
        ("model", "conditioning", "film", "model.conditioning must be one of 'spade', 'concat', got 'film'"),
        ("train", "lr", [1e-4], r"train.lr must be a number, got \[0.0001\]"),
        ("sampling", "guidance_scale", "2", "sampling.guidance_scale must be a number, got '2'"),
        ("sampling", "sampler", "euler", "sampling.sampler must be one of 'ddpm', 'ddim', 'dpm\\+\\+', 'dpm\\+\\+sde', got 'euler'"),
        ("data", "unlabeled_id", "255", "data.unlabeled_id must be an integer, got '255'"),
        ("diffusion", "num_timesteps", None, "diffusion.num_timesteps must be an integer, got None"),
    ],
)
def test_a_value_of_the_wrong_type_is_a_config_error_naming_its_key(section, key, value, message):
    d = get_preset("tiny").to_dict()
    d[section] = {**d[section], key: value}
    with pytest.raises(ConfigError, match=message):
        SDMConfig.from_dict(d)


def test_right_types_pass_unchanged():
    d = get_preset("tiny").to_dict()
    d["train"]["lr"] = 1  # an integer is a number
    d["data"]["unlabeled_id"] = None  # optional
    cfg = SDMConfig.from_dict(json.loads(json.dumps(d)))
    assert cfg.train.lr == 1 and cfg.model.image_size == (32, 32) and cfg.model.channel_mult == (1, 2, 2)


# generation.json as the generation job wrote it before format versions (format 1): flat sampling keys.
V1_SETTINGS = {"model_id": "tiny-0123", "sampler": "dpm++", "steps": 3, "guidance": 2.0, "seed": 7, "eta": 0.0,
               "cache_interval": 2, "micro_batch": 4, "precision": "fp32", "fast_path": True, "compile": False,
               "output_format": "shards", "seed_rule": 2, "segmenter": "none", "min_consistency": None, "max_retries": 0}


def test_generation_settings_of_format_1_are_upgraded_to_the_same_settings():
    upgraded = upgrade_settings(V1_SETTINGS)
    assert upgraded["format_version"] == SETTINGS_FORMAT == 2
    assert upgraded["sampling"] == {"guidance_scale": 2.0, "sampler": "dpm++", "num_inference_steps": 3, "eta": 0.0, "cache_interval": 2}
    settings = GenerationSettings.from_dict(V1_SETTINGS)
    assert settings == GenerationSettings(
        model_id="tiny-0123", sampling=SamplingParams(guidance_scale=2.0, sampler="dpm++", num_inference_steps=3, eta=0.0,
                                                     cache_interval=2),
        seed=7, micro_batch=4, precision="fp32")
    assert GenerationSettings.from_dict(settings.to_dict()) == settings
    # older still: before the feature cache, the fast path, scoring and the seed rule (refused later: rule 1 != 2)
    oldest = {k: V1_SETTINGS[k] for k in ("model_id", "sampler", "steps", "guidance", "seed", "eta", "micro_batch", "precision",
                                          "output_format")}
    assert GenerationSettings.from_dict(oldest) == dataclasses.replace(
        settings, sampling=dataclasses.replace(settings.sampling, cache_interval=1), fast_path=False, seed_rule=1)


def test_generation_settings_from_a_newer_format_are_refused():
    with pytest.raises(ConfigError, match="generation.json has format_version 3; this version of sdm reads formats 1 to 2"):
        GenerationSettings.from_dict({**V1_SETTINGS, "format_version": 3})


def test_a_models_identity_is_its_format_1_config_so_model_ids_survive_the_format_change():
    cfg = get_preset("tiny")
    # the config bytes that model ids hashed before format versions, for the tiny preset
    v1 = {k: v for k, v in cfg.to_dict().items() if k not in ("format_version", "student")}
    v1["sampling"] = {k: v for k, v in v1["sampling"].items() if k != "cache_interval"}
    v1["model"] = {k: v for k, v in v1["model"].items() if k != "guidance_input"}
    assert cfg.identity_json() == json.dumps(v1, indent=2, sort_keys=True)
    changed = cfg.with_overrides(["sampling.cache_interval=2"])  # a field added since counts once it is set
    assert json.loads(changed.identity_json())["sampling"]["cache_interval"] == 2
