"""The HTTP API (Starlette, an ASGI app served by uvicorn): routes, the token check, bounded bodies, JSON errors.

    GET  /                                   the page (no token needed to load it; it asks for one)
    GET  /healthz, /readyz                   liveness, readiness (no token)
    GET  /metrics                            Prometheus text
    GET  /sources                            every source's status       POST /sources   add one
    GET  /sources/{id}                       one source                  DELETE          remove it
    POST /sources/{id}/ask                   a question: the whole answer, or tokens over SSE ("stream": true
                                             or Accept: text/event-stream)
    GET  /sources/{id}/state                 the stream's state (.npz; its evidence stamps in a header)
    PUT  /sources/{id}/state                 restore it
    GET/POST /sources/{id}/standing          standing questions          DELETE .../standing/{sid}
    GET  /events                             events over SSE (?sources=a,b&kinds=alert,answer)
    WS   /ws                                 events and questions over a WebSocket

The token (`Authorization: Bearer TOKEN`, or `?access_token=TOKEN` where a browser cannot set headers:
EventSource and WebSocket) guards everything but the page and the probes. Bodies must be JSON sent as
`application/json` (a form of another site's page cannot post one without the browser asking first), and
a WebSocket opened by a page of another origin is refused: without a token on loopback, other sites' pages
still cannot drive the service. Every error is a JSON body `{"error": {"status": ..., "message": ...}}`:
4xx for the client's mistakes, 5xx for ours.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ..errors import MirasolError
from .fields import RequestError, flag, parse_json
from .hub import Subscription
from .metrics import CONTENT_TYPE_LATEST
from .service import STAMPS_HEADER, Service
from .websocket import serve_websocket

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})
KEEPALIVE_S = 15.0
log = logging.getLogger("mirasol.serve")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


class TokenGuard:
    """ASGI middleware: requests other than OPEN_PATHS need the token (compared in constant time)."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    def _allowed(self, scope: dict[str, Any]) -> bool:
        if self.token is None or scope["path"] in OPEN_PATHS:
            return True
        headers = dict(scope.get("headers") or [])
        given = b""
        auth = headers.get(b"authorization", b"")
        if auth.lower().startswith(b"bearer "):
            given = auth[7:].strip()
        else:
            for pair in (scope.get("query_string") or b"").split(b"&"):
                key, _, value = pair.partition(b"=")
                if key == b"access_token":
                    given = unquote_to_bytes(value)
        return hmac.compare_digest(given, self.token)

    @staticmethod
    def _same_origin(scope: dict[str, Any]) -> bool:
        """A browser's WebSocket from another site's page (WebSockets have no CORS) is refused."""
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        if origin is None:  # not a browser
            return True
        return urlsplit(origin.decode("latin-1")).netloc.encode() == headers.get(b"host", b"")

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or (self._allowed(scope) and (kind == "http" or self._same_origin(scope))):
            await self.app(scope, receive, send)
            return
        message = "a token is required: Authorization: Bearer TOKEN (or ?access_token=TOKEN for SSE and WebSocket)"
        if kind == "websocket":
            await receive()  # websocket.connect
            reason = "a token is required" if not self._allowed(scope) else "a page of another origin"
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        response = error_response(401, message)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past `limit` bytes whatever Content-Length said."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {declared} bytes; the most is {limit}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise RequestError(413, f"the body is over {limit} bytes")
    return bytes(body)


