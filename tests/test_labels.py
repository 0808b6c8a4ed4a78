import numpy as np
import pytest

from sdm.checkpoint import load_classes, save_classes, save_model
from sdm.errors import CheckpointError, InvalidInputError
from sdm.labels import colors_to_ids, default_palette


def test_default_palette_is_distinct_and_starts_black():
    palette = default_palette(256)
    assert palette[0] == (0, 0, 0) and len(set(palette)) == 256


def test_colours_map_to_ids_and_unknown_colours_are_listed():
    palette = default_palette(6)
    ids = np.array([[0, 1], [5, 2]])
    rgb = np.array(palette, dtype=np.uint8)[ids]
    assert np.array_equal(colors_to_ids(rgb, palette), ids)
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(InvalidInputError, match="not in the model's palette: #010203"):
        colors_to_ids(rgb, palette)


def test_classes_round_trip_next_to_a_model(tmp_path, random_tiny_net, tiny_cfg):
    save_model(str(tmp_path), random_tiny_net, tiny_cfg)
    assert load_classes(str(tmp_path)) is None
    save_classes(str(tmp_path), ["sky", "tree"], [(0, 0, 255), (0, 255, 0)])
    assert load_classes(str(tmp_path)) == (["sky", "tree"], [(0, 0, 255), (0, 255, 0)])
    with pytest.raises(CheckpointError, match="2 class names but 1 palette"):
        save_classes(str(tmp_path), ["sky", "tree"], [(0, 0, 255)])
