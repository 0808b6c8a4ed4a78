"""The real Serve app on a local Ray cluster (HTTP on 127.0.0.1), serving a randomly initialised tiny model."""

from __future__ import annotations

import base64
import json
import math
import re
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from sdm.errors import EXIT_REFUSED, InvalidInputError
from sdm.pipeline import SDMPipeline
from sdm.seeds import derive_seed
from hostile_corpus import load_corpus, multipart
from serve_helpers import PALETTE, deploy, label_map, png, random_tiny_model, read_png, serve_cluster

pytestmark = pytest.mark.ray

STEPS = 4
STEPS_SLOW = 100  # long enough that requests queue behind it
LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_tiny_model(str(tmp_path_factory.mktemp("random_tiny_model")))


@pytest.fixture(scope="module")
def cluster():
    with serve_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def url(cluster, model_dir):
    args = {"model_uri": model_dir, "num_cpus": 0.5, "max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    return deploy(args | {"max_body_bytes": LIMIT}, "sdm", "/", cluster.http)


def generate(url, label=None, files=None, json=None, **params):
    if json is not None:
        return requests.post(f"{url}/v1/generate", json=json, timeout=120)
    files = files or {"label": ("label.png", png(label_map() if label is None else label), "image/png")}
    data = {"steps": STEPS, "seed": 1} | params
    return requests.post(f"{url}/v1/generate", files=files, data={k: str(v) for k, v in data.items()}, timeout=120)


def test_model_route_reports_classes_palette_and_defaults(url):
    info = requests.get(f"{url}/v1/model", timeout=30).json()
    assert info["preset"] == "tiny" and info["resolution"] == {"height": 32, "width": 32}
    assert info["num_classes"] == 6 and info["class_names"][:2] == ["sky", "tree"]
    assert info["palette"][0] == list(PALETTE[0])
    assert info["defaults"] == {"guidance_scale": 1.5, "num_inference_steps": 25, "sampler": "ddim", "eta": 1.0, "cache_interval": 1}
    assert set(info["samplers"]) == {"ddpm", "ddim", "dpm++", "dpm++sde"}


def test_healthz_and_painting_page(url):
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok", "models": ["default"], "busy": False}
    page = requests.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<canvas" in page.text and "v1/generate" in page.text and "v1/edit" in page.text


def test_generate_returns_a_png_and_the_same_seed_gives_the_same_image(url):
    first = generate(url, seed=11)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.headers["x-sdm-seed"] == "11"
    image = read_png(first.content)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert generate(url, seed=11).content == first.content
    assert generate(url, seed=12).content != first.content
    assert generate(url, label=label_map(seed=5), seed=11).content != first.content


def test_served_images_match_the_library_pipeline(url, model_dir):
    body = {"label": base64.b64encode(png(label_map())).decode(), "steps": STEPS, "seed": 3, "num_samples": 2}
    out = requests.post(f"{url}/v1/generate", json=body, timeout=120).json()
    assert out["seed"] == 3 and out["seeds"] == [derive_seed(3, 0), derive_seed(3, 1)]
    assert set(out["timings"]) == {"queue_ms", "sampling_ms", "total_ms"}
    served = np.stack([read_png(base64.b64decode(b)) for b in out["images"]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the replica
    try:
        pipe = SDMPipeline.from_pretrained(model_dir, device="cpu")
        direct = pipe(label_map(), num_inference_steps=STEPS, seed=3, num_samples=2)
    finally:
        torch.set_num_threads(threads)
    assert np.abs(served.astype(int) - direct.astype(int)).max() <= 2  # equal up to kernel rounding
    assert not np.array_equal(served[0], served[1])


def test_colour_label_maps_in_the_palette_and_larger_maps_are_accepted(url):
    ids = label_map()
    by_ids = generate(url, label=ids).content
    by_colour = generate(url, label=np.array(PALETTE, dtype=np.uint8)[ids]).content
    assert by_colour == by_ids
    larger = generate(url, label=np.kron(ids, np.ones((2, 2), np.uint8)))  # 64x64: resized to 32x32
    assert larger.status_code == 200 and larger.content == by_ids


def test_edit_keeps_the_unmasked_image_and_regenerates_the_mask(url):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    edited_label = label_map()
    edited_label[8:24, 8:24] = 2
    files = {name: (f"{name}.png", png(a), "image/png") for name, a in [("image", image), ("mask", mask), ("label", edited_label)]}
    r = requests.post(f"{url}/v1/edit", files=files, data={"steps": str(STEPS), "seed": "4"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    out = read_png(r.content)
    keep = mask == 0
    assert np.array_equal(out[keep], image[keep])
    assert np.abs(out[~keep].astype(int) - image[~keep].astype(int)).mean() > 10
    again = requests.post(f"{url}/v1/edit", files=files, data={"steps": str(STEPS), "seed": "4"}, timeout=120)
    assert again.content == r.content


def test_concurrent_requests_share_batches_and_keep_their_own_settings(url):
    requests_ = [{"seed": i, "guidance_scale": 1.5 + (i % 3)} for i in range(8)]
    alone = [read_png(generate(url, **p).content) for p in requests_[:3]]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: generate(url, **p), requests_))
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["x-sdm-batch-size"]) for r in responses) > 1
    for got, want in zip(responses[:3], alone):
        assert np.abs(read_png(got.content).astype(int) - want.astype(int)).max() <= 2


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (an image bomb), with a valid header CRC."""
    data = bytearray(png(np.zeros((8, 8), np.uint8)))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _label_file(data: bytes) -> dict:
    return {"label": ("label.png", data, "image/png")}


BAD_GENERATE = [
    ("not an image", {"files": _label_file(b"this is not a png")}, 400, "invalid_image", "label: not a PNG"),
    ("truncated png", {"files": _label_file(png(label_map())[:60])}, 400, "invalid_image", "label"),
    ("image bomb", {"files": _label_file(_png_with_size(100_000, 100_000))}, 400, "image_too_large", "label"),
    ("huge side", {"files": _label_file(_png_with_size(5000, 8))}, 400, "image_too_large", "5000x8"),
    ("wrong size", {"label": np.zeros((32, 48), np.uint8)}, 400, "size_mismatch", "48x32"),
    ("class ids", {"label": np.full((32, 32), 7, np.uint8) + np.eye(32, dtype=np.uint8) * 2}, 400, "class_out_of_range", "7, 9"),
    ("colour", {"label": np.full((32, 32, 3), (1, 2, 3), np.uint8)}, 400, "color_not_in_palette", "#010203"),
    ("steps zero", {"steps": 0}, 400, "invalid_parameter", "steps: Input should be greater than or equal to 1"),
    ("steps huge", {"steps": 100000}, 400, "invalid_parameter", "steps"),
    ("steps text", {"steps": "many"}, 400, "invalid_parameter", "steps: Input should be a valid integer"),
    ("guidance nan", {"guidance_scale": "nan"}, 400, "invalid_parameter", "guidance_scale"),
    ("guidance negative", {"guidance_scale": -1}, 400, "invalid_parameter", "guidance_scale"),
    ("too many samples", {"num_samples": 99}, 400, "invalid_parameter", "num_samples must be in [1, 4]"),
    ("unknown sampler", {"sampler": "euler"}, 400, "invalid_parameter", "sampler: Input should be 'ddpm'"),
    ("negative seed", {"seed": -1}, 400, "invalid_parameter", "seed"),
    ("missing label", {"files": {"instance": ("i.png", png(label_map()), "image/png")}}, 400, "missing_field", "label"),
    ("unknown field", {"strength": 1}, 400, "unknown_field", "strength"),
]


@pytest.mark.parametrize("case,kwargs,status,code,message", BAD_GENERATE, ids=[c[0] for c in BAD_GENERATE])
def test_bad_generate_requests_get_a_4xx_json_error_naming_the_problem(url, case, kwargs, status, code, message):
    r = generate(url, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and message in error["message"], error


def _post(url, path, **kwargs):
    return requests.post(f"{url}{path}", timeout=60, **kwargs)


def test_more_bad_requests_get_4xx_json_errors_and_the_app_stays_healthy(url):
    label = base64.b64encode(png(label_map())).decode()
    empty = base64.b64encode(png(np.zeros((32, 32), np.uint8))).decode()
    as_json = {"content-type": "application/json"}
    cases = [
        (_post(url, "/v1/generate", data=json.dumps({"label": label, "guidance_scale": math.nan}), headers=as_json), 400, "guidance_scale"),
        (_post(url, "/v1/generate", data=b"{not json", headers=as_json), 400, "invalid_json"),
        (_post(url, "/v1/generate", json={"label": "@@@"}), 400, "invalid_base64"),
        (_post(url, "/v1/generate", json=[1, 2]), 400, "JSON body must be an object"),
        (_post(url, "/v1/generate", data=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        (_post(url, "/v1/generate", data=b"\0" * (LIMIT + 1), headers=as_json), 413, "body_too_large"),
        (_post(url, "/v1/edit", json={"label": label, "image": label}), 400, "missing required field(s): mask"),
        (_post(url, "/v1/edit", json={"label": label, "image": label, "mask": empty}), 400, "empty_mask"),
        (requests.get(f"{url}/v1/generate", timeout=30), 405, "method_not_allowed"),
        (requests.get(f"{url}/v2/nothing", timeout=30), 404, "not_found"),
    ]
    for r, status, text in cases:
        assert r.status_code == status and r.headers["content-type"] == "application/json", (r.status_code, r.text)
        assert text in r.text
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert generate(url).status_code == 200


def test_the_regression_corpus_through_the_http_proxy_gets_its_answers(url):
    corpus = load_corpus()
    for entry in corpus:
        r = requests.post(f"{url}{entry.path}", data=entry.body, headers={"content-type": entry.content_type}, timeout=120)
        if entry.code is None:
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", (entry.name, r.text[:300])
        else:
            assert r.status_code == entry.status and r.json()["error"]["code"] == entry.code, (entry.name, r.text[:300])
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    print(f"regression corpus: {len(corpus)} requests, {sum(e.code is None for e in corpus)} accepted, the rest refused as recorded")


def test_head_is_answered_where_get_is_and_405_names_the_allowed_methods(url):
    for path in ("/", "/healthz", "/v1/model"):
        get, head = requests.get(f"{url}{path}", timeout=30), requests.head(f"{url}{path}", timeout=30)
        assert head.status_code == get.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        r = requests.put(f"{url}{path}", timeout=30)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD" and r.json()["error"]["code"] == "method_not_allowed"
    for path in ("/v1/generate", "/v1/edit"):
        for r in (requests.get(f"{url}{path}", timeout=30), requests.head(f"{url}{path}", timeout=30)):
            assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_the_openapi_contract_describes_the_routes_and_agrees_with_the_server(url):
    import jsonschema

    doc = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert set(doc["paths"]) == {"/healthz", "/v1/models", "/v1/model", "/v1/generate", "/v1/edit"}
    assert set(doc["paths"]["/v1/generate"]) == {"post"} and set(doc["paths"]["/v1/model"]) == {"get"}
    post = doc["paths"]["/v1/generate"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["label"]["format"] == "binary"
    assert set(post["responses"]["200"]["content"]) == {"image/png", "application/json"}
    assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorBody"
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["label"] and schema["additionalProperties"] is False
    label = base64.b64encode(png(label_map())).decode()
    bodies = [{"label": label, "steps": STEPS}, {"label": label, "steps": 0}, {"label": label, "sampler": "euler"},
              {"label": label, "guidance_scale": 101}, {"label": label, "strength": 1}, {"steps": STEPS},
              {"label": label, "seed": -1}, {"label": label, "seed": 5, "sampler": "ddpm", "steps": STEPS}]
    for body in bodies:  # the published schema refuses what the server refuses, and accepts what it accepts
        published = jsonschema.Draft202012Validator(schema).is_valid(body)
        served = requests.post(f"{url}/v1/generate", json=body, timeout=120).status_code
        assert published == (served == 200), (body, served)
    docs = requests.get(f"{url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "openapi.json" in docs.text


def test_the_python_client_draws_the_pipelines_images_and_raises_the_servers_error_codes(url, model_dir):
    from sdm.client import ApiError, SDMClient

    client = SDMClient(url)
    assert client.model()["num_classes"] == 6
    label = label_map(seed=5)
    images = client.generate(label, num_inference_steps=STEPS, guidance_scale=2.0, seed=11, num_samples=2)
    pipe = SDMPipeline.from_pretrained(model_dir, device="cpu")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, pipe(label, num_inference_steps=STEPS, guidance_scale=2.0, seed=11, num_samples=2))
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.pad(np.ones((16, 16), np.uint8), 8)
    edited = client.edit(image, mask, label, num_inference_steps=STEPS, seed=3)
    assert np.array_equal(edited[0][mask == 0], image[mask == 0])
    with pytest.raises(ApiError) as refused:
        client.generate(label, num_inference_steps=0)
    assert (refused.value.status, refused.value.code) == (400, "invalid_parameter") and "steps" in refused.value.message


def _scrape(cluster, pattern: str, at_least: float = 1e-9, timeout: float = 45) -> list[tuple[str, float]]:
    """(labels, value) of every sample whose metric name and labels match `pattern`, once their sum reaches
    `at_least` (metrics are exported every second) or at the timeout."""
    deadline = time.time() + timeout
    while True:
        text = requests.get(cluster.metrics, timeout=10).text
        samples = [
            (m.group(1), float(m.group(2)))
            for m in re.finditer(r"^(" + pattern + r"[^ ]*) ([0-9.e+-]+)$", text, re.MULTILINE)
        ]
        if sum(v for _, v in samples) >= at_least or time.time() > deadline:
            return samples
        time.sleep(1)


def test_custom_metrics_are_scraped_from_rays_metrics_endpoint(url, cluster):
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: generate(url, seed=100 + i), range(6)))
    generate(url, steps=0)
    ok = _scrape(cluster, r'ray_sdm_requests_total\{[^}]*route="/v1/generate"[^}]*status="200"', at_least=6)
    assert ok and sum(v for _, v in ok) >= 6, ok
    assert _scrape(cluster, r'ray_sdm_requests_total\{[^}]*status="400"')
    assert sum(v for _, v in _scrape(cluster, r"ray_sdm_request_latency_s_count", at_least=6)) >= 6
    multi = _scrape(cluster, r'ray_sdm_batch_size_bucket\{[^}]*le="1\.0"')
    total = _scrape(cluster, r"ray_sdm_batch_size_count")
    assert sum(v for _, v in total) > sum(v for _, v in multi), "no batch held more than one request"
    assert sum(v for _, v in _scrape(cluster, r"ray_sdm_queue_wait_s_count", at_least=6)) >= 6
    assert sum(v for _, v in _scrape(cluster, r'ray_sdm_images_generated_total\{[^}]*kind="generate"', at_least=6)) >= 6
    assert max(v for _, v in _scrape(cluster, r"ray_sdm_denoising_steps_per_s")) > 0
    time.sleep(5)  # a gauge set once, when the replica started, must still be exported (Ray expires stale gauges)
    assert max(v for _, v in _scrape(cluster, r"ray_sdm_model_load_s", timeout=3)) > 0


def test_bearer_token_auth_when_configured(cluster, model_dir):
    secure = deploy({"model_uri": model_dir, "num_cpus": 0.5, "auth_token": "s3cret"}, "secure", "/secure", cluster.http)
    try:
        files = _label_file(png(label_map()))
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            r = requests.post(f"{secure}/v1/generate", files=files, data={"steps": "2"}, headers=headers, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert requests.get(f"{secure}/v1/model", timeout=30).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert requests.get(f"{secure}/v1/model", headers=auth, timeout=30).status_code == 200
        for scheme in ("bearer", "BEARER"):  # the auth scheme is case-insensitive in HTTP
            assert requests.get(f"{secure}/v1/model", headers={"Authorization": f"{scheme} s3cret"}, timeout=30).ok
        r = requests.post(f"{secure}/v1/generate", files=files, data={"steps": "2"}, headers=auth, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert requests.get(f"{secure}/healthz", timeout=30).status_code == 200  # probes need no token
    finally:
        from ray import serve

        serve.delete("secure")


def test_overload_gets_503_json_not_a_crash(cluster, model_dir, url):
    args = {
        "model_uri": model_dir,
        "num_cpus": 0.5,
        "max_batch_size": 1,
        "max_ongoing_requests": 2,
        "max_queued_requests": 1,
        "max_queue_wait_s": 0.3,
    }
    tight = deploy(args, "tight", "/tight", cluster.http)
    try:
        files = _label_file(png(label_map()))
        post = lambda i: requests.post(f"{tight}/v1/generate", files=files, data={"steps": "60", "seed": str(i)}, timeout=120)
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        codes = sorted(r.json()["error"]["code"] for r in responses if r.status_code != 200)
        assert {r.status_code for r in responses} <= {200, 503}, [r.text for r in responses]
        assert any(r.status_code == 200 for r in responses)
        assert "overloaded" in codes and "queue_timeout" in codes, codes
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
        assert requests.get(f"{tight}/healthz", timeout=30).status_code == 200
        assert post(99).status_code == 200

    finally:
        from ray import serve

        serve.delete("tight")


def test_the_python_client_retries_503_until_the_model_has_room(cluster, model_dir):
    """One request in flight and one queued: the other concurrent calls get 503 `overloaded` with Retry-After at
    first; the client waits and retries, and every call returns its images."""
    from sdm.client import ApiError, SDMClient

    args = {"model_uri": model_dir, "num_cpus": 0.5, "max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 1}
    app = deploy(args, "retry", "/retry", cluster.http)
    try:
        with ThreadPoolExecutor(6) as pool:
            raw = list(pool.map(lambda i: generate(app, steps=10, seed=i), range(6)))
        assert 503 in {r.status_code for r in raw}  # the load does overload it
        client = SDMClient(app, max_retries=120)
        with ThreadPoolExecutor(6) as pool:
            drawn = list(pool.map(lambda i: client.generate(label_map(), num_inference_steps=10, seed=i), range(6)))
        assert all(d.shape == (1, 32, 32, 3) for d in drawn)
        with pytest.raises(ApiError) as refused, ThreadPoolExecutor(6) as pool:  # without retries, the 503 comes out
            list(pool.map(lambda i: SDMClient(app, max_retries=0).generate(label_map(), num_inference_steps=10, seed=i), range(6)))
        assert (refused.value.status, refused.value.code) == (503, "overloaded")
    finally:
        from ray import serve

        serve.delete("retry")


DOOR_CASES = {  # which model, at which precision, with which request
    "teacher-auto": ("teacher", "auto", {"num_inference_steps": STEPS, "sampler": "dpm++sde", "guidance_scale": 2.0}),
    # a step student of STEPS steps (guidance inside the network, its own timesteps, DDIM), and the precision flag
    "student-fp32": ("student", "fp32", {"num_inference_steps": STEPS, "sampler": "ddim", "guidance_scale": 2.5}),
}


@pytest.mark.parametrize("case", list(DOOR_CASES))
def test_every_door_draws_the_same_bytes(cluster, url, model_dir, tmp_path, case):
    """One label map and seed give byte-identical PNGs through the generation job, the pipeline, `sdm sample`,
    POST /v1/generate and the Python client, from a model and from a distilled student alike; every sample the job
    records is reproduced from its recorded seed and index."""
    from jobs.generate import main as generate_job
    from sdm.cli import main as sdm_cli
    from sdm.client import SDMClient
    from sdm.data.shards import iter_rows
    from sdm.testing import save_random_student

    kind, precision, params = DOOR_CASES[case]
    model = model_dir if kind == "teacher" else str(tmp_path / "student")
    if kind == "student":
        save_random_student(model, model_dir, target_steps=STEPS)
    flags = [x for k, v in params.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(3):
        (labels / f"map{i}.png").write_bytes(png(label_map(seed=20 + i)))
    out = str(tmp_path / "generated")
    assert generate_job(["--model", model, "--labels", str(labels), "--out", out, "--samples-per-label", "2", *flags, "--seed", "5",
                         "--precision", precision, "--batch-size", "4", "--cpus-per-worker", "0.25"]) == 0
    # After the job, whose read and write tasks take a whole CPU of this 2-CPU cluster.
    base = url if case == "teacher-auto" else deploy(
        {"model_uri": model, "num_cpus": 0.25, "precision": precision}, "doors", "/doors", cluster.http)
    pipe = SDMPipeline.from_pretrained(model, device="cpu", precision=precision)
    client = SDMClient(base)
    rows = sorted(iter_rows(out), key=lambda r: r["key"])
    assert len(rows) == 6
    for row in rows[:3]:
        k, seed = row["sample_index"], row["seed"]
        label_png = (labels / f"{row['source_key']}.png").read_bytes()
        direct = pipe(read_png(label_png), seed=seed, num_samples=k + 1, **params)
        served = requests.post(f"{base}/v1/generate", json={"label": base64.b64encode(label_png).decode(), **params, "seed": seed,
                                                            "num_samples": k + 1},
                               headers={"Accept": "application/json"}, timeout=120)
        assert served.status_code == 200, served.text
        cli_out = tmp_path / f"cli-{row['key']}"
        assert sdm_cli(["sample", "--model", model, "--labels", str(labels / f"{row['source_key']}.png"), "--out", str(cli_out),
                        *flags, "--seed", str(seed), "--num-samples", str(k + 1), "--precision", precision, "--device", "cpu"]) == 0
        job_image = read_png(row["image"])
        assert np.array_equal(direct[k], job_image)
        assert np.array_equal(read_png(base64.b64decode(served.json()["images"][k])), job_image)
        assert np.array_equal(read_png((cli_out / f"{row['source_key']}_{k}.png").read_bytes()), job_image)
        assert np.array_equal(client.generate(read_png(label_png), seed=seed, num_samples=k + 1, **params)[k], job_image)
    if kind == "student":  # what it cannot serve is refused by name at every door, before any sampling
        with pytest.raises(InvalidInputError, match="num_inference_steps must be 4 for this student"):
            pipe(read_png(label_png), num_inference_steps=25)
        refused = requests.post(f"{base}/v1/generate", json={"label": base64.b64encode(label_png).decode(), "sampler": "dpm++"},
                                headers={"Accept": "application/json"}, timeout=60)
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_parameter")
        assert "sampler must be 'ddim' for this student" in refused.json()["error"]["message"]
        described = requests.get(f"{base}/v1/model", timeout=30).json()
        assert described["student"]["num_inference_steps"] == STEPS and described["student"]["guidance_range"] == [1.0, 3.0]
        assert described["limits"]["max_steps"] == STEPS
        assert generate_job(["--model", model, "--labels", str(labels), "--out", str(tmp_path / "refused"),
                             "--guidance-scale", "3.5"]) == EXIT_REFUSED
    if case != "teacher-auto":
        from ray import serve

        serve.delete("doors")  # frees its CPU share for the tests after this one


def _metric(cluster, name: str, app: str, at_least: float = 0, timeout: float = 45) -> float:
    """The sum of one counter of application `app` over its replicas, once it reaches `at_least` (metrics are
    exported every second) or at the timeout; 0 before it was first incremented."""
    pattern = rf'^ray_{name}_total{{[^}}]*application="{app}"[^}}]*}} ([0-9.e+-]+)$'
    deadline = time.time() + timeout
    while True:
        text = requests.get(cluster.metrics, timeout=10).text
        value = sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))
        if value >= at_least or time.time() > deadline:
            return value
        time.sleep(1)


def _hang_up_after(url: str, path: str, fields: dict, seconds: float) -> threading.Thread:
    """Send a request on a raw connection and close it after `seconds`, before any answer: a client that went away."""
    body, content_type = multipart(fields)
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    prefix = "/" + url.removeprefix("http://").split("/", 1)[1] if url.count("/") > 2 else ""
    head = f"POST {prefix}{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"

    def run() -> None:
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(head.encode() + body)
            time.sleep(seconds)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_requests_whose_clients_hang_up_are_dropped_before_sampling(cluster, model_dir):
    app = deploy({"model_uri": model_dir, "num_cpus": 0.5, "max_batch_size": 8}, "hangup", "/hangup", cluster.http)
    try:
        label = {"label": {"bytes": png(label_map())}}
        busy = threading.Thread(target=lambda: results.append(generate(app, steps=STEPS_SLOW, seed=1)))
        results: list[requests.Response] = []
        start = time.monotonic()
        busy.start()
        time.sleep(1.0)  # the first request is sampling; the next ones queue for the following batch
        hangups = [_hang_up_after(app, "/v1/generate", label | {"steps": str(STEPS_SLOW), "seed": str(i)}, 1.0) for i in range(3)]
        for t in hangups:
            t.join()
        busy.join()
        first = time.monotonic() - start
        t0 = time.monotonic()
        after = generate(app, steps=STEPS_SLOW, seed=2)
        waited = time.monotonic() - t0
        assert results[0].status_code == 200 and after.status_code == 200
        # The three that hung up were never sampled: the replica drew the first request's image and the last one's.
        assert _metric(cluster, "sdm_images_generated", "hangup", at_least=2) == 2
        assert _metric(cluster, "sdm_requests_cancelled", "hangup", at_least=3) == 3
        print(f"3 clients hung up while queued: none sampled; a {STEPS_SLOW}-step request took {first:.1f}s, the next one {waited:.1f}s")
    finally:
        from ray import serve

        serve.delete("hangup")


def test_a_request_over_the_timeout_gets_504_and_its_sampling_stops(cluster, model_dir):
    app = deploy({"model_uri": model_dir, "num_cpus": 0.5, "request_timeout_s": 1.0}, "timeout", "/timeout", cluster.http)
    try:
        t0 = time.monotonic()
        r = generate(app, steps=1000, seed=1)
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        assert "1s" in r.json()["error"]["message"] and took < 10
        t0 = time.monotonic()
        ok = generate(app, steps=2, seed=1)
        # The abandoned 1000-step sampling stopped at its next step instead of holding the replica for its full length.
        assert ok.status_code == 200 and time.monotonic() - t0 < 10
        assert requests.get(f"{app}/healthz", timeout=30).status_code == 200
        assert _metric(cluster, "sdm_images_generated", "timeout", at_least=1) == 1
        assert _metric(cluster, "sdm_requests_cancelled", "timeout", at_least=1) == 1
        print(f"timeout 1s: 504 after {took:.1f}s; the next request answered in {time.monotonic() - t0:.1f}s")
    finally:
        from ray import serve

        serve.delete("timeout")


def _running_replicas(app: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments["SDMModel"].replica_states.get("RUNNING", 0)


def _until(what: str, check, timeout: float) -> float:
    """Seconds until `check()` holds; fails the test past `timeout`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what} within {timeout:.0f}s"
        time.sleep(0.5)
    return time.monotonic() - start


