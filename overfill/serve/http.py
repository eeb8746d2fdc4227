"""HTTP hardening around the app: the API key gate and access log, the body limit, the request-head
timeout, and a uvicorn server that drains running requests on shutdown."""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time

from fastapi.responses import JSONResponse

from ..errors import OverfillError
from .protocol import APIError

log = logging.getLogger("overfill.serve")

DEFAULT_MAX_BODY_BYTES = 4 << 20
"""Largest request body: JSON parsing and validation run on the event loop, so this bounds their stall."""
REQUEST_HEAD_TIMEOUT_S = 10.0
"""A connection must send a whole request head this soon after it opens (or after its last response)."""
BODY_TIMEOUT_S = 30.0
"""Longest wait for the next piece of a request body before a 408."""
SHUTDOWN_DRAIN_S = 5.0
"""On SIGTERM, how long running requests may go on before they are ended with an error event."""
GRACEFUL_SHUTDOWN_S = 10
"""How long uvicorn waits for open connections on shutdown (more than the drain, so that streams end cleanly)."""

class _Gate:
    """ASGI middleware: the API key on everything but /health, and one access-log line per request with its latency."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
                error = APIError(401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            log.info("%s %s %d %.1fms", scope["method"], scope["path"], status[0], (time.perf_counter() - start) * 1e3)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(key.strip().encode(), self.api_key.encode())


class _BodyLimit:
    """ASGI middleware: read the request body, refusing one of more than `max_bytes` with a 413, before the app
    parses it. A declared Content-Length is checked before reading; a chunked body as it arrives. What the
    client still sends after the 413 is read and dropped by uvicorn, so that it gets to read the answer."""

    def __init__(self, app, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:  # the HTTP layer checked it is a number
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:  # a client that stopped sending half-way would hold its slot forever
                error = APIError(408, f"The request body did not arrive within {self.timeout_s:g} s.",
                                 code="request_timeout")
                return await JSONResponse(error.body(), status_code=408, headers={"connection": "close"})(
                    scope, receive, send)
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # from here on only http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        error = APIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes "
                              f"(--max-body-bytes).", code="request_too_large")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def _validation_error(error: dict) -> APIError:
    loc = [str(p) for p in error["loc"] if p != "body"]
    param = ".".join(loc) or None
    kind = error["type"]
    if kind == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'" if param else "The request body is empty",
                        param=param)
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unsupported_parameter")
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"Invalid value for {where}: {error['msg']}", param=param)


def guarded_http_protocol(head_timeout_s: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head is not complete `head_timeout_s`
    after it opened (or after its last response): uvicorn itself keeps a silent or half-open connection, or
    one that sends its headers a byte at a time, forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            self.loop.call_later(head_timeout_s, self._head_deadline, self.cycle)

        def _head_deadline(self, cycle_then) -> None:
            if self.cycle is cycle_then and not self.transport.is_closing():  # no new request head since
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_server(app, drain_s: float = SHUTDOWN_DRAIN_S, head_timeout_s: float = REQUEST_HEAD_TIMEOUT_S,
                   **config):
    """A uvicorn server whose shutdown (SIGTERM, Ctrl-C) first drains the scheduler: running requests may finish
    for `drain_s`, then end with an error event, so that every stream still ends with [DONE]. A connection
    that has not sent a whole request head within `head_timeout_s` is closed."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.server.scheduler.drain(drain_s)
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, http=guarded_http_protocol(head_timeout_s), **config))


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0: any free port), or a clear error when the address is taken."""
    if not 0 <= port <= 65535:
        raise OverfillError(f"--port must be in 0..65535, got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OverfillError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
    return sock
