"""
Faults injected for real, shared by the failure suite.

L{requireFaults} is the one place a fault test decides whether it can run: it skips with one
clear reason when it is not root, a tool is missing or network namespaces do not work --
unless C{CTRLGW_REQUIRE_PRIVILEGED=1} (CI), where the same reason fails the test instead.

L{NetworkNamespace} is a namespace of the test's own, joined to the root namespace by a veth
pair; L{NetworkNamespace.blackhole} drops everything in and out of it (nft, or iptables), so
a peer inside vanishes without a FIN or an RST.  L{FreezableProxy} is a userspace TCP proxy
on loopback that can stop forwarding while keeping both sockets open (no root needed).
L{HAProxy} runs a real HAProxy in TCP mode from a config the test writes;
L{spawnGateway} runs a gateway as a real C{twistd} child; L{ReconnectingController} is a
controller that reconnects with jittered backoff and records every answer to its hellos.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.gateways import (
    Frame,
    LineController,
    TwistdProcess,
    freePort,
    gatewayConfigText,
    mergeSections,
    twistdEnvironment,
    waitUntil,
)

REQUIRE_PRIVILEGED = "CTRLGW_REQUIRE_PRIVILEGED"

# --- may this test run? ---

_netnsProbe: str | None | bool = False  # False: not probed yet; None: usable; str: why not


def _run(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def _probeNetns() -> str | None:
    name = "ctrlgw-probe-" + uuid.uuid4().hex[:6]
    try:
        made = _run("ip", "netns", "add", name, check=False)
        if made.returncode != 0:
            return f"network namespaces are not usable here: ip netns add: {made.stderr.strip()}"
        up = _run("ip", "-n", name, "link", "set", "lo", "up", check=False)
        if up.returncode != 0:
            return f"network namespaces are not usable here: {up.stderr.strip()}"
        return None
    finally:
        _run("ip", "netns", "del", name, check=False)


def blackholeTool() -> str | None:
    """
    The firewall tool L{NetworkNamespace.blackhole} uses: C{nft}, else C{iptables}.
    """
    for tool in ("nft", "iptables"):
        if shutil.which(tool):
            return tool
    return None


def faultsUnavailable(root: bool = False, netns: bool = False, tools: Sequence[str] = ()) -> str | None:
    """
    Why a fault test with these needs cannot run here, or C{None} if it can.
    """
    global _netnsProbe
    if (root or netns) and os.geteuid() != 0:
        return "needs root (network namespaces and firewall rules)"
    needed = list(tools)
    if netns:
        needed.append("ip")
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if netns and blackholeTool() is None:
        missing.append("nft or iptables")
    if missing:
        return f"missing {', '.join(missing)} (Debian: apt-get install -y haproxy iptables nftables iproute2)"
    if netns:
        if _netnsProbe is False:
            _netnsProbe = _probeNetns()
        if isinstance(_netnsProbe, str):
            return _netnsProbe
    return None


def requireFaults(
    testCase: TestCase, root: bool = False, netns: bool = False, tools: Sequence[str] = ()
) -> None:
    """
    Skip C{testCase} with one reason if its faults cannot be injected here; with
    C{CTRLGW_REQUIRE_PRIVILEGED=1} fail it with that reason instead.
    """
    reason = faultsUnavailable(root, netns, tools)
    if reason is None:
        return
    if os.environ.get(REQUIRE_PRIVILEGED) == "1":
        testCase.fail(f"{reason}; {REQUIRE_PRIVILEGED}=1 forbids skipping")
    raise SkipTest(reason)


# --- network namespaces ---

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class NetworkNamespace:
    """
    A network namespace of the test's own, joined to the root namespace by a veth pair:
    C{hostAddress} is the root side, C{address} the side inside.  Deleted (with its veth
    and firewall rules) when the test ends.
    """

    def __init__(self, testCase: TestCase) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"ctrlgw-{tag}"
        self.hostIf, self.nsIf = f"cgh{tag}", f"cgn{tag}"
        subnet = random.randrange(0, 1 << 14)
        base = f"10.{200 + (subnet >> 8) % 50}.{subnet & 0xFF}"
        octet = random.randrange(0, 64) * 4
        self.hostAddress, self.address = f"{base}.{octet + 1}", f"{base}.{octet + 2}"
        self.blackholed = False
        testCase.addCleanup(self.destroy)
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.hostIf, "type", "veth", "peer", "name", self.nsIf)
        _run("ip", "link", "set", self.nsIf, "netns", self.name)
        _run("ip", "addr", "add", f"{self.hostAddress}/30", "dev", self.hostIf)
        _run("ip", "link", "set", self.hostIf, "up")
        _run("ip", "-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.nsIf)
        _run("ip", "-n", self.name, "link", "set", self.nsIf, "up")
        _run("ip", "-n", self.name, "link", "set", "lo", "up")

    def destroy(self) -> None:
        _run("ip", "netns", "del", self.name, check=False)
        _run("ip", "link", "del", self.hostIf, check=False)

    def blackhole(self) -> str:
        """
        Drop every packet into and out of the namespace: its sockets stay open but hear
        nothing and say nothing (no FIN, no RST).  Returns the tool used.
        """
        tool = blackholeTool()
        if tool == "nft":
            rules = (
                "table inet ctrlgw_fault {\n"
                " chain in { type filter hook input priority -300; policy drop; }\n"
                " chain out { type filter hook output priority -300; policy drop; }\n"
                "}\n"
            )
            subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=rules,
                           check=True, capture_output=True, text=True, timeout=10)
        elif tool == "iptables":
            for chain in ("INPUT", "OUTPUT"):
                _run("ip", "netns", "exec", self.name, "iptables", "-I", chain, "-j", "DROP")
        else:
            raise RuntimeError("neither nft nor iptables is installed")
        self.blackholed = True
        return tool

    def socket(self) -> socket.socket:
        """
        A TCP socket that lives in this namespace (made with setns on this thread, which
        then returns to its own namespace).
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)

    def connect(self, host: str, port: int, protocol: Protocol) -> None:
        """
        Connect C{protocol} from inside the namespace to C{host}:C{port} (over the veth:
        immediate, so blocking for it is harmless) and hand the socket to the reactor.
        """
        sock = self.socket()
        try:
            sock.settimeout(5)
            sock.connect((host, port))
            sock.setblocking(False)
            reactor.adoptStreamConnection(  # type: ignore[attr-defined]
                sock.fileno(), socket.AF_INET, _OneProtocol(protocol)
            )
        finally:
            sock.close()  # The reactor holds its own duplicate.


