"""`sdm data export`: packed, toy and generated-like datasets to the ADE20K, Cityscapes and HF Parquet layouts, read
back with the readers trainers use (PIL, `datasets`, Ray Data); on local files and on S3; reruns and refusals."""

import glob
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdm import storage
from sdm.cli import main
from sdm.data.card import read_card
from sdm.data.export import CITYSCAPES_TRAIN_IDS, EXPORT_FILE, export, id_convention
from sdm.data.packers import pack
from sdm.data.shards import iter_rows, iter_samples
from sdm.data.toy import render_toy_image, write_toy_dataset
from sdm.errors import EXIT_FAILED, EXIT_REFUSED, DatasetError, InvalidInputError
from sdm.testing import write_painted_generation


def _pixels(path) -> np.ndarray:
    return np.array(Image.open(path))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("export") / "toy")
    write_toy_dataset(uri, n=12, size=16, seed=3, val_fraction=0.25)
    return uri


@pytest.fixture(scope="module")
def generated(tmp_path_factory, toy) -> str:
    """The generation job's output format, painted without a model: 2 images per val label map of the toy set."""
    uri = str(tmp_path_factory.mktemp("export") / "generated")
    return write_painted_generation(uri, toy, lambda rng, s: render_toy_image(rng, s["label"], s["instance"]), k=2)


def test_stored_label_ids_are_the_sources_raw_ids_in_packed_and_generated_datasets(toy, generated):
    toy_labels = {s["key"]: s["label"] for s in iter_samples(toy, split="val")}
    for s in iter_samples(generated):  # generation keeps the source's ids: no remapping to model classes
        np.testing.assert_array_equal(s["label"], toy_labels[s["key"].rsplit("_", 1)[0]])
    assert id_convention(read_card(toy)).name == id_convention(read_card(generated)).name == "class-index"


def test_conventions_map_each_named_dataset_to_ade20k_ids():
    from sdm.data.card import DatasetCard
    from sdm.data.classes import dataset_classes

    def card(names):
        return DatasetCard("x", len(names), names, [[0, 0, 0]] * len(names), False)

    coco = id_convention(card(dataset_classes("coco_stuff")[0] + ["unlabeled"])).ade20k_ids()
    assert coco[255] == 0 and coco[0] == 1 and coco[181] == 182 and len(coco) == 183
    ade = id_convention(card(dataset_classes("ade20k")[0])).ade20k_ids()
    assert ade == {i: i for i in range(151)}
    assert id_convention(card(dataset_classes("cityscapes")[0])).ade20k_ids() == {i: i for i in range(35)}
    assert id_convention(card(["background", "skin"])).ade20k_ids() == {0: 1, 1: 2}


def test_toy_to_ade20k_layout_is_pixel_exact_with_ids_shifted_past_unlabelled(toy, tmp_path):
    dst = tmp_path / "ade"
    assert export(toy, str(dst), "ade20k") == {"train": 9, "val": 3}
    for s in iter_samples(toy):
        folder = {"train": "training", "val": "validation"}[s["split"]]
        np.testing.assert_array_equal(_pixels(dst / "images" / folder / f"{s['key']}.png"), s["image"])
        ann = _pixels(dst / "annotations" / folder / f"{s['key']}.png")
        np.testing.assert_array_equal(ann, s["label"] + 1)  # toy has no unlabelled class: 0 stays free
    assert len(list((dst / "images").rglob("*"))) == 2 + 12
    record = json.loads((dst / EXPORT_FILE).read_text())
    assert record["layout"] == "ade20k" and record["source"] == toy and record["splits"] == {"train": 9, "val": 3}
    assert record["label_ids"]["source"] == "class-index" and record["source_card"] == json.loads(Path(toy, "dataset.json").read_text())


