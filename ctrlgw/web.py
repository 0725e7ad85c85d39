"""
The HTTP listener: C{/metrics}, C{/healthz}, C{/readyz}.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

# A readiness check answers (ok, detail).
Check = Callable[[], tuple[bool, str]]


class Readiness:
    """
    Named checks that must all pass for the instance to take traffic.
    """

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def evaluate(self) -> dict[str, dict[str, object]]:
        return {
            name: {"ok": ok, "detail": detail}
            for name, (ok, detail) in ((n, c()) for n, c in self._checks.items())
        }

    def ready(self) -> bool:
        return all(result["ok"] for result in self.evaluate().values())


def _json(request: Request, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode() + b"\n"


class HealthResource(Resource):
    """
    200 while the process serves requests at all: a liveness probe.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class ReadyResource(Resource):
    """
    200 when every readiness check passes, else 503 naming the failing ones.
    """

    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self.readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        checks = self.readiness.evaluate()
        failing = sorted(name for name, result in checks.items() if not result["ok"])
        return _json(
            request,
            503 if failing else 200,
            {"status": "unready" if failing else "ready", "failing": failing, "checks": checks},
        )


# The largest request body the HTTP listener accepts, on every path: a command request's
# body (docs/sending-commands.md) is at most this.
MAX_REQUEST_BODY = 1024 * 1024

_TOO_LARGE = json.dumps({"error": "request body too large"}, sort_keys=True).encode() + b"\n"


class BoundedRequest(Request):
    """
    A request whose body may not exceed C{maxBody} bytes.  Twisted reads a body before
    any resource (or token check) sees the request, so a larger one is refused as it
    arrives, before the token is checked: 413 with the API's JSON error body, and the
    connection is closed.
    """

    maxBody = MAX_REQUEST_BODY
    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.maxBody:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.maxBody:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        # The channel answers "Expect: 100-continue" right after gotLength: not now.
        self.requestHeaders.removeHeader(b"expect")
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.write(
                b"HTTP/1.1 413 Payload Too Large\r\n"
                b"Content-Type: application/json\r\n"
                b"Cache-Control: no-store\r\n"
                b"Content-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE)
            )
            transport.loseConnection()


def makeSite(root: Resource) -> Site:
    return Site(root, requestFactory=BoundedRequest)


def makeRoot(
    registry: CollectorRegistry, readiness: Readiness, api: Resource | None = None
) -> Resource:
    root = Resource()
    if api is not None:
        root.putChild(b"v1", api)
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadyResource(readiness))
    return root
