"""One JSON error shape for every failure the API reports: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A request the API refuses, with its HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, self.status, headers=self.headers)
