"""
Tests for L{ctrlgw.registry.ConnectionRegistry}.
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


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = ConnectionRegistry()

    def test_empty(self) -> None:
        self.assertIsNone(self.registry.lookup("c1"))
        self.assertEqual(len(self.registry), 0)
        self.assertEqual(list(self.registry), [])

    def test_bind(self) -> None:
        first = connection("c1", 1)
        self.assertIsNone(self.registry.bind(first))
        self.assertIs(self.registry.lookup("c1"), first)
        self.assertIsNone(self.registry.lookup("c2"))
        self.assertEqual(len(self.registry), 1)

    def test_bindTwiceIsNoTakeover(self) -> None:
        first = connection("c1", 1)
        self.registry.bind(first)
        self.assertIsNone(self.registry.bind(first))
        self.assertIs(self.registry.lookup("c1"), first)

    def test_controllersIndependent(self) -> None:
        a, b = connection("a", 1), connection("b", 1)
        self.assertIsNone(self.registry.bind(a))
        self.assertIsNone(self.registry.bind(b))
        self.assertIs(self.registry.lookup("a"), a)
        self.assertIs(self.registry.lookup("b"), b)
        self.assertEqual(set(map(id, self.registry)), {id(a), id(b)})
        self.assertTrue(self.registry.unbind(a))
        self.assertIs(self.registry.lookup("b"), b)

    def test_newerEpochTakesOver(self) -> None:
        old, new = connection("c1", 1), connection("c1", 2)
        self.registry.bind(old)
        self.assertIs(self.registry.bind(new), old)
        self.assertIs(self.registry.lookup("c1"), new)
        self.assertEqual(len(self.registry), 1)

    def test_outOfOrderBind(self) -> None:
        """
        A claim that began earlier (lower epoch) but completed later loses: it is returned
        as the loser and the registered newer connection stays.
        """
        new, late = connection("c1", 5), connection("c1", 4)
        self.registry.bind(new)
        self.assertIs(self.registry.bind(late), late)
        self.assertIs(self.registry.lookup("c1"), new)
        self.assertFalse(self.registry.unbind(late))
        self.assertIs(self.registry.lookup("c1"), new)

    def test_unbind(self) -> None:
        first = connection("c1", 1)
        self.registry.bind(first)
        self.assertTrue(self.registry.unbind(first))
        self.assertIsNone(self.registry.lookup("c1"))
        self.assertEqual(len(self.registry), 0)
        self.assertFalse(self.registry.unbind(first))

    def test_lateUnbindOfSuperseded(self) -> None:
        """
        The loss of a superseded connection reported after its successor was bound leaves
        the successor registered.
        """
        old, new = connection("c1", 1), connection("c1", 2)
        self.registry.bind(old)
        self.registry.bind(new)
        self.assertFalse(self.registry.unbind(old))
        self.assertIs(self.registry.lookup("c1"), new)
        self.assertTrue(self.registry.unbind(new))
        self.assertIsNone(self.registry.lookup("c1"))

    def test_unbindSameEpochOtherConnection(self) -> None:
        """
        Only the registered object itself is unbound, not another with an equal session.
        """
        registered = connection("c1", 3)
        twin = Connection(registered.session)
        self.registry.bind(registered)
        self.assertFalse(self.registry.unbind(twin))
        self.assertIs(self.registry.lookup("c1"), registered)

    def test_unbindWithoutSession(self) -> None:
        self.registry.bind(connection("c1", 1))
        self.assertFalse(self.registry.unbind(Connection(None)))
        self.assertEqual(len(self.registry), 1)

    def test_supersededBy(self) -> None:
        current = connection("c1", 3)
        self.registry.bind(current)
        self.assertIs(self.registry.supersededBy("c1", 4), current)
        self.assertIsNone(self.registry.supersededBy("c1", 3))
        self.assertIsNone(self.registry.supersededBy("c1", 2))
        self.assertIsNone(self.registry.supersededBy("c2", 9))

    def test_iterationIsASnapshot(self) -> None:
        """
        Connections can be unbound while iterating (as shutdown does).
        """
        connections = [connection(f"c{i}", 1) for i in range(5)]
        for c in connections:
            self.registry.bind(c)
        for registered in self.registry:
            self.registry.unbind(registered)
        self.assertEqual(len(self.registry), 0)
