"""`python -m jobs.evaluate`: the passes on Ray Data actors give the numbers `sdm eval` gives in-process."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from jobs.evaluate import main as job_main
from jobs.ray_setup import read_shards
from ray_session import ray_session
from sdm.cli import main as cli_main
from sdm.data.card import read_card
from sdm.data.shards import iter_rows

pytestmark = pytest.mark.ray


@pytest.fixture
def local_ray():
    with ray_session(num_cpus=2, include_dashboard=False):
        yield


def test_ray_passes_match_the_in_process_ones(eval_sets, tmp_path, local_ray):
    common = ["--real", eval_sets["data"], "--metrics", "miou,segmenter-fd,spectrum,pixel-diversity", "--batch-size", "16"]
    # On Ray: a fresh cache (the segmenter is trained, both sets scored by an actor beside the readers), the generated set as an image folder.
    folder = tmp_path / "perfect-folder"
    for sub in ("images", "labels"):
        shutil.copytree(os.path.join(eval_sets["perfect"], sub), folder / sub)
    rc = job_main([*common, "--generated", str(folder), "--out", str(tmp_path / "ray"), "--cache-dir", str(tmp_path / "c1"),
                   "--segmenter-steps", "40"])
    assert rc == 0
    on_ray = json.load(open(tmp_path / "ray" / "results.json"))
    # In-process, another fresh cache, the same segmenter, the generated set as shards.
    rc = cli_main(["eval", *common, "--generated", eval_sets["perfect"], "--out", str(tmp_path / "local"), "--cache-dir",
                   str(tmp_path / "c2"), "--segmenter", on_ray["settings"]["segmenter_resolved"]])
    assert rc == 0
    local = json.load(open(tmp_path / "local" / "results.json"))
    a, b = on_ray["metrics"], local["metrics"]
    assert a["miou"]["generated"] == pytest.approx(b["miou"]["generated"]) and a["miou"]["real"] == pytest.approx(b["miou"]["real"])
    assert a["segmenter-fd"]["value"] == pytest.approx(b["segmenter-fd"]["value"], rel=1e-4)  # sums in another order
    assert a["segmenter-fd"]["generated_images"] == b["segmenter-fd"]["generated_images"] == 36
    assert a["diversity"]["value"] == pytest.approx(b["diversity"]["value"])
    for key in ("spectrum_db", "high_frequency_ratio", "texture_generated", "texture_real"):
        assert a["spectrum"][key] == pytest.approx(b["spectrum"][key], rel=1e-6)


def test_shards_are_read_by_tasks_with_the_columns_asked_for(eval_sets, local_ray):
    """The jobs' shard reads are Ray Data read tasks, one per shard (no footer-reading actor processes per read),
    with the columns asked for and every row."""
    data = eval_sets["data"]
    card = read_card(data)
    ds = read_shards(data, card.shards, ["key", "split"])
    rows = ds.take_all()
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in iter_rows(data))
    assert {tuple(sorted(r)) for r in rows} == {("key", "split")}
    stats = ds.stats()
    assert "ReadCardShards" in stats and "ReadFilesParquetV2" not in stats and "ReadParquet" not in stats
