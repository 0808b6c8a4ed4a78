"""Packers over tiny fixture trees in each published layout, built on the fly; rejects and reruns."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdm import storage
from sdm.data.card import read_card
from sdm.data.packers import pack
from sdm.data.shards import iter_samples
from sdm.errors import EXIT_REJECTS, DatasetError

REPO = Path(__file__).resolve().parents[1]


def _img(path: Path, h=8, w=12, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def _ids(path: Path, value, h=8, w=12, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w), value, dtype=dtype)
    arr[:, : w // 2] = 0 if np.isscalar(value) else arr[:, : w // 2]
    Image.fromarray(arr).save(path)
    return arr


def test_ade20k_layout_packs_both_splits_with_source_image_bytes(tmp_path, store):
    src = tmp_path / "ADEChallengeData2016"
    _img(src / "images/training/ADE_train_1.jpg", fmt="JPEG")
    _ids(src / "annotations/training/ADE_train_1.png", 150)
    _img(src / "images/validation/ADE_val_1.jpg", seed=1, fmt="JPEG")
    _ids(src / "annotations/validation/ADE_val_1.png", 7)
    card, rejects = pack("ade20k", str(src), store)
    assert rejects == [] and card.split_sizes == {"train": 1, "val": 1}
    assert card.num_classes == 151 and card.class_names[0] == "other" and card.class_names[150] == "flag"
    rows = {s["key"]: s for s in iter_samples(store)}
    assert set(rows) == {"ADE_train_1", "ADE_val_1"} and rows["ADE_train_1"]["label"].max() == 150
    from sdm.data.shards import iter_rows

    raw = next(iter_rows(store, split="train"))
    assert raw["image"] == (src / "images/training/ADE_train_1.jpg").read_bytes()  # JPEG kept as in the source


def test_cityscapes_layout_reads_label_and_16_bit_instance_ids(tmp_path):
    src = tmp_path / "cityscapes"
    stem = "aachen_000000_000019"
    _img(src / f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png")
    _ids(src / f"gtFine/train/aachen/{stem}_gtFine_labelIds.png", 26)
    inst = _ids(src / f"gtFine/train/aachen/{stem}_gtFine_instanceIds.png", 26001, dtype=np.uint16)
    card, rejects = pack("cityscapes", str(src), str(tmp_path / "out"))
    assert rejects == [] and card.has_instance and card.num_classes == 35
    assert card.class_names[26] == "car" and card.palette[26] == [0, 0, 142]
    s = next(iter_samples(str(tmp_path / "out")))
    assert np.array_equal(s["instance"], inst) and s["label"].max() == 26


def test_celebamask_coco_and_folder_layouts(tmp_path):
    celeb = tmp_path / "celeb"
    _img(celeb / "train/images/0.jpg", fmt="JPEG")
    _ids(celeb / "train/labels/0.png", 18)
    card, _ = pack("celebamask_hq", str(celeb), str(tmp_path / "c1"))
    assert card.num_classes == 19 and not card.has_instance and card.split_sizes == {"train": 1}

    coco = tmp_path / "coco"
    _img(coco / "val_img/000000000139.jpg", fmt="JPEG")
    _ids(coco / "val_label/000000000139.png", 255)  # unlabeled
    _ids(coco / "val_inst/000000000139.png", 3)
    card, rejects = pack("coco_stuff", str(coco), str(tmp_path / "c2"))
    assert rejects == [] and card.num_classes == 183 and card.class_names[182] == "unlabeled" and card.has_instance

    mine = tmp_path / "mine"
    _img(mine / "images/a.png")
    _ids(mine / "labels/a.png", 2)
    (mine / "classes.txt").write_text("void\nroad\ncar\n")
    card, _ = pack("folder", str(mine), str(tmp_path / "c3"))
    assert card.class_names == ["void", "road", "car"] and card.name == "mine"


def _bad_tree(tmp_path: Path) -> Path:
    src = tmp_path / "bad"
    (src / "classes.txt").parent.mkdir(parents=True)
    (src / "classes.txt").write_text("a\nb\nc\n")
    _img(src / "images/good.png"), _ids(src / "labels/good.png", 2)
    _img(src / "images/nolabel.png")
    _ids(src / "labels/noimage.png", 1)
    (src / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _ids(src / "labels/corrupt.png", 1)
    _img(src / "images/small.png", h=4), _ids(src / "labels/small.png", 1)
    _img(src / "images/range.png"), _ids(src / "labels/range.png", 9)
    return src


def test_bad_samples_go_to_rejects_and_the_good_ones_are_packed(tmp_path):
    card, rejects = pack("folder", str(_bad_tree(tmp_path)), str(tmp_path / "out"))
    assert card.split_sizes == {"train": 1}
    reasons = {r.key: r.reason for r in rejects}
    assert set(reasons) == {"nolabel", "noimage", "corrupt", "small", "range"}
    assert "has no label" in reasons["nolabel"] and "has no image" in reasons["noimage"]
    assert "not a readable image" in reasons["corrupt"] and "size mismatch" in reasons["small"]
    assert reasons["range"] == "class ids out of range: [9]"
    written = [json.loads(line) for line in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert {r["key"] for r in written} == set(reasons)


def test_cli_exits_non_zero_naming_the_count_unless_told_to_skip(tmp_path):
    src = _bad_tree(tmp_path)
    cmd = [sys.executable, "-m", "sdm", "data", "pack", "--layout", "folder", str(src), str(tmp_path / "out")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == EXIT_REJECTS and "5 samples rejected" in out.stderr and "packed bad: 1 train" in out.stdout
    assert subprocess.run([*cmd, "--skip-bad"], cwd=REPO, capture_output=True).returncode == 0
    # the rerun replaced the shard instead of adding one
    assert storage.list_files(str(tmp_path / "out/shards")) == ["train-00000.parquet"]
    assert read_card(str(tmp_path / "out")).split_sizes == {"train": 1}


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="unknown layout 'voc'"):
        pack("voc", str(tmp_path), str(tmp_path / "o"))
    with pytest.raises(DatasetError, match="does not exist"):
        pack("ade20k", str(tmp_path / "nope"), str(tmp_path / "o"))
    with pytest.raises(DatasetError, match="needs a class-names file"):
        pack("folder", str(tmp_path), str(tmp_path / "o"))


def test_toy_and_inspect_commands_print_counts_and_write_a_contact_sheet(tmp_path):
    dst = str(tmp_path / "toy")
    out = subprocess.run([sys.executable, "-m", "sdm", "data", "toy", dst, "--n", "16"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "wrote the toy dataset (14 train, 2 val; 2 shards)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "sdm", "data", "inspect", dst, "--n", "3"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "splits: train 14, val 2" in out.stdout and " sky " in out.stdout
    sheet = Image.open(tmp_path / "toy" / "contact_sheet.png")
    assert sheet.size == (3 * 128, 3 * 128)  # image | label | edges, three samples
