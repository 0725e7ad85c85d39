"""
The HTTP API under C{/v1}: presence of controllers (and, with the outbox, commands).

Every request needs C{Authorization: Bearer <[http] api_token>}; with no token configured
the API is off (404), so it is never open by accident.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO, cast

from psycopg2 import DataError
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ctrlgw.config import parseDuration
from ctrlgw.interfaces import Unavailable
from ctrlgw.protocol.messages import COMMAND_ID, CONTROLLER_ID
from ctrlgw.store.postgres import Store
from ctrlgw.web import MAX_REQUEST_BODY

log = Logger()

# A route handler gets the request and the path segments; it returns (status, body), or
# None to pass the request on to the next route.
RouteHandler = Callable[..., Awaitable[tuple[int, object] | None]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def isoTime(value: datetime | None) -> str | None:
    """
    A time as the API and the ctrlgw command print it: RFC 3339, UTC, microseconds, with
    a Z (C{2026-11-26T17:24:18.713376Z}), as the SQL API's C{rfc3339()} does.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    return isoTime(value) if isinstance(value, datetime) else value


_PRESENCE_COLUMNS = (
    "controller", "online", "instance", "epoch", "session", "listener", "peer",
    "connected_at", "last_seen_at", "disconnected_at", "disconnect_reason",
)


def presenceJson(controller: str, row: tuple[Any, ...] | None) -> dict[str, Any]:
    """
    A controller's presence as C{GET /v1/controllers/...} and C{ctrlgw sessions --json}
    show it: one row of L{Store.presence} with C{known} true, or, for a controller with no
    row (it never connected), only C{controller}, C{online} and C{known}, both false.
    """
    if row is None:
        return {"controller": controller, "online": False, "known": False}
    presence = {
        name: _jsonable(value) for name, value in zip(_PRESENCE_COLUMNS, row, strict=True)
    }
    presence["known"] = True
    return presence


# A handler that answers (STREAMING, None) has started a response it finishes itself
# (GET /v1/stream).
STREAMING = 0


def _finish(request: Request, status: int, body: object) -> None:
    if status == STREAMING or request.finished or request._disconnected:
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.write(json.dumps(body, sort_keys=True).encode() + b"\n")
    request.finish()


