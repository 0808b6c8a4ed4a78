"""The request parsers in-process against hostile input: property-based tests (Hypothesis) and the regression
corpus. Every request becomes a Job within the limits, or is refused with an ApiError of a 4xx status that names
the problem; nothing else may come out."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.requests import Request

from hostile_corpus import load_corpus, multipart
from sdm.config import SAMPLING_FIELDS, SamplingParams
from serve.errors import ApiError
from serve.inputs import Catalog, Job, Limits, ModelInfo, parse_job, read_body
from serve.schema import REQUESTS
from serve_helpers import label_map, png, random_tiny_model

LIMITS = Limits(max_body_bytes=1 << 20)
LABEL = png(label_map())
IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
MASK = np.pad(np.full((16, 16), 255, np.uint8), 8)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def info(tmp_path_factory) -> ModelInfo:
    return ModelInfo.from_uri(random_tiny_model(str(tmp_path_factory.mktemp("model"))), LIMITS)


def parse(info: ModelInfo, kind: str, content_type: str, body: bytes, headers: dict[str, str] | None = None,
          catalog: Catalog | None = None) -> Job | ApiError:
    """What the API makes of one request body: a Job, or the ApiError it refused it with."""
    headers = {"content-type": content_type, "content-length": str(len(body))} | (headers or {})
    scope = {
        "type": "http", "method": "POST", "path": f"/v1/{kind}", "query_string": b"",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
    }
    catalog = catalog or Catalog({"default": info}, "default")

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def run() -> Job:
        request = Request(scope, receive)
        return await parse_job(kind, request, await read_body(request, LIMITS.max_body_bytes), catalog, LIMITS)

    try:
        return asyncio.run(run())
    except ApiError as e:
        return e


def assert_valid_outcome(result: Job | ApiError, info: ModelInfo) -> None:
    if isinstance(result, ApiError):
        assert 400 <= result.status < 500 and result.code and result.message, (result.status, result.message)
        return
    assert result.label.shape == info.size and result.label.min() >= 0 and result.label.max() < info.num_classes
    assert 0 <= result.sampling.guidance_scale <= 100 and math.isfinite(result.sampling.guidance_scale)
    assert 1 <= result.sampling.num_inference_steps <= info.max_steps and 1 <= result.num_samples <= LIMITS.max_samples
    assert 0 <= result.seed < 2**63 and result.model == "default" and 1 <= result.sampling.cache_interval <= 10
    if result.kind == "edit":
        assert result.image.shape == (*info.size, 3) and result.mask.shape == info.size and result.mask.any()


def _json(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
param_values = json_values | st.sampled_from(["2", "1e30", "nan", "-1", "ddim", "dpm++", " 3", "0x10", "", "\x00"])
PARAMS = ("guidance_scale", "num_inference_steps", "steps", "sampler", "seed", "num_samples", "model", "cache_interval")


@FUZZ
@given(body=json_values)
def test_any_json_body_is_a_job_or_a_4xx(info, body):
    assert_valid_outcome(parse(info, "generate", "application/json", _json(body)), info)


@FUZZ
@given(params=st.dictionaries(st.sampled_from(PARAMS + ("label", "instance", "mask", "extra")), param_values, max_size=6),
       kind=st.sampled_from(["generate", "edit"]))
def test_any_json_fields_with_a_valid_label_are_a_job_or_a_4xx(info, params, kind):
    files = {"label": base64.b64encode(LABEL).decode()}
    if kind == "edit":
        files |= {"image": base64.b64encode(png(IMAGE)).decode(), "mask": base64.b64encode(png(MASK)).decode()}
    assert_valid_outcome(parse(info, kind, "application/json", _json(files | params)), info)


@FUZZ
@given(body=st.binary(max_size=2048), content_type=st.sampled_from(
    ["application/json", "multipart/form-data", "multipart/form-data; boundary=x", "text/plain", "", "image/png"]))
def test_any_bytes_under_any_content_type_are_a_4xx(info, body, content_type):
    result = parse(info, "generate", content_type, body)
    assert isinstance(result, ApiError) and 400 <= result.status < 500, result


def _mutated(data: bytes, edits: list[tuple[int, int, int]], cut: int | None) -> bytes:
    """Each edit sets a run of bytes (a header field) to one value; then the file may be cut short."""
    out = bytearray(data)
    for pos, run, value in edits:
        for i in range(pos, pos + run):
            out[i % len(out)] = value
    return bytes(out[:cut] if cut else out)


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(label_map()) if fmt in ("PNG", "PPM", "TGA") else Image.fromarray(IMAGE)
    (image.convert("F") if fmt == "SPIDER" else image).save(buf, format=fmt)
    return buf.getvalue()


# PNG and JPEG (MPO) are accepted; the rest must never reach a decoder (DDS and SPIDER decoders once crashed on
# one changed byte)
byte_values = st.sampled_from([0, 1, 0x40, 0x7F, 0x80, 0xFF]) | st.integers(0, 255)  # values that break parsers, or any
FORMATS = ["PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA", "ICO", "DDS", "SPIDER"]


@settings(FUZZ, max_examples=600)  # cheap cases; enough that the DDS and SPIDER crashes are found again
@given(fmt=st.sampled_from(FORMATS), field=st.sampled_from(["label", "instance", "image", "mask"]),
       edits=st.lists(st.tuples(st.integers(0, 127), st.integers(1, 32), byte_values), min_size=1, max_size=4),
       cut=st.none() | st.integers(1, 4096))
def test_corrupted_files_of_any_format_in_any_field_are_a_job_or_a_4xx(info, fmt, field, edits, cut):
    files = {"label": LABEL, "image": png(IMAGE), "mask": png(MASK)}
    files[field] = _mutated(_encoded(fmt), edits, cut)
    kind = "generate" if field in ("label", "instance") else "edit"
    fields = {name: {"bytes": data} for name, data in files.items() if kind == "edit" or name in ("label", "instance")}
    body, content_type = multipart(fields | {"steps": "2"})
    result = parse(info, kind, content_type, body)
    assert_valid_outcome(result, info)
    if isinstance(result, Job) and field != "image":
        assert fmt == "PNG"  # only PNG is ever decoded for label maps and masks (the image also takes JPEG)



def test_a_form_field_is_one_value_and_never_null(info):
    """A form field is text: `null` is not a value (a field is unset by leaving it out), and a field sent twice is
    refused rather than one of its values silently taken."""
    body, content_type = multipart({"label": {"bytes": LABEL}, "seed": "null"})
    refused = parse(info, "generate", content_type, body)
    assert (refused.status, refused.code) == (400, "invalid_parameter") and "seed" in refused.message
    body, content_type = multipart({"label": {"bytes": LABEL}, "num_inference_steps": "3", "seed": "7"})
    twice = body.replace(b'name="seed"', b'name="num_inference_steps"')
    refused = parse(info, "generate", content_type, twice)
    assert (refused.status, refused.code, refused.message) == (
        400, "invalid_form", "fields ['num_inference_steps'] sent more than once; each takes one value")
    assert parse(info, "generate", content_type, body).sampling.num_inference_steps == 3


@FUZZ
@given(guidance=st.floats(0, 100), steps=st.integers(1, 1000), seed=st.integers(0, 2**63 - 1), samples=st.integers(1, 4),
       sampler=st.sampled_from(["ddpm", "ddim", "dpm++", "dpm++sde"]))
def test_a_valid_request_gives_the_same_job_as_json_or_multipart(info, guidance, steps, seed, samples, sampler):
    params = {"guidance_scale": guidance, "num_inference_steps": steps, "seed": seed, "num_samples": samples, "sampler": sampler}
    as_json = parse(info, "generate", "application/json", _json({"label": base64.b64encode(LABEL).decode()} | params))
    body, content_type = multipart({"label": {"bytes": LABEL}} | {k: repr(v) if isinstance(v, float) else v for k, v in params.items()})
    as_form = parse(info, "generate", content_type, body)
    assert isinstance(as_json, Job) and isinstance(as_form, Job)
    for job in (as_json, as_form):
        assert (job.sampling.guidance_scale, job.sampling.num_inference_steps, job.seed, job.num_samples, job.sampling.sampler) == (
            guidance, steps, seed, samples, sampler)
    assert np.array_equal(as_json.label, as_form.label) and np.array_equal(as_json.label, label_map())


@pytest.mark.parametrize("entry", load_corpus(), ids=lambda e: e.name)
def test_every_request_of_the_regression_corpus_gets_its_answer(info, entry):
    result = parse(info, entry.path.removeprefix("/v1/"), entry.content_type, entry.body)
    if entry.code is None:
        assert isinstance(result, Job), f"{entry.name} ({entry.found}): {result}"
    else:
        assert isinstance(result, ApiError), f"{entry.name} ({entry.found}) was accepted"
        assert (result.status, result.code) == (entry.status, entry.code), f"{entry.name}: {result.message}"


def test_the_model_field_then_the_multiplexing_header_pick_the_model_and_unknown_ones_are_404(info):
    catalog = Catalog({"a": info, "b": info}, "b")
    label = base64.b64encode(LABEL).decode()
    header = {"serve_multiplexed_model_id": "a"}
    picked = [
        parse(info, "generate", "application/json", _json(body), headers, catalog)
        for body, headers in [({"label": label}, None), ({"label": label}, header), ({"label": label, "model": "b"}, header)]
    ]
    assert [job.model for job in picked] == ["b", "a", "b"]
    for body, headers in [({"label": label, "model": "c"}, None), ({"label": label}, {"serve_multiplexed_model_id": "c"})]:
        refused = parse(info, "generate", "application/json", _json(body), headers, catalog)
        assert (refused.status, refused.code) == (404, "unknown_model") and "'c'" in refused.message and "a, b" in refused.message


@pytest.mark.parametrize("fields,code,text", [
    ({"steps": True}, "invalid_parameter", "steps: must be a number, not a boolean"),
    ({"steps": 2.5}, "invalid_parameter", "steps: Input should be a valid integer"),
    ({"steps": 1001}, "invalid_parameter", "steps must be in [1, 1000], got 1001"),
    ({"num_samples": 5}, "invalid_parameter", "num_samples must be in [1, 4], got 5"),
    ({"guidance_scale": "inf"}, "invalid_parameter", "guidance_scale: Input should be a finite number"),
    ({"sampler": "euler"}, "invalid_parameter", "sampler: Input should be 'ddpm'"),
    ({"cache_interval": 0}, "invalid_parameter", "cache_interval: Input should be greater than or equal to 1"),
    ({"cache_interval": 11}, "invalid_parameter", "cache_interval: Input should be less than or equal to 10"),
    ({"cache_interval": True}, "invalid_parameter", "cache_interval: must be a number, not a boolean"),
    ({"label": 7}, "invalid_field", "label: expected a file upload or a base64 string"),
    ({"label": "@@"}, "invalid_base64", "label: not valid base64"),
    ({"strength": 1, "mask": "x"}, "unknown_field", "unknown fields ['mask', 'strength']"),
    ({"label": None}, "missing_field", "missing required field(s): label"),
])
def test_the_schema_refuses_with_the_apis_codes_and_names_the_field(info, fields, code, text):
    body = {k: v for k, v in ({"label": base64.b64encode(LABEL).decode()} | fields).items() if v is not None}
    refused = parse(info, "generate", "application/json", _json(body))
    assert isinstance(refused, ApiError) and refused.status == 400 and refused.code == code and text in refused.message, refused


def test_steps_is_the_deprecated_name_of_num_inference_steps_and_gives_the_same_job(info):
    schema = REQUESTS["generate"].model_json_schema()["properties"]
    assert schema["steps"]["deprecated"] is True and "deprecated" not in schema["num_inference_steps"]
    label = {"label": base64.b64encode(LABEL).decode(), "seed": 3}
    new = parse(info, "generate", "application/json", _json(label | {"num_inference_steps": 7}))
    old = parse(info, "generate", "application/json", _json(label | {"steps": 7}))
    assert new.sampling == old.sampling == dataclasses.replace(info.defaults, num_inference_steps=7)
    assert REQUESTS["generate"].model_json_schema()["not"] == {"required": ["num_inference_steps", "steps"]}
    for steps in (7, 8):  # both names in one request: refused, as the document's `not` says, even when they agree
        both = parse(info, "generate", "application/json", _json(label | {"steps": 7, "num_inference_steps": steps}))
        assert (both.status, both.code, both.message) == (
            400, "invalid_parameter", "give num_inference_steps or its deprecated name steps, not both")
    for name in ("steps", "num_inference_steps"):  # the limit names the field the request used
        too_many = parse(info, "generate", "application/json", _json(label | {name: info.max_steps + 1}))
        assert too_many.message == f"{name} must be in [1, {info.max_steps}], got {info.max_steps + 1}"


def test_a_job_carries_the_models_defaults_with_the_requests_parameters(info):
    job = parse(info, "generate", "application/json", _json({"label": base64.b64encode(LABEL).decode(), "guidance_scale": 3.0,
                                                              "sampler": "dpm++", "cache_interval": 2}))
    assert job.sampling == SamplingParams(guidance_scale=3.0, sampler="dpm++", num_inference_steps=info.defaults.num_inference_steps,
                                          eta=info.defaults.eta, cache_interval=2)


def test_the_published_defaults_are_the_models_sampling_params_field_for_field(info):
    defaults = info.describe("default", LIMITS).defaults
    assert tuple(type(defaults).model_fields) == SAMPLING_FIELDS
    assert defaults.model_dump() == info.defaults.to_dict() == {
        "guidance_scale": 1.5, "sampler": "ddim", "num_inference_steps": 25, "eta": 1.0, "cache_interval": 1}
