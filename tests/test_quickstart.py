"""The quick start as a newcomer runs it, twice (at a reduced size): the second run reuses every step the first
one completed, changes no file, and ends with exit status 0; the console says what happens, and nothing of Ray's
insides."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parent.parent
# Ray Data's execution plans, any warning (Python's, Ray's, ours), error-level log lines (Python's and Ray's C++
# `[... E pid tid]`), tracebacks, and carriage-return progress written to a log.
NOISE = re.compile(r"execution plan|starting execution|warning|\berror\b|\[[^\]]* E \d+ \d+\]|traceback|\r", re.I)
# Ray's one error-level line that is Ray's to fix: Ray Data hands every actor pool's workers their constructor
# arguments through the object store, and Ray's core worker warns at each actor start that restarting such an actor
# can fail (ray-project/ray#53727). Giving up actor restarts would silence it, and lose a lost node's generation.
RAYS_OWN = "ray-project/ray/issues/53727"


def _digests(root: Path) -> dict[str, str]:
    """Every file the quick start leaves, by path (the evaluation's feature cache aside), with its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "cache" not in p.relative_to(root).parts
    }


def test_a_second_quickstart_reuses_everything_and_changes_no_file(tmp_path):
    out = tmp_path / "quickstart"
    cmd = [sys.executable, "-m", "jobs.quickstart", "--out", str(out), "--samples", "48", "--pretrain-steps", "4",
           "--finetune-steps", "2", "--num-workers", "1", "--samples-per-label", "2", "--segmenter-steps", "50"]
    t0 = time.monotonic()
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    t1 = time.monotonic()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    console = first.stdout + first.stderr
    noise = [line for line in console.splitlines() if NOISE.search(line) and RAYS_OWN not in line]
    assert not noise, noise
    assert "validation at step 4:" in console and "consistency" in console
    for stage in ("pretrain", "finetune"):
        assert f"report: {out / stage / 'report.md'}" in console and (out / stage / "samples" / "step-2.png").exists()
    before = _digests(out)
    assert "finetune/model/model.safetensors" in before and "generated/dataset.json" in before

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    t2 = time.monotonic()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # data, pretraining, fine-tuning, evaluation and the contact sheet are reused; generation finds all 12 images
    assert second.stdout.count("complete already; reusing it") == 5, second.stdout[-3000:]
    assert "generated 0 images" in second.stdout and "12 were already there" in second.stdout
    assert _digests(out) == before
    print(f"quick start (reduced): first run {t1 - t0:.0f}s, second run {t2 - t1:.0f}s, {len(before)} files unchanged")
