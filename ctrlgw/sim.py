"""
C{ctrlgw sim}: a fleet of simulated controllers against one or more gateway endpoints.

Each controller says hello, answers pings, acks commands and, when its connection ends,
reconnects with jittered exponential backoff (to the next endpoint in its list, as a device
behind a multiplexer would).  One pacer sends C{msg} frames at the requested rate over the
connected controllers, so the simulator's own work grows with the rate, never with the size
of the fleet.  It can skew the controllers' clocks, repeat message ids and abort a share of
the fleet at intervals (a reconnect storm).

Frames are built with the project's own encoder and framings (L{ctrlgw.protocol.messages},
L{ctrlgw.framing}); the gateway's frames are read as plain JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import resource
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from ctrlgw.clock import wallMillis
from ctrlgw.framing import FramingError, IFraming, findFraming
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.writethrough import writeNow

# Messages waiting for their ack, per controller: past this, the oldest is forgotten
# (counted as unanswered) so a gateway that never acks cannot grow the simulator.
_MAX_PENDING = 10_000
# The pacer's tick: messages due in one tick go out together.
_TICK = 0.01
# Dials per reactor turn when the fleet connects at once (see _dialSlice).
_DIAL_SLICE = 200
# How long the end of a run waits for the acks of the last messages.
_DRAIN = 2.0


@dataclass
class SimOptions:
    endpoints: list[tuple[str, int]]
    controllers: int = 100
    prefix: str = "sim-"
    rate: float = 0.0  # msg frames per second, over the whole fleet
    duration: float = 10.0
    framing: str = "lines"
    dialect: str = "v1"  # or teltonika, gt06 (ctrlgw.simtrackers), ocpp1.6 (ctrlgw.simocpp)
    maxFrame: int = 1024 * 1024
    token: str | None = None
    connectRate: float = 0.0  # new connections per second at start; 0: all at once
    skew: float = 0.0  # seconds added to every ts the controllers send
    duplicates: float = 0.0  # share of msgs that repeat an earlier id
    stormEvery: float = 0.0  # abort a share of the fleet every so many seconds
    stormShare: float = 0.1
    backoffMin: float = 0.5
    backoffMax: float = 30.0
    ack: bool = True
    bodyBytes: int = 16
    window: int = 0  # msgs a controller leaves unacked at most (0: no limit, open loop)


@dataclass
class Stats:
    """
    Counters and raw latencies (milliseconds) of one simulator process.
    """

    connected: int = 0
    connects: int = 0
    welcomes: int = 0
    msgs: int = 0
    acks: int = 0
    cmds: int = 0
    errors: int = 0
    disconnects: int = 0
    unanswered: int = 0
    errorCodes: dict[str, int] = field(default_factory=dict)
    welcomeMs: list[float] = field(default_factory=list)
    ackMs: list[float] = field(default_factory=list)
    cmdMs: list[float] = field(default_factory=list)
    # (command id, wall-clock ms when its cmd frame was read): to join with the sender's
    # own records, as make bench does with the time each send() returned.
    cmdReads: list[tuple[str, float]] = field(default_factory=list)

    def counters(self) -> dict[str, int]:
        return {
            "connected": self.connected, "connects": self.connects, "welcomes": self.welcomes,
            "msgs": self.msgs, "acks": self.acks, "cmds": self.cmds, "errors": self.errors,
            "disconnects": self.disconnects, "unanswered": self.unanswered,
        }

    def latencies(self) -> dict[str, list[float]]:
        return {"welcome_ms": self.welcomeMs, "msg_ack_ms": self.ackMs, "cmd_ms": self.cmdMs}

    def records(self) -> dict[str, Any]:
        """
        Every raw sample: the latencies and the commands' read times.
        """
        return {**self.latencies(), "cmd_reads": self.cmdReads}


def percentile(values: Sequence[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


class SimController(Protocol):
    """
    One simulated controller on one connection.
    """

    def __init__(self, fleet: Fleet, controller: str) -> None:
        self.fleet = fleet
        self.controller = controller
        self.framing: IFraming = fleet.makeFraming()
        self.live = False
        # In the fleet's queue of controllers below their window (closed loop only).
        self.queued = False
        self._helloAt = 0.0
        self._pending: dict[str, float] = {}
        self._order: deque[str] = deque()

    # --- writing ---

    def now(self) -> float:
        return self.fleet.reactor.seconds()

    def send(self, kind: str, **fields: Any) -> None:
        ts = wallMillis(self.fleet.reactor) + int(self.fleet.options.skew * 1000)
        assert self.transport is not None
        writeNow(self.transport, self.framing.frame(v1.encode(kind, ts, **fields)))

    def connectionMade(self) -> None:
        self.fleet.stats.connects += 1
        self._helloAt = self.now()
        hello: dict[str, Any] = {"controller": self.controller}
        if self.fleet.options.token is not None:
            hello["token"] = self.fleet.options.token
        self.send("hello", **hello)

    def sendMsg(self, messageId: str, body: object) -> None:
        self._pending[messageId] = self.now()
        self._order.append(messageId)
        if len(self._order) > _MAX_PENDING:
            forgotten = self._order.popleft()
            if self._pending.pop(forgotten, None) is not None:
                self.fleet.stats.unanswered += 1
        self.send("msg", id=messageId, body=body)
        self.fleet.stats.msgs += 1

    # --- reading ---

    def dataReceived(self, data: bytes) -> None:
        try:
            payloads = self.framing.feed(data)
        except FramingError as e:
            self.fleet.countError(e.code)
            _abort(self)
            return
        for payload in payloads:
            try:
                frame = v1.loadJSON(payload)
            except ValueError:
                self.fleet.countError("unreadable_frame")
                continue
            self.frameReceived(frame)

    def frameReceived(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        stats = self.fleet.stats
        if kind == "welcome":
            self.live = True
            stats.welcomes += 1
            stats.welcomeMs.append((self.now() - self._helloAt) * 1000)
            self.fleet.welcomed(self)
        elif kind == "ack":
            sentAt = self._pending.pop(str(frame.get("ref")), None)
            if sentAt is not None:
                stats.acks += 1
                stats.ackMs.append((self.now() - sentAt) * 1000)
                self.fleet.offerRoom(self)
        elif kind == "ping":
            self.send("pong", echo=frame.get("ts"))
        elif kind == "cmd":
            stats.cmds += 1
            stats.cmdMs.append(self.fleet.commandLatencyMs(frame))
            stats.cmdReads.append((str(frame.get("id")), self.now() * 1000))
            if self.fleet.options.ack:
                self.send("ack", ref=frame.get("id"))
        elif kind == "error":
            self.fleet.countError(str(frame.get("code")))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.fleet.lost(self)


class _Given(Factory):
    """
    A factory for one connection that builds the protocol it was given: what
    C{connectProtocol} does, without the class it defines on every call (a third of this
    process's time in a connect storm) or a log line for every start and stop.
    """

    noisy = False

    def __init__(self, given: Protocol) -> None:
        self.given = given

    def buildProtocol(self, addr: object) -> Protocol:
        return self.given


class Fleet:
    """
    N simulated controllers, their pacer, their reconnects and their statistics.
    """

    def __init__(
        self,
        reactor: Any,
        options: SimOptions,
        rng: random.Random | None = None,
        connect: Callable[[tuple[str, int], SimController], Deferred[Any]] | None = None,
        freeze: Callable[[], None] = gc.freeze,
    ) -> None:
        self.reactor = reactor
        self._freeze = freeze
        self.options = options
        self.rng = rng if rng is not None else random.Random()
        self.stats = Stats()
        self.makeFraming = findFraming(options.framing).configure(options.maxFrame, {})
        self._connect = connect if connect is not None else self._connectTcp
        self._backoff = backoffPolicy(
            initialDelay=options.backoffMin, maxDelay=options.backoffMax, jitter=self.rng.random
        )
        self._live: list[SimController] = []
        self._liveIndex: dict[str, int] = {}
        self._frozen = False
        self._failures: dict[str, int] = {}
        self._endpoint: dict[str, int] = {}
        self._timers: dict[str, IDelayedCall] = {}
        # Controllers still to dial at start when connecting at once, and the next slice.
        self._undialled: deque[str] = deque()
        self._sliceCall: IDelayedCall | None = None
        self._connections: dict[str, SimController] = {}
        self._next = 0
        # Closed loop (a window): the live controllers below it, in the order they got
        # room, so finding one costs O(1) however many are at their window.
        self._withRoom: deque[SimController] = deque()
        self._sequence = 0
        self._credit = 0.0
        self._recentIds: deque[tuple[SimController, str]] = deque(maxlen=1000)
        self._pacer: LoopingCall | None = None
        self._storm: LoopingCall | None = None
        self._stopping = False
        self._body = "x" * max(0, options.bodyBytes)

    def controllers(self) -> list[str]:
        width = len(str(self.options.controllers - 1))
        if self.options.dialect in ("teltonika", "gt06"):
            from ctrlgw.simtrackers import imeiFor

            return [imeiFor(self.options.prefix, i) for i in range(self.options.controllers)]
        return [f"{self.options.prefix}{i:0{width}d}" for i in range(self.options.controllers)]

    # --- connecting ---

    def start(self) -> None:
        names = self.controllers()
        for i, name in enumerate(names):
            self._endpoint[name] = i % len(self.options.endpoints)
            if self.options.connectRate > 0:
                self._timers[name] = self.reactor.callLater(i / self.options.connectRate, self._dial, name)
        if self.options.connectRate <= 0:
            self._undialled.extend(names)
            self._dialSlice()
        if self.options.rate > 0:
            # withCount: ticks the reactor was too busy to run still count, so the rate
            # holds under load.
            self._pacer = LoopingCall.withCount(self._pace)
            self._pacer.clock = self.reactor
            self._pacer.start(_TICK, now=False)
        if self.options.stormEvery > 0:
            self._storm = LoopingCall(self.storm)
            self._storm.clock = self.reactor
            self._storm.start(self.options.stormEvery, now=False)

    def _connectTcp(self, endpoint: tuple[str, int], protocol: SimController) -> Deferred[Any]:
        host, port = endpoint
        return TCP4ClientEndpoint(self.reactor, host, port, timeout=10).connect(_Given(protocol))

    def _dialSlice(self) -> None:
        # "All at once" as a fleet does it: every socket's connect() runs in the reactor
        # turn after the one that made it, so 15,000 dials made in one turn would reach
        # the gateway only after all 15,000 were built (seconds of this process's time
        # during which the gateway sees nothing).  A slice per turn starts connecting at
        # once.
        self._sliceCall = None
        for _ in range(min(_DIAL_SLICE, len(self._undialled))):
            self._dial(self._undialled.popleft())
        # What was dialled lives on: out of the collector's way as it is made.  Left in,
        # the heap grows by a quarter again and again while the fleet connects, and each
        # time CPython walks all of it: the benchmark process running a storm of 15,000
        # spent 920 ms in collections (681 ms of them full ones), and 177-205 ms with
        # each slice frozen as it is made.
        self._freeze()
        if self._undialled:
            self._sliceCall = self.reactor.callLater(0, self._dialSlice)

    def _dial(self, name: str) -> None:
        self._timers.pop(name, None)
        if self._stopping:
            return
        protocol: Any = SimController(self, name)
        if self.options.dialect == "ocpp1.6":
            from ctrlgw.simocpp import ChargePointSim

            protocol = ChargePointSim(self, name)
        elif self.options.dialect != "v1":
            from ctrlgw.simtrackers import trackerFor

            protocol = trackerFor(self, name)
        self._connections[name] = protocol
        endpoint = self.options.endpoints[self._endpoint[name]]
        d = self._connect(endpoint, protocol)
        d.addErrback(lambda f: self._dialFailed(name, f))

    def _dialFailed(self, name: str, failure: Failure) -> None:
        self.countError("connect_failed")
        self._connections.pop(name, None)
        self._retry(name)

    def _retry(self, name: str) -> None:
        if self._stopping or name in self._timers:
            return
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        # Like a device behind a multiplexer: the next attempt goes to the next endpoint.
        self._endpoint[name] = (self._endpoint[name] + 1) % len(self.options.endpoints)
        self._timers[name] = self.reactor.callLater(self._backoff(failures), self._dial, name)

    def welcomed(self, protocol: SimController) -> None:
        self._failures.pop(protocol.controller, None)
        self._liveIndex[protocol.controller] = len(self._live)
        self._live.append(protocol)
        self.offerRoom(protocol)
        self.stats.connected = len(self._live)
        if not self._frozen and self.stats.connected == self.options.controllers:
            # The whole fleet is up: its objects out of the collector's way.  A full
            # collection walks every tracked object, a pause that grows with the fleet and
            # would be measured as the gateway's latency.  (Objects made after this are
            # collected as usual.)
            self._frozen = True
            self._freeze()

    def lost(self, protocol: SimController) -> None:
        self.stats.disconnects += 1
        if self._connections.get(protocol.controller) is protocol:
            del self._connections[protocol.controller]
        index = self._liveIndex.pop(protocol.controller, None)
        if index is not None and protocol.live:
            # Swap-remove: O(1), the pacer's list stays dense.
            last = self._live.pop()
            if last is not protocol:
                self._live[index] = last
                self._liveIndex[last.controller] = index
        self.stats.unanswered += len(protocol._pending)
        protocol._pending.clear()
        self.stats.connected = len(self._live)
        self._retry(protocol.controller)

    # --- load ---

    def _pace(self, ticks: int) -> None:
        self._credit += self.options.rate * _TICK * ticks
        due = int(self._credit)
        self._credit -= due
        if not self._live:
            return
        for _ in range(due):
            repeat = self._recentIds and self.rng.random() < self.options.duplicates
            if repeat:
                protocol, messageId = self.rng.choice(self._recentIds)
                if not protocol.live or protocol.transport is None:
                    continue
            else:
                withRoom = self._nextWithRoom()
                if withRoom is None:
                    # Every controller is at its window: the offer waits for acks (closed
                    # loop), as devices that cap what they leave unacked do.
                    self._credit = 0.0
                    return
                protocol = withRoom
                self._sequence += 1
                messageId = f"m{self._sequence}"
                self._recentIds.append((protocol, messageId))
            protocol.sendMsg(messageId, {"seq": self._sequence, "pad": self._body})
            self.offerRoom(protocol)

    def offerRoom(self, protocol: SimController) -> None:
        """
        Queue a live controller that is below its window (to the back: round robin).
        """
        window = self.options.window
        if (window > 0 and not protocol.queued and protocol.live
                and len(protocol._pending) < window):
            protocol.queued = True
            self._withRoom.append(protocol)

    def _nextWithRoom(self) -> SimController | None:
        if self.options.window > 0:
            while self._withRoom:
                protocol = self._withRoom.popleft()
                protocol.queued = False
                # Gone since it was queued: a new connection for the id queues itself.
                if self._connections.get(protocol.controller) is protocol:
                    return protocol
            return None
        protocol = self._live[self._next % len(self._live)]
        self._next += 1
        return protocol

    def storm(self) -> None:
        """
        Abort a share of the connected fleet at once: they all come back with backoff.
        """
        victims = self.rng.sample(self._live, int(len(self._live) * self.options.stormShare))
        for protocol in victims:
            _abort(protocol)

    def commandLatencyMs(self, frame: dict[str, Any]) -> float:
        """
        Enqueue to read, when the body says when it was sent (C{"sent_ms"}, as C{make
        bench} sends), else gateway write to read.
        """
        now = self.reactor.seconds() * 1000
        body = frame.get("body")
        if isinstance(body, dict) and isinstance(body.get("sent_ms"), int | float):
            return now - body["sent_ms"]
        ts = frame.get("ts")
        return now - ts if isinstance(ts, int | float) else 0.0

    def countError(self, code: str) -> None:
        self.stats.errors += 1
        self.stats.errorCodes[code] = self.stats.errorCodes.get(code, 0) + 1

    def stopSending(self) -> None:
        for loop in (self._pacer, self._storm):
            if loop is not None and loop.running:
                loop.stop()

    def awaitingAcks(self) -> int:
        return sum(len(p._pending) for p in self._live)

    def stop(self) -> None:
        self._stopping = True
        self.stopSending()
        self._undialled.clear()
        if self._sliceCall is not None and self._sliceCall.active():
            self._sliceCall.cancel()
        self._sliceCall = None
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for protocol in list(self._connections.values()):
            if protocol.transport is not None:
                protocol.transport.loseConnection()


def _abort(protocol: Protocol) -> None:
    if protocol.transport is not None:
        cast(ITCPTransport, protocol.transport).abortConnection()


def raiseFileLimit() -> int:
    """
    Raise this process's soft open-file limit to its hard limit; returns the new limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def summary(stats: Stats, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = dict(stats.counters())
    out["seconds"] = round(seconds, 3)
    out["msgs_per_s"] = round(stats.acks / seconds, 1) if seconds > 0 else 0.0
    out["error_codes"] = dict(stats.errorCodes)
    for name, values in stats.latencies().items():
        out[name] = {
            "count": len(values),
            "p50": percentile(values, 0.50),
            "p99": percentile(values, 0.99),
            "max": max(values) if values else None,
        }
    return out


def progressLine(previous: dict[str, int], current: dict[str, int], seconds: float) -> str:
    def rate(name: str) -> float:
        return (current[name] - previous[name]) / seconds if seconds > 0 else 0.0

    return (
        f"connected {current['connected']}  msgs/s {rate('msgs'):.0f}  acks/s {rate('acks'):.0f}"
        f"  cmds/s {rate('cmds'):.0f}  errors {current['errors']}"
    )


async def runSim(
    reactor: Any, options: SimOptions, report: Callable[[Stats, float], object]
) -> Stats:
    """
    Run the fleet for C{options.duration} seconds, calling C{report(stats, elapsed)} each
    second.
    """
    raiseFileLimit()
    fleet = Fleet(reactor, options)
    started = reactor.seconds()
    fleet.start()
    ticker = LoopingCall(lambda: report(fleet.stats, reactor.seconds() - started))
    ticker.clock = reactor
    ticker.start(1.0, now=False)
    await deferLater(reactor, options.duration, lambda: None)
    # Stop sending, give the acks in flight a moment (bounded), then hang up.
    fleet.stopSending()
    for _ in range(int(_DRAIN / _TICK)):
        if not fleet.awaitingAcks():
            break
        await deferLater(reactor, _TICK, lambda: None)
    ticker.stop()
    fleet.stop()
    # Let the closes go out before the summary.
    await deferLater(reactor, 0.2, lambda: None)
    return fleet.stats


class ProgressPrinter:
    """
    Prints one progress line a second from running counters (a terminal gets it redrawn
    in place).
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._previous: dict[str, int] | None = None
        self._previousAt = 0.0

    def __call__(self, counters: dict[str, int], elapsed: float) -> None:
        previous = self._previous or {name: 0 for name in counters}
        line = progressLine(previous, counters, elapsed - self._previousAt)
        self.stream.write(f"\r{line}   " if self.tty else f"{line}\n")
        self.stream.flush()
        self._previous, self._previousAt = dict(counters), elapsed

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class _Worker(ProcessProtocol):
    """
    One C{ctrlgw sim --worker} child: its JSON lines on standard output.
    """

    def __init__(self, onTick: Callable[[int, dict[str, int]], object], index: int) -> None:
        self.onTick = onTick
        self.index = index
        self.final: dict[str, Any] | None = None
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            report = json.loads(line)
            if "tick" in report:
                self.onTick(self.index, report["tick"])
            elif "final" in report:
                self.final = report["final"]

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


async def runWorkers(
    reactor: Any, workerArgv: Callable[[int], list[str]], count: int, progress: ProgressPrinter
) -> Stats:
    """
    Run C{count} simulator processes and add up what they report.
    """
    ticks: dict[int, dict[str, int]] = {}
    started = reactor.seconds()

    def onTick(index: int, counters: dict[str, int]) -> None:
        ticks[index] = counters
        if len(ticks) == count and index == count - 1:
            total = {name: sum(t.get(name, 0) for t in ticks.values()) for name in counters}
            progress(total, reactor.seconds() - started)

    workers = []
    for index in range(count):
        worker = _Worker(onTick, index)
        argv = [sys.executable, "-c", "from ctrlgw.cli import main; main()", *workerArgv(index)]
        reactor.spawnProcess(worker, sys.executable, argv, env=None)
        workers.append(worker)
    for worker in workers:
        await worker.ended
    total = Stats()
    for worker in workers:
        if worker.final is None:
            total.errors += 1
            total.errorCodes["worker_failed"] = total.errorCodes.get("worker_failed", 0) + 1
            continue
        for name, value in worker.final["counters"].items():
            if name != "connected":
                setattr(total, name, getattr(total, name) + value)
        for code, n in worker.final["error_codes"].items():
            total.errorCodes[code] = total.errorCodes.get(code, 0) + n
        total.welcomeMs += worker.final["welcome_ms"]
        total.ackMs += worker.final["msg_ack_ms"]
        total.cmdMs += worker.final["cmd_ms"]
        total.cmdReads += [(i, t) for i, t in worker.final["cmd_reads"]]
    return total


def addArguments(parser: Any) -> None:
    """
    The C{ctrlgw sim} options, on an argparse parser.
    """
    parser.add_argument("endpoints", metavar="HOST:PORT", nargs="*", default=["127.0.0.1:7000"],
                        help="gateway endpoints; controllers are spread over them and move to the"
                        " next one when they reconnect (default 127.0.0.1:7000)")
    parser.add_argument("-n", "--controllers", type=int, default=100, help="fleet size (100)")
    parser.add_argument("--prefix", default="sim-", help="controller id prefix (sim-)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="msg frames per second over the whole fleet (0: none)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to run (10)")
    parser.add_argument("--framing", default="lines", help="the listener's framing (lines)")
    parser.add_argument("--dialect", default="v1", choices=("v1", "teltonika", "gt06", "ocpp1.6"),
                        help="the listener's dialect (v1); ocpp1.6 simulates charge points (MeterValues per msg); teltonika and gt06 simulate GPS"
                        " trackers with 15-digit IMEIs as ids, one position per msg")
    parser.add_argument("--max-frame", type=int, default=1024 * 1024, dest="maxFrame")
    parser.add_argument("--token", default=None, help="token sent in every hello")
    parser.add_argument("--connect-rate", type=float, default=0.0, dest="connectRate",
                        help="new connections per second at start (0: all at once)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="seconds added to every ts the controllers send")
    parser.add_argument("--duplicates", type=float, default=0.0,
                        help="share of msgs that repeat a recent id (0-1)")
    parser.add_argument("--storm-every", type=float, default=0.0, dest="stormEvery",
                        help="abort --storm-share of the fleet every so many seconds")
    parser.add_argument("--storm-share", type=float, default=0.1, dest="stormShare")
    parser.add_argument("--backoff-min", type=float, default=0.5, dest="backoffMin")
    parser.add_argument("--backoff-max", type=float, default=30.0, dest="backoffMax")
    parser.add_argument("--no-ack", dest="ack", action="store_false", help="never ack commands")
    parser.add_argument("--body-bytes", type=int, default=16, dest="bodyBytes",
                        help="padding in each msg body (16)")
    parser.add_argument("--window", type=int, default=0,
                        help="msgs a controller leaves unacked at most; the pacer skips it"
                        " until acks come (0: no limit, an open-loop offer)")
    parser.add_argument("--procs", type=int, default=1,
                        help="simulator processes (each gets its share of the fleet and rate)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="write the summary and raw latencies (ms) to FILE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def optionsFrom(args: Any) -> SimOptions:
    endpoints = []
    for text in args.endpoints:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        endpoints.append((host, int(port)))
    if args.controllers < 1 or args.procs < 1 or args.duration <= 0:
        raise ValueError("--controllers, --procs and --duration must be positive")
    if not 0 <= args.duplicates <= 1 or not 0 <= args.stormShare <= 1:
        raise ValueError("--duplicates and --storm-share are shares from 0 to 1")
    findFraming(args.framing)  # refuses an unknown framing now, not per connection
    return SimOptions(
        endpoints=endpoints, controllers=args.controllers, prefix=args.prefix,
        rate=args.rate, duration=args.duration, framing=args.framing, maxFrame=args.maxFrame,
        dialect=args.dialect,
        token=args.token, connectRate=args.connectRate, skew=args.skew,
        duplicates=args.duplicates, stormEvery=args.stormEvery, stormShare=args.stormShare,
        backoffMin=args.backoffMin, backoffMax=args.backoffMax, ack=args.ack,
        bodyBytes=args.bodyBytes, window=args.window,
    )


def _workerArgv(args: Any, index: int) -> list[str]:
    """
    The command line of worker C{index} of C{args.procs}: its share of the fleet and rate,
    its own id prefix.
    """
    share = args.controllers // args.procs + (1 if index < args.controllers % args.procs else 0)
    argv = ["sim", *args.endpoints, "--worker", "--controllers", str(share),
            "--prefix", f"{args.prefix}{index}-", "--rate", str(args.rate / args.procs)]
    for flag, value in (
        ("--duration", args.duration), ("--framing", args.framing), ("--dialect", args.dialect),
        ("--max-frame", args.maxFrame), ("--connect-rate", args.connectRate / args.procs),
        ("--skew", args.skew), ("--duplicates", args.duplicates),
        ("--storm-every", args.stormEvery), ("--storm-share", args.stormShare),
        ("--backoff-min", args.backoffMin), ("--backoff-max", args.backoffMax),
        ("--body-bytes", args.bodyBytes), ("--window", args.window),
    ):
        argv += [flag, str(value)]
    if args.token is not None:
        argv += ["--token", args.token]
    if not args.ack:
        argv.append("--no-ack")
    return argv


async def simCommand(reactor: Any, args: Any, out: TextIO, err: TextIO) -> int:
    """
    C{ctrlgw sim}: run, print progress on C{err} and the summary (JSON) on C{out}.
    """
    try:
        options = optionsFrom(args)
    except (ValueError, KeyError) as e:
        err.write(f"ctrlgw: sim: {e}\n")
        return 2
    if args.worker:
        def tick(stats: Stats, elapsed: float) -> None:
            out.write(json.dumps({"tick": stats.counters()}) + "\n")
            out.flush()

        stats = await runSim(reactor, options, tick)
        final = summary(stats, options.duration)
        final.update({"counters": stats.counters(), **stats.records()})
        out.write(json.dumps({"final": final}) + "\n")
        return 0
    progress = ProgressPrinter(err)
    if args.procs > 1:
        stats = await runWorkers(reactor, lambda i: _workerArgv(args, i), args.procs, progress)
    else:
        stats = await runSim(reactor, options, lambda s, elapsed: progress(s.counters(), elapsed))
    progress.finish()
    result = summary(stats, options.duration)
    out.write(json.dumps(result, indent=2) + "\n")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"summary": result, **stats.records()}, f)
    return 0
