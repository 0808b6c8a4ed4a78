"""The bulk generation job on a local Ray cluster, with a randomly initialised tiny model (perturbed so that
its zero-initialised layers pass signal; never trained), toy label maps, DDIM with 3 steps."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jobs.generate import main
from sdm.errors import EXIT_REFUSED, EXIT_REJECTS, InvalidInputError
from ray_session import local_ray_cluster
from sdm import storage
from sdm.checkpoint import model_id
from sdm.data.card import CARD_FILE, read_card, write_card
from sdm.data.shards import decode_row, iter_rows
from sdm.imageio import encode_png
from sdm.metrics.consistency import score_pairs
from sdm.metrics.segmenter import load_segmenter
from sdm.data.toy import render_toy_sample, write_toy_dataset
from sdm.config import SamplingParams
from sdm.generated_dataset import REJECTS_FILE, GenerationOutput, GenerationSettings, call_seed
from sdm.pipeline import SDMPipeline

pytestmark = pytest.mark.ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A small local cluster whose workers see the loopback S3 endpoint; yields its address."""
    with local_ray_cluster(s3_server) as address:
        yield address


@pytest.fixture(scope="module")
def toy_labels(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("toy") / "data")
    write_toy_dataset(uri, n=6, size=32, seed=0, val_fraction=0.34)
    return uri


def _args(model: str, labels: str, out: str, *extra: str) -> list[str]:
    """Pairs are not scored unless `extra` names a segmenter (later flags win)."""
    return ["--model", model, "--labels", labels, "--out", out, "--sampler", "ddim", "--num-inference-steps", str(STEPS),
            "--guidance-scale", "1.5", "--seed", "7", "--micro-batch", "4", "--segmenter", "none", *extra]


def _rows(uri: str) -> dict[str, dict]:
    """Every row of a generated dataset by key, read through the card (checksums verified); keys are unique."""
    rows = list(iter_rows(uri))
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "a key is present more than once"
    return by_key


def _reference(model: str, label: np.ndarray, instance: np.ndarray | None, row: dict) -> bytes:
    """Sample (key, k) alone through the pipeline from the row's recorded seed and index, as PNG bytes."""
    pipe = SDMPipeline.from_pretrained(model, micro_batch=4)
    k = row["sample_index"]
    images = pipe(label, instances=instance, guidance_scale=row["guidance"], num_inference_steps=row["steps"], sampler=row["sampler"],
                  seed=row["seed"], num_samples=k + 1)
    return encode_png(images[k])


def test_every_key_k_once_with_metadata_and_byte_identical_across_concurrency_and_batch_size(
    ray_cluster, random_model, toy_labels, tmp_path
):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    k = 2
    assert main(_args(random_model, toy_labels, a, "--samples-per-label", str(k), "--batch-size", "4",
                      "--concurrency", "1", "--format", "folder")) == 0
    assert main(_args(random_model, toy_labels, b, "--samples-per-label", str(k), "--batch-size", "3",
                      "--concurrency", "2", "--cpus-per-worker", "0.5", "--shard-rows", "5")) == 0

    sources = {r["key"]: decode_row(r) for r in iter_rows(toy_labels)}
    rows_a, rows_b = _rows(a), _rows(b)
    expected = {f"{key}_{i}" for key in sources for i in range(k)}
    assert set(rows_a) == set(rows_b) == expected
    assert all(rows_a[key]["image"] == rows_b[key]["image"] for key in expected)  # byte-identical

    mid = model_id(random_model)
    for key, row in rows_a.items():
        src = sources[row["source_key"]]
        assert key == f"{row['source_key']}_{row['sample_index']}" and row["split"] == src["split"]
        assert row["seed"] == call_seed(7, row["source_key"])
        assert (row["model_id"], row["sampler"], row["steps"], row["guidance"]) == (mid, "ddim", STEPS, 1.5)
        got = decode_row(row)
        assert got["image"].shape == (32, 32, 3) and got["image"].dtype == np.uint8
        assert np.array_equal(got["label"], src["label"]) and np.array_equal(got["instance"], src["instance"])
        for sub, col in (("images", "image"), ("labels", "label"), ("instances", "instance")):
            assert storage.read_bytes(os.path.join(a, sub, f"{key}.png")) == row[col]
    images = [decode_row(r)["image"].astype(int) for r in rows_a.values()]
    assert np.abs(images[0] - images[1]).mean() > 1  # samples differ from each other

    first = sources["toy-000000"]
    assert rows_a["toy-000000_1"]["image"] == _reference(random_model, first["label"], first["instance"], rows_a["toy-000000_1"])

    card = read_card(a)
    assert card.name == "toy-generated" and card.num_classes == 6 and card.has_instance
    assert card.split_sizes == {"train": 8, "val": 4} and card.extra["rejects"] == 0
    assert card.extra["generation"]["samples_per_label"] == k and card.extra["generation"]["model_id"] == mid
    assert storage.read_bytes(os.path.join(a, REJECTS_FILE)) == b""

    # Other settings on the same output are refused (rerunning the same ones: see the kill test).
    for other in (["--seed", "8"], ["--format", "shards"]):
        assert main(_args(random_model, toy_labels, a, "--format", "folder", *other)) == EXIT_REFUSED


