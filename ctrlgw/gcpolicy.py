"""
Python's cyclic garbage collector on the gateway's own schedule.

A full collection walks every tracked object: with 10,000 connections that is a quarter of
a million objects and a pause of 50-150 ms on this machine type, in which no frame is read
and no command is written.  Left to itself, CPython runs one whenever enough objects have
survived into the oldest generation, so the pauses come with traffic and grow with the
fleet: they are the tail of command latency at fleet scale.

So, as Synapse does: automatic collection is off; the young objects (cheap: only those
allocated since) are collected from a timer once CPython's first threshold is passed; the
oldest generation only every C{full_interval}.  Cyclic garbage that has reached the oldest
generation waits at most that long.  Each pause is measured (C{ctrlgw_gc_seconds}).

Each young collection takes the middle generation too, so whatever survives one tick goes
straight to the oldest.  Left to CPython's schedule, the middle generation holds about a
second of survivors: after 10,000 controllers connect that is 100,000-150,000 objects and a
pause of 70-200 ms, just when the fleet starts to work; one tick's survivors are a few
milliseconds.  Each object is walked once on its way to the oldest generation instead of
twice, and what dies young never gets there: what lives past a tick is almost all
connections, sessions and timers, which live on.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ctrlgw.metrics import Metrics

log = Logger()

# How often the young generations' counts are looked at.
TICK = 0.1


class Collector(Protocol):
    """
    The parts of the C{gc} module used here.
    """

    def enable(self) -> None: ...
    def disable(self) -> None: ...
    def isenabled(self) -> bool: ...
    def collect(self, generation: int = 2) -> int: ...
    def get_count(self) -> tuple[int, int, int]: ...
    def get_threshold(self) -> tuple[int, int, int]: ...


class ScheduledCollection(Service):
    def __init__(
        self,
        clock: IReactorTime,
        metrics: Metrics,
        fullInterval: float,
        collector: Collector = gc,  # type: ignore[assignment]
        timer: Any = time.perf_counter,
    ) -> None:
        self.setName("gc")
        self.clock = clock
        self.metrics = metrics
        self.fullInterval = fullInterval
        self.collector = collector
        self.timer = timer
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._lastFull = 0.0
        self._wasEnabled = True

    def startService(self) -> None:
        super().startService()
        self._wasEnabled = self.collector.isenabled()
        self.collector.disable()
        self._lastFull = self.clock.seconds()
        self._loop.start(TICK, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._wasEnabled:
            self.collector.enable()

    def _tick(self) -> None:
        now = self.clock.seconds()
        if now - self._lastFull >= self.fullInterval:
            self._lastFull = now
            self._collect(2)
            return
        if self.collector.get_count()[0] >= self.collector.get_threshold()[0]:
            self._collect(1)

    def _collect(self, generation: int) -> None:
        started = self.timer()
        found = self.collector.collect(generation)
        seconds = self.timer() - started
        self.metrics.gcSeconds.labels(str(generation)).observe(seconds)
        if generation == 2:
            log.debug("full garbage collection: {found} unreachable, {ms:.1f} ms",
                      found=found, ms=seconds * 1000)
