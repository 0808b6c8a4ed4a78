"""The one label encoder (sdm.labels.LabelEncoder): its input numbers, each fact checked once per call, and the same
refusal of the same bad map from every door (the pipeline, the generation job's load path, Serve)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json

import numpy as np
import pytest
import torch
from starlette.requests import Request

from sdm import labels
from sdm.errors import InvalidInputError
from sdm.generated_dataset import load_item
from sdm.imageio import encode_png
from sdm.labels import LabelEncoder, default_classes, default_palette
from sdm.pipeline import SDMPipeline
from serve.errors import ApiError
from serve.inputs import Catalog, Limits, ModelInfo, parse_job

BAD = np.zeros((32, 32), np.uint8)
BAD[0, 0], BAD[5, 7], BAD[9, 9] = 7, 9, 9
UNKNOWN = "has class ids this model does not know (6 classes): 7, 9"


def test_a_map_encodes_to_one_hot_classes_and_its_instance_edges(tiny_cfg):
    label = np.zeros((8, 8), np.int64)
    label[2:6, 2:6] = 3
    instance = np.zeros((8, 8), np.int64)
    instance[:, 4:] = 1
    x = LabelEncoder(tiny_cfg)(label, instance)
    assert x.shape == (1, 7, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x[0, :6].sum(0), torch.ones(8, 8))
    assert torch.equal(x[0, :6].argmax(0), torch.from_numpy(label))
    edges = torch.zeros(8, 8)
    edges[:, 3:5] = 1  # both sides of the one vertical instance boundary
    assert torch.equal(x[0, 6], edges)
    assert torch.equal(LabelEncoder(tiny_cfg)(label)[0, 6], torch.zeros(8, 8))  # no instance map: no edges


def test_raw_ids_are_remapped_and_unknown_ones_named_once_by_their_raw_id(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, label_offset=1))
    label = np.array([[0, 1, 6, 7], [9, 9, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]])  # raw 7 and 9: classes 6 and 8
    with pytest.raises(InvalidInputError) as e:
        LabelEncoder(cfg).check(label)
    assert str(e.value) == "label map has class ids this model does not know (6 classes): 7, 9"
    maps = LabelEncoder(cfg).check(np.array([[0, 1, 6, 3]] * 4))
    assert maps.classes[0, 0].tolist() == [5, 0, 5, 2] and maps.raw[0, 0].tolist() == [0, 1, 6, 3]


def test_each_fact_is_checked_once_per_call(tiny_cfg, random_tiny_net, monkeypatch):
    """One class-id check per call (np.unique over the raw ids), and none by the encoding (torch unique)."""
    counts = {"raw_to_classes": 0, "np.unique": 0, "torch.unique": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(labels, "raw_to_classes", counting("raw_to_classes", labels.raw_to_classes))
    monkeypatch.setattr(np, "unique", counting("np.unique", np.unique))
    monkeypatch.setattr(torch, "unique", counting("torch.unique", torch.unique))
    monkeypatch.setattr(torch.Tensor, "unique", counting("torch.unique", torch.Tensor.unique))
    ids = np.random.default_rng(0).integers(0, 6, (3, 32, 32))
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, "cpu", "fp32")
    for encode in (pipe.prepare_labels, LabelEncoder(tiny_cfg)):  # the pipeline's door, training's
        counts.update(dict.fromkeys(counts, 0))
        encode(list(ids), list(ids))
        assert counts == {"raw_to_classes": 1, "np.unique": 1, "torch.unique": 0}


@pytest.mark.parametrize("label,instance,message", [
    (np.zeros((30, 32)), None, "label map size 30x32 is not divisible by the network's down-sampling factor 4"),
    (np.zeros((32, 32)), np.zeros((16, 16)), "instance maps (1, 16, 16) do not match label maps (1, 32, 32)"),
    ([np.zeros((32, 32)), np.zeros((16, 16))], None, "label maps in one call must share a size"),
    (np.full((32, 32), 0.5), None, "label map must hold integer ids, got dtype float64"),
])
def test_bad_shapes_and_types_are_named(tiny_cfg, label, instance, message):
    with pytest.raises(InvalidInputError) as e:
        LabelEncoder(tiny_cfg).check(label, instance)
    assert str(e.value).startswith(message)


def test_the_generation_load_path_names_the_item_and_checks_before_resizing(tiny_cfg):
    big = np.zeros((64, 64), np.uint8)
    big[1, 1] = 9  # a pixel the nearest-neighbour resize to 32x32 drops: refused all the same
    with pytest.raises(InvalidInputError) as e:
        load_item("big", encode_png(big), None, tiny_cfg, 0.05)
    assert str(e.value) == "label map 'big' has class ids this model does not know (6 classes): 9"
    with pytest.raises(InvalidInputError) as e:
        load_item("k", encode_png(np.zeros((32, 32), np.uint8)), encode_png(np.zeros((16, 32), np.uint8)), tiny_cfg, 0.05)
    assert str(e.value) == "label map 'k': instance maps (1, 16, 32) do not match label maps (1, 32, 32)"
    big[1, 1] = 0
    big[:, 32:] = 4
    item = load_item("ok", encode_png(big), encode_png(big), tiny_cfg, 0.05)
    assert item["label"].shape == item["instance"].shape == (32, 32) and item["label"][:, 16:].min() == 4


def _serve_refusal(info: ModelInfo, label_png: bytes) -> ApiError:
    body = json.dumps({"label": base64.b64encode(label_png).decode()}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/generate", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    with pytest.raises(ApiError) as e:
        asyncio.run(parse_job("generate", Request(scope, receive), body, Catalog({"m": info}, "m"), Limits()))
    return e.value


def test_the_same_bad_map_gets_the_same_refusal_at_every_door(random_model, tiny_cfg):
    with pytest.raises(InvalidInputError) as pipeline:
        SDMPipeline.from_pretrained(random_model, device="cpu", precision="fp32").prepare_labels(BAD)
    with pytest.raises(InvalidInputError) as job:
        load_item("bad", encode_png(BAD), None, tiny_cfg, 0.05)
    serve = _serve_refusal(ModelInfo.from_uri(random_model, Limits()), encode_png(BAD))
    assert str(pipeline.value) == f"label map {UNKNOWN}"
    assert str(job.value) == f"label map 'bad' {UNKNOWN}"
    assert (serve.status, serve.code, serve.message) == (400, "class_out_of_range", f"label: label map {UNKNOWN}")


def test_default_class_names_are_spelled_once(random_model):
    assert default_classes(3) == (["class_0", "class_1", "class_2"], default_palette(3))
    info = ModelInfo.from_uri(random_model, Limits())  # a model saved without class names
    assert info.class_names == [f"class_{i}" for i in range(6)] and info.palette == default_palette(6)
