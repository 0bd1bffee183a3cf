"""Every error a caller can cause is a 4xx JSON body {"error", "detail"} naming the problem; Triton being away
is a 503; nothing internal (traceback, addresses) reaches a response."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kiln.errors import InputError, KilnError, NotFoundError, ServerError, TooLargeError
from orchestrator.jobs import QueueFull


class APIError(Exception):
    """An HTTP answer other than 200, with its kind and a message for the caller."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers


def api_error(exc: KilnError) -> APIError:
    """Our exception hierarchy as HTTP statuses."""
    if isinstance(exc, NotFoundError):
        return APIError(404, "not_found", str(exc))
    if isinstance(exc, QueueFull):
        return APIError(429, "queue_full", str(exc), {"Retry-After": "2"})
    if isinstance(exc, TooLargeError):
        return APIError(413, "too_large", str(exc))
    if isinstance(exc, InputError):
        return APIError(422, "invalid_input", str(exc))
    if isinstance(exc, ServerError):
        return APIError(503, "unavailable", str(exc), {"Retry-After": "5"})
    return APIError(500, "generation_failed", str(exc))


def as_api_error(exc: Exception) -> APIError:
    return exc if isinstance(exc, APIError) else api_error(exc)


def count(request, endpoint: str, outcome: str) -> None:
    """Requests by endpoint and outcome, for /metrics."""
    request.app.state.metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()


def short(exc: Exception) -> str:
    """A pydantic validation error as "field: message; ..." (names the fields, never echoes values)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {_message(e)}" for e in errors())
    return type(exc).__name__


def _message(error: dict) -> str:
    if error.get("type") == "extra_forbidden":  # schemas.STRICT: a field kiln does not read is refused, not ignored
        return "not a field this server has (it would be ignored); remove it"
    return error.get("msg", "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return JSONResponse({"error": exc.kind, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(KilnError)
    async def on_kiln_error(request: Request, exc: KilnError):
        return await on_api_error(request, api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": _message(e), "type": e.get("type", "")}
                  for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'][1:]) or e['loc'][0] if e['loc'] else 'body'}: {e['msg']}"
                           for e in errors)
        return JSONResponse({"error": "validation", "detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": "http", "detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, exc: Exception):
        return JSONResponse({"error": "internal", "detail": f"internal error ({type(exc).__name__})"}, status_code=500)
