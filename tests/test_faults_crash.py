"""
A gateway instance (a real C{twistd}) is killed with SIGKILL while it holds live
controllers and commands written to them but not acked.  The controllers reconnect to
another instance, the in-flight commands are delivered again with the same ids, and no
session counts as owned by the dead instance past C{[cluster] instance_ttl}.  The test
prints what it measured (a C{FIGURES ...} line).
"""

from __future__ import annotations

import json
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.dbfaults import Device, TwistdGateway, deliveryFigures, httpGet, inboxCounts, query
from tests.gateways import connectController, sleep, waitUntil
from tests.helpers import deferred
from tests.pg import PostgresTestCase

TOKEN = "crash-test-token"
INSTANCE_TTL = 3.0


class InstanceCrashTests(PostgresTestCase):
    timeout = 180

    @deferred
    async def test_killNineWithCommandsInFlight(self) -> None:
        sections: dict[str, dict[str, object]] = {
            "cluster": {"heartbeat_interval": "1s", "instance_ttl": f"{INSTANCE_TTL:g}s",
                        "reconcile_interval": "1s"},
            "http": {"api_token": TOKEN},
            # Written commands stay unanswered (sent) until the crash, not re-sent meanwhile.
            "outbox": {"ack_timeout": "60s", "poll_interval": "200ms"},
        }
        a = await TwistdGateway.start(self, self.dsn, self.schema, "gw-a", sections)
        b = await TwistdGateway.start(self, self.dsn, self.schema, "gw-b", sections)
        devices = [Device(f"dev-{i}", [a.port, b.port], rate=10, autoAck=False)
                   for i in range(6)]
        for device in devices:
            device.start()
        self.addCleanup(self.stopDevices, devices)
        # And one device that dies with the instance: it never reconnects.
        silent = await connectController(a.port)
        self.addCleanup(silent.close)
        await silent.hello("dev-silent")
        await waitUntil(lambda: all(d.online and d.port == a.port for d in devices), 30,
                        what="every device welcomed on gw-a")

        controllers = [d.controller for d in devices] + ["dev-silent"]
        rows = await deferToThread(
            query, self.dsn,
            f'SELECT * FROM "{self.schema}".send_many(%s, %s::jsonb[], interval \'60 seconds\')',
            (controllers, [json.dumps({"op": "reboot"})] * len(controllers)),
        )
        ids = {c: str(r[0]) for c, r in zip(controllers, rows, strict=True)}
        await waitUntil(lambda: all(ids[d.controller] in d.commandIds() for d in devices), 30,
                        what="every command written")
        await silent.waitFor("cmd")
        sent = await deferToThread(
            query, self.dsn,
            f'SELECT count(*) FROM "{self.schema}".commands WHERE state = \'sent\'',
        )
        self.assertEqual(sent, [(len(controllers),)])
        await waitUntil(lambda: all(len(d.acked) >= 5 for d in devices), 30,
                        what="messages acked on gw-a")
        # From now on the devices answer what they get (the re-deliveries).
        for device in devices:
            device.autoAck = True

        killed = reactor.seconds()
        a.child.signal(signal.SIGKILL)
        exitCode = await a.child.waitForExit(30)
        self.assertEqual(exitCode, (None, signal.SIGKILL))

        def welcomedOnB(d: Device) -> bool:
            return any(port == b.port and at >= killed for port, at in d.welcomes)

        await waitUntil(lambda: all(welcomedOnB(d) for d in devices), 30,
                        what="every device reconnected to gw-b")
        reconnected = reactor.seconds() - killed
        await waitUntil(lambda: all(d.commandIds().count(ids[d.controller]) >= 2 for d in devices),
                        30, what="every in-flight command delivered again")
        redelivered = reactor.seconds() - killed

        async def presence(controller: str) -> dict[str, Any]:
            code, body = await httpGet(b.http, f"/v1/controllers/{controller}", token=TOKEN)
            self.assertEqual(code, 200, body)
            return dict(body)

        # The silent device's session still names the dead instance in its row, but
        # presence stops counting it within instance_ttl of the last heartbeat.
        while (await presence("dev-silent"))["online"]:
            self.assertLess(reactor.seconds() - killed, INSTANCE_TTL + 3,
                            "presence still shows a session of the dead instance")
            await sleep(0.05)
        offline = reactor.seconds() - killed
        code, listing = await httpGet(b.http, "/v1/controllers", token=TOKEN)
        self.assertEqual(code, 200)
        ownedByDead = [c for c in listing["controllers"] if c["instance"] == "gw-a" and c["online"]]
        self.assertEqual(ownedByDead, [])
        for device in devices:
            info = await presence(device.controller)
            self.assertEqual((info["online"], info["instance"]), (True, "gw-b"), info)
        # The row itself: the live instance's heartbeat takes it offline once the dead
        # one's heartbeat is older than instance_ttl.
        while True:
            table = await deferToThread(
                query, self.dsn,
                f'SELECT controller_id, instance_id, online, disconnect_reason'
                f' FROM "{self.schema}".sessions ORDER BY 1',
            )
            silentRow = next(r for r in table if r[0] == "dev-silent")
            if not silentRow[2]:
                break
            self.assertLess(reactor.seconds() - killed, INSTANCE_TTL + 3,
                            f"the dead instance still owns {silentRow}")
            await sleep(0.05)
        rowOffline = reactor.seconds() - killed
        self.assertEqual(silentRow[3], "instance_dead")

        # The re-delivered commands are acked on gw-b; the silent device's waits.
        states: list[tuple[Any, ...]] = []
        deadline = reactor.seconds() + 30
        while True:
            states = await deferToThread(
                query, self.dsn,
                f'SELECT controller_id, state, attempts FROM "{self.schema}".commands ORDER BY 1',
            )
            if all(s == "acked" for c, s, _ in states if c != "dev-silent"):
                break
            self.assertLess(reactor.seconds(), deadline, f"not acked: {states}")
            await sleep(0.1)
        for device in devices:
            await device.stop()
        counts = await deferToThread(inboxCounts, self.dsn, self.schema)
        delivery = deliveryFigures(devices, counts)
        result = {
            "devices": len(devices),
            "in_flight_commands": len(controllers),
            "reconnected_all_s": round(reconnected, 2),
            "redelivered_all_s": round(redelivered, 2),
            "dead_session_offline_in_presence_s": round(offline, 2),
            "dead_session_row_offline_s": round(rowOffline, 2),
            "instance_ttl_s": INSTANCE_TTL,
            "sessions_rows": [list(r) for r in table],
            "command_states": [list(r) for r in states],
            **delivery,
        }
        print(f"\nFIGURES instance-kill-9: {json.dumps(result, sort_keys=True)}")
        self.assertEqual({r[1] for r in table if r[0] != "dev-silent"}, {"gw-b"}, result)
        # Same ids, delivered on the new session: one more send each.
        self.assertEqual({c: n for c, _, n in states if c != "dev-silent"},
                         {d.controller: 2 for d in devices}, result)
        self.assertEqual(delivery["lost"], 0, result)
        self.assertEqual(delivery["duplicates"], 0, result)
        await b.stop()

    async def stopDevices(self, devices: list[Device]) -> None:
        for device in devices:
            await device.stop()
