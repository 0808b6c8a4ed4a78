"""Randomly initialised models and model-free generated datasets for tests, benchmarks and demos. Their images
are never results of a trained model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sdm.checkpoint import load_classes, load_model, model_id, save_classes, save_model
from sdm.config import ModelConfig, SamplingParams, SDMConfig, get_preset
from sdm.data.card import read_card
from sdm.data.shards import iter_samples
from sdm.distill import halving_grids, init_student, student_config
from sdm.imageio import encode_png
from sdm.generated_dataset import Draw, GenerationOutput, GenerationSettings, generated_row
from sdm.labels import label_input
from sdm.unet import SDMUNet


def perturbed(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter, so zero-initialised layers pass signal and outputs vary
    with the label map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def seeded_weights(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter from one seeded generator, independent of the layers' own initialisation (which
    may change between torch releases): weights N(0, 1/fan_in), everything else 1-dimensional N(0, 0.05^2),
    norm scales around 1. For golden-value tests against other implementations of the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(noise / (p[0].numel() ** 0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.05 * noise)
            else:
                p.copy_(0.05 * noise)
    return net


def blocky_batches(model: ModelConfig, batch: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of (x0 in [-1, 1], label input): blocky random label maps, each class painted in one colour
    shared by all batches. A mapping a network fits in tens of steps, for training checks and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    h, w = model.image_size
    colours = torch.rand(model.num_classes, 3, generator=g) * 2 - 1
    out = []
    for _ in range(count):
        coarse = torch.randint(0, model.num_classes, (batch, 1, max(h // 8, 1), max(w // 8, 1)), generator=g)
        classes = torch.nn.functional.interpolate(coarse.float(), size=(h, w), mode="nearest").long()[:, 0]
        out.append((colours[classes].permute(0, 3, 1, 2).contiguous(), label_input(classes, model)))
    return out


def save_random_model(uri: str, preset: str = "tiny", seed: int = 0) -> SDMConfig:
    """Export a randomly initialised, perturbed model of a preset to `uri`; returns its config."""
    config = get_preset(preset)
    torch.manual_seed(seed)
    save_model(uri, perturbed(SDMUNet(config.model), seed=seed), config, metadata={"origin": "random-init"})
    return config


def save_random_student(uri: str, teacher_uri: str, target_steps: int | None = 4, seed: int = 1) -> SDMConfig:
    """Export a student of the model at `teacher_uri` with randomly perturbed weights: a step student of
    `target_steps` steps (the grid of halving twice), or a guidance student when None; returns its config."""
    teacher, config = load_model(teacher_uri)
    T = config.diffusion.num_timesteps
    grid = halving_grids(T, 4 * target_steps, target_steps)[-1] if target_steps else ()
    student = student_config(config, "progressive" if target_steps else "guidance", model_id(teacher_uri), teacher_uri,
                             timesteps=grid, from_steps=4 * target_steps if target_steps else 0)
    save_model(uri, perturbed(init_student(teacher, student), seed=seed), student, metadata={"origin": "random-init"})
    classes = load_classes(teacher_uri)
    if classes is not None:
        save_classes(uri, *classes)
    return student


def write_painted_generation(uri: str, data: str, paint: Callable[[np.random.Generator, dict[str, Any]], np.ndarray], k: int,
                             maps: int | None = None) -> str:
    """A dataset in the generation job's output format (shards and image folders) made without a model: k images
    painted by paint(rng, val sample) for each of the first `maps` validation label maps of `data`."""
    settings = GenerationSettings(model_id="painter", sampling=SamplingParams(), seed=0, output_format="folder")  # painted, not sampled
    out = GenerationOutput(uri)
    out.claim(settings)
    rng = np.random.default_rng(1)
    val = list(iter_samples(data, split="val"))[:maps]
    rows = [generated_row(s["key"], Draw(j), "val", paint(rng, s), encode_png(s["label"]), encode_png(s["instance"]), settings)
            for s in val for j in range(k)]
    out.write(rows, folder=True)
    out.finalize(read_card(data), [], settings)
    return uri


def parity_segmenter(x: torch.Tensor) -> torch.Tensor:
    """A segmenter for tests (`sdm.testing:parity_segmenter`): class 0 or 1 by the parity of a pixel's red level.
    Deterministic, and it follows the sampling noise rather than the image's layout, so on a label map of class 0
    alone a pair's score (the share of pixels predicted 0) changes from one draw to the next."""
    return (x[:, 0] * 255).round().long() % 2