def test_the_model_deployment_scales_out_under_load_back_in_after_it_and_up_from_zero(cluster, model_dir):
    from ray import serve

    scaling = {"num_cpus": 0.25, "max_batch_size": 1, "target_ongoing_requests": 1, "upscale_delay_s": 1,
               "downscale_delay_s": 3}
    app = deploy({"model_uri": model_dir, "min_replicas": 1, "max_replicas": 3} | scaling, "scale", "/scale", cluster.http)
    try:
        assert _running_replicas("scale") == 1
        stop = threading.Event()
        codes: list[int] = []

        def client() -> None:
            while not stop.is_set():
                codes.append(generate(app, steps=20).status_code)

        clients = [threading.Thread(target=client) for _ in range(6)]
        for t in clients:
            t.start()
        try:
            out = _until("a second replica under 6 clients' load", lambda: _running_replicas("scale") >= 2, 120)
        finally:
            stop.set()
            for t in clients:
                t.join()
        peak = _running_replicas("scale")
        back = _until("back to 1 replica after the load", lambda: _running_replicas("scale") == 1, 120)
        assert codes and set(codes) == {200}
        print(f"autoscaling: 1 -> {peak} replicas {out:.1f}s into the load; back to 1 {back:.1f}s after it ended; "
              f"{len(codes)} requests, all 200")
    finally:
        serve.delete("scale")

    zero = deploy({"model_uri": model_dir, "min_replicas": 0, "max_replicas": 1} | scaling, "zero", "/zero", cluster.http)
    try:
        idle = _until("scaled to zero replicas", lambda: _running_replicas("zero") == 0, 120)
        t0 = time.monotonic()
        r = generate(zero, steps=2)
        cold = time.monotonic() - t0
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert _running_replicas("zero") == 1
        print(f"scale to zero: no replica {idle:.1f}s after the last request; the next request answered in {cold:.1f}s (cold start)")
    finally:
        serve.delete("zero")
