"""The metric functions against closed forms and reference implementations. Backbones here are randomly
initialised, so their numbers are plumbing checks, named as such (random-inception, random-alexnet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from sdm.errors import InvalidInputError, MissingWeightsError
from sdm.metrics.diversity import LowPassL1Distance, LpipsDistance, load_lpips, mean_pairwise_distance
from sdm.metrics.frechet import FeatureStats, StatsAccumulator, feature_stats, frechet_distance
from sdm.metrics.inception import InceptionFeatures, load_inception
from sdm.metrics.miou import ConfusionMatrix
from sdm.metrics.pretrained import ALEXNET_FILE, FID_INCEPTION_FILE, is_published
from sdm.metrics.segmenter import load_segmenter


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_forms():
    # Commuting covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2 over eigenvalues.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    l1, l2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    d = frechet_distance(FeatureStats(mu1, np.diag(l1), 10), FeatureStats(mu2, np.diag(l2), 10))
    assert d == pytest.approx(5.0 + ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum(), rel=1e-12)
    # Isotropic: s1^2 I vs s2^2 I in D dims gives D (s1 - s2)^2.
    assert frechet_distance(FeatureStats(np.zeros(4), 4.0 * np.eye(4), 10), FeatureStats(np.zeros(4), 9.0 * np.eye(4), 10)) == pytest.approx(4.0)
    # Same Gaussian: zero, even for a singular covariance (fewer samples than dimensions).
    rng = np.random.default_rng(0)
    s = feature_stats(rng.normal(size=(5, 16)))
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-6 * np.trace(s.sigma))


def test_frechet_distance_agrees_with_pytorch_fid():
    rng = np.random.default_rng(1)
    for d in (2, 8, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        ours = frechet_distance(FeatureStats(mu1, s1, 100), FeatureStats(mu2, s2, 100))
        assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-6)


def test_streaming_statistics_equal_numpy_and_merge_across_workers():
    feats = np.random.default_rng(2).normal(size=(50, 6))
    a = StatsAccumulator(6).add(feats[:20])
    b = StatsAccumulator(6).add(feats[20:35]).add(feats[35:])
    s = a.merge(b).stats()
    assert s.n == 50
    np.testing.assert_allclose(s.mu, feats.mean(0))
    np.testing.assert_allclose(s.sigma, np.cov(feats, rowvar=False))
    assert FeatureStats.from_bytes(s.to_bytes()).sigma.tolist() == s.sigma.tolist()
    with pytest.raises(InvalidInputError, match="at least 2 images"):
        StatsAccumulator(6).add(feats[:1]).stats()
    with pytest.raises(InvalidInputError, match=r"features must be \[N, 6\]"):
        StatsAccumulator(6).add(feats[:, :5])


def test_confusion_matrix_iou_by_hand_with_ignore_index():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 3]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 1, 9]])
    cm = ConfusionMatrix(4, ignore_index=3).update(pred, target)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2.
    # 255 is outside the classes and 3 is the ignore index: both left out; class 3 reads NaN.
    np.testing.assert_allclose(cm.iou()[:3], [1 / 3, 2 / 3, 1 / 2])
    assert np.isnan(cm.iou()[3])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)
    twice = ConfusionMatrix(4, 3).update(pred, target).merge(cm)
    assert twice.miou() == pytest.approx(cm.miou())


def test_miou_present_averages_only_the_classes_of_the_label_map():
    target = np.array([[0, 0, 0, 0], [1, 1, 1, 1]])
    pred = np.array([[0, 0, 2, 2], [1, 1, 1, 1]])  # class 2 is absent from the label map but predicted
    cm = ConfusionMatrix(3).update(pred, target)
    # class 0: TP 2, FN 2 -> 1/2; class 1: 1; class 2 (absent, predicted): IoU 0, counted by miou() only.
    assert cm.miou_present() == pytest.approx((1 / 2 + 1) / 2)
    assert cm.miou() == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert np.isnan(ConfusionMatrix(3, ignore_index=0).update(pred[:1], target[:1]).miou_present())  # nothing scorable


def test_mean_pairwise_distance_averages_pairs_then_label_maps():
    flat = lambda v, k: np.full((k, 2, 2, 3), v, np.uint8)  # noqa: E731
    groups = {"a": np.concatenate([flat(0, 1), flat(255, 1)]),  # one pair at distance 1
              "b": np.concatenate([flat(0, 2), flat(51, 1)]),  # pairs 0, 0.2, 0.2
              "c": flat(7, 1)}  # one sample: no pairs, skipped
    r = mean_pairwise_distance(groups, LowPassL1Distance(cell=1), batch_size=2)
    assert (r.label_maps, r.pairs) == (2, 4)
    assert r.mean == pytest.approx((1.0 + 0.4 / 3) / 2)
    assert r.per_map["b"] == pytest.approx(0.4 / 3)
    with pytest.raises(InvalidInputError, match="at least one label map with 2"):
        mean_pairwise_distance({"c": flat(7, 1)}, LowPassL1Distance(cell=1))


def test_random_alexnet_distance_plumbing():
    dist = LpipsDistance.random(seed=0)
    assert dist.metric_name == "random-alexnet distance" and "LPIPS" not in dist.metric_name
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    same, diff = dist(a, a), dist(a, b)
    assert same.shape == (3,) and np.allclose(same, 0, atol=1e-6)
    assert (diff > 0).all()
    r = mean_pairwise_distance({"x": np.concatenate([a, b])}, dist)
    assert r.metric_name == "random-alexnet distance" and r.pairs == 15


def test_alexnet_weights_from_a_file_go_into_the_trunk(tmp_path):
    # A file that is not torchvision's (its hash differs) is loaded, and named by its hash, not LPIPS.
    torch.manual_seed(3)
    ref = LpipsDistance.random(seed=3).net.net
    state = {f"features.{i}.{p}": getattr(layer, p).detach().clone() for s in (ref.slice1, ref.slice2, ref.slice3, ref.slice4, ref.slice5)
             for i, layer in s.named_children() if isinstance(layer, torch.nn.Conv2d) for p in ("weight", "bias")}
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    dist = load_lpips(str(path))
    assert dist.metric_name.startswith("AlexNet-feature distance (weights ") and "LPIPS" not in dist.metric_name
    assert torch.equal(getattr(dist.net.net.slice5, "10").weight, getattr(ref.slice5, "10").weight)


def test_random_inception_features_are_pool3():
    ext = InceptionFeatures.random(seed=0)
    assert ext.metric_name == "random-inception Frechet distance" and "FID" not in ext.metric_name
    imgs = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    f = ext(imgs)
    assert f.shape == (2, 2048) and np.isfinite(f).all() and (f >= 0).all()  # after ReLU and average pooling


def test_missing_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = str(tmp_path / "torch" / "hub" / "checkpoints")
    with pytest.raises(MissingWeightsError, match=f"put {FID_INCEPTION_FILE} at {hub}/{FID_INCEPTION_FILE}.*--inception-weights"):
        load_inception()
    with pytest.raises(MissingWeightsError, match=f"put {ALEXNET_FILE} at {hub}/{ALEXNET_FILE}.*--alexnet-weights"):
        load_lpips()
    with pytest.raises(MissingWeightsError, match="--inception-weights /nope: no such file"):
        load_inception("/nope")


def test_published_weights_are_recognised_by_hash_prefix():
    assert is_published("6726825d" + "0" * 56, FID_INCEPTION_FILE)
    assert is_published("7be5be79" + "0" * 56, ALEXNET_FILE)
    assert not is_published("deadbeef" + "0" * 56, FID_INCEPTION_FILE)


def _two_class_segmenter(x: torch.Tensor) -> torch.Tensor:
    """Class 1 where red dominates, else 0: an importable callable segmenter."""
    return (x[:, 0] > x[:, 1]).long()


def test_pluggable_segmenters_torchscript_and_callable(tmp_path):
    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[:, 1], x[:, 0]], 1)[:, :, ::2, ::2]  # logits at half resolution

    path = tmp_path / "seg.pt"
    torch.jit.script(Net()).save(str(path))
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    imgs[..., 1] = 200
    imgs[0, :, :4] = (200, 0, 0)
    expected = np.zeros((2, 8, 8), np.int64)
    expected[0, :, :4] = 1
    for spec in (str(path), f"{__name__}:_two_class_segmenter"):
        assert (load_segmenter(spec).predict(imgs) == expected).all(), spec
    # A TorchScript file's results are cached under its hash; a callable's code cannot be hashed, so never.
    assert load_segmenter(str(path)).cache_id.startswith("torchscript-")
    assert load_segmenter(f"{__name__}:_two_class_segmenter").cache_id is None
    with pytest.raises(InvalidInputError, match="neither a built-in segmenter directory"):
        load_segmenter(str(tmp_path / "missing"))
    with pytest.raises(InvalidInputError, match="cannot be imported"):
        load_segmenter("no_such_module_xyz:fn")
