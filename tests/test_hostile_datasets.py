"""The packers against hostile source trees: every case of the corpus (tests/data/hostile_datasets.json) in every
layout gets its outcome (packed, or rejected with its reason in the rejects file), every good sample is packed,
nothing half-written looks complete, the exit status is 3, a decompression bomb never decodes (the pack's memory
stays bounded), and files corrupted by a property-based generator are rejected with a reason, never a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_datasets import FOLDER_CLASSES, build_tree, image_array, jpeg, label_array, load_corpus, png
from sdm import storage
from sdm.data.card import CARD_FILE, read_card
from sdm.data.packers import LAYOUTS, REJECTS_FILE, pack, report
from sdm.data.shards import SHARD_DIR, iter_samples
from sdm.errors import EXIT_REJECTS

REPO = Path(__file__).resolve().parents[1]
CORPUS = load_corpus()


def _rejects(dst: Path) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in map(json.loads, (dst / REJECTS_FILE).read_text().splitlines())}


def test_the_corpus_is_well_formed():
    names = [c.name for c in CORPUS]
    assert len(names) == len(set(names)) and all(c.outcome in ("packed", "rejected") for c in CORPUS)
    assert all((c.reason is None) == (c.outcome == "packed") for c in CORPUS)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_case_gets_its_outcome(layout, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    cases = build_tree(layout, src, CORPUS)
    notes = []
    card, rejects = pack(layout, str(src), str(dst), log=notes.append)
    recorded = _rejects(dst)
    assert recorded == {r.key: r.reason for r in rejects}  # the file says what pack returned
    packed = {s["key"]: s for s in iter_samples(str(dst))}
    for case in cases:
        key = case.stem or case.name
        if case.outcome == "packed":
            assert key in packed and key not in recorded, case.name
        else:
            assert key not in packed and case.reason in recorded.get(key, ""), (case.name, recorded.get(key))
    assert len(packed) + len(recorded) == len(cases)  # nothing lost, nothing extra
    assert np.array_equal(packed["label-16bit-in-range"]["label"], label_array(value=1))  # the ids, at either bit depth
    # Nothing half-written: the card lists every shard there is, with every packed sample and no other.
    assert sorted(s.path for s in card.shards) == sorted(f"{SHARD_DIR}/{n}" for n in storage.list_files(str(dst / SHARD_DIR), ".parquet"))
    assert card.split_sizes == {"train": len(packed)}  # the empty val split is left out
    assert report(card, rejects, str(dst), skip_bad=False) == EXIT_REJECTS
    assert f"{len(recorded)} samples rejected" in capsys.readouterr().err


def test_a_split_whose_every_sample_is_rejected_is_named(tmp_path):
    src = tmp_path / "ade"
    for stem, (img, lab) in {"a": (png(image_array()), png(label_array())), "b": (b"junk", png(label_array()))}.items():
        d = "training" if stem == "a" else "validation"
        for path, data in ((src / f"images/{d}/{stem}.png", img), (src / f"annotations/{d}/{stem}.png", lab)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    notes = []
    card, rejects = pack("ade20k", str(src), str(tmp_path / "out"), log=notes.append)
    assert card.split_sizes == {"train": 1} and [r.key for r in rejects] == ["b"]
    assert notes == ["note: split 'val' has no valid sample (1 rejected); it is left out of the card"]


def test_a_pack_of_the_corpus_exits_3_in_bounded_memory(tmp_path):
    """In a process of its own: the rise of its peak RSS over the pack. The bomb label alone would take 64 MiB
    decoded and 512 MiB as int64 ids; the bound is far below that and far above what the sound samples need."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_tree("folder", src, CORPUS)
    code = ("import resource, sys; from sdm.cli import main; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"rc = main(['data', 'pack', '--layout', 'folder', {str(src)!r}, {str(dst)!r}]); "
            "print('rss_rise_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == EXIT_REJECTS, out.stderr[-2000:]
    rise_mib = int(out.stdout.split("rss_rise_kib")[1]) / 1024
    print(f"peak RSS rise over the pack of the corpus: {rise_mib:.1f} MiB")
    assert rise_mib < 128
    assert (dst / CARD_FILE).exists() and "samples rejected" in out.stderr


# Property-based: a sound file damaged at random; the pack must take it or reject it with a reason, never crash, and
# always pack the sound sample beside it.
CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("splice"), st.integers(0, 10_000), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("zero"), st.integers(0, 10_000), st.integers(1, 256)),
)


def corrupt(data: bytes, how: tuple) -> bytes:
    at = how[1] % (len(data) + 1)
    if how[0] == "truncate":
        return data[:at]
    if how[0] == "flip":
        return data[:at] + bytes([data[at] ^ (1 << how[2])]) + data[at + 1 :] if at < len(data) else data
    if how[0] == "splice":
        return data[:at] + how[2] + data[at:]
    return data[:at] + b"\0" * how[2] + data[at + how[2] :]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["image-png", "image-jpeg", "label", "instance"]), how=CORRUPTIONS)
def test_corrupted_files_are_packed_or_rejected_never_a_crash(tmp_path_factory, target, how):
    src = tmp_path_factory.mktemp("src")
    (src / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n")
    files = {"image": png(image_array()), "label": png(label_array()), "instance": png(label_array(value=3))}
    for stem in ("sound", "damaged"):
        for kind, data in files.items():
            (src / f"{kind}s").mkdir(exist_ok=True)
            ext = ".jpg" if stem == "damaged" and kind == "image" and target == "image-jpeg" else ".png"
            if stem == "damaged" and target.startswith(kind):
                data = corrupt(jpeg(image_array()) if ext == ".jpg" else data, how)
            (src / f"{kind}s" / f"{stem}{ext}").write_bytes(data)
    dst = tmp_path_factory.mktemp("dst")
    card, rejects = pack("folder", str(src), str(dst), log=lambda _: None)
    packed = {s["key"] for s in iter_samples(str(dst))}
    assert "sound" in packed
    assert len(packed) + len(rejects) == 2 and all(r.key == "damaged" and r.reason for r in rejects)
    assert read_card(str(dst)).split_sizes == {"train": len(packed)}
