"""
Tests for L{ctrlgw.gcpolicy}: the collector on the gateway's schedule, on a L{task.Clock}
and a recording stand-in for the C{gc} module.
"""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.gcpolicy import TICK, ScheduledCollection
from ctrlgw.metrics import Metrics


class RecordingCollector:
    def __init__(self) -> None:
        self.enabled = True
        self.count = [0, 0, 0]
        self.threshold = (700, 10, 10)
        self.collected: list[int] = []

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def isenabled(self) -> bool:
        return self.enabled

    def collect(self, generation: int = 2) -> int:
        self.collected.append(generation)
        # As CPython: collecting a generation empties it and the younger ones, and counts
        # one collection of the next.
        for younger in range(generation + 1):
            self.count[younger] = 0
        if generation < 2:
            self.count[generation + 1] += 1
        return 0

    def get_count(self) -> tuple[int, int, int]:
        return (self.count[0], self.count[1], self.count[2])

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold


class ScheduledCollectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.collector = RecordingCollector()
        self.metrics = Metrics(CollectorRegistry())
        self.service = ScheduledCollection(self.clock, self.metrics, 600.0, self.collector)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def test_automaticCollectionOffWhileRunning(self) -> None:
        self.assertFalse(self.collector.enabled)
        self.service.stopService()
        self.assertTrue(self.collector.enabled, "given back as it was found")

    def test_youngGenerationsByThreshold(self) -> None:
        """
        Once the first threshold is passed, a tick collects both young generations: what
        survives one tick goes to the oldest, so the middle never piles up.
        """
        self.clock.advance(TICK)
        self.assertEqual(self.collector.collected, [], "nothing allocated: nothing collected")
        self.collector.count[0] = 699
        self.clock.advance(TICK)
        self.assertEqual(self.collector.collected, [], "under the threshold")
        for _ in range(3):
            self.collector.count[0] = 700
            self.clock.advance(TICK)
        self.assertEqual(self.collector.collected, [1, 1, 1])
        self.assertEqual(self.collector.count[1], 0, "the middle generation is left empty")

    def test_fullOnlyEveryInterval(self) -> None:
        """
        However many survivors pile up, the oldest generation is collected only every
        full_interval: the long pause comes at a known rate, not with the traffic.
        """
        for _ in range(int(599 / TICK)):
            self.collector.count[0] = 10_000
            self.collector.count[1] = 10_000
            self.collector.count[2] = 10_000
            self.clock.advance(TICK)
        self.assertNotIn(2, self.collector.collected)
        self.clock.advance(1.2)
        self.assertEqual(self.collector.collected.count(2), 1)
        samples = {s.labels["generation"]: s.value for m in self.metrics.registry.collect()
                   for s in m.samples if s.name == "ctrlgw_gc_seconds_count"}
        self.assertEqual(samples["2"], 1)
        self.assertGreater(samples["1"], 0)

    def test_realCollector(self) -> None:
        """
        Against the real gc module: disabled while it runs, collections still happen.
        """
        clock = Clock()
        service = ScheduledCollection(clock, Metrics(CollectorRegistry()), 1.0)
        wasEnabled = gc.isenabled()
        service.startService()
        try:
            self.assertFalse(gc.isenabled())
            clock.advance(1.0)
        finally:
            service.stopService()
        self.assertEqual(gc.isenabled(), wasEnabled)