class _OneProtocol(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_ = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_


# --- a userspace proxy that can freeze ---

class _ProxyEnd(Protocol):
    def __init__(self, proxy: FreezableProxy) -> None:
        self.proxy = proxy
        self.peer: _ProxyEnd | None = None
        self.pending: list[bytes] = []
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.proxy.ends.add(self)
        if self.proxy.frozen:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.proxy.frozen:
            return  # Frozen: read before the freeze took effect, and swallowed.
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)  # type: ignore[union-attr]

    def pair(self, other: _ProxyEnd) -> None:
        self.peer, other.peer = other, self
        for data in self.pending:
            other.transport.write(data)  # type: ignore[union-attr]
        self.pending = []

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.proxy.ends.discard(self)
        if not self.proxy.frozen and self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
        self.lost.callback(None)


class FreezableProxy:
    """
    A TCP proxy on loopback in front of C{targetPort}.  L{freeze} makes it stop forwarding
    and stop reading both sockets while keeping them open: its kernel still acknowledges
    what the gateway writes, so to the gateway the controller is silent, not gone.
    """

    def __init__(self, testCase: TestCase, targetPort: int, targetHost: str = "127.0.0.1") -> None:
        self.targetHost, self.targetPort = targetHost, targetPort
        self.frozen = False
        self.ends: set[_ProxyEnd] = set()
        proxy = self

        class Front(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                front = _ProxyEnd(proxy)
                back = _ProxyEnd(proxy)
                d = connectProtocol(TCP4ClientEndpoint(reactor, targetHost, targetPort, 5), back)
                d.addCallbacks(lambda _: front.pair(back),
                               lambda _: front.transport.abortConnection())  # type: ignore[union-attr]
                return front

        self.listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Front(), interface="127.0.0.1")  # type: ignore[arg-type]
        self.port: int = self.listening.getHost().port  # type: ignore[attr-defined]
        testCase.addCleanup(self.stop)

    def freeze(self) -> None:
        self.frozen = True
        for end in list(self.ends):
            end.transport.pauseProducing()  # type: ignore[union-attr]

    async def stop(self) -> None:
        await maybeDeferred(self.listening.stopListening)
        ends = list(self.ends)
        for end in ends:
            end.transport.abortConnection()  # type: ignore[union-attr]
        for end in ends:
            await end.lost


