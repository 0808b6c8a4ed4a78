"""Shards + card: round trips, checksums, crash safety and streaming, on local files and S3."""

import numpy as np
import pyarrow as pa
import pytest

from sdm import storage
from sdm.data.card import CARD_FILE, read_card
from sdm.data.preprocess import fit_to_model, preprocess_eval, preprocess_train
from sdm.data.shards import ShardWriter, decode_row, iter_rows, iter_samples, make_row
from sdm.imageio import encode_png
from sdm.data.toy import TOY_PALETTE, render_toy_image, render_toy_sample, write_toy_dataset
from sdm.config import get_preset
from sdm.errors import DatasetError, InvalidInputError


def test_toy_dataset_round_trips_byte_exact(store):
    card = write_toy_dataset(store, n=40, size=32, seed=3, val_fraction=0.25)
    assert card.split_sizes == {"train": 30, "val": 10} and card.num_classes == 6 and card.has_instance
    assert read_card(store) == card
    rng = np.random.default_rng(3)
    expected = [render_toy_sample(rng, 32) for _ in range(40)]
    got = list(iter_samples(store))
    assert [s["key"] for s in got] == [f"toy-{i:06d}" for i in range(40)]
    for (image, label, instance), s in zip(expected, got):
        assert np.array_equal(s["image"], image) and np.array_equal(s["label"], label)
        assert np.array_equal(s["instance"], instance)
    rows = list(iter_rows(store, split="val"))
    assert len(rows) == 10 and {r["split"] for r in rows} == {"val"}
    assert rows[0]["image"] == encode_png(expected[30][0])  # the stored bytes are the encoded source


def test_toy_is_deterministic_in_its_seed(tmp_path):
    a = write_toy_dataset(str(tmp_path / "a"), n=8, seed=1)
    b = write_toy_dataset(str(tmp_path / "b"), n=8, seed=1)
    c = write_toy_dataset(str(tmp_path / "c"), n=8, seed=2)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards] != [s.sha256 for s in c.shards]


