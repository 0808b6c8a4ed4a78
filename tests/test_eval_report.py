"""`sdm eval` end to end on toy data, without Ray. The "generated" sets are made without a model: a perfect
generator (toy images painted afresh from the same label maps) and a noise generator, so the numbers have
known orders: the perfect set scores like the real images, the noise set far worse."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdm.cli import main
from sdm.data.card import read_card
from sdm.data.shards import encode_png, iter_samples
from sdm.data.toy import render_toy_image, write_toy_dataset
from sdm.generate import GenerationOutput, GenerationSettings, generated_row
from sdm.metrics.inception import random_fid_inception_state
from sdm.metrics.pretrained import ALEXNET_FILE, FID_INCEPTION_FILE

K = 3
FAST = ["--segmenter-steps", "40", "--metrics", "miou,segmenter-fd,pixel-diversity"]


def _write_generated(uri: str, data: str, paint, maps: int | None = None) -> str:
    """A dataset in the generation job's output format (shards + folders), K images per val label map."""
    settings = GenerationSettings(model_id="test-painter", sampler="none", steps=0, guidance=0.0, seed=0, output_format="folder")
    out = GenerationOutput(uri)
    out.claim(settings)
    rng = np.random.default_rng(1)
    val = list(iter_samples(data, split="val"))[:maps]
    rows = [generated_row(s["key"], k, "val", paint(rng, s), encode_png(s["label"]), encode_png(s["instance"]), settings)
            for s in val for k in range(K)]
    out.write(rows, folder=True)
    out.finalize(read_card(data), [])
    return uri


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = str(root / "toy")
    write_toy_dataset(data, n=96, size=32, seed=0)
    perfect = _write_generated(str(root / "perfect"), data, lambda rng, s: render_toy_image(rng, s["label"], s["instance"]))
    noise = _write_generated(str(root / "noise"), data, lambda rng, s: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return {"root": root, "data": data, "perfect": perfect, "noise": noise, "cache": str(root / "cache")}


def _eval(sets, generated: str, out: str, *extra: str) -> dict:
    rc = main(["eval", "--real", sets["data"], "--generated", generated, "--out", out, "--cache-dir", sets["cache"], *FAST, *extra])
    assert rc == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_perfect_generator_scores_like_real_images_and_noise_far_worse(sets, capsys):
    good = _eval(sets, sets["perfect"], str(sets["root"] / "r-perfect"))
    first = capsys.readouterr()
    assert "training the built-in segmenter" in first.err
    m = good["metrics"]
    assert m["miou"]["real"] > 0.5  # the segmenter works on real val images
    assert abs(m["miou"]["generated"] - m["miou"]["real"]) < 0.1  # perfect images: same distribution
    assert m["segmenter-fd"]["name"] == "Frechet distance in the built-in segmenter's features"
    assert (m["segmenter-fd"]["real_images"], m["segmenter-fd"]["generated_images"]) == (12, 12 * K)
    assert m["diversity"]["name"] == "mean pairwise pixel L1" and m["diversity"]["pairs"] == 12 * K * (K - 1) // 2
    assert [r["class"] for r in m["miou"]["per_class"]] == ["sky", "grass", "water", "tree", "house", "ball"]

    bad = _eval(sets, sets["noise"], str(sets["root"] / "r-noise"))
    second = capsys.readouterr()
    assert "training the built-in segmenter" not in second.err  # trained once per real dataset
    assert "reused cached statistics" in second.err and f"scoring {sets['data']}" not in second.err  # real set embedded once
    n = bad["metrics"]
    assert n["miou"]["real"] == m["miou"]["real"]
    assert n["miou"]["generated"] < m["miou"]["generated"] - 0.3
    assert n["segmenter-fd"]["value"] > 5 * m["segmenter-fd"]["value"]
    assert n["diversity"]["value"] > 2 * m["diversity"]["value"]  # uniform noise differs more than toy paintings
    assert "mIoU (built-in segmenter" in second.out and "report:" in second.out


def test_report_files(sets):
    out = str(sets["root"] / "r-perfect")
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert "| mIoU, real images |" in md and "| sky |" in md and "![contact sheet](contact_sheet.png)" in md
    sheet = Image.open(os.path.join(out, "contact_sheet.png"))
    assert sheet.size == ((2 + K) * 128, 6 * 128)  # label | real | K samples, 6 label maps, 32 px cells x4
    Image.open(os.path.join(out, "per_class_iou.png")).verify()
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["settings"]["metrics"] == ["miou", "segmenter-fd", "pixel-diversity"]
    assert res["generated"]["uri"] == sets["perfect"] and res["real"]["split"] == "val"


def test_image_folders_score_the_same_as_shards(sets):
    folder = sets["root"] / "perfect-folder"
    for sub in ("images", "labels"):
        shutil.copytree(os.path.join(sets["perfect"], sub), folder / sub)
    shards = json.load(open(sets["root"] / "r-perfect" / "results.json"))["metrics"]
    folders = _eval(sets, str(folder), str(sets["root"] / "r-folder"))["metrics"]
    assert folders["miou"]["generated"] == pytest.approx(shards["miou"]["generated"])
    assert folders["segmenter-fd"]["value"] == pytest.approx(shards["segmenter-fd"]["value"])
    assert folders["diversity"]["pairs"] == shards["diversity"]["pairs"]  # samples grouped by <key>_<k> names


def test_fid_without_weights_is_refused_and_says_where_to_put_them(sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rc = main(["eval", "--real", sets["data"], "--generated", sets["perfect"], "--out", str(tmp_path / "r"), "--cache-dir", sets["cache"]])
    assert rc == 2
    err = capsys.readouterr().err
    hub = f"{tmp_path}/torch/hub/checkpoints"
    assert f"put {FID_INCEPTION_FILE} at {hub}/{FID_INCEPTION_FILE}" in err and f"put {ALEXNET_FILE} at {hub}/{ALEXNET_FILE}" in err
    assert not os.path.exists(tmp_path / "r" / "results.json")


def test_inception_weights_from_a_file_that_is_not_pytorch_fids(sets, tmp_path):
    """The FID path with randomly initialised Inception weights: computed, and not called FID."""
    path = str(tmp_path / "random-inception.pth")
    torch.save(random_fid_inception_state(0), path)
    small = _write_generated(str(tmp_path / "small"), sets["data"], lambda rng, s: render_toy_image(rng, s["label"], s["instance"]), maps=1)
    res = _eval(sets, small, str(tmp_path / "r"), "--metrics", "fid", "--inception-weights", path, "--max-real", "3")
    fid = res["metrics"]["fid"]
    assert fid["name"].startswith("Frechet distance in Inception features (weights ") and "not pytorch-fid's" in fid["name"]
    assert (fid["real_images"], fid["generated_images"]) == (3, K) and fid["value"] > 0