# --- HAProxy ---

class HAProxy:
    """
    A real HAProxy in TCP mode on loopback, in front of C{servers} (name → port), with a
    TCP health check on each server's controller port.  C{port} is its frontend.
    """

    def __init__(self, testCase: TestCase, workdir: Path, servers: Mapping[str, int],
                 check: str | Mapping[str, str] = "check inter 200ms fall 1 rise 1",
                 backend: Sequence[str] = ()) -> None:
        """
        @param check: the check options of every server, or of each by name.
        @param backend: more lines for the backend (an HTTP health check, say).
        """
        self.port = freePort()
        self.socketPath = str(workdir / "haproxy.sock")
        lines = [
            "global",
            "    maxconn 4000",
            f"    stats socket {self.socketPath} mode 600 level admin",
            "defaults",
            "    mode tcp",
            "    timeout connect 1s",
            "    timeout client 120s",
            "    timeout server 120s",
            "    retries 3",
            "    option redispatch 1",
            "frontend controllers",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend gateways",
            "backend gateways",
            "    balance roundrobin",
            *(f"    {line}" for line in backend),
            *(
                f"    server {name} 127.0.0.1:{port} "
                + (check if isinstance(check, str) else check[name])
                for name, port in servers.items()
            ),
        ]
        self.configPath = workdir / "haproxy.cfg"
        self.configPath.write_text("\n".join(lines) + "\n")
        self.process = TwistdProcess()
        haproxy = shutil.which("haproxy") or "haproxy"
        self.process.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.process, haproxy, [haproxy, "-db", "-f", str(self.configPath)],
            env=twistdEnvironment(), path=str(workdir),
        )

        async def kill() -> None:
            if not self.process.ended.called:
                self.process.signal(signal.SIGKILL)
                await self.process.ended

        testCase.addCleanup(lambda: Deferred.fromCoroutine(kill()))

    async def command(self, line: str) -> str:
        """
        One command on the admin socket; its whole answer.
        """
        collector = _Collector()
        await connectProtocol(UNIXClientEndpoint(reactor, self.socketPath, 2), collector)
        collector.transport.write(line.encode() + b"\n")  # type: ignore[union-attr]
        await collector.done
        return b"".join(collector.chunks).decode()

    async def serverStates(self) -> dict[str, str]:
        """
        Each server's status as HAProxy sees it (C{UP}, C{DOWN}, ...).
        """
        text = await self.command("show stat")
        header, *rows = [line for line in text.splitlines() if line]
        names = header.lstrip("# ").split(",")
        states = {}
        for row in rows:
            fields = dict(zip(names, row.split(","), strict=False))
            if fields.get("pxname") == "gateways" and fields.get("svname") not in ("BACKEND", None):
                states[fields["svname"]] = fields["status"]
        return states

    async def waitStates(self, expected: Mapping[str, str], timeout: float = 30.0) -> None:
        started = reactor.seconds()  # type: ignore[attr-defined]
        seen: dict[str, str] = {}
        while reactor.seconds() - started < timeout:  # type: ignore[attr-defined]
            if self.process.ended.called:
                raise AssertionError(f"haproxy ended:\n{self.process.text()}")
            try:
                seen = await self.serverStates()
            except (OSError, ConnectionError, ValueError) as e:
                seen = {"error": str(e)}
            except Exception as e:  # Not listening on its admin socket yet.
                seen = {"error": repr(e)}
            if all(seen.get(name, "").startswith(state) for name, state in expected.items()):
                return
            await _sleep(0.05)
        raise AssertionError(f"haproxy servers {seen}, expected {dict(expected)}:\n{self.process.text()}")


