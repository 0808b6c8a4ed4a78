"""The HTTP API's contract as pydantic models: what requests carry and responses hold. FastAPI publishes them in
/openapi.json; serve/inputs.py validates every request body with them (JSON and multipart alike)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model, field_validator
from pydantic_core import PydanticCustomError

from sdm.config import MAX_CACHE_INTERVAL, MAX_GUIDANCE, SamplerName, SamplingParams

MODEL_HEADER = "serve_multiplexed_model_id"  # Ray Serve's header naming the model of a request


def _file_bytes(value: Any) -> bytes:
    """An uploaded file's bytes as they are; a JSON string as base64 (a data: URL prefix is allowed)."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("invalid_field", "expected a file upload or a base64 string")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:  # MIME base64 is wrapped at 76 columns; whitespace is never part of the data
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PydanticCustomError("invalid_base64", "not valid base64") from None


def _file(description: str) -> Any:
    return Annotated[
        bytes,
        BeforeValidator(_file_bytes),
        WithJsonSchema({"type": "string", "contentEncoding": "base64", "description": description}),
        Field(description=description),
    ]


LabelFile = _file("label map: PNG of class ids (8/16-bit), or an RGB PNG in the model's palette")
InstanceFile = _file("instance map: PNG of instance ids (models trained with instance edges only)")
ImageFile = _file("the image to edit: PNG or JPEG")
MaskFile = _file("PNG, nonzero where the image is regenerated")


_STEPS = "denoising steps; at most the model's limits.max_steps"


class SamplingFields(BaseModel):
    """The sampling parameters of both routes, by SamplingParams' names; unset ones take the model's defaults.
    `steps`, the deprecated name of `num_inference_steps`, is still taken for one release, never with it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"not": {"required": ["num_inference_steps", "steps"]}})

    model: str | None = Field(None, description=f"which served model draws (GET /v1/models); or the {MODEL_HEADER} header")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    num_inference_steps: int | None = Field(None, ge=1, description=_STEPS)
    steps: int | None = Field(None, ge=1, description=f"deprecated name of num_inference_steps: {_STEPS}",
                              json_schema_extra={"deprecated": True})
    sampler: SamplerName | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="unset: a random seed, returned in the answer")
    num_samples: int = Field(1, ge=1, description="images for this label map; at most limits.max_samples")
    cache_interval: int = Field(1, ge=1, le=MAX_CACHE_INTERVAL,
                                description="k > 1: deep U-Net features recomputed every k-th step only (faster, lower quality)")

    @field_validator("guidance_scale", "num_inference_steps", "steps", "seed", "num_samples", "cache_interval", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError("not_a_number", "must be a number, not a boolean")
        return value


class GenerateRequest(SamplingFields):
    label: LabelFile
    instance: InstanceFile | None = None


class EditRequest(GenerateRequest):
    image: ImageFile
    mask: MaskFile


REQUESTS: dict[str, type[GenerateRequest]] = {"generate": GenerateRequest, "edit": EditRequest}
FILE_FIELDS = {kind: [f for f in m.model_fields if f not in SamplingFields.model_fields] for kind, m in REQUESTS.items()}


class Resolution(BaseModel):
    height: int
    width: int


SamplingDefaults = create_model(  # SamplingParams' fields, as a model's defaults
    "SamplingDefaults",
    __doc__="The model's sampling defaults: what a request's unset parameters take.",
    **{f.name: (get_type_hints(SamplingParams)[f.name], ...) for f in dataclasses.fields(SamplingParams)},
)


class RequestLimits(BaseModel):
    max_steps: int
    max_samples: int
    max_body_bytes: int
    max_image_side: int


class StudentDescription(BaseModel):
    """What a distilled model is (sdm.config.StudentConfig): the scales it serves and, for a step student, the one
    number of steps it samples in (any other is refused)."""

    method: str
    teacher: str
    guidance_range: tuple[float, float]
    num_inference_steps: int | None = Field(description="a step student's only number of steps; null: any")


class ModelDescription(BaseModel):
    """One served model: what a label map for it must hold, and its sampling defaults."""

    name: str
    preset: str
    resolution: Resolution
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    instance_map: bool
    defaults: SamplingDefaults  # type: ignore[valid-type]
    samplers: list[str]
    limits: RequestLimits
    student: StudentDescription | None = Field(None, description="set for a distilled model")


class ModelList(BaseModel):
    default: str
    models: list[ModelDescription]
    max_loaded_per_replica: int


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str] = Field(description="the models loaded on the replica that answered the probe")
    busy: bool = False


class Timings(BaseModel):
    queue_ms: float
    sampling_ms: float
    total_ms: float


class GenerateResult(BaseModel):
    """The JSON answer (Accept: application/json, or num_samples > 1); one PNG otherwise."""

    images: list[str] = Field(description="PNG images in base64")
    model: str
    seed: int
    seeds: list[int] = Field(description="the seed of each image")
    batch_size: int = Field(description="requests that shared the sampling call")
    timings: Timings


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def request_schema(kind: str, maxima: dict[str, int]) -> dict[str, Any]:
    """A route's JSON body schema with a deployment's upper bounds: `maxima` maps a field to the largest value any
    served model takes (each model's own limit is in GET /v1/models `limits`, and the server checks that one)."""
    schema = REQUESTS[kind].model_json_schema()
    for name, high in maxima.items():
        field = schema["properties"][name]
        _value_branch(field)["maximum"] = high
        note = "the maximum here is the largest over the served models"
        field["description"] = f"{field['description']}; {note}" if "description" in field else note
    return schema


def multipart_schema(kind: str, maxima: dict[str, int]) -> dict[str, Any]:
    """The multipart/form-data variant of a route's body schema: files are uploads, parameters form fields. A form
    field is text and cannot be null: a field is left unset by leaving it out, so no field has a null branch."""
    schema = request_schema(kind, maxima)
    schema["properties"] = {name: not_null(field) for name, field in schema["properties"].items()}
    for name in FILE_FIELDS[kind]:
        schema["properties"][name] = {"type": "string", "format": "binary"}
    return schema


def _value_branch(field: dict[str, Any]) -> dict[str, Any]:
    """The schema of a field's values, without its null branch (a field of an optional type is anyOf [T, null])."""
    return next((b for b in field.get("anyOf", []) if b != {"type": "null"}), field)


def not_null(field: dict[str, Any]) -> dict[str, Any]:
    """The schema of a field sent as text (a form field, a query parameter): its values, without null."""
    if "anyOf" not in field:
        return field
    rest = {k: v for k, v in field.items() if k != "anyOf" and not (k == "default" and v is None)}
    return rest | _value_branch(field)
