"""OpenAI-style errors: every failure leaves the server as {"error": {"message", "type", "param", "code"}}.

Status codes follow the OpenAI API: 400 bad request (validation), 401 missing or wrong API key, 404 unknown
model or route, 413 request body or prompt too large, 500 one request failed inside the engine (type
server_error) or a bug, 503 overloaded (queue full) or the engine is down, always with `Retry-After`. Clients
such as the official `openai` package turn these into typed exceptions (BadRequestError, ...).

An unexpected exception is answered by `CatchAllMiddleware` with a 500 JSON error: Starlette's own
last-resort handler re-raises after answering, which makes the server close the client's keep-alive
connection; ours does not, so one bad request never costs a client its connection.

Usage:
    from lmstack.serve.errors import APIError, install_error_handlers
    raise APIError(400, "n must be >= 1", param="n")
    install_error_handlers(app)     # FastAPI: APIError, pydantic validation, SamplingParams, 404/405
    app.add_middleware(CatchAllMiddleware)  # 500 for anything else, keeping the connection
"""
from __future__ import annotations

from dataclasses import fields
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.errors import LmstackError
from lmstack.infer.sampling_params import SamplingParams

log = logging.getLogger("lmstack.serve")

RETRY_AFTER_S = 1
"""Seconds a client is told to wait (Retry-After) after a 503: requests are short, a slot frees soon."""

# status -> (OpenAI error type, default code)
ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    503: ("server_overloaded", "server_overloaded"),
    500: ("internal_server_error", "internal_error"),
}


class APIError(Exception):
    """An error with an HTTP status that the server reports in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        default_type, default_code = ERROR_TYPES.get(status, ("invalid_request_error", None))
        self.type = type or default_type
        self.code = code if code is not None else default_code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else \
        {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# SamplingParamsError messages start with "<field>=<value> is not allowed", guided-decoding errors with
# "<field> is not usable ..."; a leading word that is a SamplingParams field becomes `param`.
_FIELD_RX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)[= ]")


def _sampling_fields() -> set[str]:
    return {f.name for f in fields(SamplingParams)}


def from_value_error(e: Exception) -> APIError:
    """A ValueError / LmstackError raised while checking a request -> 400 naming the field when we can."""
    message = str(e) or type(e).__name__
    m = _FIELD_RX.match(message)
    param = m.group(1) if m and m.group(1) in _sampling_fields() else None
    return APIError(400, message, param=param)


def _validation_error(e: RequestValidationError) -> APIError:
    """Pydantic's list of problems -> one readable message; `param` is the first offending field's path."""
    problems, param = [], None
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        path = ".".join(loc)
        param = param or path or None
        problems.append(f"{path or 'body'}: {err.get('msg', 'invalid')}")
    return APIError(400, "; ".join(problems) or "invalid request", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return error_response(_validation_error(e))

    @app.exception_handler(LmstackError)
    async def _lmstack(_: Request, e: LmstackError):
        return error_response(from_value_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail)))



class CatchAllMiddleware:
    """Any exception the handlers above did not take -> a 500 JSON error, logged with its traceback (a bug
    must not leak a traceback to the client, but it must be in the server log). Unlike Starlette's
    ServerErrorMiddleware it does not re-raise, so the server keeps the client's keep-alive connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_and_note(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            log.exception("internal error")
            if started:
                raise  # half a response is out: only closing the connection can tell the client
            await error_response(APIError(500, f"internal error: {type(e).__name__}"))(scope, receive, send)
