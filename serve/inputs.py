"""The HTTP boundary: request bodies to validated jobs. Every refusal is an ApiError naming the bad field."""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from sdm import checkpoint
from sdm.config import SAMPLER_NAMES, SamplingParams, StudentConfig
from sdm.data.preprocess import fit_to_model
from sdm.errors import InvalidInputError
from sdm.labels import LabelEncoder, as_id_array, colors_to_ids, default_classes
from serve.errors import ApiError
from serve.schema import FILE_FIELDS, MODEL_HEADER, REQUESTS, ModelDescription, SamplingFields


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_image_side: int = 4096
    max_steps: int = 1000
    max_samples: int = 4


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know of the served model to validate requests, read from its directory."""

    preset: str
    size: tuple[int, int]  # (height, width)
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]  # colour of each label id
    instance_edges: bool
    labels: LabelEncoder  # the model's: what checks a label map's ids
    defaults: SamplingParams
    max_steps: int
    student: StudentConfig  # a distilled model's limits (method "" for any other)

    @classmethod
    def from_uri(cls, uri: str, limits: Limits) -> "ModelInfo":
        config = checkpoint.load_config(uri)
        m = config.model
        classes = checkpoint.load_classes(uri)
        names, palette = classes or default_classes(m.num_classes)
        return cls(
            preset=config.name,
            size=tuple(m.image_size),
            num_classes=m.num_classes,
            class_names=names,
            palette=palette,
            instance_edges=m.instance_edges,
            labels=LabelEncoder(config),
            defaults=config.sampling,
            max_steps=min(limits.max_steps, len(config.student.timesteps) or config.diffusion.num_timesteps),
            student=config.student,
        )

    def describe(self, name: str, limits: Limits) -> ModelDescription:
        return ModelDescription(
            name=name,
            preset=self.preset,
            resolution={"height": self.size[0], "width": self.size[1]},
            num_classes=self.num_classes,
            class_names=self.class_names,
            palette=self.palette,
            instance_map=self.instance_edges,
            defaults=self.defaults.to_dict(),
            samplers=list(SAMPLER_NAMES),
            limits={
                "max_steps": self.max_steps,
                "max_samples": limits.max_samples,
                "max_body_bytes": limits.max_body_bytes,
                "max_image_side": limits.max_image_side,
            },
            student=self._student(),
        )

    def _student(self) -> dict[str, Any] | None:
        s = self.student
        if not s.is_student:
            return None
        return {"method": s.method, "teacher": s.teacher, "guidance_range": s.guidance_range,
                "num_inference_steps": len(s.timesteps) or None}


@dataclass(frozen=True)
class Catalog:
    """The served models by name, and the one that draws for a request naming none."""

    models: dict[str, ModelInfo]
    default: str

    @classmethod
    def from_uris(cls, uris: dict[str, str], default: str, limits: Limits) -> "Catalog":
        return cls({name: ModelInfo.from_uri(uri, limits) for name, uri in uris.items()}, default)

    def pick(self, name: str | None) -> tuple[str, ModelInfo]:
        name = name or self.default
        if name not in self.models:
            raise ApiError(404, "unknown_model", f"no model {name!r} is served; models: {', '.join(self.models)}")
        return name, self.models[name]


@dataclass
class Job:
    """One validated request, at the model's resolution; what crosses from the API to the model deployment."""

    kind: str  # "generate" or "edit"
    model: str  # the name of the served model that draws it
    label: np.ndarray  # [H, W] raw label ids
    instance: np.ndarray | None
    sampling: SamplingParams  # the model's defaults with the request's parameters, validated
    seed: int
    num_samples: int
    image: np.ndarray | None = None  # edit: uint8 [H, W, 3]
    mask: np.ndarray | None = None  # edit: [H, W], nonzero where the image is regenerated


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed `limit` bytes."""
    too_big = ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_job(kind: str, request: Request, body: bytes, catalog: Catalog, limits: Limits) -> Job:
    """A multipart upload or a JSON body (images as base64) -> a validated Job for the model it names."""
    try:
        req = REQUESTS[kind].model_validate(await _fields(kind, request, body))
    except ValidationError as e:
        raise _refusal(kind, e) from None
    model, info = catalog.pick(req.model or request.headers.get(MODEL_HEADER))

    with _reading("label"):
        label = _label_ids(_open(req.label, "label", limits), info)
    instance = None
    if req.instance is not None:
        if not info.instance_edges:
            raise ApiError(400, "unexpected_field", f"instance: model {model!r} takes no instance map")
        with _reading("instance"):
            instance = _fit(_ids(_open(req.instance, "instance", limits), "instance"), "instance", info.size)
    job = Job(
        kind=kind,
        model=model,
        label=label,
        instance=instance,
        sampling=_sampling(req, info),
        seed=secrets.randbits(63) if req.seed is None else req.seed,
        num_samples=_at_most("num_samples", req.num_samples, limits.max_samples),
    )
    if kind == "edit":
        with _reading("image"):
            image = _open(req.image, "image", limits, formats=("PNG", "JPEG"))
            job.image = _fit(np.array(image.convert("RGB")), "image", info.size)
        with _reading("mask"):
            mask = _fit(np.array(_open(req.mask, "mask", limits).convert("L")), "mask", info.size)
        if not mask.any():
            raise ApiError(400, "empty_mask", "mask: selects no pixels to regenerate (nonzero = regenerate)")
        job.mask = mask
    return job


def _sampling(req: SamplingFields, info: ModelInfo) -> SamplingParams:
    """The model's defaults with the request's parameters; the steps within the model's limit (info.max_steps is at
    most its number of diffusion steps), by the name the request gave them."""
    name, steps = "num_inference_steps", req.num_inference_steps
    if req.steps is not None:  # the deprecated name; the document says "not both" (serve.schema.SamplingFields)
        if steps is not None:
            raise ApiError(400, "invalid_parameter", "give num_inference_steps or its deprecated name steps, not both")
        name, steps = "steps", req.steps
    if steps is not None:
        _at_most(name, steps, info.max_steps)
    params = info.defaults.resolve(guidance_scale=req.guidance_scale, num_inference_steps=steps, sampler=req.sampler,
                                   cache_interval=req.cache_interval)
    try:
        return info.student.check_request(params)
    except InvalidInputError as e:  # what a distilled model cannot serve, whatever the schema allows
        raise ApiError(400, "invalid_parameter", str(e)) from None


def _refusal(kind: str, e: ValidationError) -> ApiError:
    """A request the schema refused, as the error a client can act on: unknown or missing fields first."""
    errors = e.errors()
    unknown = sorted(str(x["loc"][0]) for x in errors if x["type"] == "extra_forbidden")
    if unknown:
        return ApiError(400, "unknown_field", f"unknown fields {unknown}; this route takes {sorted(REQUESTS[kind].model_fields)}")
    missing = [str(x["loc"][0]) for x in errors if x["type"] == "missing"]
    if missing:
        return ApiError(400, "missing_field", f"missing required field(s): {', '.join(missing)}")
    x = errors[0]
    field = ".".join(map(str, x["loc"]))
    code = x["type"] if x["type"] in ("invalid_base64", "invalid_field") else "invalid_parameter"
    return ApiError(400, code, f"{field}: {x['msg']}, got {repr(x['input'])[:60]}")


def _at_most(name: str, n: int, high: int) -> int:
    if n > high:
        raise ApiError(400, "invalid_parameter", f"{name} must be in [1, {high}], got {n}")
    return n


@contextmanager
def _reading(field: str) -> Iterator[None]:
    """Turning an untrusted file into arrays: whatever fails there is a 400 naming the field, never a 500."""
    try:
        yield
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(400, "invalid_image", f"{field}: cannot be read ({type(e).__name__}: {e})") from None


async def _fields(kind: str, request: Request, body: bytes) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "invalid_json", f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "invalid_json", "body is nested too deeply to parse") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "JSON body must be an object")
        return data
    if ctype == "multipart/form-data":

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=len(FILE_FIELDS[kind]), max_fields=len(SamplingFields.model_fields)
            )
        except Exception as e:  # starlette/python-multipart raise several types for malformed bodies
            raise ApiError(400, "invalid_form", f"cannot parse the multipart body: {e}") from None
        try:  # uploads as bytes, and their spooled temporary files closed now rather than whenever collected
            repeated = sorted({k for k in form.keys() if len(form.getlist(k)) > 1})
            if repeated:  # a field is one value, as in the schema; a list sent as repeated fields is not one
                raise ApiError(400, "invalid_form", f"fields {repeated} sent more than once; each takes one value")
            return {k: await v.read() if isinstance(v, UploadFile) else v for k, v in form.multi_items()}
        finally:
            await form.close()
    raise ApiError(
        415, "unsupported_media_type", f"content type {ctype or '(none)'!r}: send multipart/form-data or application/json"
    )


def _open(data: bytes, field: str, limits: Limits, formats: tuple[str, ...] = ("PNG",)) -> Image.Image:
    """Decode an image with the decoders of the accepted formats only, checking its declared size before decoding
    pixels (image bombs never decode). Whatever a decoder raises on crafted bytes is the sender's error."""
    names = " or ".join(formats)
    try:
        image = Image.open(io.BytesIO(data), formats=formats)  # JPEG includes MPO, the multi-picture JPEG of phones
    except Image.DecompressionBombError as e:
        raise ApiError(400, "image_too_large", f"{field}: {e}") from None
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", f"{field}: not a {names} image") from None
    except Exception as e:  # a header parser failing on crafted bytes (e.g. a text chunk over the decompression limit)
        raise ApiError(400, "invalid_image", f"{field}: unreadable {names} image ({e})") from None
    w, h = image.size
    if max(w, h) > limits.max_image_side:
        raise ApiError(
            400, "image_too_large", f"{field}: {w}x{h} pixels; the largest side accepted is {limits.max_image_side}"
        )
    try:
        image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for corrupt data
        raise ApiError(400, "invalid_image", f"{field}: truncated or corrupt image ({e})") from None
    return image


