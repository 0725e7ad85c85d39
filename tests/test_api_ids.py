"""
The HTTP API accepts exactly the controller ids the protocol accepts.
"""

from __future__ import annotations

import json
from typing import Any, cast

from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.api import ApiResource
from ctrlgw.store.postgres import Store
from ctrlgw.web import Readiness, makeRoot, makeSite

TOKEN = "secret"
COMMAND_ID = "0b7c5a8e-2f41-4c55-9d0e-3a6f1f0c2b11"
NOT_AN_ID = {"error": "not a controller id"}


class FakeStore:
    """
    The two L{Store} calls these routes make, recorded.
    """

    def __init__(self) -> None:
        self.presenceAsked: list[str | None] = []
        self.sent: list[tuple[str, object, float]] = []

    async def presence(self, controller: str | None, limit: int = 1000) -> list[tuple[Any, ...]]:
        self.presenceAsked.append(controller)
        return []

    async def sendCommand(self, controller: str, body: object, ttl: float) -> str:
        self.sent.append((controller, body, ttl))
        return COMMAND_ID


class ControllerIdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = FakeStore()
        api = ApiResource(TOKEN, cast(Store, self.store))
        self.site = makeSite(makeRoot(CollectorRegistry(), Readiness(), api))

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
        """
        One HTTP/1.0 request through the real site and HTTP parser; the status and the
        JSON body of the answer.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        head = (
            f"{method} {path} HTTP/1.0\r\n"
            f"Authorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        channel.dataReceived(head.encode() + body)
        raw = transport.value()
        statusLine, _, rest = raw.partition(b"\r\n")
        _, _, payload = rest.partition(b"\r\n\r\n")
        return int(statusLine.split()[1]), json.loads(payload)

    def test_getWithTrailingNewline(self) -> None:
        """
        C{dev-1%0A} (the id C{"dev-1\\n"}) is refused with 400 and the documented error,
        and the store is never asked about it.
        """
        self.assertEqual(self.request("GET", "/v1/controllers/dev-1%0A"), (400, NOT_AN_ID))
        self.assertEqual(self.store.presenceAsked, [])

    def test_postWithTrailingNewline(self) -> None:
        """
        No command is written for C{dev-1%0A}.
        """
        self.assertEqual(
            self.request("POST", "/v1/controllers/dev-1%0A/commands", b'{"body": {"op": "blink"}}'),
            (400, NOT_AN_ID),
        )
        self.assertEqual(self.store.sent, [])

    def test_otherIdsTheProtocolRefuses(self) -> None:
        """
        Each id the protocol's pattern does not match in full is refused.
        """
        for path in ["dev-1%0D%0A", "dev%0A1", "%0Adev-1", "dev%201", "d" * 129]:
            self.assertEqual(self.request("GET", f"/v1/controllers/{path}"), (400, NOT_AN_ID), path)
        self.assertEqual(self.store.presenceAsked, [])

    def test_validIdServed(self) -> None:
        """
        The same routes serve a valid id: the refusals above are about the id alone.
        """
        self.assertEqual(
            self.request("GET", "/v1/controllers/dev-1"),
            (200, {"controller": "dev-1", "online": False, "known": False}),
        )
        status, body = self.request(
            "POST", "/v1/controllers/dev-1/commands", b'{"body": {"op": "blink"}}'
        )
        self.assertEqual((status, body["id"]), (201, COMMAND_ID))
        self.assertEqual(self.store.presenceAsked, ["dev-1"])
        self.assertEqual([s[:2] for s in self.store.sent], [("dev-1", {"op": "blink"})])


class CommandIdTests(SynchronousTestCase):
    setUp = ControllerIdTests.setUp
    request = ControllerIdTests.request

    def test_commandIdsPostgresWouldRefuse(self) -> None:
        """
        Ids Python's uuid.UUID takes but PostgreSQL's uuid does not (urn:uuid:, stray
        hyphens) are refused with 400 before they reach the database.
        """
        for path in [f"urn:uuid:{COMMAND_ID}", COMMAND_ID.replace("-", "")[:8] + "--" + COMMAND_ID[9:]]:
            self.assertEqual(
                self.request("GET", f"/v1/commands/{path}"), (400, {"error": "not a command id"}), path
            )
