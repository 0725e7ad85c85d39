"""
Backpressure on a real loopback socket: a controller with a small receive buffer that
stops reading.  The kernel's buffers fill, then Twisted's; the connection's writes pause;
commands claimed meanwhile are not written and go back to pending with the attempt undone;
once the controller reads again, every command is delivered, once each, in order.

(The L{StringTransport} tests in test_connection.py only simulate a full buffer.)
"""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import reactor

from ctrlgw.protocol.connection import ControllerProtocol
from tests.gateways import listenerPort, sample, sleep, startGateway, waitUntil
from tests.pg import PostgresTestCase
from tests.test_hostile import RawSocket, connectionOf, kernelQueued, report, userspaceBuffered

COMMANDS = 40
BODY = 30_000  # characters of padding: about 30 KB a frame, 1.2 MB in all
# The gateway side's kernel send buffer, set on the accepted socket: without it, loopback
# autotuning lets the kernel take 2-3 MB before Twisted's buffer fills, and the test would
# need that much more (and longer).
SNDBUF = 64 * 1024


class SlowReaderTests(PostgresTestCase):
    timeout = 120

    async def states(self) -> dict[str, int]:
        rows = await self.db.runQuery(
            "test", "SELECT state, count(*) FROM commands GROUP BY state"
        )
        return {state: int(n) for state, n in rows}

    async def test_fullBufferHoldsCommandsBack(self) -> None:
        """
        A controller with a 4 KiB receive buffer says hello and stops reading (the
        gateway's socket has a 64 KiB send buffer); 40 commands of 30 KB are sent.  What
        the kernel and Twisted's buffer take is written; then the connection's writes are
        paused, and the rest stay pending with no attempt counted, through several outbox
        polls.  Once it reads again, each command arrives
        exactly once, in the order sent, each on its first attempt, and its acks finish
        them all.
        """
        gateway = await startGateway(self, self.dsn, self.schema, "gw-slow", {
            "outbox": {"max_inflight": 1000, "ack_timeout": "60s", "poll_interval": "200ms"},
            "liveness": {"ping_interval": "30s", "idle_timeout": "90s"},
        })
        raw = RawSocket(listenerPort(gateway), rcvbuf=4096)
        self.addCleanup(raw.close)
        raw.send(b'{"type":"hello","ts":%d,"controller":"slow"}\n' % int(reactor.seconds() * 1000))
        await waitUntil(lambda: raw.frames(), 10, what="the welcome")
        self.assertEqual(raw.frames()[0]["type"], "welcome")
        connection: ControllerProtocol = connectionOf(gateway, "slow")
        handle: Any = connection.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        raw.received = b""

        # From here on the controller reads nothing.
        rows = await self.db.runQuery(
            "test",
            "SELECT id::text FROM send_many(%s::text[], %s::jsonb[], interval '60 seconds') AS id",
            (["slow"] * COMMANDS,
             [json.dumps({"n": n, "pad": "x" * BODY}) for n in range(COMMANDS)]),
        )
        ids = [r[0] for r in rows]
        await waitUntil(lambda: connection.writesPaused, 20, what="the writes to pause")

        def pollClaims() -> int:
            return sum(int(sample(gateway, "ctrlgw_command_claims_total", {"source": "poll", "result": r}))
                       for r in ("found", "empty"))

        # Positive events before the negative check: the outbox polls (and claims) a few
        # times while the writes stay paused, and each claim's commands go back to pending.
        polls = {"query": "outbox_due"}
        before = sample(gateway, "ctrlgw_db_query_seconds_count", polls)
        await waitUntil(
            lambda: sample(gateway, "ctrlgw_db_query_seconds_count", polls) >= before + 3,
            10, what="three outbox polls",
        )
        self.assertTrue(connection.writesPaused, "the writes resumed though nothing was read")
        written = int(sample(gateway, "ctrlgw_frames_out_total", {"type": "cmd"}))
        self.assertGreater(written, 0)
        self.assertLess(written, COMMANDS, "every command fitted: the buffer never filled")
        # What was written shows as sent and the rest pending, with no attempt counted.
        expected = {"sent": written, "pending": COMMANDS - written}
        states: dict[str, int] = {}
        deadline = reactor.seconds() + 5
        while states != expected:
            self.assertLess(reactor.seconds(), deadline, f"{states}, not {expected}")
            states = await self.states()
        attempts = await self.db.runQuery(
            "test", "SELECT max(attempts) FROM commands WHERE state = 'pending'"
        )
        self.assertEqual(attempts, [(0,)])
        self.assertTrue(connection.writesPaused)
        self.assertEqual(sample(gateway, "ctrlgw_frames_out_total", {"type": "cmd"}), written)
        buffered, queued = userspaceBuffered(connection), kernelQueued(connection)
        self.assertLessEqual(buffered, 65536 + BODY + 1024)
        # A connection that has stopped reading is not claimed for: the polls above left it
        # alone.  (Once it reads again, a poll may claim for it like any other.)
        self.assertEqual(pollClaims(), 0)

        # The controller reads again, with a larger buffer: the rest follow as the buffers
        # drain.
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        resumed = reactor.seconds()

        def cmds() -> list[str]:
            raw.read()
            return [f["id"] for f in raw.frames() if f.get("type") == "cmd"]

        while len(cmds()) < COMMANDS:
            self.assertLess(reactor.seconds() - resumed, 30, f"{len(cmds())} of {COMMANDS} arrived")
            await sleep(0.002)
        drained = reactor.seconds() - resumed
        self.assertEqual(cmds(), ids)
        self.assertEqual(await self.states(), {"sent": COMMANDS})
        self.assertEqual(
            await self.db.runQuery("test", "SELECT DISTINCT attempts FROM commands"), [(1,)]
        )
        self.assertEqual(sample(gateway, "ctrlgw_command_retries_total"), 0)
        self.assertFalse(connection.writesPaused)

        acks = b"".join(
            b'{"type":"ack","ref":"%s","ts":%d}\n' % (i.encode(), int(reactor.seconds() * 1000))
            for i in ids
        )
        await raw.sendAll(acks)
        await waitUntil(
            lambda: sample(gateway, "ctrlgw_commands_finished_total", {"state": "acked"})
            == COMMANDS, 10, what="every ack settled",
        )
        self.assertEqual(await self.states(), {"acked": COMMANDS})
        claims = {
            f"{source}_{result}": int(sample(gateway, "ctrlgw_command_claims_total",
                                             {"source": source, "result": result}))
            for source in ("poll", "connect") for result in ("found", "empty")
        }
        report("slow reader", commands=COMMANDS, frame_bytes=BODY + 100,
               written_before_pause=written, twisted_buffer=buffered, kernel_queue=queued,
               **claims, all_delivered_after_read_s=drained)