def _ids(image: Image.Image, field: str) -> np.ndarray:
    try:
        return as_id_array(image, f"{field} map")
    except InvalidInputError as e:
        raise ApiError(400, "invalid_image", f"{field}: {e}") from None


def _label_ids(image: Image.Image, info: ModelInfo) -> np.ndarray:
    """A PNG of class ids, or a colour PNG in the model's palette -> raw ids at the model's size, checked by the
    model's label encoder (where, at the model's size, only class ids can fail)."""
    if image.mode in ("RGB", "RGBA"):
        try:
            ids = colors_to_ids(np.array(image.convert("RGB")), info.palette)
        except InvalidInputError as e:
            raise ApiError(400, "color_not_in_palette", f"label: {e}") from None
    else:
        ids = _ids(image, "label")
    ids = _fit(ids, "label", info.size)
    try:
        info.labels.check(ids)
    except InvalidInputError as e:
        raise ApiError(400, "class_out_of_range", f"label: {e}") from None
    return ids


def _fit(arr: np.ndarray, field: str, size: tuple[int, int]) -> np.ndarray:
    """To the model's (height, width) by the library's one resize policy (ids nearest, images bicubic)."""
    try:
        return fit_to_model(arr, size, field)
    except InvalidInputError as e:
        raise ApiError(400, "size_mismatch", str(e)) from None
