"""The HTTP contract: the OpenAPI document a deployment serves at /openapi.json says what its server does.

In-process, the document (`serve.app.contract`) is checked for the facts it must state exactly. Against the real
app (the Ray Serve HTTP proxy on a local cluster), Schemathesis generates requests from the served document, with
and without the bearer token, and checks every answer against it: no 5xx, only declared status codes and content
types, bodies of the declared schemas, requests outside the document refused, and requests inside it never refused
for a parameter (only for what their files hold, which a schema cannot say, or for a model that is not served).
"""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests

from serve.app import contract, published_maxima
from serve.schema import REQUESTS
from serve_helpers import deploy, label_map, png, random_tiny_model, serve_cluster

SEED_MAX = 2**63 - 1
MAXIMA = published_maxima(50, 3)  # the open deployment's limits, other than the defaults (1000, 4)
TOKEN = "s3cret"
# The answers to a request outside the document's parameters; a request inside it must never get one of these.
PARAMETER_CODES = {"invalid_parameter", "unknown_field", "missing_field", "invalid_json", "invalid_form",
                   "unsupported_media_type"}


def _operations(doc: dict) -> list[dict]:
    return [op for methods in doc["paths"].values() for op in methods.values()]


def _bodies(doc: dict, media_type: str = "application/json") -> list[dict]:
    return [doc["paths"][p]["post"]["requestBody"]["content"][media_type]["schema"] for p in ("/v1/generate", "/v1/edit")]


def _forms(doc: dict) -> list[dict]:
    return _bodies(doc, "multipart/form-data")


def test_the_seed_bound_is_exact_in_the_documents_text():
    text = json.dumps(contract(MAXIMA, auth=False))
    for body in _bodies(json.loads(text)):
        (bound,) = [b for b in body["properties"]["seed"]["anyOf"] if b != {"type": "null"}]
        assert bound == {"type": "integer", "minimum": 0, "maximum": SEED_MAX}
        assert type(bound["maximum"]) is int
    assert '"maximum": 9223372036854775807' in text and "e+18" not in text


def test_the_deployments_maxima_are_published_with_where_each_models_own_limit_is():
    doc = contract(MAXIMA, auth=False)
    for schema in _bodies(doc):
        for name in ("num_inference_steps", "steps"):  # the field and its deprecated name
            steps = next(b for b in schema["properties"][name]["anyOf"] if b["type"] == "integer")
            assert (steps["minimum"], steps["maximum"]) == (1, 50)
            assert "limits.max_steps" in schema["properties"][name]["description"]
        assert (schema["properties"]["num_samples"]["minimum"], schema["properties"]["num_samples"]["maximum"]) == (1, 3)
    for form in _forms(doc):
        assert form["properties"]["num_inference_steps"]["maximum"] == 50 and form["properties"]["steps"]["maximum"] == 50
        assert form["properties"]["num_samples"]["maximum"] == 3
    assert contract(published_maxima(1000, 4), auth=False)["paths"]["/v1/edit"]["post"]["requestBody"][
        "content"]["multipart/form-data"]["schema"]["properties"]["num_inference_steps"]["maximum"] == 1000


def test_form_fields_and_query_parameters_cannot_be_null_while_json_fields_can():
    doc = contract(MAXIMA, auth=False)
    for form in _forms(doc):
        for name, field in form["properties"].items():
            assert "anyOf" not in field and field.get("type") != "null" and field.get("default", 0) is not None, name
        assert form["properties"]["seed"] == {"description": "unset: a random seed, returned in the answer", "title": "Seed",
                                              "type": "integer", "minimum": 0, "maximum": SEED_MAX}
        assert form["properties"]["label"] == {"type": "string", "format": "binary"}
    (model,) = doc["paths"]["/v1/model"]["get"]["parameters"]
    assert model["schema"]["type"] == "string" and "anyOf" not in model["schema"] and model["required"] is False
    for body in _bodies(doc):  # JSON has null: sending it leaves the field unset
        assert {"type": "null"} in body["properties"]["seed"]["anyOf"]
        assert set(body["properties"]) == set(REQUESTS["edit" if "mask" in body["properties"] else "generate"].model_fields)


def test_only_what_the_app_answers_is_declared_and_auth_only_with_a_token():
    for auth in (False, True):
        doc = contract(MAXIMA, auth=auth)
        text = json.dumps(doc)
        assert '"422"' not in text and "HTTPValidationError" not in text and '"example"' not in text
        assert set(doc["paths"]["/v1/model"]["get"]["responses"]) == {"200", "400", "404"} | ({"401"} if auth else set())
        secured = [op["security"] for op in _operations(doc) if "security" in op]
        assert secured == [[{"HTTPBearer": []}] + ([] if auth else [{}])] * 4  # without a token, a token is optional
        assert ("401" in doc["paths"]["/v1/generate"]["post"]["responses"]) == auth
    assert contract(MAXIMA, auth=False, root_path="/secure")["servers"] == [{"url": "/secure"}]


