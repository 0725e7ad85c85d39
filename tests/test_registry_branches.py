"""
Branches of L{ctrlgw.registry.ConnectionRegistry} that C{test_registry.py} leaves open:
an epoch announced elsewhere beats a claim that completes here later (and only a lower
epoch), and the announcements remembered are bounded, the oldest forgotten first.

These run in C{make mutate} against C{ctrlgw/registry.py}, with C{test_registry.py}.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.interfaces import Session
from ctrlgw.registry import ConnectionRegistry


@dataclass(eq=False)
class Connection:
    session: Session | None


def connection(controller: str, epoch: int) -> Connection:
    return Connection(Session(controller, f"{controller}-{epoch}", epoch, "gw-1"))


class AnnouncedTests(SynchronousTestCase):
    def test_announcedBeatsLaterBind(self) -> None:
        """
        A claim that completes here after a newer epoch was announced elsewhere loses at
        once: it is returned as the loser and not bound.
        """
        registry = ConnectionRegistry()
        self.assertIsNone(registry.supersededBy("a", 5))
        late = connection("a", 3)
        self.assertIs(registry.bind(late), late)
        self.assertIsNone(registry.lookup("a"))

    def test_announcedSameEpochBinds(self) -> None:
        """
        The announcement of the very session being bound (our own claim's notification
        arriving first) does not refuse it.
        """
        registry = ConnectionRegistry()
        registry.supersededBy("a", 3)
        own = connection("a", 3)
        self.assertIsNone(registry.bind(own))
        self.assertIs(registry.lookup("a"), own)

    def test_olderAnnouncementKeepsNewer(self) -> None:
        registry = ConnectionRegistry()
        registry.supersededBy("a", 5)
        registry.supersededBy("a", 4)
        late = connection("a", 4)
        self.assertIs(registry.bind(late), late)

    def test_supersededReturnsLower(self) -> None:
        registry = ConnectionRegistry()
        bound = connection("a", 3)
        registry.bind(bound)
        self.assertIsNone(registry.supersededBy("a", 3))
        self.assertIs(registry.supersededBy("a", 4), bound)

    def test_rememberedBounded(self) -> None:
        """
        At most C{rememberSuperseded} announcements are kept; the oldest goes first.
        """
        registry = ConnectionRegistry(rememberSuperseded=2)
        registry.supersededBy("a", 5)
        registry.supersededBy("b", 5)
        # Both remembered.
        self.assertIsNotNone(registry.bind(connection("a", 1)))
        self.assertIsNotNone(registry.bind(connection("b", 1)))
        registry.supersededBy("c", 5)
        # a forgotten: a late claim of it binds; b and c are still remembered.
        self.assertIsNone(registry.bind(connection("a", 1)))
        self.assertIsNotNone(registry.bind(connection("b", 1)))
        self.assertIsNotNone(registry.bind(connection("c", 1)))

    def test_reannouncedMovesToEnd(self) -> None:
        """
        A newer announcement of a controller counts as the most recent.
        """
        registry = ConnectionRegistry(rememberSuperseded=2)
        registry.supersededBy("a", 5)
        registry.supersededBy("b", 5)
        registry.supersededBy("a", 6)
        registry.supersededBy("c", 5)
        self.assertIsNone(registry.bind(connection("b", 1)))
        self.assertIsNotNone(registry.bind(connection("a", 1)))