def test_dataset_on_s3_to_output_on_s3(ray_cluster, random_model, s3_env):
    labels, out = f"{s3_env}/toy", f"{s3_env}/generated"
    write_toy_dataset(labels, n=3, size=32, seed=1, val_fraction=0.0)
    assert main(_args(random_model, labels, out, "--samples-per-label", "2", "--batch-size", "4", "--format", "folder")) == 0
    rows = _rows(out)
    assert set(rows) == {f"toy-{i:06d}_{k}" for i in range(3) for k in range(2)}
    for key, row in rows.items():
        assert decode_row(row)["image"].shape == (32, 32, 3)
        assert storage.read_bytes(f"{out}/images/{key}.png") == row["image"]
    assert read_card(out).split_sizes == {"train": 6}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_items_go_to_rejects_and_the_rest_completes(ray_cluster, random_model, tmp_path):
    labels, instances, out = tmp_path / "labels", tmp_path / "instances", str(tmp_path / "out")
    labels.mkdir()
    instances.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        _, label, instance = render_toy_sample(rng, 32)
        (labels / f"good{i}.png").write_bytes(encode_png(label))
        if i < 2:
            (instances / f"good{i}.png").write_bytes(encode_png(instance))
    (labels / "garbage.png").write_bytes(b"this is not a png")
    (labels / "class9.png").write_bytes(_png(np.full((32, 32), 9, np.uint8)))
    (labels / "wide.png").write_bytes(_png(np.zeros((16, 32), np.uint8)))

    status = main(_args(random_model, str(labels), out, "--instances", str(instances), "--batch-size", "4"))
    assert status == EXIT_REJECTS  # finished, with rejects
    rejects = {r["key"]: r["reason"] for r in map(json.loads, storage.read_bytes(f"{out}/{REJECTS_FILE}").splitlines())}
    assert set(rejects) == {"garbage", "class9", "wide"}
    assert "label map 'garbage' is not a readable image" in rejects["garbage"]
    assert "class ids this model does not know (6 classes): 9" in rejects["class9"]
    assert "label map 'wide' is 32x16 but the model takes 32x32" in rejects["wide"]
    rows = _rows(out)
    assert set(rows) == {"good0_0", "good1_0", "good2_0"}
    assert rows["good0_0"]["instance"] is not None and rows["good2_0"]["instance"] is None
    card = read_card(out)
    assert card.extra["rejects"] == 3 and card.class_names[0] == "class_0" and card.has_instance


def test_refused_before_any_worker_starts(random_model, toy_labels, tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "no-model")
    assert main(_args(missing, toy_labels, out)) == EXIT_REFUSED
    assert f"no model at {missing}" in capsys.readouterr().err

    five = str(tmp_path / "five-classes")
    card = write_toy_dataset(five, n=2, seed=0)
    card.num_classes, card.class_names, card.palette = 5, card.class_names[:5], card.palette[:5]
    write_card(five, card)
    assert main(_args(random_model, five, out)) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert f"dataset {five} ('toy') has 5 classes but model {random_model} ('tiny') takes 6" in err
    assert main(_args(random_model, toy_labels, out, "--num-inference-steps", "0")) == EXIT_REFUSED
    with pytest.raises(SystemExit) as exit_:
        main(_args(random_model, toy_labels, out, "--concurrency", "3-1"))
    assert exit_.value.code == EXIT_REFUSED
    assert not os.path.exists(out)


def test_killed_job_finishes_on_rerun_with_every_item_exactly_once(ray_cluster, random_model, tmp_path):
    labels, out = str(tmp_path / "toy"), str(tmp_path / "out")
    write_toy_dataset(labels, n=8, size=32, seed=2, val_fraction=0.0)
    args = _args(random_model, labels, out, "--samples-per-label", "2", "--batch-size", "4", "--shard-rows", "4")
    cmd = [sys.executable, "-m", "jobs.generate", *args, "--address", ray_cluster]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not storage.list_files(os.path.join(out, "progress")):
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended before writing a shard"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(os.path.join(out, CARD_FILE))  # nothing looks complete
    time.sleep(2)  # let the cluster reap the killed job's workers
    assert 0 < len(GenerationOutput(out).completed_keys()) < 16
    unfinished = os.path.join(out, "shards", "gen-0000000000000000-train-00000.parquet")
    storage.write_bytes(unfinished, b"a shard whose progress record was never written")

    assert main(args) == 0
    rows = _rows(out)
    assert set(rows) == {f"toy-{i:06d}_{k}" for i in range(8) for k in range(2)}
    card = read_card(out)
    assert not os.path.exists(unfinished)
    assert sorted(storage.list_files(os.path.join(out, "shards"))) == sorted(os.path.basename(s.path) for s in card.shards)
    src = decode_row(next(iter_rows(labels)))
    assert rows[f"{src['key']}_0"]["image"] == _reference(random_model, src["label"], src["instance"], rows[f"{src['key']}_0"])