class _Collector(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(None)


async def _sleep(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    await d


# --- a gateway as a real twistd process ---

class GatewayProcess:
    """
    One gateway instance run as C{twistd -n ctrlgw}, with a fixed controller port and HTTP
    port so it can be restarted in place.  Killed at the end of the test if still running.
    """

    def __init__(self, testCase: TestCase, workdir: Path, dsn: str, schema: str, instance: str,
                 sections: Mapping[str, Mapping[str, object]] = {}) -> None:
        self.testCase, self.workdir, self.instance = testCase, workdir, instance
        self.port, self.httpPort = freePort(), freePort()
        merged = mergeSections(
            {"listener:main": {"endpoint": f"tcp:{self.port}:interface=127.0.0.1"},
             "http": {"endpoint": f"tcp:{self.httpPort}:interface=127.0.0.1"}},
            sections,
        )
        self.configPath = workdir / f"{instance}.ini"
        self.configPath.write_text(gatewayConfigText(dsn, schema, instance, merged))
        self.child: TwistdProcess | None = None
        self.runs = 0

    async def start(self, timeout: float = 60.0) -> None:
        self.runs += 1
        self.child = TwistdProcess.spawn(
            self.testCase,
            ["-n", "--pidfile=", "--logfile", str(self.workdir / f"{self.instance}.{self.runs}.log"),
             "ctrlgw", "--config", str(self.configPath)],
            str(self.workdir),
        )
        await self.child.waitReady(self.httpPort, timeout)

    async def stop(self, timeout: float = 60.0) -> tuple[int | None, int | None]:
        """
        SIGTERM, as a rolling restart does; the exit status once it has exited.
        """
        assert self.child is not None
        self.child.signal(signal.SIGTERM)
        return await self.child.waitForExit(timeout)

    def log(self) -> str:
        path = self.workdir / f"{self.instance}.{self.runs}.log"
        return path.read_text(errors="replace") if path.exists() else ""


# --- a controller that reconnects ---

class ReconnectingController:
    """
    A controller that stays connected: it says hello, answers pings and acks commands, and
    whenever its connection ends (or cannot be made) it reconnects after a jittered,
    exponentially growing delay (C{minDelay} … C{maxDelay}).  With C{churn=(low, high)} it
    also leaves on its own after a random C{low}-C{high} seconds live, so it keeps
    reconnecting (L{settle} ends that).  It records every answer to its hellos in
    C{answers} and every bye reason in C{byes}.
    """

    def __init__(self, controllerId: str, port: int, host: str = "127.0.0.1",
                 minDelay: float = 0.05, maxDelay: float = 2.0,
                 churn: tuple[float, float] | None = None) -> None:
        self.controllerId, self.port, self.host = controllerId, port, host
        self.minDelay, self.maxDelay = minDelay, maxDelay
        self.churn = churn
        self._leaveCall: IDelayedCall | None = None
        self.answers: list[Frame] = []
        self.byes: list[str] = []
        self.commands: list[str] = []
        self.attempts = 0
        self.connectFailures = 0
        self.closedBeforeAnswer = 0
        self.current: LineController | None = None
        self.live = False
        self._failures = 0
        self._stopped = False
        self._call: IDelayedCall | None = None
        self._connecting: Deferred[Any] | None = None

    def start(self) -> None:
        self._connect()

    def errors(self, code: str | None = None) -> list[Frame]:
        return [a for a in self.answers if a["type"] == "error" and code in (None, a.get("code"))]

    def _connect(self) -> None:
        self._call = None
        if self._stopped:
            return
        self.attempts += 1
        proto = LineController(autoAck=True)
        d = connectProtocol(TCP4ClientEndpoint(reactor, self.host, self.port, timeout=2), proto)
        self._connecting = d
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, proto: LineController) -> None:
        self._connecting = None
        self.current = proto
        answered: list[bool] = []

        def frame(f: Frame) -> None:
            kind = f.get("type")
            if kind == "ping":
                proto.send({"type": "pong", "echo": f["ts"]})
            elif kind in ("welcome", "error") and not answered:
                answered.append(True)
                self.answers.append(f)
                if kind == "welcome":
                    self.live = True
                    self._failures = 0
                    if self.churn is not None:
                        self._leaveCall = reactor.callLater(  # type: ignore[attr-defined]
                            random.uniform(*self.churn), proto.leave)
            elif kind == "bye":
                self.byes.append(f["reason"])
            elif kind == "cmd":
                self.commands.append(f["id"])

        proto.onFrame = frame
        proto.closed.addCallback(lambda _: self._lost(proto, answered))
        if self._stopped:
            proto.close()
            return
        proto.send({"type": "hello", "controller": self.controllerId})

    def _connectFailed(self, failure: Failure) -> None:
        self._connecting = None
        self.connectFailures += 1
        self._schedule()

    def settle(self) -> None:
        """
        Stop churning: stay on the next connection that is welcomed.
        """
        self.churn = None
        if self._leaveCall is not None and self._leaveCall.active():
            self._leaveCall.cancel()

    def _lost(self, proto: LineController, answered: list[bool]) -> None:
        if self._leaveCall is not None and self._leaveCall.active():
            self._leaveCall.cancel()
        if not answered:
            self.closedBeforeAnswer += 1
        self.live = False
        self.current = None
        self._schedule()

    def _schedule(self) -> None:
        if self._stopped:
            return
        self._failures += 1
        delay = min(self.maxDelay, self.minDelay * 2 ** (self._failures - 1))
        self._call = reactor.callLater(  # type: ignore[attr-defined]
            delay * random.uniform(0.5, 1.0), self._connect
        )

    async def stop(self) -> None:
        self._stopped = True
        self.settle()
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self._connecting is not None:
            try:
                await self._connecting
            except Exception:
                pass
        if self.current is not None:
            current = self.current
            current.close()
            await current.closed


def stopAll(controllers: Sequence[ReconnectingController]) -> Deferred[None]:
    async def stop() -> None:
        for controller in controllers:
            await controller.stop()

    return Deferred.fromCoroutine(stop()) if controllers else succeed(None)


def printFigures(scenario: str, **figures: object) -> None:
    """
    Print a test's figures on one line, for docs/reliability.md.
    """
    print(f"\nFIGURES {scenario}: {json.dumps(figures, sort_keys=True)}")


async def waitFor(condition: Any, timeout: float, what: str) -> float:
    return await waitUntil(condition, timeout, 0.01, what=what)


__all__ = [
    "FreezableProxy", "GatewayProcess", "HAProxy", "NetworkNamespace", "REQUIRE_PRIVILEGED",
    "ReconnectingController", "blackholeTool", "faultsUnavailable", "printFigures",
    "requireFaults", "stopAll", "waitFor",
]
