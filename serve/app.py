"""The HTTP API deployment and the application builder: `serve run serve/config.yaml`.

Two deployments: SDMApi (HTTP ingress on CPU: auth, validation, PNG encoding, metrics) and SDMModel
(the network, on a GPU where one is given, autoscaled, with dynamic batching).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from sdm.errors import InvalidInputError
from sdm.imageio import encode_png
from serve.errors import ApiError
from serve.inputs import Job, Limits, ModelInfo, parse_job, read_body
from serve.metrics import ApiMetrics
from serve.model import Output, QueueTimeout, SDMModel

logger = logging.getLogger("ray.serve")
PAGE = Path(__file__).parent / "static" / "index.html"
ROUTES = {"/": "GET", "/healthz": "GET", "/v1/model": "GET", "/v1/generate": "POST", "/v1/edit": "POST"}
TOKEN_ENV = "SDM_SERVE_TOKEN"
# What a call to the model deployment raises when the replica serving it died or is being replaced.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class AppArgs(BaseModel):
    """Builder arguments (the `args:` of serve/config.yaml). Unset scaling knobs take defaults that depend on
    whether replicas get a GPU: a fixed single replica on CPU, an autoscaled fleet on GPUs."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, ge=0)
    device: str | None = None
    precision: str = "auto"
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


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """The application: an SDMApi ingress bound to an autoscaled SDMModel deployment."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    gpu = a.num_gpus > 0
    batch = a.max_batch_size or (16 if gpu else 8)
    delays = {"upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    model = serve.deployment(
        name="SDMModel",
        ray_actor_options={"num_gpus": a.num_gpus, "num_cpus": a.num_cpus},
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
        a.model_uri, a.device, a.precision, batch, a.batch_wait_timeout_s, a.batch_wait_under_load_s, a.max_queue_wait_s
    )
    limits = Limits(a.max_body_bytes, a.max_image_side, a.max_steps, a.max_samples)
    token = a.auth_token or os.environ.get(TOKEN_ENV) or None
    api = serve.deployment(
        name="SDMApi", num_replicas=a.api_replicas, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000
    )(SDMApi)
    return api.bind(model, a.model_uri, limits, token, a.request_timeout_s)


class SDMApi:
    def __init__(
        self, model: DeploymentHandle, model_uri: str, limits: Limits, auth_token: str | None, request_timeout_s: float
    ):
        self.model = model
        self.request_timeout_s = request_timeout_s
        self.limits = limits
        self.info = ModelInfo.from_uri(model_uri, limits)
        self.token = auth_token
        self.page = PAGE.read_bytes()
        self.metrics = ApiMetrics.create()

    async def __call__(self, request: Request) -> Response:
        start = time.perf_counter()
        path = _app_path(request)
        route = path if path in ROUTES else "other"
        try:
            response = await self._dispatch(request, path, start)
        except ApiError as e:
            response = e.response()
        except Exception:
            logger.exception("unexpected error on %s %s", request.method, path)
            response = ApiError(500, "internal", "internal error; see the replica's log").response()
        self.metrics.requests.inc(tags={"route": route, "status": str(response.status_code)})
        self.metrics.latency.observe(time.perf_counter() - start, tags={"route": route})
        return response

    async def _dispatch(self, request: Request, path: str, start: float) -> Response:
        if path not in ROUTES:
            raise ApiError(404, "not_found", f"no route {path}; routes: {', '.join(ROUTES)}")
        allowed = ROUTES[path]
        if request.method != allowed and not (request.method == "HEAD" and allowed == "GET"):
            allow = "GET, HEAD" if allowed == "GET" else allowed
            raise ApiError(405, "method_not_allowed", f"{path} takes {allow}, not {request.method}", {"Allow": allow})
        if path.startswith("/v1/"):
            self._authorize(request)
        if path == "/":
            return HTMLResponse(self.page)
        if path == "/healthz":
            return await self._healthz()
        if path == "/v1/model":
            return JSONResponse(self.info.to_json(self.limits))
        kind = path.removeprefix("/v1/")
        body = await read_body(request, self.limits.max_body_bytes)
        job = await parse_job(kind, request, body, self.info, self.limits)
        out = await self._run(job)
        timings = {"queue_ms": out.queue_ms, "sampling_ms": out.sampling_ms, "total_ms": (time.perf_counter() - start) * 1000}
        if job.num_samples == 1 and "application/json" not in request.headers.get("accept", ""):
            headers = {"X-SDM-Seed": str(job.seed), "X-SDM-Batch-Size": str(out.batch_size)}
            headers |= {f"X-SDM-{k.replace('_', '-').title()}": f"{v:.1f}" for k, v in timings.items()}
            return Response(encode_png(out.images[0]), media_type="image/png", headers=headers)
        return JSONResponse(
            {
                "images": [base64.b64encode(encode_png(im)).decode() for im in out.images],
                "seed": job.seed,
                "seeds": out.seeds,
                "batch_size": out.batch_size,
                "timings": timings,
            }
        )

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def _healthz(self) -> Response:
        try:
            preset = await self.model.ping.remote()
        except BackPressureError:  # alive but at capacity: not a reason to take this node out of service
            return JSONResponse({"status": "ok", "model": self.info.preset, "busy": True})
        except Exception as e:
            raise _unavailable(e) from None
        return JSONResponse({"status": "ok", "model": preset})

    async def _run(self, job: Job) -> Output:
        response = self.model.run.remote(job)
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


def _unavailable(e: Exception) -> ApiError:
    """The answer while no model replica can take a request (one died mid-request, or all are restarting)."""
    return ApiError(503, "model_unavailable", f"the model deployment does not answer: {_cause(e)}", {"Retry-After": "2"})


def _app_path(request: Request) -> str:
    """The path under the application's route prefix."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def _cause(e: Exception) -> str:
    """The message of an exception raised in another replica (Ray wraps it with its traceback)."""
    return str(getattr(e, "cause", None) or e)
