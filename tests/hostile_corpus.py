"""The regression corpus of hostile requests (tests/data/hostile_requests.json): every request that ever crashed
the API or got the wrong answer, with the status and error code it must get. Replayed in-process against the
parsers (tests/test_serve_inputs.py) and through the real HTTP proxy (tests/test_serve_app.py).

An entry's body is JSON text built from parts ([text] or [text, times]), or a multipart form whose files are
base64 ({"b64": ...}) and whose other fields are plain strings.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "data" / "hostile_requests.json"


@dataclass(frozen=True)
class HostileRequest:
    name: str
    found: str  # how it was found and what it did before the fix
    path: str
    content_type: str
    body: bytes
    status: int
    code: str | None  # the error code of a refusal; None when the request must succeed


def _json_body(parts: list[list[Any]]) -> bytes:
    return "".join(p[0] * (p[1] if len(p) > 1 else 1) for p in parts).encode()


def multipart(fields: dict[str, Any]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type; dict values are files ({"b64": ...} or {"bytes": ...})."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields.items():
        if isinstance(value, dict):
            head = f'Content-Disposition: form-data; name="{name}"; filename="{name}"\r\nContent-Type: application/octet-stream'
            data = value["bytes"] if "bytes" in value else base64.b64decode(value["b64"])
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"', str(value).encode()
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def load_corpus() -> list[HostileRequest]:
    entries = []
    for e in json.loads(CORPUS.read_text()):
        if "json" in e:
            body, ctype = _json_body(e["json"]), "application/json"
        else:
            body, ctype = multipart(e["multipart"])
        entries.append(HostileRequest(e["name"], e["found"], e["path"], ctype, body, e["status"], e.get("code")))
    return entries
