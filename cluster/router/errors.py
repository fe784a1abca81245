"""API errors: every failure leaves the router as `{"error": {"message", "type", "code"}}`."""
from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An HTTP error with an OpenAI-style body. `code` defaults to the status code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: Optional[str | int] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code = code if code is not None else status
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, code) -> dict:
    return {"error": {"message": message, "type": type, "code": code}}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, "invalid_request_error",
                    code="invalid_value" if param else 400)


def overloaded(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, "service_unavailable", code=503,
                    headers={"Retry-After": str(retry_after)})
