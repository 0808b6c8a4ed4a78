"""The HTTP API deployment and the application builder: `serve run serve/config.yaml`.

Two deployments: SDMApi (a FastAPI app bound with `serve.ingress`, on CPU: auth, validation, PNG encoding, metrics;
its OpenAPI contract at /openapi.json and /docs) and SDMModel (the networks, on a GPU where one is given, autoscaled,
multiplexed over the served models, with dynamic batching).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at run time, in the replica.
import asyncio
import base64
import copy
import hmac
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdm.errors import InvalidInputError
from sdm.imageio import encode_png
from sdm.process_env import ALLOCATOR_ENV
from serve.errors import ApiError
from serve.inputs import Catalog, Job, Limits, parse_job, read_body
from serve.metrics import ApiMetrics
from serve.model import Output, QueueTimeout, SDMModel
from serve.schema import (
    ErrorBody, GenerateResult, Health, ModelDescription, ModelList, multipart_schema, not_null, request_schema,
)

logger = logging.getLogger("ray.serve")
PAGE = Path(__file__).parent / "static" / "index.html"
TOKEN_ENV = "SDM_SERVE_TOKEN"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # safe in a header, a metric tag and a URL
# What a call to the model deployment raises when the replica serving it died or is being replaced.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class AppArgs(BaseModel):
    """Builder arguments (the `args:` of serve/config.yaml). Unset scaling knobs take defaults that depend on
    whether replicas get a GPU: a fixed single replica on CPU, an autoscaled fleet on GPUs."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str | None = None  # one model, served as "default"; or:
    models: dict[str, str] | None = None  # name -> URI (local, file:// or s3://) of each model served
    default_model: str | None = None  # what a request naming no model gets; the first of `models` when unset
    max_models_per_replica: int = Field(2, ge=1)  # models one replica holds at once (LRU)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, ge=0)
    device: str | None = None
    precision: str = "auto"
    fast_path: bool = True  # the inference fast path: channels_last, bf16-held weights (sdm.inference)
    compile: bool = False  # torch.compile, warmed up as each model loads (slow to start on CPU)
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)
    upscale_delay_s: float | None = Field(None, ge=0)  # None: Serve's defaults (30 s out, 600 s in)
    downscale_delay_s: float | None = Field(None, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    max_batch_size: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    batch_wait_under_load_s: float = Field(0.05, ge=0)
    max_queue_wait_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    api_replicas: int = Field(1, ge=1)
    auth_token: str | None = None
    max_body_bytes: int = Field(Limits.max_body_bytes, ge=1024)
    max_image_side: int = Field(Limits.max_image_side, ge=16)
    max_steps: int = Field(Limits.max_steps, ge=1)
    max_samples: int = Field(Limits.max_samples, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, args: Any) -> Any:
        """`fast`, the old name of `fast_path`, taken for one release."""
        if isinstance(args, dict) and "fast" in args:
            warnings.warn("serve args: 'fast' is deprecated and will be removed; use 'fast_path'", DeprecationWarning, stacklevel=2)
            args = dict(args)
            fast = args.pop("fast")
            if args.setdefault("fast_path", fast) != fast:
                raise ValueError("fast_path and its deprecated name fast disagree; give fast_path")
        return args

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> "AppArgs":
        if (self.model_uri is None) == (self.models is None):
            raise ValueError("give either model_uri (one model) or models (name -> URI), not both or neither")
        bad = [name for name in self.served() if not MODEL_NAME.match(name)]
        if bad:
            raise ValueError(f"model names {bad}: use letters, digits, '.', '_' and '-' (at most 64)")
        if not self.served():
            raise ValueError("models: name at least one model")
        if self.default_model is not None and self.default_model not in self.served():
            raise ValueError(f"default_model {self.default_model!r} is not one of models: {', '.join(self.served())}")
        return self

    def served(self) -> dict[str, str]:
        return self.models if self.models is not None else {"default": self.model_uri}

    def default(self) -> str:
        return self.default_model or next(iter(self.served()))


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """The application: an SDMApi ingress bound to an autoscaled SDMModel deployment."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    gpu = a.num_gpus > 0
    batch = a.max_batch_size or (16 if gpu else 8)
    delays = {"upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    model = serve.deployment(
        name="SDMModel",
        # merged by Ray into the application's own runtime_env: the replica's process starts with the allocator setting
        ray_actor_options={"num_gpus": a.num_gpus, "num_cpus": a.num_cpus, "runtime_env": {"env_vars": ALLOCATOR_ENV}},
        autoscaling_config={
            "min_replicas": a.min_replicas if a.min_replicas is not None else 1,
            "max_replicas": a.max_replicas or (8 if gpu else 1),
            "target_ongoing_requests": a.target_ongoing_requests or batch,
            **{k: v for k, v in delays.items() if v is not None},
        },
        max_ongoing_requests=a.max_ongoing_requests or 2 * batch,
        max_queued_requests=a.max_queued_requests,
        health_check_period_s=10,
        health_check_timeout_s=60,
    )(SDMModel).bind(
        a.served(), a.default(), a.max_models_per_replica, a.device, a.precision, a.fast_path, a.compile, batch,
        a.batch_wait_timeout_s, a.batch_wait_under_load_s, a.max_queue_wait_s,
    )
    limits = Limits(a.max_body_bytes, a.max_image_side, a.max_steps, a.max_samples)
    token = a.auth_token or os.environ.get(TOKEN_ENV) or None
    api = serve.deployment(
        name="SDMApi", num_replicas=a.api_replicas, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000
    )(SDMApi)
    return api.bind(model, a.served(), a.default(), a.max_models_per_replica, limits, token, a.request_timeout_s)


# Everything the routes use is defined above `serve.ingress`, which freezes the app (and what it references) into
# the replicas when the class is decorated.
def _unavailable(e: Exception) -> ApiError:
    """The answer while no model replica can take a request (one died mid-request, or all are restarting)."""
    return ApiError(503, "model_unavailable", f"the model deployment does not answer: {_cause(e)}", {"Retry-After": "2"})


def _root_path(request: Request) -> str:
    """Where the application is mounted (its Serve route prefix), as FastAPI's own /openapi.json and /docs use it."""
    return request.scope.get("root_path", "").rstrip("/")


def _cause(e: Exception) -> str:
    """The message of an exception raised in another replica (Ray wraps it with its traceback)."""
    return str(getattr(e, "cause", None) or e)


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 415, 503, 504)}
IMAGE_ANSWER = {
    200: {
        "description": "one PNG (X-SDM-* headers carry seed, model and timings), or JSON with Accept: application/json"
        " or num_samples > 1",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "model": GenerateResult,
    }
}
# The deployment serves /openapi.json and /docs itself (SDMApi.openapi): its document depends on what it serves.
app = FastAPI(
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
    title="Semantic Diffusion on Ray",
    version="1",
    summary="Images from semantic label maps (SDM), served by Ray Serve",
    description="Errors always answer {\"error\": {\"code\": ..., \"message\": ...}} with a stable code."
    " POST routes take multipart/form-data (files as uploads) or application/json (files in base64).",
)