# Against the real app, through the Ray Serve HTTP proxy.


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """Two deployments of one random tiny model: open, with limits of its own; and behind a bearer token."""
    model = random_tiny_model(str(tmp_path_factory.mktemp("random_tiny_model")))
    with serve_cluster() as cluster:
        limits = {"max_steps": MAXIMA["num_inference_steps"], "max_samples": MAXIMA["num_samples"]}
        yield {
            "open": deploy({"model_uri": model, "num_cpus": 0.25} | limits, "open", "/", cluster.http),
            "secure": deploy({"model_uri": model, "num_cpus": 0.25, "auth_token": TOKEN}, "secure", "/secure", cluster.http),
        }


def _served(url: str) -> dict:
    r = requests.get(f"{url}/openapi.json", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


@pytest.mark.ray
@pytest.mark.e2e
def test_each_deployment_serves_its_own_document(apps):
    """The served documents, not only the one built in-process: no `example: {}` (the pickled app's copy of
    FastAPI's marker), no 422, the exact seed bound, and the deployment's own maxima and auth."""
    open_doc, secure_doc = _served(apps["open"]), _served(apps["secure"])
    assert open_doc == contract(MAXIMA, auth=False)
    assert secure_doc == contract(published_maxima(1000, 4), auth=True, root_path="/secure")
    for doc in (open_doc, secure_doc):
        assert doc["paths"]["/v1/model"]["get"]["parameters"][0].keys() == {"name", "in", "required", "schema", "description"}
    for url in apps.values():
        text = requests.get(f"{url}/openapi.json", timeout=30).text
        assert '"maximum":9223372036854775807' in text and '"example"' not in text and '"422"' not in text
    docs = requests.get(f"{apps['secure']}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/secure/openapi.json" in docs.text
    assert requests.head(f"{apps['open']}/openapi.json", timeout=30).status_code == 200


def _edit(url: str, label: bytes, **fields) -> requests.Response:
    """A multipart /v1/edit with a real label map and an image that is not one: the server checks the parameters,
    reads the label and checks steps and num_samples against the model, and only then refuses the image (400
    invalid_image). Nothing is sampled, and a parameter the server takes shows as `invalid_image`."""
    files = {"label": ("label.png", label, "image/png"), "image": ("i.png", b"not an image", "image/png"),
             "mask": ("m.png", b"not an image", "image/png")}
    return requests.post(f"{url}/v1/edit", files=files, data={k: str(v) for k, v in fields.items()}, timeout=60)


def _code(r: requests.Response) -> tuple[int, str, str]:
    error = r.json()["error"]
    return r.status_code, error["code"], error["message"]


@pytest.mark.ray
@pytest.mark.e2e
def test_the_four_contract_defects_stay_fixed(apps):
    url, label = apps["open"], png(label_map())
    # 1. A form field is text: `null` is no value, refused as the document (no null branch) says.
    assert _code(_edit(url, label, seed="null"))[:2] == (400, "invalid_parameter")
    assert _code(_edit(url, label, model="null")) == (404, "unknown_model", "no model 'null' is served; models: default")
    assert _code(_edit(url, label))[:2] == (400, "invalid_image")  # left out: unset
    # 2. The seed's exact bound: 2**63 - 1 is taken, 2**63 refused (JSON and form alike).
    assert _code(_edit(url, label, seed=SEED_MAX))[:2] == (400, "invalid_image")
    assert _code(_edit(url, label, seed=SEED_MAX + 1))[:2] == (400, "invalid_parameter")
    b64 = base64.b64encode(label).decode()
    r = requests.post(f"{url}/v1/edit", json={"label": b64, "image": "AAAA", "mask": "AAAA", "seed": SEED_MAX + 1}, timeout=60)
    assert _code(r)[:2] == (400, "invalid_parameter") and "seed" in _code(r)[2]
    # 3. The published maxima are the deployment's: at the maximum taken, one above refused.
    doc = _served(url)
    form = doc["paths"]["/v1/edit"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    for name in ("num_inference_steps", "steps", "num_samples"):
        high = form[name]["maximum"]
        assert high == MAXIMA[name]
        assert _code(_edit(url, label, **{name: high}))[:2] == (400, "invalid_image")
        status, code, message = _code(_edit(url, label, **{name: high + 1}))
        assert (status, code) == (400, "invalid_parameter") and f"{name} must be in [1, {high}]" in message
    limits = requests.get(f"{url}/v1/models", timeout=30).json()["models"][0]["limits"]
    assert (limits["max_steps"], limits["max_samples"]) == (MAXIMA["num_inference_steps"], MAXIMA["num_samples"])
    # 4. GET /v1/model answers what it declares: 200, or 404 for a model not served.
    assert requests.get(f"{url}/v1/model", params={"model": "nope"}, timeout=30).status_code == 404
    assert "422" not in doc["paths"]["/v1/model"]["get"]["responses"]


def _not_refused_for_a_parameter(ctx, response, case) -> None:
    """A request inside the document may be refused for what its files hold, or for naming a model that is not
    served (404); never for a parameter: that would be the document allowing what the server refuses."""
    if case.meta.generation.mode.is_positive and response.status_code == 400:
        status, code, message = _code(response)
        assert code not in PARAMETER_CODES, f"the document allows what the server refuses: {code}: {message}"


def _with_a_real_label(case) -> None:
    """A document-valid /v1/edit carries a real label map, so that the checks of steps and num_samples against the
    model (after the label is read, before the image) are reached; its image is still generated bytes, so (almost)
    nothing samples."""
    if case.operation.path == "/v1/edit" and case.meta.generation.mode.is_positive and isinstance(case.body, dict):
        label = png(label_map())
        case.body["label"] = base64.b64encode(label).decode() if case.media_type == "application/json" else label


def _drive(url: str, budget: dict[str, int], headers: dict[str, str], checks: list, negative: bool = True) -> int:
    """Generated requests for every operation of the served document, inside it and (`negative`) outside it:
    `budget` caps the examples per operation and mode (derandomized, so a run repeats). Returns the requests sent."""
    import schemathesis
    from hypothesis import HealthCheck, assume, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:2 if negative else 1]:
            examples = budget.get(f"{operation.method.upper()} {operation.path}", 0)
            if not examples or (mode.is_negative and not (operation.query or operation.body)):
                continue

            @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                nonlocal sent
                # An empty list in a form is no field at all: the negation vanishes on the wire (a valid request).
                assume(not (mode.is_negative and case.media_type == "multipart/form-data" and isinstance(case.body, dict)
                            and [] in case.body.values()))
                _with_a_real_label(case)
                response = case.call(base_url=url, headers=headers, timeout=60)
                sent += 1
                case.validate_response(response, checks=checks, headers=headers)

            run()
    return sent


@pytest.mark.ray
@pytest.mark.e2e
def test_schemathesis_finds_no_disagreement_between_the_served_document_and_the_server(apps):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance, ignored_auth, negative_data_rejection, response_headers_conformance,
        response_schema_conformance, status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance, negative_data_rejection, _not_refused_for_a_parameter]
    full = {"GET /healthz": 1, "GET /v1/models": 1, "GET /v1/model": 15, "POST /v1/generate": 50, "POST /v1/edit": 50}
    brief = {"GET /v1/models": 1, "GET /v1/model": 8, "POST /v1/generate": 20, "POST /v1/edit": 20}
    start = time.monotonic()
    counts = {
        "open": _drive(apps["open"], full, {}, checks),
        # inside the document only: a case outside it may be one without the token, which these headers would add
        "secure, with the token": _drive(apps["secure"], brief, {"Authorization": f"Bearer {TOKEN}"}, checks + [ignored_auth],
                                         negative=False),
        "secure, without it": _drive(apps["secure"], brief, {}, checks),
    }
    took = time.monotonic() - start
    assert all(counts.values()) and sum(counts.values()) <= 400, counts
    assert requests.get(f"{apps['open']}/healthz", timeout=30).status_code == 200
    print(f"schemathesis: {sum(counts.values())} generated requests ({counts}) in {took:.1f}s, no disagreement")


@pytest.mark.ray
@pytest.mark.e2e
def test_without_the_token_every_route_but_the_probe_is_refused(apps):
    url = apps["secure"]
    for path in ("/v1/models", "/v1/model"):
        r = requests.get(f"{url}{path}", timeout=30)
        assert _code(r)[:2] == (401, "unauthorized") and r.headers["www-authenticate"] == "Bearer"
    r = requests.post(f"{url}/v1/generate", json={"label": "AAAA"}, timeout=30)
    assert _code(r)[:2] == (401, "unauthorized")
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    described = requests.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert described["limits"]["max_steps"] == 1000
