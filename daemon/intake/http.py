"""The HTTP API (aiohttp), run as a service in the daemon's task group.

Probes (/healthz, /readyz), the status JSON and page, Prometheus metrics, and the
job API and spend report under /v1. These run the very same commands as the control
socket (`daemon.control.commands.execute`); this module only translates HTTP to commands
and CommandError codes to HTTP statuses, in one table (`ERROR_STATUS`).

Every error, whatever raised it (a command, aiohttp's router, a body over the limit,
a bug), leaves as `{"error": {"code", "message", "details"}}`; the daemon never dies
of a request. The host owns signals: the runner is set up and cleaned up here, in
one place, and cleanup is shielded with a deadline so a cancelled daemon still frees
the port.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from anyio.abc import TaskStatus

from daemon.config import HttpConfig, parse_listen
from daemon.control.commands import execute
from daemon.control.protocol import CommandError
from daemon.errors import StartupError
from daemon.observe.metrics import CONTENT_TYPE, Metrics
from daemon.observe.page import StatusPage, load_page
from daemon.runtime import Runtime
from daemon.spend.report import parse_when

log = structlog.get_logger("vigil.http")

MAX_IN_FLIGHT = 256
"""Requests served at once (probes excepted); beyond it, 503 `busy` at once."""
BODY_TIMEOUT_S = 30.0
"""A request body must arrive within this, or 408: a slow client cannot pin a slot."""
SHUTDOWN_TIMEOUT_S = 2.0
CLEANUP_DEADLINE_S = 5.0
RETRY_AFTER_BUSY_S = 1
MAX_STREAMS = 32
"""Event streams (SSE) and exports open at once; each holds a request slot."""
HEARTBEAT_S = 15.0  # an SSE comment after this long without an event, so proxies keep it
_PROBES = frozenset({"/healthz", "/readyz"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# The one place CommandError codes (the control socket's, plus HTTP's own) become
# HTTP statuses; an unknown code is a 500.
ERROR_STATUS: dict[str, int] = {
    "bad_request": 400,
    "bad_args": 400,
    "invalid_job": 400,
    "unauthorized": 401,
    "not_found": 404,
    "unknown_command": 404,
    "forbidden": 403,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "filter_required": 400,
    "invalid_state": 409,
    "idempotency_conflict": 409,
    "cursor_expired": 410,
    "too_large": 413,
    "unsupported_media_type": 415,
    "backlog_full": 429,
    "internal": 500,
    "intake_closed": 503,
    "store_error": 503,
    "busy": 503,
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}

RUNTIME = web.AppKey("runtime", Runtime)
METRICS = web.AppKey("metrics", Metrics)
PAGE = web.AppKey("page", StatusPage)
SETTINGS = web.AppKey("settings", HttpConfig)


@dataclass
class _Load:
    in_flight: int = 0
    streams: int = 0


LOAD = web.AppKey("load", _Load)


class HttpListenError(StartupError):
    """The configured address cannot be bound (in use, not local, no permission)."""


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(exc: CommandError, status: int | None = None) -> web.Response:
    """A CommandError as HTTP: status from ERROR_STATUS (unless given), the shared
    JSON shape, and Retry-After where waiting helps."""
    status = status or ERROR_STATUS.get(exc.code, 500)
    headers: dict[str, str] = {}
    if status == 429:
        details = exc.details if isinstance(exc.details, dict) else {}
        retry_after = details.get("retry_after_s", 1)
        seconds = retry_after if isinstance(retry_after, int | float) else 1
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    elif exc.code == "busy":
        headers["Retry-After"] = str(RETRY_AFTER_BUSY_S)
    elif exc.code == "unauthorized":
        headers["WWW-Authenticate"] = 'Bearer realm="vigil"'
    body = {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
    return _json(body, status, headers)


def _from_http_exception(exc: web.HTTPException, settings: HttpConfig) -> CommandError:
    if exc.status == 413:
        return CommandError(
            "too_large",
            f"request body larger than {settings.max_body_bytes} bytes (http.max_body_bytes)",
        )
    code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
    return CommandError(code, exc.reason)


def _labels(request: web.Request, status: int) -> tuple[str, str, str]:
    """Metric labels from bounded sets only: a client picks the path and the method."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    method = request.method if request.method in _METHODS else "other"
    return route, method, str(status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost layer: bounds requests in flight, turns every failure into the
    shared error shape, and counts the request."""
    load = request.app[LOAD]
    started = time.perf_counter()
    status = 499  # the client went away before an answer (its handler was cancelled)
    try:
        if request.path in _PROBES:  # never refused: a busy daemon is still alive
            response = await _answer(request, handler)
        elif load.in_flight >= MAX_IN_FLIGHT:
            response = error_response(
                CommandError("busy", f"more than {MAX_IN_FLIGHT} requests in flight")
            )
        else:
            load.in_flight += 1
            try:
                response = await _answer(request, handler)
            finally:
                load.in_flight -= 1
        status = response.status
        return response
    finally:
        request.app[METRICS].http_requests.labels(*_labels(request, status)).inc()
        log.debug(
            "http.request",
            method=request.method,
            path=request.path,
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CommandError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http_exception(exc, request.app[SETTINGS]), exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:  # a bug must cost one request, not the daemon
        log.exception("http.request_failed", method=request.method, path=request.path)
        return error_response(
            CommandError("internal", f"internal error ({type(exc).__name__}); see the daemon log")
        )


def _protected(request: web.Request) -> bool:
    """Under /v1, by the path asked for or by the route it matched."""
    resource = request.match_info.route.resource
    paths = (request.path, resource.canonical if resource is not None else "")
    return any(path == "/v1" or path.startswith("/v1/") for path in paths)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """/v1/* needs the bearer token while the variable named by http.token_env is set.
    Like API keys, the token is read from the environment at use, never logged. And a
    change under /v1 never comes from another site's page: a browser sends it with
    `Sec-Fetch-Site: cross-site` or a foreign `Origin`, refused here; `_body` refuses a
    body that is not `application/json`, which no page can send cross-site unasked."""
    if _protected(request) and request.method not in ("GET", "HEAD", "OPTIONS"):
        _same_site(request)
    if _protected(request):
        env = request.app[RUNTIME].config.http.token_env
        token = os.environ.get(env) if env else None
        if token:
            given = request.headers.get("Authorization", "")
            scheme, _, credential = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credential.strip().encode("utf-8", "surrogatepass"),
                token.encode("utf-8", "surrogatepass"),
            ):
                raise CommandError(
                    "unauthorized",
                    "missing or wrong bearer token (Authorization: Bearer <token>)",
                )
    return await handler(request)


def _same_site(request: web.Request) -> None:
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise CommandError("forbidden", "a change under /v1 from another site's page")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        raise CommandError("forbidden", f"a change under /v1 from another origin ({origin[:80]})")


async def _run(request: web.Request, cmd: str, args: dict[str, Any]) -> Any:
    return await execute(request.app[RUNTIME], cmd, args)


# -- handlers --------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    report = request.app[RUNTIME].health.report()
    return _json(
        {"live": report.live, "reasons": report.reasons("live")}, 200 if report.live else 503
    )


async def readyz(request: web.Request) -> web.Response:
    """Ready to take work: live, and no check that takes readiness away (draining,
    backlog full, database unwritable) failing. Paused still counts as ready."""
    report = request.app[RUNTIME].health.report()
    reasons = report.reasons("live") + report.reasons("ready")
    return _json({"ready": report.ready, "reasons": reasons}, 200 if report.ready else 503)


async def status(request: web.Request) -> web.Response:
    return _json(await _run(request, "status", {}))


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def page(request: web.Request) -> web.Response:
    status_page = request.app[PAGE]
    return web.Response(body=status_page.body, headers=status_page.headers)


async def _body(request: web.Request) -> Any:
    """The request body as JSON (declared so), within the size and time limits."""
    if request.content_type != "application/json":
        raise CommandError(
            "unsupported_media_type",
            f"the body must be Content-Type: application/json, not {request.content_type!r}",
        )
    declared, limit = request.content_length, request.app[SETTINGS].max_body_bytes
    if declared is not None and declared > limit:  # refused before any of it is read
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
    try:
        with anyio.fail_after(BODY_TIMEOUT_S):
            raw = await request.read()
    except TimeoutError:
        raise CommandError(
            "request_timeout", f"request body not received within {BODY_TIMEOUT_S:g} s"
        ) from None
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # Recursion: too deep
        raise CommandError("bad_request", f"request body is not valid JSON: {exc}") from None


async def submit_jobs(request: web.Request) -> web.Response:
    data = await _run(request, "submit", {"jobs": await _body(request), "source": "http"})
    return _json(data, 202)


def _bulk(cmd: str) -> Handler:
    """`POST /v1/jobs:cancel|retry|purge`: the body is the socket command's arguments
    (a filter: state, analyzer, error_type, since, until, before, tag, batch, ids;
    dry_run, all);
    `since` and `until` also take the CLI's forms (7d, 2026-11-23, ...)."""

    async def handler(request: web.Request) -> web.Response:
        body = await _body(request) if request.body_exists else {}
        if not isinstance(body, dict):
            raise CommandError("bad_request", "request body must be a JSON object (a filter)")
        now = time.time()
        for key in ("since", "until"):
            if isinstance(body.get(key), str):
                try:
                    body[key] = parse_when(body[key], now)
                except ValueError as exc:
                    field = {"index": None, "field": key, "message": str(exc)}
                    raise CommandError("bad_args", f"{key}: {exc}", [field]) from None
        return _json(await _run(request, cmd, body))

    return handler


Converter = Callable[[str], Any]


def _query_args(request: web.Request, params: dict[str, Converter]) -> dict[str, Any]:
    """The query as a command's arguments, each parameter given at most once and
    converted by its function (a ValueError is that field's message); every fault
    comes out together as one 400 `bad_args` with a field error each."""
    args: dict[str, Any] = {}
    errors = []
    for key in request.query:
        values = request.query.getall(key)
        if key not in params:
            errors.append({"index": None, "field": key, "message": "unknown query parameter"})
        elif len(values) > 1:
            errors.append({"index": None, "field": key, "message": "given more than once"})
        else:
            try:
                args[key] = params[key](values[0])
            except ValueError as exc:
                errors.append({"index": None, "field": key, "message": str(exc)})
    if errors:
        first = errors[0]
        raise CommandError("bad_args", f"{first['field']}: {first['message']}", errors)
    return args


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer") from None


_LIST_PARAMS: dict[str, Converter] = {
    "state": str,
    "analyzer": str,
    "limit": _integer,
    "before": str,
    "tag": str,
    "batch": str,
    "q": str,  # text in the id, any case
}


async def list_jobs(request: web.Request) -> web.Response:
    """Newest first; `next_before` is the cursor for the next page (null at the end)."""
    return _json(await _run(request, "jobs", _query_args(request, _LIST_PARAMS)))


async def usage(request: web.Request) -> web.Response:
    """The spend report, as the socket's `usage`; `since` and `until` take the CLI's
    forms (7d, 2026-11-23, 2026-11-23T18:00:00Z), read against one `now`."""
    now = time.time()

    def when(text: str) -> float:
        return parse_when(text, now)

    params: dict[str, Converter] = {"since": when, "until": when, "by": str}
    return _json(await _run(request, "usage", _query_args(request, params)))


_EVENT_PARAMS: dict[str, Converter] = {
    "after": str,
    "analyzer": str,
    "state": str,
    "limit": _integer,
    "wait": float,
}


async def events(request: web.Request) -> web.StreamResponse:
    """Job ends after `after` (or the SSE `Last-Event-ID`): a JSON page (`wait` makes
    it a long poll), or, to a client that accepts `text/event-stream`, a stream of
    them, each event's `id` its cursor, so a reconnecting EventSource resumes."""
    args = _query_args(request, _EVENT_PARAMS)
    if "text/event-stream" not in request.headers.get("Accept", ""):
        return _json(await _run(request, "events", args))
    args.pop("wait", None)
    resume = request.headers.get("Last-Event-ID")
    if resume:
        args["after"] = resume
    async with _stream_slot(request):
        items = await _run(request, "watch", {**args, "heartbeat_s": HEARTBEAT_S})
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        return await _stream(request, response, items, _sse)


def _sse(item: Any) -> bytes:
    if item is None:
        return b": keep-alive\n\n"
    head = f"id: {item['cursor']}\nevent: {item['event']}\ndata: ".encode()
    return head + msgspec.json.encode(item) + b"\n\n"


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    items: AsyncGenerator[Any],
    render: Callable[[Any], bytes | None],
) -> web.StreamResponse:
    """Each item as `render` makes it (None: nothing). Once the answer has begun, a
    failure (the store, a cursor retention passed meanwhile) can only cut it: the
    connection is closed, so the client sees a broken stream, never an error answer
    inside the body, and never a cut-off export that looks complete."""
    await response.prepare(request)
    async with contextlib.aclosing(items):
        try:
            async for item in items:
                if (chunk := render(item)) is not None:
                    await response.write(chunk)
        except Exception as exc:
            log.warning("http.stream_cut", path=request.path, error=f"{type(exc).__name__}: {exc}")
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response


async def export(request: web.Request) -> web.StreamResponse:
    """Every matching job with its result as JSON lines, streamed (the socket's
    `export`); a complete export ends the body, a cut-off one breaks it."""
    now = time.time()

    def when(text: str) -> float:
        return parse_when(text, now)

    params: dict[str, Converter] = {
        "state": str,
        "analyzer": str,
        "since": when,
        "until": when,
        "tag": str,
        "batch": str,
    }
    args = _query_args(request, params)
    async with _stream_slot(request):
        items = await _run(request, "export", args)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        return await _stream(request, response, items, _job_line)


def _job_line(item: Any) -> bytes | None:
    return msgspec.json.encode(item["job"]) + b"\n" if "job" in item else None


@contextlib.asynccontextmanager
async def _stream_slot(request: web.Request) -> AsyncIterator[None]:
    load = request.app[LOAD]
    if load.streams >= MAX_STREAMS:
        raise CommandError("busy", f"more than {MAX_STREAMS} event streams and exports open")
    load.streams += 1
    try:
        yield
    finally:
        load.streams -= 1


async def show_job(request: web.Request) -> web.Response:
    return _json(await _run(request, "show", {"id": request.match_info["id"]}))


async def cancel_job(request: web.Request) -> web.Response:
    return _json(await _run(request, "cancel", {"id": request.match_info["id"]}))


def build_app(
    rt: Runtime, metrics_: Metrics, page_: StatusPage, settings: HttpConfig
) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_errors, _auth])
    app[RUNTIME] = rt
    app[METRICS] = metrics_
    app[PAGE] = page_
    app[SETTINGS] = settings
    app[LOAD] = _Load()
    app.router.add_get("/", page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/jobs", submit_jobs)
    app.router.add_get("/v1/jobs", list_jobs)
    for action in ("cancel", "retry", "purge"):
        app.router.add_post(f"/v1/jobs:{action}", _bulk(action))
    app.router.add_get("/v1/jobs/{id}", show_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/export", export)
    return app


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard is not dialable
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class HttpServer:
    """Serves the HTTP API on `http.listen` while `run` runs. Build it before the
    dispatcher starts, so the metrics see every attempt."""

    def __init__(self, rt: Runtime, settings: HttpConfig) -> None:
        self._rt = rt
        self._settings = settings
        self.metrics = Metrics(rt)
        self.url: str | None = None

    def _status(self) -> dict[str, Any]:
        env = self._rt.config.http.token_env
        return {"url": self.url, "auth": bool(env and os.environ.get(env))}

    async def run(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the URL through `task_status`, serve until cancelled."""
        listen = self._settings.listen
        host, port = parse_listen(listen)
        status_page = await anyio.to_thread.run_sync(load_page)
        runner = web.AppRunner(
            build_app(self._rt, self.metrics, status_page, self._settings),
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,  # a client that leaves ends its handler
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                raise HttpListenError(
                    f"cannot listen on {listen} (http.listen): {exc.strerror or exc}"
                ) from None
            self.url = _url(runner.addresses[0])
            self._rt.status_sections["http"] = self._status
            auth = self._status()["auth"]
            log.info("http.listening", url=self.url, auth="bearer" if auth else "none")
            if not auth and host not in ("127.0.0.1", "::1", "localhost"):
                log.warning(
                    "http.unauthenticated",
                    url=self.url,
                    reason=f"not loopback and ${self._settings.token_env or '(none)'} is unset: "
                    "anyone who can reach it can submit and cancel jobs",
                )
            task_status.started(self.url)
            await anyio.sleep_forever()
        finally:
            self._rt.status_sections.pop("http", None)
            with anyio.move_on_after(CLEANUP_DEADLINE_S, shield=True):
                await runner.cleanup()
