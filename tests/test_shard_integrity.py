"""Every Ray Data read checks each shard against its card: a shard replaced by another valid shard of the same schema
(the val shard's bytes over the train shard's: a re-pack while a job runs, an older version left on the bucket) and a
shard with one payload byte flipped (same size: only the sha256 tells) stop training and evaluation with an error
naming the shard and the card, and become the generation job's rejects (exit 3), on local files and on S3."""

from __future__ import annotations

import json

import pytest

from jobs.evaluate import main as eval_main
from jobs.generate import main as generate_main
from jobs.ray_setup import integrity_failure, read_shards
from jobs.train import main as train_main
from ray_session import local_ray_cluster
from sdm import storage
from sdm.data.card import CARD_FILE, ShardInfo, read_card
from sdm.data.shards import read_shard_table
from sdm.data.toy import render_toy_image, write_toy_dataset
from sdm.errors import EXIT_FAILED, EXIT_REJECTS, ShardIntegrityError
from sdm.generated_dataset import REJECTS_FILE
from sdm.testing import write_painted_generation

pytestmark = pytest.mark.ray

# (store, corruption) per job run: each job meets both corruptions and both stores, in two runs
CASES = [("local", "replaced"), ("s3", "flipped")]


def corrupt(uri: str, split: str, how: str) -> ShardInfo:
    """Damage the dataset's `split` shard behind its card's back; returns the shard as the card lists it."""
    card = read_card(uri)
    (shard,) = [s for s in card.shards if s.split == split]
    path = storage.join(uri, shard.path)
    if how == "replaced":  # another valid shard of the same schema
        (other,) = [s for s in card.shards if s.split != split]
        data = storage.read_bytes(storage.join(uri, other.path))
    else:  # one byte in the middle of the payload, the file still its listed size
        data = bytearray(storage.read_bytes(path))
        data[len(data) // 2] ^= 0x01
        data = bytes(data)
    storage.write_bytes(path, data)
    return shard


def names(uri: str, shard: ShardInfo) -> str:
    """The start of every integrity error: the shard and the card, both by URI."""
    return f"shard {shard.path} of {uri} fails its checksum against the card {storage.join(uri, CARD_FILE)}"


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    with local_ray_cluster(s3_server) as address:
        yield address


@pytest.fixture
def base(request, tmp_path):
    """A fresh base URI on the store the case names."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_env")


def _toy(base: str, n: int = 12) -> str:
    uri = storage.join(base, "toy")
    write_toy_dataset(uri, n=n, size=32, seed=0, val_fraction=0.34)
    return uri


@pytest.mark.parametrize("how", ["replaced", "flipped"])
def test_the_check_is_the_single_process_readers(tmp_path, how):
    uri = _toy(str(tmp_path))
    shard = corrupt(uri, "train", how)
    kind = "bytes where the card lists" if how == "replaced" else "sha256"
    with pytest.raises(ShardIntegrityError, match=f"{names(uri, shard)}: .*{kind}"):
        read_shard_table(uri, shard)


@pytest.mark.parametrize("base", ["local", "s3"], indirect=True)
def test_ray_reads_check_every_shard_as_it_is_read(ray_cluster, base):
    uri = _toy(base)
    card = read_card(uri)
    assert read_shards(uri, card.shards, ["key"]).count() == 12  # a sound dataset reads whole
    for how in ("replaced", "flipped"):
        shard = corrupt(uri, "train", how)
        with pytest.raises(ShardIntegrityError) as e:
            read_shards(uri, card.shards, ["key"]).take_all()
        assert str(integrity_failure(e.value)).startswith(names(uri, shard))
        rows = read_shards(uri, card.shards, ["key", "split"], reject_column="reject").take_all()
        bad = [r for r in rows if r["reject"]]
        assert [(r["key"], r["split"]) for r in bad] == [(shard.path, "train")]
        assert bad[0]["reject"].startswith(names(uri, shard))
        assert sorted(r["split"] for r in rows if not r["reject"]) == ["val"] * card.split_sizes["val"]  # the sound one whole
        write_toy_dataset(uri, n=12, size=32, seed=0, val_fraction=0.34)  # restored for the next corruption


@pytest.mark.parametrize("base,how", CASES, indirect=["base"])
def test_training_stops_naming_the_shard(ray_cluster, base, how, tmp_path, capsys):
    uri = _toy(base)
    shard = corrupt(uri, "train", how)
    run = str(tmp_path / "run")
    rc = train_main(["--preset", "tiny", "--data", uri, "--run", run, "--steps", "3", "--num-workers", "1",
                     "--batch-size", "4", "--max-failures", "0"])
    err = capsys.readouterr().err
    assert rc == EXIT_FAILED
    assert f"error: training failed: {names(uri, shard)}" in err
    assert not storage.exists(storage.join(run, "model"))  # nothing exported from a dataset the card does not vouch for


@pytest.mark.parametrize("base,how", CASES, indirect=["base"])
def test_generation_rejects_the_shards_label_maps(ray_cluster, random_model, base, how, capsys):
    labels = _toy(base, n=6)
    val_maps = read_card(labels).split_sizes["val"]
    shard = corrupt(labels, "train", how)
    out = storage.join(base, "gen")
    rc = generate_main(["--model", random_model, "--labels", labels, "--out", out, "--sampler", "ddim", "--steps", "2",
                        "--micro-batch", "4", "--segmenter", "none"])
    assert rc == EXIT_REJECTS
    rejects = [json.loads(line) for line in storage.read_bytes(storage.join(out, REJECTS_FILE)).decode().splitlines()]
    assert [(r["key"], r["split"]) for r in rejects] == [(shard.path, "train")]
    assert rejects[0]["reason"].startswith(names(labels, shard))
    assert read_card(out).split_sizes == {"val": val_maps}  # the sound shard's label maps all generated
    assert "1 label maps rejected" in capsys.readouterr().out


@pytest.mark.parametrize("base,how", CASES, indirect=["base"])
def test_evaluation_stops_naming_the_shard(ray_cluster, base, how, tmp_path, capsys):
    real = _toy(base, n=24)
    generated = write_painted_generation(storage.join(base, "painted"), real,
                                         lambda rng, s: render_toy_image(rng, s["label"], s["instance"]), k=1)
    shard = corrupt(real, "val", how)
    out = str(tmp_path / "eval")
    rc = eval_main(["--real", real, "--generated", generated, "--out", out, "--metrics", "spectrum",
                    "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8"])
    assert rc == EXIT_FAILED
    assert f"error: {names(real, shard)}" in capsys.readouterr().err
    assert not storage.exists(storage.join(out, "results.json"))
