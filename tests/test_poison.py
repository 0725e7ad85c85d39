"""
One bad input must not jam an instance: a row the database rejects is isolated by every
batch writer, an ack whose ref the database could not read never reaches a batch, and a
claimed command the gateway cannot handle is reported back instead of stranding its batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg2
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.batching import BatchWriter
from ctrlgw.interfaces import Rejected
from ctrlgw.protocol.messages import COMMAND_ID, RawJSON, encode
from ctrlgw.store.postgres import rejectsRow
from tests.gateways import (
    LineController,
    connectController,
    listenerPort,
    sample,
    startGateway,
    waitUntil,
)
from tests.pg import PostgresTestCase

# More digits than Python's int() takes by default (4300): jsonb stores it, json refuses it.
HUGE_DIGITS = b"9" * 5000


class BatchIsolationTests(SynchronousTestCase):
    def writer(self, flushed: list[list[int]], rejected: list[int]) -> tuple[Clock, BatchWriter[int]]:
        clock = Clock()

        def flush(items: Sequence[int]) -> Deferred[Sequence[object]]:
            flushed.append(list(items))
            if 13 in items:
                raise psycopg2.DataError("invalid input syntax for type uuid: \"13\"")
            return Deferred.fromCoroutine(_results(items))

        async def _results(items: Sequence[int]) -> Sequence[object]:
            return [f"ok {i}" for i in items]

        writer: BatchWriter[int] = BatchWriter(
            clock, flush, batchSize=8, interval=0.01, maxBuffered=100,
            isolate=rejectsRow, onRejected=lambda: rejected.append(1),
        )
        return clock, writer

    def test_rejectedRowFailsAlone(self) -> None:
        """
        A batch the database refuses for one row is halved until that row is alone: it
        fails with Rejected, every other row is written, and nothing is retried.
        """
        flushed: list[list[int]] = []
        rejected: list[int] = []
        clock, writer = self.writer(flushed, rejected)
        results: dict[int, object] = {}
        for i in range(10, 18):
            writer.add(i).addBoth(lambda r, i=i: results.__setitem__(i, r))
        self.assertEqual(set(results), set(range(10, 18)))
        failure = results.pop(13)
        assert isinstance(failure, Failure)
        self.assertIsInstance(failure.value, Rejected)
        self.assertIn("uuid", str(failure.value))
        self.assertEqual(results, {i: f"ok {i}" for i in range(10, 18) if i != 13})
        self.assertEqual(rejected, [1])
        self.assertEqual(len(writer), 0)
        # No retry pending: the clock has nothing to run.
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIn([13], flushed)

    def test_otherErrorsRetryTheWholeBatch(self) -> None:
        """
        An error that is not about a row's content (the database went away) keeps the
        whole batch, unconfirmed, for a retry.
        """
        clock = Clock()
        calls: list[int] = []

        async def flush(items: Sequence[int]) -> Sequence[object]:
            calls.append(len(items))
            if len(calls) == 1:
                raise psycopg2.OperationalError("server closed the connection")
            return [None] * len(items)

        writer: BatchWriter[int] = BatchWriter(
            clock, flush, batchSize=4, interval=0.01, maxBuffered=100, isolate=rejectsRow
        )
        done: list[object] = []
        for i in range(4):
            writer.add(i).addCallback(done.append)
        self.assertEqual((calls, done), ([4], []))
        clock.advance(1)
        self.assertEqual((calls, done), ([4, 4], [None] * 4))


class CommandIdTests(PostgresTestCase):
    def test_pythonAcceptsWhatPostgresRefuses(self) -> None:
        """
        The refs that broke settlement: uuid.UUID takes them, PostgreSQL's uuid does not.
        COMMAND_ID refuses every one of them.
        """
        canonical = str(uuid.uuid4())
        for ref in (f"urn:uuid:{canonical}", canonical.replace("-", "")[:8] + "--" + canonical[9:]):
            uuid.UUID(ref)  # Python is happy
            self.assertIsNone(COMMAND_ID.fullmatch(ref), ref)
        self.assertIsNotNone(COMMAND_ID.fullmatch(canonical))
        self.assertIsNotNone(COMMAND_ID.fullmatch(canonical.upper()))

    @given(st.text(alphabet="0123456789abcdefABCDEF-{}urn:", max_size=45) | st.uuids().map(str))
    @settings(max_examples=300, deadline=None)
    def test_matchesOnlyWhatPostgresReads(self, ref: str) -> None:
        """
        Whatever COMMAND_ID accepts, PostgreSQL's uuid input accepts too (so a settlement
        batch can never fail on a ref).
        """
        if not COMMAND_ID.fullmatch(ref):
            return
        connection = psycopg2.connect(self.dsn)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT %s::uuid::text", (ref,))
                self.assertEqual(cursor.fetchone()[0], ref.lower())
        finally:
            connection.close()


class RawBodyTests(SynchronousTestCase):
    def test_rawJsonGoesInAsItIs(self) -> None:
        frame = encode("cmd", 5, id="x", expires=9, body=RawJSON('{"n": ' + "9" * 5000 + "}"))
        self.assertTrue(frame.startswith(b'{"type":"cmd","ts":5,"id":"x","expires":9,"body":{"n": 999'))
        self.assertTrue(frame.endswith(b"999}}"))


class RawController(LineController):
    """
    Keeps the raw bytes it receives; the frame parser sees huge numbers as 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw = b""

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        super().dataReceived(data.replace(HUGE_DIGITS, b"0"))


