"""
Real gateways and real controllers on loopback, for tests whose claim is about sockets,
the database or several instances.

L{startGateway} runs a L{Gateway} service on the real reactor (or one whose clock is off,
L{SkewedReactor}) against a given PostgreSQL schema and waits until it is ready;
L{TwistdProcess} runs C{twistd -n ctrlgw} as a child process, as an operator would;
L{connectController} and L{connectEndpoint} open a connection speaking JSON lines;
L{LineController} records every frame it gets and lets a test wait for one.  L{waitUntil}
and L{sleep} wait on the real reactor; L{metric} and L{sample} read a gateway's metrics.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IProcessTransport, IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ctrlgw.config import parseConfig
from ctrlgw.service import Gateway
from tests.helpers import iniText

Frame = dict[str, Any]

# Database timeouts for tests that take the database away under a live gateway: a
# connection attempt or a statement to a server that is gone fails within seconds.
QUICK_DATABASE_TIMEOUTS: Mapping[str, Mapping[str, object]] = {
    "database": {"connect_timeout": "1s", "statement_timeout": "3s"},
}


def nowMs() -> int:
    return int(reactor.seconds() * 1000)


async def sleep(seconds: float) -> None:
    """
    Let C{seconds} pass on the real reactor.
    """
    await deferLater(reactor, seconds, lambda: None)


async def waitUntil(
    condition: Callable[[], object], timeout: float = 15.0, interval: float = 0.02,
    what: str | Callable[[], str] = "condition",
) -> float:
    """
    Poll C{condition} until it is true; return the seconds it took.  After C{timeout}
    seconds fail, saying C{what} was awaited (a callable is asked only then, for the state
    at that time).
    """
    started = reactor.seconds()
    while not condition():
        if reactor.seconds() - started > timeout:
            description = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {description}")
        await sleep(interval)
    return reactor.seconds() - started


class SkewedReactor:
    """
    The real reactor, whose clock reads C{skew} seconds off (ahead when positive): the
    reactor of a gateway host whose clock is wrong.  Timers and sockets are the real
    reactor's own.
    """

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def seconds(self) -> float:
        return reactor.seconds() + self.skew

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


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

    def ackedIds(self) -> list[str]:
        """
        The refs of the ack frames received, in order: the ids of the messages the
        gateway has acked.
        """
        return [f["ref"] for f in self.of("ack")]

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

    async def helloAnswer(self, controller: str, timeout: float = 20.0, **extra: object) -> Frame:
        """
        Say hello; return the welcome or the error that answered it (for a test that
        expects a refusal; L{hello} fails unless welcomed).
        """
        seen = len(self.frames)

        def answer() -> Frame | None:
            return next(
                (f for f in self.frames[seen:] if f.get("type") in ("welcome", "error")), None
            )

        self.send({"type": "hello", "controller": controller, **extra})
        await waitUntil(lambda: answer() is not None or self.isClosed, timeout,
                        what=f"an answer to the hello of {controller}")
        found = answer()
        if found is None:
            raise AssertionError(f"closed without an answer to the hello of {controller}")
        return found

    def close(self) -> None:
        """
        Drop the connection at once (abort).
        """
        if not self.isClosed:
            self.transport.abortConnection()

    def leave(self) -> Deferred[None]:
        """
        Close the connection in order; the result fires once it is closed.
        """
        if not self.isClosed:
            self.transport.loseConnection()
        return self.closed


async def connectEndpoint(
    endpoint: IStreamClientEndpoint, autoAck: bool = False
) -> LineController:
    """
    Connect a L{LineController} through C{endpoint} (TLS, say).
    """
    controller = LineController(autoAck)
    await connectProtocol(endpoint, controller)
    return controller


async def connectController(
    port: int, host: str = "127.0.0.1", autoAck: bool = False
) -> LineController:
    return await connectEndpoint(TCP4ClientEndpoint(reactor, host, port), autoAck)


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
    return iniText(mergeSections(base, sections))


def mergeSections(
    *layers: Mapping[str, Mapping[str, object]],
) -> dict[str, dict[str, object]]:
    """
    Merge configuration sections C{{section: {key: value}}}, later layers winning key by key.
    """
    merged: dict[str, dict[str, object]] = {}
    for layer in layers:
        for name, items in layer.items():
            merged.setdefault(name, {}).update(items)
    return merged


async def startGateway(
    testCase: TestCase,
    dsn: str,
    schema: str,
    instance: str,
    sections: Mapping[str, Mapping[str, object]] = {},
    waitReady: bool = True,
    gatewayReactor: Any = None,
) -> Gateway:
    """
    Start a gateway service on the real reactor (or C{gatewayReactor}); it is stopped
    when the test ends.  With C{waitReady}, wait until its readiness checks all pass.
    """
    config = parseConfig(gatewayConfigText(dsn, schema, instance, sections), f"{instance}.ini")
    gateway = Gateway(config, gatewayReactor if gatewayReactor is not None else reactor)
    gateway.service.startService()

    async def stop() -> None:
        # Stopped means stopped: no timer or socket may outlive this (trial checks).
        if gateway.service.running:
            await gateway.service.stopService()

    # After the stop: a failure some Deferred of the gateway left unhandled is reported
    # when the Deferred is collected -- so collect now, in this test, not in a later one.
    testCase.addCleanup(gc.collect)
    testCase.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    if waitReady:
        await waitUntil(
            gateway.readiness.ready, 30,
            what=lambda: f"{instance} ready: {gateway.readiness.evaluate()}",
        )
    return gateway


def listenerPort(gateway: Gateway, name: str = "main") -> int:
    service = gateway.service.getServiceNamed(f"listener:{name}")
    assert service.port is not None, f"listener:{name} not listening"
    return int(service.port.getHost().port)


def httpPort(gateway: Gateway) -> int:
    service = gateway.service.getServiceNamed("http")
    assert service.port is not None, "http not listening"
    return int(service.port.getHost().port)


def metric(gateway: Gateway, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """
    The value of one sample of the gateway's metrics; C{None} if there is no such sample.
    """
    return gateway.metrics.registry.get_sample_value(name, dict(labels or {}))


def sample(gateway: Gateway, name: str, labels: Mapping[str, str] | None = None) -> float:
    """
    Like L{metric}, but 0 for a sample not (yet) there.
    """
    return metric(gateway, name, labels) or 0.0


# --- twistd as a child process ---

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistdEnvironment() -> dict[str, str]:
    """
    The environment for a twistd child: without C{PYTHONPATH}, so that the plugin must
    come from the installed package.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


