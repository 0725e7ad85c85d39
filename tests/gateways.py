"""
Real gateways and real controllers on loopback, for tests whose claim is about sockets,
the database or several instances.

L{startGateway} runs a L{Gateway} service on the real reactor against a given PostgreSQL
schema and waits until it is ready; L{connectController} opens a TCP connection speaking
JSON lines; L{LineController} records every frame it gets and lets a test wait for one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ctrlgw.config import parseConfig
from ctrlgw.service import Gateway
from tests.helpers import iniText

Frame = dict[str, Any]


def nowMs() -> int:
    return int(reactor.seconds() * 1000)


async def waitUntil(
    condition: Callable[[], object], timeout: float = 15.0, interval: float = 0.02,
    what: str = "condition",
) -> float:
    """
    Poll C{condition} until it is true; return the seconds it took.
    """
    started = reactor.seconds()
    while not condition():
        if reactor.seconds() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)
    return reactor.seconds() - started


class LineController(Protocol):
    """
    A controller speaking protocol v1 over the lines framing.

    With C{autoAck}, every C{cmd} frame is acked as soon as it arrives.  C{receivedAt}
    holds, for each frame in C{frames}, the reactor clock (seconds) when it arrived;
    C{onFrame}, if set, is called with each frame as it arrives.
    """

    def __init__(self, autoAck: bool = False) -> None:
        self.frames: list[Frame] = []
        self.receivedAt: list[float] = []
        self.onFrame: Callable[[Frame], object] | None = None
        self.closed: Deferred[None] = Deferred()
        self.isClosed = False
        self.autoAck = autoAck
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            frame = json.loads(line)
            self.frames.append(frame)
            self.receivedAt.append(reactor.seconds())
            if self.onFrame is not None:
                self.onFrame(frame)
            if self.autoAck and frame.get("type") == "cmd" and not self.isClosed:
                self.send({"type": "ack", "ref": frame["id"]})

    def commandIds(self) -> list[str]:
        """
        The ids of the cmd frames received, in order (a re-sent id appears again).
        """
        return [f["id"] for f in self.of("cmd")]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.isClosed = True
        self.closed.callback(None)

    def send(self, frame: Frame) -> None:
        frame = dict(frame)
        frame.setdefault("ts", nowMs())
        self.transport.write(json.dumps(frame).encode() + b"\n")

    def of(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if f.get("type") == kind]

    async def waitFor(
        self, kind: str, timeout: float = 15.0, **fields: object
    ) -> Frame:
        def match() -> Frame | None:
            for frame in self.frames:
                if frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items()):
                    return frame
            return None

        await waitUntil(lambda: match() is not None or self.isClosed and match() is None and False,
                        timeout, what=f"a {kind} frame {fields or ''}")
        found = match()
        assert found is not None
        return found

    async def hello(self, controller: str, **extra: object) -> Frame:
        self.send({"type": "hello", "controller": controller, **extra})
        await waitUntil(lambda: self.of("welcome") or self.of("error") or self.isClosed,
                        what=f"welcome for {controller}")
        if not self.of("welcome"):
            raise AssertionError(f"no welcome for {controller}: {self.frames}")
        return self.of("welcome")[-1]

    def close(self) -> None:
        if not self.isClosed:
            self.transport.abortConnection()


async def connectController(
    port: int, host: str = "127.0.0.1", autoAck: bool = False
) -> LineController:
    controller = LineController(autoAck)
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port), controller)
    return controller


def gatewayConfigText(
    dsn: str, schema: str, instance: str, sections: Mapping[str, Mapping[str, object]] = {}
) -> str:
    base: dict[str, dict[str, object]] = {
        "gateway": {"instance_id": instance},
        "listener:main": {"endpoint": "tcp:0:interface=127.0.0.1"},
        "http": {"endpoint": "tcp:0:interface=127.0.0.1"},
        "database": {"dsn": dsn, "schema": schema, "reconnect_max_delay": "500ms", "pool_size": 2},
        "inbox": {"flush_interval": "2ms"},
        "liveness": {"close_grace": "200ms"},
        "cluster": {"heartbeat_interval": "1s", "instance_ttl": "5s", "reconcile_interval": "1s"},
        "timestamps": {"clock_check_interval": "5s"},
    }
    for name, items in sections.items():
        base.setdefault(name, {}).update(items)
    return iniText(base)


async def startGateway(
    testCase: TestCase,
    dsn: str,
    schema: str,
    instance: str,
    sections: Mapping[str, Mapping[str, object]] = {},
    waitReady: bool = True,
) -> Gateway:
    """
    Start a gateway service on the real reactor; it is stopped when the test ends.
    """
    config = parseConfig(gatewayConfigText(dsn, schema, instance, sections), f"{instance}.ini")
    gateway = Gateway(config, reactor)
    gateway.service.startService()

    async def stop() -> None:
        if gateway.service.running:
            await gateway.service.stopService()

    testCase.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    if waitReady:
        await waitUntil(gateway.readiness.ready, 30, what=f"{instance} ready")
    return gateway


def listenerPort(gateway: Gateway, name: str = "main") -> int:
    service = gateway.service.getServiceNamed(f"listener:{name}")
    assert service.port is not None
    return int(service.port.getHost().port)


def httpPort(gateway: Gateway) -> int:
    service = gateway.service.getServiceNamed("http")
    assert service.port is not None
    return int(service.port.getHost().port)