class PoisonEndToEndTests(PostgresTestCase):
    timeout = 60

    async def _gateway(self):  # type: ignore[no-untyped-def]
        return await startGateway(self, self.dsn, self.schema, "gw-p", {"outbox": {"poll_interval": "200ms"}})

    async def _send(self, controllers: list[str], bodies: list[str]) -> list[str]:
        rows = await self.db.runQuery(
            "test", "SELECT id::text FROM send_many(%s::text[], %s::jsonb[]) AS id",
            (controllers, bodies),
        )
        return [r[0] for r in rows]

    async def test_badRefDoesNotJamSettlements(self) -> None:
        """
        An ack whose ref uuid.UUID accepts but PostgreSQL refuses (urn:uuid:...) does not
        hold up the acks after it: the valid one settles.
        """
        gateway = await self._gateway()
        client = await connectController(listenerPort(gateway))
        self.addCleanup(client.close)
        await client.hello("c-1")
        (command,) = await self._send(["c-1"], ['{"op": 1}'])
        await client.waitFor("cmd", id=command)
        client.send({"type": "ack", "ref": f"urn:uuid:{command}"})
        client.send({"type": "ack", "ref": command})
        await waitUntil(lambda: sample(gateway, "ctrlgw_commands_finished_total", {"state": "acked"}) == 1,
                        10, what="the valid ack settled")
        rows = await self.db.runQuery("test", "SELECT state FROM commands WHERE id = %s", (command,))
        self.assertEqual(rows, [("acked",)])

    async def test_settlementWriterIsolatesRejectedRow(self) -> None:
        """
        A settlement row the database refuses fails alone; the rest of its batch settles.
        """
        gateway = await self._gateway()
        client = await connectController(listenerPort(gateway))
        self.addCleanup(client.close)
        welcome = await client.hello("c-1")
        (command,) = await self._send(["c-1"], ['{"op": 1}'])
        await client.waitFor("cmd", id=command)
        writer = gateway.outbox._settlements
        bad = writer.add(("not-a-uuid", "c-1", welcome["epoch"], True, ""))
        good = writer.add((command, "c-1", welcome["epoch"], True, ""))
        outcomes: list[object] = []
        bad.addBoth(outcomes.append)
        await good
        self.assertEqual(len(outcomes), 1)
        assert isinstance(outcomes[0], Failure)
        self.assertIsInstance(outcomes[0].value, Rejected)
        rows = await self.db.runQuery("test", "SELECT state FROM commands WHERE id = %s", (command,))
        self.assertEqual(rows, [("acked",)])
        self.assertEqual(sample(gateway, "ctrlgw_rows_rejected_total", {"writer": "settlements"}), 1)

    async def test_undecodableBodyDoesNotStrandItsClaim(self) -> None:
        """
        A body jsonb stores and Python's json refuses (an integer of 5,000 digits) is
        written as jsonb prints it, and the other command claimed in the same round is
        written too: nothing claimed is stranded as 'sent' with nothing written.
        """
        gateway = await self._gateway()
        huge = RawController()
        other = await connectController(listenerPort(gateway))
        self.addCleanup(other.close)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listenerPort(gateway)), huge)
        self.addCleanup(huge.close)
        await huge.hello("c-huge")
        await other.hello("c-other")
        hugeId, otherId = await self._send(
            ["c-huge", "c-other"], ['{"n": ' + HUGE_DIGITS.decode() + "}", '{"op": "x"}']
        )
        await other.waitFor("cmd", id=otherId)
        await huge.waitFor("cmd", id=hugeId)
        self.assertIn(b'"body":{"n": ' + HUGE_DIGITS + b"}}", huge.raw)
        states = dict(await self.db.runQuery("test", "SELECT id::text, state FROM commands"))
        self.assertEqual(states, {hugeId: "sent", otherId: "sent"})