PARITY = "sdm.testing:parity_segmenter"


def _rejects(uri: str) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, storage.read_bytes(f"{uri}/{REJECTS_FILE}").splitlines())}


def test_consistency_filter_keeps_pairs_above_threshold_and_redraws_the_rest_deterministically(
    ray_cluster, random_model, tmp_path
):
    # Label maps of class 0 alone: a pair's score is then the share of its pixels the segmenter calls 0, which
    # moves with the sampling noise, so some redraws pass where the first draw did not.
    labels, scored, filtered = tmp_path / "labels", str(tmp_path / "scored"), str(tmp_path / "filtered")
    labels.mkdir()
    for i in range(6):
        (labels / f"flat{i}.png").write_bytes(encode_png(np.zeros((32, 32), np.uint8)))
    toy_labels = str(labels)
    common = ("--segmenter", PARITY, "--samples-per-label", "3", "--batch-size", "4")
    assert main(_args(random_model, toy_labels, scored, *common)) == 0
    first = _rows(scored)
    segmenter = load_segmenter(PARITY)
    for row in first.values():  # each stored score is the segmenter's agreement with the pair's own label map
        got = decode_row(row)
        (score,) = score_pairs(segmenter, got["image"][None], got["label"][None], 6)
        assert row["attempt"] == 0 and row["consistency"] == pytest.approx(score.consistency)
        assert row["pixel_accuracy"] == pytest.approx(score.pixel_accuracy)
    scores = sorted(r["consistency"] for r in first.values())
    threshold = float(np.mean(scores[len(scores) // 2 - 1 : len(scores) // 2 + 1]))  # half the first draws fall below

    assert main(_args(random_model, toy_labels, filtered, *common, "--min-consistency", str(threshold),
                      "--max-retries", "1")) == 0  # pairs left out by the threshold are no failure
    kept, rejects = _rows(filtered), _rejects(filtered)
    assert set(kept) | set(rejects) == set(first) and not set(kept) & set(rejects)  # every pair decided once
    redrawn = {k for k, r in kept.items() if r["attempt"] > 0}
    assert redrawn, "no pair passed on a redraw: the test shows nothing"
    for key, row in kept.items():
        assert row["consistency"] >= threshold
        assert row["seed"] == call_seed(7, row["source_key"], row["attempt"])
        if row["attempt"] == 0:  # a first draw is the unfiltered job's pair, byte for byte
            assert row["image"] == first[key]["image"] and first[key]["consistency"] >= threshold
        else:
            assert first[key]["consistency"] < threshold and row["image"] != first[key]["image"]
    for key, r in rejects.items():
        assert first[key]["consistency"] < threshold and r["consistency"] < threshold
        assert r["reason"].startswith("label consistency") and r["reason"].endswith("after 2 draws")
    key = min(redrawn)  # a redrawn pair is redrawn by any door from the seed its row records
    assert kept[key]["image"] == _reference(random_model, np.zeros((32, 32), np.int64), None, kept[key])

    card = read_card(filtered)
    summary = card.extra["consistency"]
    assert summary["segmenter"] == PARITY and summary["min_consistency"] == threshold and summary["max_retries"] == 1
    assert summary["scored"] == len(kept) and summary["rejected"] == len(rejects) == card.extra["rejects"]
    assert summary["kept_after_redraw"] == len(redrawn)
    assert summary["mean"] == pytest.approx(np.mean([r["consistency"] for r in kept.values()]))

    # A rerun decides every pair the same way and adds nothing; another threshold on this output is refused.
    before = storage.read_bytes(f"{filtered}/{REJECTS_FILE}")
    assert main(_args(random_model, toy_labels, filtered, *common, "--min-consistency", str(threshold), "--max-retries", "1")) == 0
    assert {k: r["image"] for k, r in _rows(filtered).items()} == {k: r["image"] for k, r in kept.items()}
    assert storage.read_bytes(f"{filtered}/{REJECTS_FILE}") == before
    assert main(_args(random_model, toy_labels, filtered, *common, "--min-consistency", "0.1")) == EXIT_REFUSED


def test_builtin_segmenter_trains_on_the_source_and_new_layouts_grow_the_set(ray_cluster, random_model, toy_labels, tmp_path):
    a, b, cache = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "cache")
    common = ("--segmenter", "builtin", "--segmenter-steps", "3", "--cache-dir", cache, "--layouts-per-map", "2")
    assert main(_args(random_model, toy_labels, a, *common, "--batch-size", "4")) == 0
    assert main(_args(random_model, toy_labels, b, *common, "--batch-size", "5", "--concurrency", "2",
                      "--cpus-per-worker", "0.5")) == 0
    rows_a, rows_b = _rows(a), _rows(b)
    sources = {r["key"]: decode_row(r) for r in iter_rows(toy_labels)}
    assert set(rows_a) == {f"{key}{suffix}_0" for key in sources for suffix in ("", "-layout1", "-layout2")}
    assert {k: (r["label"], r["image"]) for k, r in rows_a.items()} == {k: (r["label"], r["image"]) for k, r in rows_b.items()}

    by_split = {split: {k for k, s in sources.items() if s["split"] == split} for split in ("train", "val")}
    changed = 0
    for key, row in rows_a.items():
        src = row["source_key"].split("-layout")[0]
        assert row["split"] == sources[src]["split"]
        label = decode_row(row)["label"]
        allowed = set().union(*(np.unique(sources[k]["label"]) for k in by_split[row["split"]]))
        assert set(np.unique(label)) <= allowed  # ids only from maps of the same split
        changed += "-layout" in key and not np.array_equal(label, sources[src]["label"])
    assert changed >= 10  # of 12 new layouts

    # The built-in segmenter was trained on the source's train split, is kept with the output, and scored every pair.
    seg = load_segmenter(os.path.join(a, "segmenter"))
    record = json.loads(storage.read_bytes(os.path.join(a, "segmenter", "segmenter.json")))
    assert record["trained_on"]["dataset"] == toy_labels and record["trained_on"]["steps"] == 3
    assert storage.read_bytes(os.path.join(a, "segmenter", "segmenter.safetensors")) == \
        storage.read_bytes(os.path.join(b, "segmenter", "segmenter.safetensors"))  # trained once, from the cache
    row = rows_a["toy-000001-layout2_0"]
    got = decode_row(row)
    (score,) = score_pairs(seg, got["image"][None], got["label"][None], 6)
    assert row["consistency"] == pytest.approx(score.consistency)
    card = read_card(a)
    assert card.extra["consistency"]["segmenter"].startswith("builtin:") and card.extra["consistency"]["scored"] == 18
    gen = card.extra["generation"]
    assert gen["layouts_per_map"] == 2 and gen["source"] == toy_labels and gen["segmenter_uri"] == os.path.join(a, "segmenter")
    assert gen["source_card_sha256"] == hashlib.sha256(storage.read_bytes(os.path.join(toy_labels, CARD_FILE))).hexdigest()


def test_consistency_options_are_validated_before_any_worker_starts(random_model, toy_labels, tmp_path, capsys):
    out = str(tmp_path / "out")
    for extra, message in (
        (("--segmenter", PARITY, "--min-consistency", "1.5"), "--min-consistency is an mIoU, between 0 and 1"),
        (("--segmenter", PARITY, "--max-retries", "2"), "give --min-consistency too"),
        (("--min-consistency", "0.5"), "--min-consistency needs a segmenter"),
        (("--segmenter", "no_such_module:fn"), "cannot be imported"),
        (("--layouts-per-map", "-1"), "--layouts-per-map must be >= 0"),
    ):
        assert main(_args(random_model, toy_labels, out, *extra)) == EXIT_REFUSED
        assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_an_output_from_before_scoring_counts_as_unscored(tmp_path):
    out = GenerationOutput(str(tmp_path / "old"))
    body = {"model_id": "m", "sampler": "ddim", "steps": 3, "guidance": 1.5, "seed": 7, "eta": 0.0, "cache_interval": 1,
            "micro_batch": 8, "precision": "auto", "fast_path": True, "compile": False, "output_format": "shards",
            "seed_rule": 2}  # format 1, from before the label-consistency stage
    storage.write_bytes(str(tmp_path / "old" / "generation.json"), json.dumps(body).encode())
    old = GenerationSettings(model_id="m", sampling=SamplingParams(sampler="ddim", num_inference_steps=3, guidance_scale=1.5, eta=0.0),
                             seed=7)
    out.claim(old)  # unscored, as it was written
    with pytest.raises(InvalidInputError, match="segmenter: 'none' there, 'builtin:x' now"):
        out.claim(dataclasses.replace(old, segmenter="builtin:x"))
