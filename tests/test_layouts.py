import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdm.data.layouts import layout_key, new_layout, partner_key


def _blocks(h: int, w: int, ids: list[int], seed: int) -> np.ndarray:
    """A map of rectangular blocks, like a coarse segmentation, with ids from `ids` (all of them present)."""
    rng = np.random.default_rng(seed)
    out = np.full((h, w), ids[0], dtype=np.int64)
    for i in ids[1:]:
        t, l = rng.integers(0, h - 4), rng.integers(0, w - 4)
        out[t : t + rng.integers(3, h // 2), l : l + rng.integers(3, w // 2)] = i
    out[0, 1 : len(ids)] = ids[1:]  # every id keeps at least one pixel
    return out


OWN = _blocks(32, 48, [0, 3, 7, 9, 12], seed=1)
PARTNER = _blocks(32, 48, [100, 150, 200, 255], seed=2)


def test_layout_key_format():
    assert layout_key("ADE_train_00000001", 3) == "ADE_train_00000001-layout3"


def test_partner_key_is_deterministic_other_and_order_free():
    keys = [f"k{i}" for i in range(7)]
    for j in range(1, 30):
        p = partner_key(keys, "k2", j, seed=5)
        assert p in keys and p != "k2"
        assert p == partner_key(keys, "k2", j, seed=5) == partner_key(keys[::-1], "k2", j, seed=5)
    assert len({partner_key(keys, "k2", j, seed=5) for j in range(1, 30)}) >= 3
    assert partner_key(["only"], "only", 1, seed=0) is None
    assert partner_key([], "a", 1, seed=0) is None
    assert partner_key(["a", "b"], "a", 1, seed=0) == "b"


def test_shape_dtype_copy_and_determinism():
    outs = []
    for seed in range(20):
        label, instance = new_layout(OWN, None, None, seed)
        assert label.shape == OWN.shape and label.dtype == np.int64 and instance is None
        assert not np.shares_memory(label, OWN)
        assert np.array_equal(label, new_layout(OWN, None, None, seed)[0])
        outs.append(label.tobytes())
    assert len(set(outs)) >= 15


def test_label_and_instance_get_the_same_geometry():
    for seed in range(10):
        label, instance = new_layout(OWN, OWN.copy(), None, seed)
        assert np.array_equal(label, instance)


def test_flip_and_crop_happen():
    ramp = np.tile(np.arange(48, dtype=np.int64), (32, 1))  # id = column
    flipped = cropped = 0
    for seed in range(40):
        label, _ = new_layout(ramp, None, None, seed)
        row = label[0]
        assert (label == row).all()  # a column map stays one: no vertical mixing
        flipped += bool(row[0] > row[-1])
        cropped += bool(len(np.unique(row)) < 48)
    assert 8 <= flipped <= 32 and cropped >= 30


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32), st.booleans(), st.booleans(), st.data())
def test_ids_only_from_the_inputs(h, w, seed, with_partner, with_instance, data):
    ids = st.sampled_from([0, 1, 2, 5, 150, 255, 1000])
    maps = st.lists(ids, min_size=h * w, max_size=h * w).map(lambda v: np.array(v, dtype=np.int64).reshape(h, w))
    label = data.draw(maps)
    partner = (data.draw(maps), data.draw(maps) if data.draw(st.booleans()) else None) if with_partner else None
    instance = data.draw(maps) if with_instance else None
    out, out_inst = new_layout(label, instance, partner, seed)
    assert out.shape == (h, w) and out.dtype == np.int64
    allowed = set(np.unique(label)) | (set(np.unique(partner[0])) if partner else set())
    assert set(np.unique(out)) <= allowed
    assert (out_inst is None) == (instance is None)
    if out_inst is not None:
        assert out_inst.shape == (h, w) and out_inst.dtype == np.int64 and out_inst.max() <= 65535


def test_partner_regions_are_pasted_pixel_exact_as_rectangle_or_whole_classes():
    partner_ids = np.unique(PARTNER)
    ids, counts = np.unique(PARTNER, return_counts=True)
    largest = ids[np.argmax(counts)]
    rects = objects = 0
    for seed in range(40):
        label, _ = new_layout(OWN, None, (PARTNER, None), seed)
        pasted = np.isin(label, partner_ids)
        assert pasted.any()
        assert np.array_equal(label[pasted], PARTNER[pasted])
        rows, cols = np.nonzero(pasted)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        classes = np.unique(label[pasted])
        if box == pasted.sum() and 0.2 <= pasted.mean() <= 0.55 and not np.array_equal(pasted, np.isin(PARTNER, classes)):
            rects += 1
        else:
            assert np.array_equal(pasted, np.isin(PARTNER, classes))  # whole classes, every pixel of them
            assert 1 <= len(classes) <= 2 and largest not in classes
            objects += 1
    assert rects >= 8 and objects >= 8


def test_single_class_partner_pastes_a_rectangle():
    flat = np.full_like(OWN, 200)
    for seed in range(10):
        label, _ = new_layout(OWN, None, (flat, None), seed)
        pasted = label == 200
        rows, cols = np.nonzero(pasted)
        assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == pasted.sum()
        assert 0.2 <= pasted.mean() <= 0.55


def test_partner_of_another_size_is_refused():
    with pytest.raises(ValueError, match="partner label map is 40x32 but the label map is 48x32"):
        new_layout(OWN, None, (np.zeros((32, 40), dtype=np.int64), None), 0)


@pytest.mark.parametrize("base", [1, 60000])
def test_pasted_instance_ids_never_collide_and_fit_16_bit(base):
    own_inst = OWN * 10 + base
    part_inst = (PARTNER - 100) * 300 + 1  # 1..46501: offset past 60000+ own ids it overflows 16 bits
    seen = 0
    for seed in range(20):
        label, inst = new_layout(OWN, own_inst, (PARTNER, part_inst), seed)
        pasted = np.isin(label, np.unique(PARTNER))
        assert inst.max() <= 65535
        assert not set(np.unique(inst[pasted])) & set(np.unique(inst[~pasted]))
        # one-to-one with the source ids: objects are neither merged nor split
        for src, region in ((part_inst[pasted], inst[pasted]), (label[~pasted], inst[~pasted])):
            pairs = set(zip(src.tolist(), region.tolist()))
            assert len(pairs) == len(set(src.tolist())) == len(set(region.tolist()))
        seen += (~pasted).any()
    assert seen == 20


def test_partner_without_instances_gets_one_instance_per_pasted_class():
    own_inst = OWN + 1
    for seed in range(20):
        label, inst = new_layout(OWN, own_inst, (PARTNER, None), seed)
        pasted = np.isin(label, np.unique(PARTNER))
        assert not set(np.unique(inst[pasted])) & set(np.unique(inst[~pasted]))
        pairs = set(zip(label[pasted].tolist(), inst[pasted].tolist()))
        assert len(pairs) == len(np.unique(label[pasted])) == len(np.unique(inst[pasted]))
        assert new_layout(OWN, None, (PARTNER, None), seed)[1] is None
