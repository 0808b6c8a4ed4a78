"""What the generation job and the packers record, each written by one owner: the stage rows of the generation job,
the rejects file (one reader for the packers' and the generation job's), and the dataset-matches-model check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jobs.stage_rows import Redraw, Rejected, ShardWritten, StoreFailed, from_row, to_rows
from jobs.train_data import check_dataset_fits
from sdm import storage
from sdm.data.card import DatasetCard, ShardInfo, check_classes_match
from sdm.data.packers import pack
from sdm.data.rejects import REJECTS_FILE, Reject, read_rejects
from sdm.errors import DatasetError
from sdm.generated_dataset import GenerationOutput, GenerationSettings

RECORDS = [
    ShardWritten(ShardInfo("shards/gen-0-train-00000.parquet", "train", 3, "ab" * 32, 1234)),
    Rejected(Reject("garbage", "train", "label map 'garbage' is not a readable image")),
    Rejected(Reject("a_0", "val", "label consistency 0.1000 below --min-consistency 0.5 after 2 draws", 0.1)),
    Redraw("b_1", 2),
    StoreFailed("s3://bucket/out/shards/x.parquet: write failed after 5 attempts"),
]


def test_stage_rows_round_trip_as_string_columns():
    columns = to_rows(RECORDS)
    assert columns["kind"] == ["shard", "reject", "reject", "redraw", "store_error"]
    assert all(isinstance(v, str) for v in columns["value"])
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    assert [from_row(r) for r in rows] == RECORDS


def test_an_unknown_stage_row_kind_is_named():
    with pytest.raises(ValueError, match="unknown stage row kind 'shards'; known: shard, reject, redraw, store_error"):
        from_row({"kind": "shards", "value": "{}"})


def test_rejects_of_a_packer_and_of_the_generation_job_read_back_by_one_reader(tmp_path):
    src = tmp_path / "src"
    for sub in ("images", "labels"):
        (src / sub).mkdir(parents=True)
    (src / "classes.txt").write_text("a\nb\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "images/good.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "labels/good.png")
    Image.fromarray(np.full((8, 8), 5, np.uint8)).save(src / "labels/range.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "images/range.png")
    packed = str(tmp_path / "packed")
    card, rejects = pack("folder", str(src), packed, log=lambda _: None)
    assert rejects == [Reject("range", "train", "class ids out of range: [5]")]
    assert read_rejects(packed) == rejects
    assert storage.read_bytes(storage.join(packed, REJECTS_FILE)) == (
        b'{"key": "range", "split": "train", "reason": "class ids out of range: [5]"}\n'
    )

    out = str(tmp_path / "generated")
    generated = [Reject("b_0", "train", "label consistency 0.2500 below", 0.25), Reject("a", "val", "unreadable")]
    settings = GenerationSettings("model", "ddim", 2, 1.5, 0)
    GenerationOutput(out).finalize(card, generated, settings)
    assert read_rejects(out) == sorted(generated, key=lambda r: r.key)
    lines = storage.read_bytes(storage.join(out, REJECTS_FILE)).decode().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"key": "a", "split": "val", "reason": "unreadable"},  # no score: no consistency key
        {"key": "b_0", "split": "train", "reason": "label consistency 0.2500 below", "consistency": 0.25},
    ]


def _card(num_classes: int) -> DatasetCard:
    return DatasetCard("toy", num_classes, [f"c{i}" for i in range(num_classes)], [[0, 0, 0]] * num_classes, True,
                       split_sizes={"train": 4})


def test_a_dataset_that_does_not_match_the_model_is_refused_naming_both(tiny_cfg):
    check_classes_match(_card(6), "s3://b/toy", tiny_cfg, "s3://b/model")  # matching: nothing to say
    with pytest.raises(DatasetError) as generation:
        check_classes_match(_card(5), "s3://b/toy", tiny_cfg, "s3://b/model")
    assert str(generation.value) == "dataset s3://b/toy ('toy') has 5 classes but model s3://b/model ('tiny') takes 6"
    with pytest.raises(DatasetError) as segmenter:
        check_classes_match(_card(5), "s3://b/toy", tiny_cfg, "s3://b/model", what="segmenter data")
    assert str(segmenter.value).startswith("segmenter data s3://b/toy ('toy') has 5 classes but model s3://b/model")
    with pytest.raises(DatasetError) as training:  # training knows the model by its config only
        check_dataset_fits(_card(7), tiny_cfg, "s3://b/toy")
    assert str(training.value) == "dataset s3://b/toy ('toy') has 7 classes but model config 'tiny' takes 6"
