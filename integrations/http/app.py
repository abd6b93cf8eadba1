"""The FastAPI application: routes, error bodies, API key check, access log."""

import hmac
import logging
import time
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from integrations.http import native_api, openai_api
from integrations.http.server import ApiError, Server
from rollout import Engine

log = logging.getLogger("rollout.serve")


def build_app(engine: Engine, model_name: str | None = None,
              api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="rollout serve", summary="SGLang's native HTTP API and the OpenAI API "
                  "over a deterministic rollout engine", version=native_api.package_version())
    app.state.server = Server(engine, model_name or Path(engine.config.model).name)
    app.include_router(native_api.router)
    app.include_router(openai_api.router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(UnexpectedErrors)  # first: innermost
    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    app.add_middleware(AccessLog)  # added last: outermost, so refused calls are logged too
    _name_the_model_in_the_schema(app, app.state.server.model_name)
    return app


def _name_the_model_in_the_schema(app: FastAPI, model_name: str) -> None:
    """/openapi.json says which `model` the OpenAI routes accept: the one served here."""
    schema_of = app.openapi

    def openapi() -> dict:
        schema = schema_of()
        for name in ("CompletionRequest", "ChatRequest"):
            schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_name]
        return schema
    app.openapi = openapi


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """SGLang's `{success, message}` and the OpenAI error object, in one body."""
    return {"success": False, "message": message,
            "error": {"message": message, "type": HTTPStatus(status).phrase, "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))




async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    if request.method in ("POST", "PUT") and "json" not in content_type:
        return error_response(400, f"the body must be JSON, sent with 'Content-Type: "
                                   f"application/json' (got {content_type or 'none'!r})", "body")
    problems = [_problem(e) for e in _closest_union_members(exc.errors())]
    message = "; ".join(dict.fromkeys(text for _, text in problems))
    return error_response(400, message, problems[0][0] if problems else None)


def _is_type_tag(part) -> bool:
    """pydantic names the union member an error belongs to in its location ('list[str]')."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int"))


def _closest_union_members(errors: list[dict]) -> list[dict]:
    """A value that fits no member of a union gets every member's errors; keep those of the
    members it came closest to (the deepest errors)."""
    def member(error) -> tuple[tuple, str | None, int]:
        loc = error["loc"]
        i = next((i for i, part in enumerate(loc) if _is_type_tag(part)), None)
        return (tuple(loc), None, 0) if i is None else (tuple(loc[:i]), loc[i], len(loc) - i)

    depth: dict = {}
    for e in errors:
        field, tag, d = member(e)
        depth[field, tag] = max(depth.get((field, tag), 0), d)
    deepest = {field: max(d for (f, _), d in depth.items() if f == field) for field, _ in depth}
    return [e for e in errors if depth[member(e)[:2]] == deepest[member(e)[0]]]


def _problem(error: dict) -> tuple[str, str]:
    """(field, what is wrong with it) from one pydantic error."""
    loc = [str(part) for part in error["loc"] if not _is_type_tag(part)]
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        position = f" at position {loc[0]}" if loc else ""
        return "body", f"body is not valid JSON{position}: {reason}"
    field = ".".join(loc) or "body"
    got = error.get("input")
    shown = f" (got {got!r:.80})" if isinstance(got, (str, int, float, bool)) else ""
    return field, f"{field}: {error['msg']}{shown}"


class UnexpectedErrors:
    """A route's unexpected exception, answered 500 here: Starlette's outermost handler answers
    and then re-raises it, and uvicorn closes the connection (a client's keep-alive connection
    reset on its next call)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_started(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except Exception as exc:
            if started:  # a streamed answer has begun: nothing else can be said
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            response = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
            await response(scope, receive, send)


class ApiKeyCheck:
    """Every call needs `Authorization: Bearer <key>` (slime and OpenAI clients send it)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                response = error_response(401, "missing or wrong API key: send the header "
                                               "'Authorization: Bearer <key>'")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class AccessLog:
    """One line per request once it is answered: client, method, path, status, milliseconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            host, port = scope.get("client") or ("-", 0)
            log.info('%s:%s "%s %s" %d %.1f ms', host, port, scope["method"], scope["path"],
                     status, (time.perf_counter() - start) * 1000)