class ApiResource(Resource):
    """
    Dispatches C{/v1/...} to async handlers after checking the bearer token.
    """

    isLeaf = True

    def __init__(self, token: str, store: Store, defaultTtl: float = 30.0) -> None:
        super().__init__()
        self.token = token.encode()
        self.store = store
        self.defaultTtl = defaultTtl
        self.routes: list[tuple[bytes, int, RouteHandler]] = [
            (b"GET", 1, self.listControllers),
            (b"GET", 2, self.getController),
            (b"GET", 2, self.getCommand),
            (b"POST", 3, self.sendCommand),
            (b"POST", 1, self.sendCommands),
        ]

    def addRoute(self, method: bytes, depth: int, handler: RouteHandler) -> None:
        """
        Add a handler for requests of C{method} with C{depth} path segments under /v1; it
        gets the segments as arguments and returns (status, body), or None to pass.
        """
        self.routes.append((method, depth, handler))

    def render(self, request: Request) -> Any:
        Deferred.fromCoroutine(self._handle(request))
        return NOT_DONE_YET

    async def _handle(self, request: Request) -> None:
        try:
            self._authorize(request)
            status, body = await self._dispatch(request)
        except ApiError as e:
            status, body = e.status, {"error": e.message}
        except Unavailable as e:
            status, body = 503, {"error": str(e)}
        except DataError as e:
            status, body = 400, {"error": str(e).strip().splitlines()[0]}
        except Exception:
            log.failure("API request {path} failed", path=request.path)
            status, body = 500, {"error": "internal error"}
        _finish(request, status, body)

    def _authorize(self, request: Request) -> None:
        if not self.token:
            raise ApiError(404, "the API is off: set [http] api_token")
        header = request.getHeader(b"authorization") or b""
        scheme, _, presented = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(presented.strip(), self.token):
            request.setHeader(b"www-authenticate", b'Bearer realm="ctrlgw"')
            raise ApiError(401, "missing or wrong bearer token")

    async def _dispatch(self, request: Request) -> tuple[int, object]:
        # server.Request.process sets postpath before any resource renders.
        assert request.postpath is not None
        segments = [s.decode("utf-8", "replace") for s in request.postpath if s]
        for method, depth, handler in self.routes:
            if len(segments) == depth and request.method == method:
                result = await handler(request, *segments)
                if result is not None:
                    return result
        raise ApiError(404, "no such resource")

    # --- presence ---

    async def listControllers(self, request: Request, collection: str) -> tuple[int, object] | None:
        if collection != "controllers":
            return None
        rows = await self.store.presence(None)
        return 200, {"controllers": [presenceJson(row[0], row) for row in rows]}

    async def getController(
        self, request: Request, collection: str, controller: str
    ) -> tuple[int, object] | None:
        if collection != "controllers":
            return None
        if not CONTROLLER_ID.fullmatch(controller):
            raise ApiError(400, "not a controller id")
        rows = await self.store.presence(controller)
        return 200, presenceJson(controller, rows[0] if rows else None)

    # --- commands ---

    async def getCommand(
        self, request: Request, collection: str, command: str
    ) -> tuple[int, object] | None:
        if collection != "commands":
            return None
        if not COMMAND_ID.fullmatch(command):
            raise ApiError(400, "not a command id")
        status = await self.store.commandStatus(command)
        if status is None:
            raise ApiError(404, "no such command")
        return 200, status

    async def sendCommand(
        self, request: Request, collection: str, controller: str, leaf: str
    ) -> tuple[int, object] | None:
        if (collection, leaf) != ("controllers", "commands"):
            return None
        if not CONTROLLER_ID.fullmatch(controller):
            raise ApiError(400, "not a controller id")
        payload = _jsonBody(request, "{\"body\": ..., \"ttl\": \"30s\"}")
        if not isinstance(payload, dict) or "body" not in payload:
            raise ApiError(400, "the request body must be a JSON object with a \"body\"")
        seconds = self._ttl(payload)
        command = await self.store.sendCommand(controller, payload["body"], seconds)
        return 201, {"id": command, "controller": controller, "state": "pending"}

    def _ttl(self, payload: dict[str, Any]) -> float:
        ttl = payload.get("ttl", self.defaultTtl)
        try:
            seconds = parseDuration(str(ttl))
        except ValueError as e:
            raise ApiError(400, f"ttl: {e}") from None
        if seconds <= 0:
            raise ApiError(400, "ttl must be positive")
        return seconds

    # --- many commands in one request (docs/sending-commands.md) ---

    async def sendCommands(self, request: Request, collection: str) -> tuple[int, object] | None:
        """
        C{POST /v1/commands}: C{{"commands": [{"controller": ..., "body": ...}, ...],
        "ttl": ...}}, one statement (C{send_many}); the ids come back in the same order.
        """
        if collection != "commands":
            return None
        payload = _jsonBody(request, "{\"commands\": [{\"controller\": ..., \"body\": ...}]}")
        commands = payload.get("commands") if isinstance(payload, dict) else None
        if not isinstance(commands, list) or not 1 <= len(commands) <= MAX_BATCH:
            raise ApiError(400, f"\"commands\" must be a list of 1 to {MAX_BATCH} commands")
        for n, item in enumerate(commands):
            if not isinstance(item, dict) or "body" not in item:
                raise ApiError(400, f"commands[{n}] must be an object with a \"body\"")
            controller = item.get("controller")
            if not isinstance(controller, str) or not CONTROLLER_ID.fullmatch(controller):
                raise ApiError(400, f"commands[{n}]: not a controller id")
        seconds = self._ttl(payload)
        ids = await self.store.sendCommands(
            [c["controller"] for c in commands], [c["body"] for c in commands], seconds
        )
        return 201, {"ids": ids, "state": "pending"}


# The most commands one POST /v1/commands may carry.
MAX_BATCH = 10_000


def _jsonBody(request: Request, shape: str) -> Any:
    # Twisted annotates Request.content by its class default, None; gotLength sets the
    # body file (its documented type is BinaryIO) before the request is rendered.
    content = cast(BinaryIO, request.content)
    raw = content.read(MAX_REQUEST_BODY + 1)
    if len(raw) > MAX_REQUEST_BODY:
        raise ApiError(413, "request body too large")
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise ApiError(400, f"the request body must be JSON: {shape}") from None