async def json_body(request: Request, service: Service) -> dict[str, Any]:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind not in ("application/json", ""):
        raise RequestError(415, f"send JSON (Content-Type: application/json), got {kind}")
    return parse_json(await read_body(request, service.limits.max_request_bytes))


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def create_app(service: Service, first: list[dict[str, Any]] = ()) -> Starlette:
    """The ASGI app of `service` with the operator's sources `first` (the token is added by `guarded`)."""
    page = resources.files(__package__).joinpath("page.html").read_bytes()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def healthz(request: Request) -> Response:
        ok, why = service.health()
        return JSONResponse({"status": "ok"}) if ok else error_response(503, why)

    async def readyz(request: Request) -> Response:
        ok, why = service.health()
        if not ok:
            return error_response(503, why)
        return JSONResponse({"status": "ready", "sources": len(service.scheduler.sources)})

    async def metrics(request: Request) -> Response:
        body = await asyncio.to_thread(service.metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def sources(request: Request) -> Response:
        if request.method == "POST":
            return JSONResponse(await service.add_source(await json_body(request, service)), status_code=201)
        return JSONResponse({"sources": await service.sources()})

    async def source(request: Request) -> Response:
        source_id = request.path_params["id"]
        if request.method == "DELETE":
            return JSONResponse(await service.remove_source(source_id))
        return JSONResponse(await service.source(source_id))

    async def ask(request: Request) -> Response:
        data = await json_body(request, service)
        streamed = flag(data, "stream", "text/event-stream" in request.headers.get("accept", ""))
        if not streamed:
            question = await service.ask(request.path_params["id"], data, extra=("stream",))
            record = await service.answer(question)
            if "error" in record:
                raise RequestError(400, record["error"])
            return JSONResponse(record)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        def on_token(text: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, ("token", text))

        question = await service.ask(request.path_params["id"], data, extra=("stream",), on_token=on_token)
        question.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, ("done", None)))

        async def tokens() -> AsyncIterator[bytes]:
            try:
                while True:
                    kind, value = await pieces.get()
                    if kind == "token":
                        yield sse("token", {"text": value})
                        continue
                    record = question.future.result() if not question.future.cancelled() else None
                    if record is None or "error" in record:
                        message = record["error"] if record else "the question was cancelled"
                        yield sse("error", error_body(400, message))
                    else:
                        yield sse("answer", record)
                    return
            finally:
                question.future.cancel()  # a client that left: the scheduler drops the question

        return StreamingResponse(tokens(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def state(request: Request) -> Response:
        source_id = request.path_params["id"]
        if request.method == "PUT":
            body = await read_body(request, service.limits.max_state_bytes)
            return JSONResponse(await service.restore(source_id, body, request.headers.get(STAMPS_HEADER)))
        data, stamps = await service.snapshot(source_id)
        return Response(data, media_type="application/octet-stream", headers={
            STAMPS_HEADER: stamps, "Content-Disposition": f'attachment; filename="{source_id}.npz"'})

    async def standing(request: Request) -> Response:
        source_id = request.path_params["id"]
        if request.method == "POST":
            return JSONResponse(await service.add_standing(source_id, await json_body(request, service)),
                                status_code=201)
        return JSONResponse({"standing": await service.standing(source_id)})

    async def standing_one(request: Request) -> Response:
        return JSONResponse(await service.remove_standing(request.path_params["id"], request.path_params["sid"]))

    async def events(request: Request) -> Response:
        subscription = subscribe(service, request.query_params.get("sources"), request.query_params.get("kinds"))

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b": subscribed\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(subscription.next(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield b": keepalive\n\n"
                        continue
                    yield sse(event["event"], event)
            finally:
                subscription.close()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def websocket(socket: WebSocket) -> None:
        await serve_websocket(socket, service, subscribe)

    async def request_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestError)
        return error_response(error.status, error.message)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        words = {404: f"no route {request.url.path}; the API: GET /sources, POST /sources, POST /sources/ID/ask, ..."}
        return error_response(error.status_code, words.get(error.status_code, str(error.detail)))

    async def runtime_error(request: Request, error: Exception) -> Response:
        return error_response(400, str(error))  # the runtime refused something of the client's the checks let by

    async def internal_error(request: Request, error: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}: {error}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.attach(asyncio.get_running_loop())
        for data in first:
            await service.add_source(data, trusted=True)
        yield

    routes = [
        Route("/", index), Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
        Route("/sources", sources, methods=["GET", "POST"]),
        Route("/sources/{id}", source, methods=["GET", "DELETE"]),
        Route("/sources/{id}/ask", ask, methods=["POST"]),
        Route("/sources/{id}/state", state, methods=["GET", "PUT"]),
        Route("/sources/{id}/standing", standing, methods=["GET", "POST"]),
        Route("/sources/{id}/standing/{sid}", standing_one, methods=["DELETE"]),
        Route("/events", events), WebSocketRoute("/ws", websocket),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        RequestError: request_error, HTTPException: http_error, MirasolError: runtime_error,
        Exception: internal_error})


def subscribe(service: Service, sources: str | list[str] | None, kinds: str | list[str] | None) -> Subscription:
    """A subscription from `?sources=a,b&kinds=x,y` (or lists); 400 / 429 when it cannot be."""
    def split(value: str | list[str] | None) -> list[str] | None:
        if value is None or isinstance(value, list):
            return value
        return [v for v in value.split(",") if v]
    assert service.hub is not None
    try:
        return service.hub.subscribe(split(sources), split(kinds))
    except ValueError as error:
        raise RequestError(400, str(error)) from None
    except OverflowError as error:
        raise RequestError(429, str(error)) from None


def guarded(service: Service, token: str | None, first: list[dict[str, Any]] = ()) -> Any:
    """The app with the token check in front."""
    return TokenGuard(create_app(service, first), token)
