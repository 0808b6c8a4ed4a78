"""`sdm eval` end to end on toy data, without Ray. The "generated" sets are made without a model: a perfect
generator (toy images painted afresh from the same label maps) and a noise generator, so the numbers have
known orders: the perfect set scores like the real images, the noise set far worse."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from sdm.cli import main
from sdm.data.toy import render_toy_image
from sdm.metrics.inception import random_fid_inception_state
from sdm.metrics.pretrained import ALEXNET_FILE, FID_INCEPTION_FILE
from sdm.testing import write_painted_generation

K = 3  # the eval_sets fixture's samples per label map

FAST = ["--segmenter-steps", "40", "--metrics", "miou,segmenter-fd,spectrum,pixel-diversity"]


def _eval(eval_sets: dict, generated: str, out: str, *extra: str) -> dict:
    rc = main(["eval", "--real", eval_sets["data"], "--generated", generated, "--out", out, "--cache-dir", eval_sets["cache"], *FAST, *extra])
    assert rc == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_perfect_generator_scores_like_real_images_and_noise_far_worse(eval_sets, capsys):
    good = _eval(eval_sets, eval_sets["perfect"], str(eval_sets["root"] / "r-perfect"))
    first = capsys.readouterr()
    assert "training the built-in segmenter" in first.err
    m = good["metrics"]
    assert m["miou"]["real"] > 0.5  # the segmenter works on real val images
    assert abs(m["miou"]["generated"] - m["miou"]["real"]) < 0.1  # perfect images: same distribution
    assert m["segmenter-fd"]["name"] == "Frechet distance in the built-in segmenter's features"
    assert (m["segmenter-fd"]["real_images"], m["segmenter-fd"]["generated_images"]) == (12, 12 * K)
    assert m["diversity"]["name"] == "low-pass pixel L1 (4x4 blocks)" and m["diversity"]["pairs"] == 12 * K * (K - 1) // 2
    assert m["spectrum"]["spectrum_db"] < 1.0 and 0.9 < m["spectrum"]["texture_ratio"] < 1.1  # painted like the real ones
    assert [r["class"] for r in m["miou"]["per_class"]] == ["sky", "grass", "water", "tree", "house", "ball"]

    bad = _eval(eval_sets, eval_sets["noise"], str(eval_sets["root"] / "r-noise"))
    second = capsys.readouterr()
    assert "training the built-in segmenter" not in second.err  # trained once per real dataset
    assert "reused cached statistics" in second.err and f"scoring {eval_sets['data']}" not in second.err  # real set embedded once
    n = bad["metrics"]
    assert n["miou"]["real"] == m["miou"]["real"]
    assert n["miou"]["generated"] < m["miou"]["generated"] - 0.3
    assert n["segmenter-fd"]["value"] > 5 * m["segmenter-fd"]["value"]
    assert n["spectrum"]["texture_ratio"] > 3 and n["spectrum"]["high_frequency_ratio"] > 3  # noise is all grain
    assert "mIoU (built-in segmenter" in second.out and "report:" in second.out
    assert "spectrum distance (dB)" in second.out and "(real images: " in second.out


def test_report_files(eval_sets):
    out = str(eval_sets["root"] / "r-perfect")
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert "| mIoU, real images |" in md and "| sky |" in md and "![contact sheet](contact_sheet.png)" in md
    sheet = Image.open(os.path.join(out, "contact_sheet.png"))
    assert sheet.size == ((2 + K) * 128, 6 * 128)  # label | real | K samples, 6 label maps, 32 px cells x4
    Image.open(os.path.join(out, "per_class_iou.png")).verify()
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["settings"]["metrics"] == ["miou", "segmenter-fd", "spectrum", "pixel-diversity"]
    assert "| high-frequency power, generated / real |" in md
    assert res["generated"]["uri"] == eval_sets["perfect"] and res["real"]["split"] == "val"


def test_image_folders_score_the_same_as_shards(eval_sets):
    folder = eval_sets["root"] / "perfect-folder"
    for sub in ("images", "labels"):
        shutil.copytree(os.path.join(eval_sets["perfect"], sub), folder / sub)
    shards = json.load(open(eval_sets["root"] / "r-perfect" / "results.json"))["metrics"]
    folders = _eval(eval_sets, str(folder), str(eval_sets["root"] / "r-folder"))["metrics"]
    assert folders["miou"]["generated"] == pytest.approx(shards["miou"]["generated"])
    assert folders["segmenter-fd"]["value"] == pytest.approx(shards["segmenter-fd"]["value"])
    assert folders["diversity"]["pairs"] == shards["diversity"]["pairs"]  # samples grouped by <key>_<k> names


def test_fid_without_weights_is_refused_and_says_where_to_put_them(eval_sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = ["eval", "--real", eval_sets["data"], "--generated", eval_sets["perfect"], "--out", str(tmp_path / "r"), "--cache-dir", eval_sets["cache"]]
    hub = f"{tmp_path}/torch/hub/checkpoints"
    # The defaults: FID needs its weights; diversity falls back to the low-pass pixel L1 and says so.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"put {FID_INCEPTION_FILE} at {hub}/{FID_INCEPTION_FILE}" in err and ALEXNET_FILE not in err
    assert "diversity: no AlexNet weights for LPIPS, so low-pass pixel L1 (4x4 blocks) (not LPIPS)" in err
    # LPIPS asked for by name: every missing file in one error.
    assert main([*args, "--metrics", "fid,lpips"]) == 2
    err = capsys.readouterr().err
    assert f"put {FID_INCEPTION_FILE} at {hub}/{FID_INCEPTION_FILE}" in err and f"put {ALEXNET_FILE} at {hub}/{ALEXNET_FILE}" in err
    assert not os.path.exists(tmp_path / "r" / "results.json")


def test_inception_weights_from_a_file_that_is_not_pytorch_fids(eval_sets, tmp_path):
    """The FID path with randomly initialised Inception weights: computed, and not called FID."""
    path = str(tmp_path / "random-inception.pth")
    torch.save(random_fid_inception_state(0), path)
    small = write_painted_generation(str(tmp_path / "small"), eval_sets["data"], lambda rng, s: render_toy_image(rng, s["label"], s["instance"]), k=K, maps=1)
    res = _eval(eval_sets, small, str(tmp_path / "r"), "--metrics", "fid", "--inception-weights", path, "--max-real", "3")
    fid = res["metrics"]["fid"]
    assert fid["name"].startswith("Frechet distance in Inception features (weights ") and "not pytorch-fid's" in fid["name"]
    assert (fid["real_images"], fid["generated_images"]) == (3, K) and fid["value"] > 0


def test_one_diversity_metric_and_a_named_weights_file_must_exist(eval_sets, tmp_path, capsys):
    args = ["eval", "--real", eval_sets["data"], "--generated", eval_sets["perfect"], "--out", str(tmp_path / "r"), "--cache-dir", eval_sets["cache"]]
    assert main([*args, "--metrics", "lpips,diversity"]) == 2
    assert "choose one diversity metric" in capsys.readouterr().err
    assert main([*args, "--metrics", "diversity", "--alexnet-weights", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r" / "results.json")
