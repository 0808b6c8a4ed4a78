"""The procedural worlds: the benchmark world's invariants (property-tested over seeds), determinism, the shard
format, and the colour-lookup baseline of bench/world_difficulty.py, which must succeed where colour decides (toy)
and fail where it does not (scenes)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from world_difficulty import colour_lookup, colour_lookup_predict, colour_lookup_scores  # noqa: E402
from sdm.data.card import read_card  # noqa: E402
from sdm.data.procedural import write_world  # noqa: E402
from sdm.data.scenes import CAR, OBJECT_ID, SCENES, SCENES_CLASSES, THIN_CLASSES, TREE, WALL, WIRE  # noqa: E402
from sdm.data.shards import iter_samples  # noqa: E402
from sdm.data.toy import TOY  # noqa: E402
from sdm.errors import InvalidInputError  # noqa: E402

seeds = st.integers(0, 2**32 - 1)


def layouts(seed: int, n: int, size: int = 48):
    rng = np.random.default_rng(seed)
    return [SCENES.sample(rng, size) for _ in range(n)]


def has_3x3_block(mask: np.ndarray) -> bool:
    """Whether some 3x3 square lies wholly inside the mask: false exactly when the mask is at most 2 pixels wide."""
    h, w = mask.shape
    block = np.ones((h - 2, w - 2), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            block &= mask[dy : h - 2 + dy, dx : w - 2 + dx]
    return bool(block.any())


def test_the_width_check_sees_a_3_pixel_bar():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, 4:6] = True
    assert not has_3x3_block(mask)
    mask[2:5, 6] = True
    assert has_3x3_block(mask)


@settings(max_examples=25, deadline=None)
@given(seeds, st.sampled_from([32, 48, 64]))
def test_a_layout_is_deterministic_in_its_seed_and_well_formed(seed, size):
    (img, label, inst), = layouts(seed, 1, size)
    (img2, label2, inst2), = layouts(seed, 1, size)
    assert np.array_equal(img, img2) and np.array_equal(label, label2) and np.array_equal(inst, inst2)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert label.shape == inst.shape == (size, size) and label.dtype == np.uint8
    assert label.max() < len(SCENES_CLASSES)
    stuff = inst < OBJECT_ID
    assert np.array_equal(inst[stuff], label[stuff])  # stuff carries its class id
    for obj in np.unique(inst[~stuff]):  # one class per object id
        assert len(np.unique(label[inst == obj])) == 1
    for cls in THIN_CLASSES:
        assert not has_3x3_block(label == cls), SCENES_CLASSES[cls]


def test_every_class_occurs_and_touching_instances_of_one_class_do_too():
    samples = layouts(0, 300)
    counts = np.bincount(np.concatenate([s[1].ravel() for s in samples]), minlength=len(SCENES_CLASSES))
    assert (counts > 0).all(), dict(zip(SCENES_CLASSES, counts))
    assert min(counts) / counts.sum() > 5e-4  # even the rarest class has training pixels in a few hundred scenes
    touching = {WALL: 0, CAR: 0, TREE: 0}
    for _, label, inst in samples:
        for cls in touching:
            a, b = inst[:, :-1], inst[:, 1:]
            same = (label[:, :-1] == cls) & (label[:, 1:] == cls) & (a != b)
            touching[cls] += bool(same.any())
    assert all(v >= 10 for v in touching.values()), touching  # the instance edges separate them
    assert sum(bool((s[1] == WIRE).any()) for s in samples) >= 50


def test_one_layout_admits_different_images():
    rng = np.random.default_rng(3)
    label, inst = SCENES.layout(rng, 48)
    a, b = SCENES.paint(rng, label, inst), SCENES.paint(rng, label, inst)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10


def test_write_world_writes_the_shard_format_with_its_card(tmp_path):
    card = write_world(SCENES, str(tmp_path / "s"), n=16, seed=5)
    assert card.num_classes == 18 and card.class_names == SCENES_CLASSES and card.has_instance
    assert card.split_sizes == {"train": 14, "val": 2} and card.extra["generator"] == "sdm.data.scenes"
    first = next(iter(iter_samples(str(tmp_path / "s"), split="train")))
    (img, label, inst), = layouts(5, 1)
    assert np.array_equal(first["image"], img) and np.array_equal(first["label"], label)
    assert np.array_equal(first["instance"], inst)
    with pytest.raises(InvalidInputError, match="size >= 24"):
        write_world(SCENES, str(tmp_path / "small"), n=4, size=16)


def test_sdm_data_scenes_writes_a_dataset(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sdm", "data", "scenes", str(tmp_path / "d"), "--n", "8", "--size", "32"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wrote the scenes dataset (7 train, 1 val; 2 shards)" in out.stdout
    assert read_card(str(tmp_path / "d")).extra["size"] == 32


def test_colour_lookup_fits_class_means_and_predicts_the_nearest():
    images = np.array([[[[10, 0, 0], [20, 0, 0]], [[200, 0, 0], [0, 0, 255]]]], dtype=np.uint8)
    labels = np.array([[[0, 0], [1, 2]]])
    means = colour_lookup(images, labels, 4)
    assert np.allclose(means[:3], [[15, 0, 0], [200, 0, 0], [0, 0, 255]]) and np.isinf(means[3]).all()
    pred = colour_lookup_predict(means, np.array([[[[120, 0, 0], [0, 10, 240]]]], dtype=np.uint8))
    assert pred.tolist() == [[[1, 2]]]


def world_arrays(world, n: int, seed: int):
    rng = np.random.default_rng(seed)
    samples = [world.sample(rng) for _ in range(n)]
    return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])


def test_colour_decides_the_toy_world_but_not_the_scenes():
    toy = colour_lookup_scores(*world_arrays(TOY, 150, 0), *world_arrays(TOY, 40, 1), len(TOY.class_names))
    scenes = colour_lookup_scores(*world_arrays(SCENES, 150, 0), *world_arrays(SCENES, 40, 1), len(SCENES.class_names))
    assert toy.miou() > 0.85
    assert scenes.miou() < 0.3
