"""A Python client of the SDM HTTP API (serve/), with the pipeline's parameters and return type.

    from sdm.client import SDMClient
    client = SDMClient("http://127.0.0.1:8000", token=None)
    images = client.generate(label_ids, guidance_scale=1.5, num_inference_steps=25, seed=7, num_samples=2)  # uint8 [2, H, W, 3]
    client.models()  # the served models; generate(..., model="ade20k") picks one

Sample k of a call equals sample k of `SDMPipeline.__call__` with the same label map, parameters and seed. A 503
(the model is overloaded or restarting) is retried with backoff, honouring the server's Retry-After; any other
refusal raises ApiError carrying the server's error code.
"""

from __future__ import annotations

import base64
import os
import time
from typing import Any, Union

import numpy as np
import requests

from sdm.config import renamed
from sdm.errors import SDMError
from sdm.imageio import decode_image, encode_png

ImageLike = Union[np.ndarray, bytes, str, "os.PathLike[str]"]  # an array, PNG/JPEG bytes, or a file's path


class ApiError(SDMError):
    """The server refused a request: its HTTP status, error code (e.g. "invalid_parameter") and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class SDMClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 600.0,
                 max_retries: int = 5, backoff_s: float = 1.0):
        """`max_retries`: how often a 503 is retried; each waits the server's Retry-After, else `backoff_s`
        doubling from one retry to the next."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def models(self) -> dict[str, Any]:
        """Every served model: {"default": name, "models": [description, ...], "max_loaded_per_replica": n}."""
        return self._request("GET", "/v1/models").json()

    def model(self, name: str | None = None) -> dict[str, Any]:
        """One served model (the default one when `name` is None): preset, resolution, classes and palette,
        sampler defaults, limits."""
        return self._request("GET", "/v1/model", params={"model": name} if name else None).json()

    def generate(self, label: ImageLike, instance: ImageLike | None = None, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, sampler: str | None = None, seed: int = 0,
                 num_samples: int = 1, model: str | None = None, cache_interval: int | None = None, *,
                 num_steps: int | None = None) -> np.ndarray:
        """Images for one label map (ids, or colours of the model's palette): uint8 [num_samples, H, W, 3].
        Unset parameters take the model's defaults; `model` names a served model (unset: the default one).
        `num_steps` is the deprecated name of `num_inference_steps`."""
        files = {"label": label, "instance": instance}
        return self._images("/v1/generate", files, {
            "guidance_scale": guidance_scale, "sampler": sampler, "seed": seed, "num_samples": num_samples, "model": model,
            "cache_interval": cache_interval,
            "num_inference_steps": renamed(num_inference_steps, num_steps, "num_steps", "num_inference_steps")})

    def edit(self, image: ImageLike, mask: ImageLike, label: ImageLike, instance: ImageLike | None = None,
             guidance_scale: float | None = None, num_inference_steps: int | None = None, sampler: str | None = None,
             seed: int = 0, num_samples: int = 1, model: str | None = None,
             cache_interval: int | None = None, *, num_steps: int | None = None) -> np.ndarray:
        """The image with the region where `mask` is nonzero regenerated from the (edited) label map."""
        files = {"image": image, "mask": mask, "label": label, "instance": instance}
        return self._images("/v1/edit", files, {
            "guidance_scale": guidance_scale, "sampler": sampler, "seed": seed, "num_samples": num_samples, "model": model,
            "cache_interval": cache_interval,
            "num_inference_steps": renamed(num_inference_steps, num_steps, "num_steps", "num_inference_steps")})

    def _images(self, path: str, files: dict[str, ImageLike | None], params: dict[str, Any]) -> np.ndarray:
        body = {k: v for k, v in params.items() if v is not None}
        body |= {k: base64.b64encode(_file_bytes(v)).decode() for k, v in files.items() if v is not None}
        r = self._request("POST", path, json=body, headers={"Accept": "application/json"})
        return np.stack([decode_image(base64.b64decode(b), f"image {i} of the response") for i, b in enumerate(r.json()["images"])])

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        for attempt in range(self.max_retries + 1):
            r = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
            if r.status_code != 503 or attempt == self.max_retries:
                break
            time.sleep(_retry_after(r) or self.backoff_s * 2**attempt)
        if r.status_code >= 400:
            raise _error(r)
        return r


def _error(r: requests.Response) -> ApiError:
    """The server's JSON error; a proxy in front of it may answer otherwise."""
    try:
        error = r.json()["error"]
        return ApiError(r.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return ApiError(r.status_code, "http_error", r.text[:500])


def _retry_after(r: requests.Response) -> float | None:
    value = r.headers.get("Retry-After", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None


def _file_bytes(value: ImageLike) -> bytes:
    """A PNG for an array (id maps 8- or 16-bit, images RGB), file bytes as they are, a path's contents."""
    if isinstance(value, np.ndarray):
        return encode_png(value)
    if isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()