def test_packed_ade20k_exports_back_to_its_own_files(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    for folder, stem, seed in (("training", "ADE_train_1", 0), ("validation", "ADE_val_1", 1)):
        arr = np.random.default_rng(seed).integers(0, 255, (8, 12, 3), dtype=np.uint8)
        (src / "images" / folder).mkdir(parents=True)
        Image.fromarray(arr).save(src / "images" / folder / f"{stem}.jpg", format="JPEG")
        ids = np.arange(96, dtype=np.uint8).reshape(8, 12) % 151  # 0 (other) .. 95
        (src / "annotations" / folder).mkdir(parents=True)
        Image.fromarray(ids).save(src / "annotations" / folder / f"{stem}.png")
    pack("ade20k", str(src), str(tmp_path / "packed"))
    export(str(tmp_path / "packed"), str(tmp_path / "out"), "ade20k")
    out = _tree(tmp_path / "out")
    for name, data in _tree(src).items():
        if name.endswith(".jpg"):
            assert out[name] == data  # the source JPEG bytes, unchanged
        else:
            np.testing.assert_array_equal(_pixels(tmp_path / "out" / name), _pixels(src / name))  # ADE20K ids as they were


def test_packed_cityscapes_exports_label_train_and_instance_ids(tmp_path):
    src = tmp_path / "cityscapes"
    labels = np.array([[0, 7, 26, 33], [24, 11, 34, 5]], dtype=np.uint8)
    for stem, city in (("aachen_000000_000019", "aachen"), ("frame1", "mine")):
        (src / "leftImg8bit/train" / city).mkdir(parents=True)
        (src / "gtFine/train" / city).mkdir(parents=True)
        Image.fromarray(np.full((2, 4, 3), 9, np.uint8)).save(src / f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png")
        Image.fromarray(labels).save(src / f"gtFine/train/{city}/{stem}_gtFine_labelIds.png")
        Image.fromarray((labels.astype(np.uint16) * 1000 + 1)).save(src / f"gtFine/train/{city}/{stem}_gtFine_instanceIds.png")
    pack("cityscapes", str(src), str(tmp_path / "packed"))
    dst = tmp_path / "out"
    assert export(str(tmp_path / "packed"), str(dst), "cityscapes") == {"train": 2}
    for stem, city in (("aachen_000000_000019", "aachen"), ("frame1", "synthetic")):  # no city in the key: fixed folder
        gt = dst / "gtFine/train" / city
        np.testing.assert_array_equal(_pixels(dst / f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png"), np.full((2, 4, 3), 9))
        np.testing.assert_array_equal(_pixels(gt / f"{stem}_gtFine_labelIds.png"), labels)
        np.testing.assert_array_equal(_pixels(gt / f"{stem}_gtFine_instanceIds.png"), labels.astype(np.int64) * 1000 + 1)
        train_ids = _pixels(gt / f"{stem}_gtFine_labelTrainIds.png")
        np.testing.assert_array_equal(train_ids, [[255, 0, 13, 18], [11, 2, 255, 255]])
    assert CITYSCAPES_TRAIN_IDS.size == 35 and sorted(set(CITYSCAPES_TRAIN_IDS.tolist()) - {255}) == list(range(19))


def test_generated_dataset_to_hf_parquet_decodes_with_datasets(generated, tmp_path, monkeypatch):
    import datasets  # the test extra's
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    dst = tmp_path / "hf-export"
    assert export(generated, str(dst), "hf-parquet") == {"val": 6}
    ds = datasets.load_dataset("parquet", data_files={"val": str(dst / "data/val-*.parquet")}, cache_dir=str(tmp_path / "cache"))["val"]
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["label"], datasets.Image)
    rows = {r["key"]: r for r in iter_rows(generated)}
    assert sorted(ds["key"]) == sorted(rows)
    for got in ds:
        src = rows[got["key"]]
        assert isinstance(got["image"], Image.Image)
        np.testing.assert_array_equal(np.array(got["image"]), np.array(Image.open(io.BytesIO(src["image"]))))
        np.testing.assert_array_equal(np.array(got["label"]), np.array(Image.open(io.BytesIO(src["label"]))))  # raw ids
        np.testing.assert_array_equal(np.array(got["instance"]), np.array(Image.open(io.BytesIO(src["instance"]))))
        for col in ("source_key", "sample_index", "seed", "model_id", "sampler", "steps", "guidance", "split", "height"):
            assert got[col] == src[col]


@pytest.mark.ray
def test_hf_parquet_export_reads_with_ray_data(toy, tmp_path):
    import ray.data

    from ray_session import ray_session

    dst = tmp_path / "hf-export"
    export(toy, str(dst), "hf-parquet", splits=["train"])
    assert [p.name for p in (dst / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    with ray_session(num_cpus=1, include_dashboard=False):
        rows = ray.data.read_parquet(str(dst / "data")).take_all()
    source = {r["key"]: r for r in iter_rows(toy, split="train")}
    assert len(rows) == 9
    for r in rows:
        assert r["image"]["bytes"] == source[r["key"]]["image"] and r["image"]["path"] == f"{r['key']}.png"
        assert r["label"]["bytes"] == source[r["key"]]["label"] and r["split"] == "train"


def test_s3_round_trip_and_rerun(s3_env):
    src, dst = f"{s3_env}/toy", f"{s3_env}/exports/ade"
    write_toy_dataset(src, n=4, size=8, seed=1, val_fraction=0.25)
    assert main(["data", "export", src, dst, "--layout", "ade20k"]) == 0
    first = storage.read_bytes(storage.join(dst, EXPORT_FILE))
    assert json.loads(first)["source"] == src
    for s in iter_samples(src):
        folder = {"train": "training", "val": "validation"}[s["split"]]
        ann = np.array(Image.open(io.BytesIO(storage.read_bytes(f"{dst}/annotations/{folder}/{s['key']}.png"))))
        np.testing.assert_array_equal(ann, s["label"] + 1)
        img = np.array(Image.open(io.BytesIO(storage.read_bytes(f"{dst}/images/{folder}/{s['key']}.png"))))
        np.testing.assert_array_equal(img, s["image"])
    assert main(["data", "export", src, dst, "--layout", "ade20k"]) == 0
    assert storage.read_bytes(storage.join(dst, EXPORT_FILE)) == first


@pytest.mark.parametrize("layout", ["ade20k", "hf-parquet"])
def test_rerun_rewrites_the_same_bytes_and_drops_stale_parquet(toy, tmp_path, layout, capsys):
    dst = tmp_path / layout
    assert main(["data", "export", toy, str(dst), "--layout", layout]) == 0
    out = capsys.readouterr()
    assert out.out.strip().startswith(f"exported {toy} as {layout} (9 train, 3 val) to {dst}")
    assert "train: 9/9" in out.err and "val: 3/3" in out.err
    before = _tree(dst)
    stale = dst / "data" / "train-00001-of-00002.parquet"
    if layout == "hf-parquet":
        stale.write_bytes(b"left by an earlier run")
    assert main(["data", "export", toy, str(dst), "--layout", layout]) == 0
    assert _tree(dst) == before and not stale.exists()


def test_split_option_exports_only_that_split(toy, tmp_path):
    assert export(toy, str(tmp_path / "v"), "ade20k", splits=["val"]) == {"val": 3}
    assert sorted(os.listdir(tmp_path / "v" / "images")) == ["validation"]


def test_refusals_name_the_bad_thing(toy, tmp_path, capsys):
    with pytest.raises(InvalidInputError, match="unknown export layout 'voc'"):
        export(toy, str(tmp_path / "a"), "voc")
    with pytest.raises(DatasetError, match=r"no dataset at .*nothing: dataset.json is missing"):
        export(str(tmp_path / "nothing"), str(tmp_path / "a"), "ade20k")
    with pytest.raises(DatasetError, match=r"has no split 'test' \(it has train, val\)"):
        export(toy, str(tmp_path / "a"), "ade20k", splits=["test"])
    with pytest.raises(DatasetError, match=r"layout 'cityscapes' writes Cityscapes labelIds, but .* \('toy', 6 classes\)"):
        export(toy, str(tmp_path / "a"), "cityscapes")
    with pytest.raises(InvalidInputError, match="holds a dataset in the shard format"):
        export(toy, toy, "hf-parquet")
    export(toy, str(tmp_path / "a"), "ade20k")
    with pytest.raises(InvalidInputError, match=r"holds another export \(layout: 'ade20k' there, 'hf-parquet' now\)"):
        export(toy, str(tmp_path / "a"), "hf-parquet")
    assert not (tmp_path / "a" / "data").exists()
    with pytest.raises(SystemExit):
        main(["data", "export", toy, str(tmp_path / "b"), "--layout", "voc"])
    assert "invalid choice: 'voc'" in capsys.readouterr().err
    assert main(["data", "export", toy, str(tmp_path / "b"), "--layout", "ade20k", "--split", "test"]) == EXIT_REFUSED
    assert "has no split 'test'" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_failed_export_is_left_without_its_marker(tmp_path, capsys):
    src, dst = tmp_path / "toy", tmp_path / "out"
    write_toy_dataset(str(src), n=4, size=8, seed=2, val_fraction=0.25)
    assert main(["data", "export", str(src), str(dst), "--layout", "hf-parquet"]) == 0
    (shard,) = [s for s in read_card(str(src)).shards if s.split == "val"]
    (src / shard.path).write_bytes(b"corrupt")
    assert main(["data", "export", str(src), str(dst), "--layout", "hf-parquet"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "fails its checksum" in err and f"{dst} is unfinished (no {EXPORT_FILE})" in err
    assert not (dst / EXPORT_FILE).exists() and glob.glob(str(dst / "data" / "train-*.parquet"))
