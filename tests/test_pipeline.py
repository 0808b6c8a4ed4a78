"""The pipeline: input validation, determinism, precision, checkpoints and configs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdm.unet import SDMUNet
from sdm.checkpoint import load_model, model_id, save_model
from sdm.config import SDMConfig, get_preset, list_presets
from sdm.errors import CheckpointError, ConfigError, InvalidInputError
from sdm.labels import remap_raw_labels
from sdm.pipeline import SDMPipeline
from sdm.seeds import derive_seed


@pytest.fixture
def pipe(random_tiny_net, tiny_cfg):
    return SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32")


def _label(seed=0, b=None):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 6, (32, 32) if b is None else (b, 32, 32))


def test_returns_uint8_images_per_label_and_sample(pipe):
    out = pipe(_label(b=2), num_inference_steps=3, num_samples=3, seed=1)
    assert out.shape == (6, 32, 32, 3) and out.dtype == np.uint8
    assert len({out[i].tobytes() for i in range(6)}) == 6  # every sample differs


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_images_whatever_the_batch(random_tiny_net, tiny_cfg, precision):
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision=precision, micro_batch=4)
    labels = _label(b=3)
    together = pipe(labels, num_inference_steps=4, num_samples=2, seed=7)  # 6 rows: micro-batches of 4 + 2 padded
    # sample k of label b is the same when the label map is sent alone with the same row seed: exact, as the
    # network sees the same micro-batch size and layout whatever the other rows are
    alone = pipe(labels[1], num_inference_steps=4, seed=[derive_seed(7, 2), derive_seed(7, 3)], num_samples=2)
    assert np.array_equal(alone, together[2:4])
    # a channels-last label input gives the same bytes (the runner makes each micro-batch contiguous)
    label = pipe.prepare_labels(labels).repeat_interleave(2, dim=0)
    strided = label.contiguous(memory_format=torch.channels_last)
    assert np.array_equal(pipe.runner(strided, [derive_seed(7, r) for r in range(6)], pipe.params(num_inference_steps=4)), together)
    assert not np.array_equal(pipe(labels, num_inference_steps=4, num_samples=2, seed=8), together)


def test_other_micro_batch_sizes_differ_by_rounding_at_most(random_tiny_net, tiny_cfg):
    labels = _label(b=3)
    runs = [SDMPipeline(random_tiny_net, tiny_cfg, "cpu", "fp32", micro_batch=m)(labels, num_inference_steps=4, num_samples=2, seed=7)
            for m in (1, 8)]
    diff = np.abs(runs[0].astype(int) - runs[1].astype(int))
    assert diff.max() <= 2  # fp32 kernels may sum in another order for another batch size: a level or two at most


def test_accepts_pil_and_tensor_label_maps(pipe):
    lab = _label().astype(np.uint8)
    a = pipe(lab, num_inference_steps=2, seed=0)
    b = pipe(Image.fromarray(lab, mode="L"), num_inference_steps=2, seed=0)
    c = pipe(torch.from_numpy(lab), num_inference_steps=2, seed=0)
    assert np.array_equal(a, b) and np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": 1e30}, r"guidance_scale must be a number in \[0, 100\]"),
        ({"num_inference_steps": 0}, "sampling steps"),
        ({"num_inference_steps": 1001}, r"sampling steps must be an integer in \[1, 1000\], got 1001"),
        ({"eta": 2.0}, "eta must be a number in"),
        ({"sampler": "euler"}, "unknown sampler 'euler'"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_parameters_raise_one_clear_error(pipe, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        pipe(_label(), **kwargs)


def test_out_of_range_class_ids_are_listed(pipe):
    lab = _label()
    lab[0, 0], lab[1, 1], lab[2, 2] = 6, 9, 9
    with pytest.raises(InvalidInputError, match=r"6 classes\): 6, 9$"):
        pipe(lab, num_inference_steps=1)


@pytest.mark.parametrize(
    "label,message",
    [
        (np.zeros((30, 32), dtype=np.int64), "not divisible by the network's down-sampling factor 4"),
        (np.zeros((2, 2, 32, 32), dtype=np.int64), "must be \\[H, W\\] or \\[B, H, W\\]"),
        (np.full((32, 32), 0.5), "integer ids"),
        (Image.new("RGB", (32, 32)), "single-channel"),
        ("labels.png", "numpy array, tensor or PIL image"),
    ],
)
def test_bad_label_maps_raise_one_clear_error(pipe, label, message):
    with pytest.raises(InvalidInputError, match=message):
        pipe(label, num_inference_steps=1)


def test_instance_map_must_match(pipe):
    with pytest.raises(InvalidInputError, match="instance maps"):
        pipe(_label(), instances=np.zeros((16, 16), dtype=np.int64), num_inference_steps=1)


def test_bf16_inference_is_close_to_fp32(random_tiny_net, tiny_cfg):
    lab = _label(b=2)
    fp32 = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32")(lab, num_inference_steps=5, seed=3)
    bf16 = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="bf16")(lab, num_inference_steps=5, seed=3)
    diff = np.abs(fp32.astype(int) - bf16.astype(int))
    # a randomly initialised model is chaotic where clipping flips, so bound the mean and the tail
    assert diff.mean() < 3.0 and (diff > 16).mean() < 0.02
    assert not np.array_equal(fp32, bf16)  # bf16 autocast really ran


def test_checkpoint_round_trip_is_exact(tmp_path, random_tiny_net, tiny_cfg):
    save_model(str(tmp_path / "m"), random_tiny_net, tiny_cfg)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    net, cfg = load_model(str(tmp_path / "m"))
    assert cfg == tiny_cfg
    for (k, a), (k2, b) in zip(random_tiny_net.state_dict().items(), net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    lab = _label()
    a = SDMPipeline(random_tiny_net, tiny_cfg, "cpu", "fp32")(lab, num_inference_steps=3, seed=0)
    b = SDMPipeline.from_pretrained(f"file://{tmp_path}/m", "cpu", "fp32")(lab, num_inference_steps=3, seed=0)
    assert np.array_equal(a, b)


def test_model_id_depends_on_weights_and_config_not_on_file_bytes(tmp_path, random_tiny_net, tiny_cfg):
    # The same weights exported twice, with their metadata in another order (as safetensors may write it from
    # one process to the next), are one model; a changed weight or config is another.
    save_model(str(tmp_path / "a"), random_tiny_net, tiny_cfg, metadata={"step": "300", "stage": "finetune"})
    save_model(str(tmp_path / "b"), random_tiny_net, tiny_cfg, metadata={"stage": "finetune", "step": "300", "x": "1"})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "b" / "model.safetensors").read_bytes()
    assert model_id(str(tmp_path / "a")) == model_id(str(tmp_path / "b"))
    assert model_id(str(tmp_path / "a")).startswith("tiny-")
    changed = SDMUNet(tiny_cfg.model)
    changed.load_state_dict(random_tiny_net.state_dict())
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-6
    save_model(str(tmp_path / "c"), changed, tiny_cfg)
    save_model(str(tmp_path / "d"), random_tiny_net, tiny_cfg.with_overrides(["sampling.guidance_scale=2.0"]))
    ids = {model_id(str(tmp_path / n)) for n in "acd"}
    assert len(ids) == 3


def test_run_directory_with_exported_model_loads(tmp_path, random_tiny_net, tiny_cfg):
    save_model(str(tmp_path / "run" / "model"), random_tiny_net, tiny_cfg)
    assert load_model(str(tmp_path / "run"))[1] == tiny_cfg


def test_checkpoint_errors_name_the_problem(tmp_path, random_tiny_net, tiny_cfg):
    with pytest.raises(CheckpointError, match="no model at"):
        load_model(str(tmp_path / "nothing"))
    save_model(str(tmp_path / "m"), random_tiny_net, tiny_cfg)
    other = tiny_cfg.with_overrides(["model.model_channels=64"])
    (tmp_path / "m" / "config.json").write_text(other.to_json())
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(str(tmp_path / "m"))


def test_configs_round_trip_and_overrides():
    for name in list_presets():
        cfg = get_preset(name)
        assert SDMConfig.from_json(cfg.to_json()) == cfg
        assert SDMConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg = SDMConfig.from_yaml("preset: tiny\nmodel: {model_channels: 64}\n")
    assert cfg.model.model_channels == 64 and cfg.model.num_classes == 6
    assert json.loads(get_preset("ade20k").to_json())["model"]["channel_mult"] == [1, 1, 2, 2, 4, 4]
    assert get_preset("tiny").with_overrides(["train.lr=2e-3"]).train.lr == 0.002
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="unknown key 'model.width'"):
        get_preset("tiny").with_overrides(["model.width=3"])
    with pytest.raises(ConfigError, match="not divisible by the down-sampling factor"):
        get_preset("tiny").with_overrides(["model.image_size=[30, 32]"])


def test_raw_label_remapping_of_ade20k_and_coco():
    ade = get_preset("ade20k")
    assert remap_raw_labels(np.array([0, 1, 150]), ade.data, 151).tolist() == [150, 0, 149]
    coco = get_preset("coco_stuff")
    assert remap_raw_labels(np.array([0, 181, 255]), coco.data, 183).tolist() == [0, 181, 182]


def test_per_row_guidance_matches_separate_calls(pipe):
    label = pipe.prepare_labels(_label(b=3))
    seeds = [derive_seed(3, 0), derive_seed(3, 1), derive_seed(3, 2)]
    params = pipe.params(num_inference_steps=3, sampler="ddim")
    mixed = pipe.runner(label, seeds, params, guidance=[1.5, 3.0, 1.0])
    for i, g in enumerate([1.5, 3.0, 1.0]):  # exact: each row is computed as it would be alone
        assert np.array_equal(mixed[i : i + 1], pipe.runner(label[i : i + 1], seeds[i : i + 1], pipe.params(guidance_scale=g, num_inference_steps=3, sampler="ddim")))
    assert not np.array_equal(mixed[1:2], pipe.runner(label[1:2], seeds[1:2], pipe.params(guidance_scale=1.5, num_inference_steps=3, sampler="ddim")))
    with pytest.raises(InvalidInputError, match="guidance_scale must be a number in"):
        pipe.runner(label, seeds, params, guidance=[1.5, 1e30, 1.0])


def test_edit_keeps_unmasked_pixels_and_regenerates_the_mask(pipe):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    out = pipe.edit(image, mask, _label(), num_inference_steps=4, seed=5, num_samples=2)
    assert out.shape == (2, 32, 32, 3)
    assert np.array_equal(out[:, mask == 0], np.broadcast_to(image[mask == 0], out[:, mask == 0].shape))
    assert not np.array_equal(out[0][mask == 1], image[mask == 1])
    assert not np.array_equal(out[0], out[1])
    assert np.array_equal(out, pipe.edit(image, mask, _label(), num_inference_steps=4, seed=5, num_samples=2))
    with pytest.raises(InvalidInputError, match="must both match the label map size"):
        pipe.edit(image[:16], mask, _label(), num_inference_steps=1)


def test_configs_stored_with_the_old_step_names_still_load():
    """Earlier configs called both the diffusion length and the sampling steps `steps`."""
    d = json.loads(get_preset("tiny").to_json())
    del d["format_version"]  # stored before configs had one: format 1
    d["diffusion"]["steps"] = d["diffusion"].pop("num_timesteps")
    d["sampling"]["steps"] = d["sampling"].pop("num_inference_steps")
    assert SDMConfig.from_dict(d) == get_preset("tiny")
    cfg = get_preset("tiny").with_overrides(["sampling.steps=40", "diffusion.steps=500"])
    assert (cfg.sampling.num_inference_steps, cfg.diffusion.num_timesteps) == (40, 500)
    with pytest.raises(ConfigError, match="sampling steps must be an integer in \\[1, 500\\], got 600"):
        get_preset("tiny").with_overrides(["diffusion.num_timesteps=500", "sampling.num_inference_steps=600"])


def test_the_deprecated_parameter_names_warn_and_draw_the_same_bytes(pipe, random_tiny_net, tiny_cfg):
    new = pipe(_label(), num_inference_steps=2, seed=3, num_samples=2)
    with pytest.warns(DeprecationWarning, match="'num_steps' is deprecated and will be removed; use 'num_inference_steps'"):
        old = pipe(_label(), num_steps=2, seed=3, num_samples=2)
    assert np.array_equal(old, new) and not np.array_equal(new, pipe(_label(), num_inference_steps=3, seed=3, num_samples=2))
    image, mask = np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), np.uint8)
    with pytest.warns(DeprecationWarning, match="'num_steps'"):
        assert np.array_equal(pipe.edit(image, mask, _label(), num_steps=2, seed=1), pipe.edit(image, mask, _label(), num_inference_steps=2, seed=1))
    with pytest.warns(DeprecationWarning), pytest.raises(InvalidInputError, match="num_inference_steps and its deprecated name num_steps disagree"):
        pipe(_label(), num_inference_steps=2, num_steps=3)
    with pytest.warns(DeprecationWarning, match="'fast' is deprecated and will be removed; use 'fast_path'"):
        eager_old = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32", fast=False)
    eager = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32", fast_path=False)
    assert eager_old.net is random_tiny_net and not eager_old.runner.label_cache and not eager.runner.label_cache
    assert np.array_equal(eager_old(_label(), num_inference_steps=2, seed=3), eager(_label(), num_inference_steps=2, seed=3))