def test_toy_classes_are_recoverable_from_colour_and_images_are_diverse():
    rng = np.random.default_rng(0)
    samples = [render_toy_sample(rng, 32) for _ in range(60)]
    pixels = np.concatenate([img.reshape(-1, 3) for img, _, _ in samples]).astype(float)
    labels = np.concatenate([lab.reshape(-1) for _, lab, _ in samples])
    centroids = np.stack([pixels[labels == c].mean(0) for c in range(6)])
    nearest = np.argmin(((pixels[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.9  # a colour lookup already segments most pixels
    image, label, instance = samples[0]
    other = render_toy_image(np.random.default_rng(99), label, instance)
    assert np.abs(other.astype(int) - image.astype(int)).mean() > 5  # same layout, a different image
    assert len(TOY_PALETTE) == 6


def test_reader_names_a_missing_or_corrupt_shard(store):
    card = write_toy_dataset(store, n=8, seed=0)
    shard = card.shards[0]
    storage.write_bytes(storage.join(store, shard.path), b"garbage")
    with pytest.raises(DatasetError, match=f"shard {shard.path} .* fails its checksum"):
        list(iter_rows(store))
    storage.delete(storage.join(store, shard.path))
    with pytest.raises(DatasetError, match=f"shard {shard.path} .* is missing"):
        list(iter_rows(store))


def test_a_pack_killed_mid_write_leaves_nothing_that_looks_complete(store, monkeypatch):
    calls = {"n": 0}
    real = storage.write_bytes

    def dies_on_second_shard(uri, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write_toy_dataset(store, n=16, seed=0, shard_bytes=1)  # one sample per shard
    monkeypatch.setattr(storage, "write_bytes", real)
    assert not storage.exists(storage.join(store, CARD_FILE))
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        read_card(store)
    shard_dir = storage.join(store, "shards")
    assert storage.list_files(shard_dir) == ["train-00000.parquet"]  # the whole first shard, no partial second
    # a rerun writes the same shard names: no duplicates
    card = write_toy_dataset(store, n=16, seed=0, shard_bytes=1)
    assert len(storage.list_files(shard_dir)) == len(card.shards) == 16


def test_streaming_holds_one_shard_at_a_time(tmp_path):
    card = write_toy_dataset(str(tmp_path), n=64, size=64, seed=0, shard_bytes=30_000)
    assert len(card.shards) >= 8
    largest = max(s.bytes for s in card.shards)
    total = sum(s.bytes for s in card.shards)
    base = pa.total_allocated_bytes()
    peak = 0
    for _ in iter_samples(str(tmp_path), shuffle=True, buffer_size=8):
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert peak < 3 * largest < total


def test_shuffled_reading_is_a_permutation_and_seeded(tmp_path):
    write_toy_dataset(str(tmp_path), n=48, seed=0, shard_bytes=20_000)
    plain = [r["key"] for r in iter_rows(str(tmp_path))]
    a = [r["key"] for r in iter_rows(str(tmp_path), shuffle=True, seed=1, buffer_size=8)]
    b = [r["key"] for r in iter_rows(str(tmp_path), shuffle=True, seed=1, buffer_size=8)]
    assert sorted(a) == sorted(plain) and a == b and a != plain


def test_decode_rejects_mismatched_sizes_naming_the_key():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    row = make_row("k1", "train", encode_png(image), encode_png(np.zeros((8, 6), dtype=np.uint8)), None, 8, 8)
    with pytest.raises(DatasetError, match="sample 'k1': label is 6x8 but the image is 8x8"):
        decode_row(row)
    row["label"] = b"\x89PNG broken"
    with pytest.raises(DatasetError, match="label of sample 'k1' is not a readable image"):
        decode_row(row)


def test_sixteen_bit_ids_survive_the_png_round_trip():
    ids = np.array([[0, 300], [26001, 65535]])
    row = make_row("k", "train", encode_png(np.zeros((2, 2, 3), np.uint8)), encode_png(ids), encode_png(ids), 2, 2)
    s = decode_row(row)
    assert np.array_equal(s["label"], ids) and np.array_equal(s["instance"], ids)


def test_preprocessing_resizes_flips_and_maps_to_unit_range():
    rng = np.random.default_rng(0)
    image, label, instance = render_toy_sample(rng, 64)
    sample = {"key": "k", "image": image, "label": label, "instance": instance}
    model = get_preset("tiny").model
    ev = preprocess_eval(sample, model)
    assert ev["image"].shape == (3, 32, 32) and ev["image"].dtype == np.float32
    assert -1 <= ev["image"].min() and ev["image"].max() <= 1
    assert np.array_equal(ev["label"], label[::2, ::2])  # nearest keeps ids exact
    data = get_preset("tiny").data
    flips = 0
    for seed in range(20):
        tr = preprocess_train(sample, model, data, np.random.default_rng(seed))
        flipped = np.array_equal(tr["label"], label[::2, ::2][:, ::-1])
        assert flipped or np.array_equal(tr["label"], label[::2, ::2])
        flips += flipped
    assert 3 <= flips <= 17
    crop = get_preset("ade20k").data  # random crop after resizing the short side
    wide = {"key": "w", "image": np.zeros((64, 128, 3), np.uint8), "label": np.zeros((64, 128), np.int64), "instance": None}
    out = preprocess_train(wide, model, crop, np.random.default_rng(0))
    assert out["image"].shape == (3, 32, 32) and out["label"].shape == (32, 32)


def test_shard_writer_splits_by_size(tmp_path):
    w = ShardWriter(str(tmp_path), "train", target_bytes=1000)
    for i in range(10):
        w.add(make_row(f"k{i}", "train", b"x" * 400, b"y", None, 1, 1))
    shards = w.close()
    assert [s.rows for s in shards] == [3, 3, 3, 1]


def test_one_resize_policy_for_inputs_of_a_model():
    ids = np.arange(64 * 66).reshape(64, 66) % 300  # 16-bit-range ids survive nearest resizing exactly
    out = fit_to_model(ids, (32, 32), "label map 'x'")  # 3% off the model's aspect ratio: resized
    assert out.shape == (32, 32) and np.isin(out, ids).all()
    assert np.array_equal(fit_to_model(ids[:, :64], (32, 32), "m"), ids[:64:2, :64:2])
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert fit_to_model(image, (32, 32), "image").shape == (32, 32, 3)
    wide = np.arange(128 * 256).reshape(128, 256)  # (height, width) everywhere: a Cityscapes-shaped model
    assert np.array_equal(fit_to_model(wide, (64, 128), "m"), wide[::2, ::2])
    assert fit_to_model(np.zeros((128, 256, 3), np.uint8), (64, 128), "image").shape == (64, 128, 3)
    with pytest.raises(InvalidInputError, match=r"label map 'x' is 48x32 but the model takes 32x32: .* by 50% \(limit 5%\)"):
        fit_to_model(np.zeros((32, 48), np.int64), (32, 32), "label map 'x'")