BODIES = {"/v1/generate": "generate", "/v1/edit": "edit"}


def published_maxima(max_steps: int, max_samples: int) -> dict[str, int]:
    """The upper bounds a deployment publishes: its largest steps limit over the served models (under the field's
    name and its deprecated one) and its samples limit."""
    return {"num_inference_steps": max_steps, "steps": max_steps, "num_samples": max_samples}


def contract(maxima: dict[str, int], auth: bool, root_path: str = "") -> dict[str, Any]:
    """The OpenAPI document of a deployment: the routes of `app` with their bodies as JSON or a multipart form,
    bounded by `maxima` (field -> the largest value a served model takes), with bearer auth required where it has a
    token (`auth`) and optional (`{}`: no requirement) where it has none.

    Built from the module's `app`, not from the copy that `serve.ingress` pickles and serves: FastAPI tells an
    unset parameter example by the identity of its marker, which a pickled copy does not keep (`"example": {}`).
    The bodies are set after FastAPI's document model, which holds bounds as floats (2**63 - 1 is not a float).
    """
    doc = copy.deepcopy(app.openapi())
    for path, kind in BODIES.items():
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": request_schema(kind, maxima)},
                "multipart/form-data": {"schema": multipart_schema(kind, maxima)},
            },
        }
    for operation in (op for methods in doc["paths"].values() for op in methods.values()):
        operation["responses"].pop("422", None)  # FastAPI's answer to a bad parameter: _bad_query answers 400 instead
        for parameter in operation.get("parameters", []):  # text, like a form field: unset when left out, never null
            parameter["schema"] = not_null(parameter["schema"])
        if not auth and "security" in operation:
            operation["security"].append({})
            operation["responses"].pop("401")
    for unused in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(unused, None)
    if root_path:
        doc["servers"] = [{"url": root_path}]
    return doc