class TwistdProcess(ProcessProtocol):
    """
    A C{twistd} child process.  C{out} and C{err} collect its standard output and error,
    C{output} both as they came; C{ended} fires with C{(exitCode, signal)}.
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.output = b""
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        self.process: IProcessTransport | None = None

    @classmethod
    def spawn(cls, testCase: TestCase, args: Sequence[str], path: str) -> TwistdProcess:
        """
        Run C{twistd args} in directory C{path}; killed at the end of the test if it is
        still running then.
        """
        child = cls()
        child.process = reactor.spawnProcess(
            child, TWISTD, [TWISTD, *args], env=twistdEnvironment(), path=path
        )

        async def kill() -> None:
            if not child.ended.called:
                child.signal(signal.SIGKILL)
                await child.ended

        testCase.addCleanup(lambda: Deferred.fromCoroutine(kill()))
        return child

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        value: Any = reason.value  # ProcessDone or ProcessTerminated
        self.ended.callback((value.exitCode, value.signal))

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.signalProcess(number)

    async def waitForExit(self, timeout: float = 60.0) -> tuple[int | None, int | None]:
        await waitUntil(lambda: self.ended.called, timeout, 0.05,
                        what=lambda: f"twistd to exit:\n{self.text()}")
        return await self.ended

    async def waitReady(self, httpPort: int, timeout: float = 60.0) -> None:
        """
        Wait until C{/readyz} on C{httpPort} answers 200, as a load balancer would; fail
        with the output if the process ends first.
        """
        from twisted.web.client import Agent, readBody

        agent = Agent(reactor, connectTimeout=5)
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            try:
                response = await agent.request(b"GET", b"http://127.0.0.1:%d/readyz" % httpPort)
                await readBody(response)
                if response.code == 200:
                    return
            except Exception:
                pass  # Not listening yet.
            if self.ended.called:
                raise AssertionError(f"twistd ended before it was ready:\n{self.text()}")
            await sleep(0.1)
        raise AssertionError(f"twistd never ready:\n{self.text()}")