bearer = HTTPBearer(auto_error=False, description=f"set when the app has a token (auth_token or {TOKEN_ENV})")


class _Observed:
    """ASGI middleware: counts and times every request by route template, status and model, and answers anything
    that escapes the handlers as a JSON 500 instead of a connection reset."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.metrics: ApiMetrics | None = None  # created in the replica, on its first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if status[0]:  # the answer has begun: nothing better can be sent than a cut connection
                raise
            await ApiError(500, "internal", "internal error; see the replica's log").response()(scope, receive, sending)
        finally:
            code = str(status[0] or 499)  # nginx's "client closed request": the caller went away before an answer
            route = getattr(scope.get("route"), "path", "other")
            model = scope.get("state", {}).get("model", "")
            self.metrics = self.metrics or ApiMetrics.create()
            self.metrics.requests.inc(tags={"route": route, "status": code, "model": model})
            self.metrics.latency.observe(time.perf_counter() - start, tags={"route": route, "model": model})


app.add_middleware(_Observed)


@app.exception_handler(ApiError)
async def _refused(request: Request, e: ApiError) -> Response:
    return e.response()


@app.exception_handler(HTTPException)
async def _routing(request: Request, e: HTTPException) -> Response:
    """Starlette's routing answers (404, 405 with Allow) in the API's error shape."""
    if e.status_code == 405:  # every GET route has a HEAD twin (left out of the OpenAPI document)
        methods = set((e.headers or {}).get("Allow", "").split(", "))
        allow = ", ".join(sorted(methods | ({"GET", "HEAD"} if methods & {"GET", "HEAD"} else set())))
        message = f"{request.url.path} takes {allow}, not {request.method}"
        return ApiError(405, "method_not_allowed", message, {"Allow": allow}).response()
    if e.status_code == 404:
        routes = ", ".join(dict.fromkeys(r.path for r in request.app.routes if getattr(r, "include_in_schema", False)))
        return ApiError(404, "not_found", f"no route {request.url.path}; routes: {routes}").response()
    return ApiError(e.status_code, "http_error", str(e.detail), dict(e.headers or {})).response()


@app.exception_handler(RequestValidationError)
async def _bad_query(request: Request, e: RequestValidationError) -> Response:
    x = e.errors()[0]
    return ApiError(400, "invalid_parameter", f"{'.'.join(map(str, x['loc']))}: {x['msg']}").response()


@serve.ingress(app)
class SDMApi:
    def __init__(
        self,
        model: DeploymentHandle,
        models: dict[str, str],
        default_model: str,
        max_loaded: int,
        limits: Limits,
        auth_token: str | None,
        request_timeout_s: float,
    ):
        self.model = model
        self.catalog = Catalog.from_uris(models, default_model, limits)
        self.max_loaded = max_loaded
        self.limits = limits
        self.token = auth_token
        self.request_timeout_s = request_timeout_s
        self.page = PAGE.read_bytes()
        self.maxima = published_maxima(max(info.max_steps for info in self.catalog.models.values()), limits.max_samples)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.head("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The painting page."""
        return HTMLResponse(self.page)

    @app.api_route("/openapi.json", methods=["GET", "HEAD"], include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        """This deployment's contract (`contract`): the bounds of the models it serves, bearer auth if it has a token."""
        return JSONResponse(contract(self.maxima, self.token is not None, _root_path(request)))

    @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        """Swagger UI on the contract."""
        return get_swagger_ui_html(openapi_url=f"{_root_path(request)}/openapi.json", title=f"{app.title} - Swagger UI")

    @app.get("/healthz", responses={503: {"model": ErrorBody}})
    @app.head("/healthz", include_in_schema=False)
    async def healthz(self) -> Health:
        """200 while a model replica answers; 503 model_unavailable otherwise."""
        try:
            held = await self.model.ping.remote()
        except BackPressureError:  # alive but at capacity: not a reason to take this node out of service
            return Health(status="ok", models=[], busy=True)
        except Exception as e:
            raise _unavailable(e) from None
        return Health(status="ok", models=held)

    @app.get("/v1/models", responses={401: {"model": ErrorBody}})
    @app.head("/v1/models", include_in_schema=False)
    async def models(self, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> ModelList:
        """Every served model, with what its label maps must hold and its sampling defaults."""
        self._authorize(credentials)
        described = [info.describe(name, self.limits) for name, info in self.catalog.models.items()]
        return ModelList(default=self.catalog.default, models=described, max_loaded_per_replica=self.max_loaded)

    @app.get("/v1/model", responses={status: {"model": ErrorBody} for status in (400, 401, 404)})
    @app.head("/v1/model", include_in_schema=False)
    async def model_info(
        self,
        model: str | None = Query(None, description="a served model's name; unset: the default model"),
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> ModelDescription:
        """One served model: preset, resolution, classes and palette, sampler defaults, limits."""
        self._authorize(credentials)
        name, info = self.catalog.pick(model)
        return info.describe(name, self.limits)

    @app.post("/v1/generate", responses=ERRORS | IMAGE_ANSWER)
    async def generate(self, request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Response:
        """Images drawn from a label map."""
        self._authorize(credentials)
        return await self._draw("generate", request)

    @app.post("/v1/edit", responses=ERRORS | IMAGE_ANSWER)
    async def edit(self, request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Response:
        """An image with the region under the mask regenerated from the (edited) label map."""
        self._authorize(credentials)
        return await self._draw("edit", request)

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            return
        given = credentials.credentials.strip() if credentials else ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def _draw(self, kind: str, request: Request) -> Response:
        start = time.perf_counter()
        body = await read_body(request, self.limits.max_body_bytes)
        job = await parse_job(kind, request, body, self.catalog, self.limits)
        request.state.model = job.model
        out = await self._run(job)
        timings = {"queue_ms": out.queue_ms, "sampling_ms": out.sampling_ms, "total_ms": (time.perf_counter() - start) * 1000}
        if job.num_samples == 1 and "application/json" not in request.headers.get("accept", ""):
            headers = {"X-SDM-Seed": str(job.seed), "X-SDM-Model": job.model, "X-SDM-Replica": out.replica,
                       "X-SDM-Batch-Size": str(out.batch_size)}
            headers |= {f"X-SDM-{k.replace('_', '-').title()}": f"{v:.1f}" for k, v in timings.items()}
            return Response(encode_png(out.images[0]), media_type="image/png", headers=headers)
        result = GenerateResult(
            images=[base64.b64encode(encode_png(im)).decode() for im in out.images],
            model=job.model,
            seed=job.seed,
            seeds=out.seeds,
            batch_size=out.batch_size,
            timings=timings,
        )
        return JSONResponse(result.model_dump(), headers={"X-SDM-Replica": out.replica})

    async def _run(self, job: Job) -> Output:
        response = self.model.options(multiplexed_model_id=job.model).run.remote(job)
        try:
            return await asyncio.wait_for(response, self.request_timeout_s)
        except asyncio.CancelledError:  # the client went away: free its place in the queue, or stop its sampling
            response.cancel()
            raise
        except TimeoutError:
            response.cancel()
            raise ApiError(
                504, "timeout", f"no result within the request timeout of {self.request_timeout_s:g}s; the request was cancelled"
            ) from None
        except BackPressureError as e:
            raise ApiError(503, "overloaded", f"the model is at capacity, retry later ({e})", {"Retry-After": "1"}) from None
        except QueueTimeout as e:
            raise ApiError(503, "queue_timeout", _cause(e), {"Retry-After": "1"}) from None
        except InvalidInputError as e:
            raise ApiError(400, "invalid_input", _cause(e)) from None
        except REPLICA_LOST as e:
            raise _unavailable(e) from None
